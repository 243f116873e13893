//! Network namespace handles.
//!
//! A namespace is entered per *thread* (`setns(2)`), so everything here works on the calling
//! thread only and always returns it to where it was. Named namespaces live where iproute2 keeps
//! them (`/run/netns/<name>`, a bind mount of the namespace file), so `ip netns exec` and
//! `nsenter --net=` see exactly what flatnet made, and the other way round.

pub mod measure;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub const NETNS_RUN_DIR: &str = "/run/netns";

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    pub fn open(path: impl AsRef<Path>) -> io::Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Ok(NetNs { file, path })
    }

    /// The calling thread's own namespace.
    pub fn current() -> io::Result<NetNs> {
        NetNs::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Moves the calling thread into this namespace for good.
    pub fn enter(&self) -> io::Result<()> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }

    /// Runs `f` with the calling thread inside this namespace, then moves it back. Sockets opened
    /// by `f` stay bound to this namespace, which is how one process talks netlink to several.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = NetNs::current()?;
        self.enter()?;
        let out = f();
        home.enter()
            .expect("returning to the original network namespace");
        Ok(out)
    }
}

/// `/run/netns/<name>`.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Creates `/run/netns/<name>` like `ip netns add`: a fresh namespace bind-mounted there, with the
/// directory made a shared mount so other mount namespaces see it too.
pub fn create_named(name: &str) -> io::Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad namespace name {name:?}"),
        ));
    }
    std::fs::create_dir_all(NETNS_RUN_DIR)?;
    make_run_dir_shared()?;
    let path = named_path(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .expect("namespace thread");
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

fn make_run_dir_shared() -> io::Result<()> {
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(
        None::<&str>,
        NETNS_RUN_DIR,
        None::<&str>,
        shared,
        None::<&str>,
    )
    .is_ok()
    {
        return Ok(());
    }
    // Not a mount point yet: bind it onto itself first, as iproute2 does.
    mount(
        Some(NETNS_RUN_DIR),
        NETNS_RUN_DIR,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        NETNS_RUN_DIR,
        None::<&str>,
        shared,
        None::<&str>,
    )?;
    Ok(())
}

/// Removes `/run/netns/<name>` like `ip netns del`; absent is fine.
pub fn delete_named(name: &str) -> io::Result<()> {
    let path = named_path(name);
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A named namespace that is removed when dropped (also when a test panics). Names are unique per
/// process and carry the pid, so parallel tests and parallel runs never share one.
#[derive(Debug)]
pub struct TempNetNs {
    name: String,
    ns: NetNs,
}

impl TempNetNs {
    pub fn new(prefix: &str) -> io::Result<TempNetNs> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = create_named(&name)?;
        let ns = NetNs::open(&path)?;
        Ok(TempNetNs { name, ns })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        self.ns.path()
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Runs `ip -n NAME ARGS…` (iproute2) in this namespace; the error carries its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip -n {} {args:?}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for TempNetNs {
    fn drop(&mut self) {
        let _ = delete_named(&self.name);
    }
}

/// Whether this process may create namespaces (root tests skip, loudly, otherwise).
pub fn can_create() -> bool {
    nix::unistd::geteuid().is_root()
}
