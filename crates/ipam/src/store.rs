//! The lease directory: one file per address, host-local's layout, atomic and locked.

use crate::io;
use cni_spec::error::CniError;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub struct Store {
    dir: PathBuf,
}

/// One held address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: IpAddr,
    pub container_id: String,
    /// Absent in leases written by host-local before it recorded interface names.
    pub ifname: Option<String>,
}

impl Store {
    /// Opens `<data_dir>/<network>` (created on first use) and holds its exclusive lock until
    /// the returned guard drops. The network name was validated by the caller to the spec's
    /// name rules, so it cannot climb out of `data_dir`.
    pub fn open_locked(data_dir: &Path, network: &str) -> Result<(Store, Flock<File>), CniError> {
        debug_assert!(cni_spec::env::is_valid_name(network));
        let store = Store {
            dir: data_dir.join(network),
        };
        let path = store.dir.join("lock");
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        };
        // The directory exists on every call but the first: try the lock file first.
        let f = match open() {
            Err(e) if e.kind() == ErrorKind::NotFound => fs::create_dir_all(&store.dir)
                .map_err(|e| {
                    io(
                        format!("creating lease directory {}", store.dir.display()),
                        e,
                    )
                })
                .and_then(|()| open().map_err(|e| io(format!("opening {}", path.display()), e))),
            other => other.map_err(|e| io(format!("opening {}", path.display()), e)),
        }?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io(format!("locking {}", path.display()), errno.into()))?;
        Ok((store, lock))
    }

    fn lease_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    pub fn is_taken(&self, ip: IpAddr) -> bool {
        self.lease_path(ip).exists()
    }

    /// Takes `ip` for the attachment if free: the lease is written beside and hard-linked into
    /// place, so it appears whole or not at all, and the link fails if the address is taken.
    pub fn reserve(&self, ip: IpAddr, container_id: &str, ifname: &str) -> Result<bool, CniError> {
        let target = self.lease_path(ip);
        let tmp = self.dir.join(format!(".tmp-{ip}-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(format!("{container_id}\r\n{ifname}").as_bytes())
        };
        write().map_err(|e| io(format!("writing lease {}", tmp.display()), e))?;
        let linked = fs::hard_link(&tmp, &target);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io(format!("creating lease {}", target.display()), e)),
        }
    }

    pub fn release_ip(&self, ip: IpAddr) -> Result<(), CniError> {
        match fs::remove_file(self.lease_path(ip)) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(io(format!("removing lease for {ip}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Every lease in the directory (stray temporary files are removed on the way).
    pub fn leases(&self) -> Result<Vec<Lease>, CniError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| io(format!("listing {}", self.dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            let Ok(text) = fs::read_to_string(entry.path()) else {
                continue;
            };
            let mut lines = text.lines().map(str::trim);
            let container_id = lines.next().unwrap_or_default().to_string();
            let ifname = lines.next().filter(|s| !s.is_empty()).map(str::to_string);
            out.push(Lease {
                ip,
                container_id,
                ifname,
            });
        }
        Ok(out)
    }

    /// The addresses an attachment holds.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        Ok(self
            .leases()?
            .into_iter()
            .filter(|l| {
                l.container_id == container_id && l.ifname.as_deref().is_none_or(|n| n == ifname)
            })
            .map(|l| l.ip)
            .collect())
    }

    pub fn last_reserved(&self, set: usize) -> Result<Option<IpAddr>, CniError> {
        match fs::read_to_string(self.dir.join(format!("last_reserved_ip.{set}"))) {
            Ok(s) => Ok(s.trim().parse().ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading last_reserved_ip", e)),
        }
    }

    /// Records where the next search starts. The file is only a hint (a torn or missing one
    /// restarts the search at the range start), so it is overwritten in place: replacing it by
    /// rename or truncation makes ext4 flush it (auto_da_alloc), which cost more than the rest
    /// of the allocation.
    pub fn set_last_reserved(&self, set: usize, ip: IpAddr) -> Result<(), CniError> {
        let path = self.dir.join(format!("last_reserved_ip.{set}"));
        let text = ip.to_string();
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            f.write_all(text.as_bytes())?;
            f.set_len(text.len() as u64)
        };
        write().map_err(|e| io(format!("writing {}", path.display()), e))
    }
}
