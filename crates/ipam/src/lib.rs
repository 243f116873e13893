//! IP address management compatible with the reference `host-local` plugin.
//!
//! A network's addresses come from *range sets*: each set yields one address per attachment, so a
//! dual-stack pod gets one IPv4 and one IPv6 address from two sets. Allocation walks a set
//! round-robin from the address handed out last (recorded in `last_reserved_ip.<set>`), so a freed
//! address is not reused at once: a conntrack entry or a peer's ARP cache still pointing at the old
//! pod has time to expire.
//!
//! Leases live on disk exactly where and how host-local keeps them — one file per address under
//! `<dataDir>/<network>/`, holding `containerID\r\nifname` — so a node can switch between the two
//! plugins without losing track of an address. What flatnet adds: every lease file appears
//! atomically (written beside, then hard-linked into place, which also fails if the address is
//! taken), every operation holds an exclusive `flock` on `<dir>/lock`, and file names are only
//! ever formatted addresses, never caller-supplied strings, so no input can write outside the dir.
//!
//! No fsync: leases describe attachments to network namespaces, which do not survive a reboot, and
//! the page cache is coherent between processes. A lease lost to a power cut names a pod that is
//! gone too; runtimes reconcile the rest with GC.

pub mod config;
pub mod range;
pub mod resolv;
pub mod store;

pub use config::IpamConfig;
pub use range::{Range, RangeSet};
pub use store::{Lease, Store};

use cni_spec::error::{io_error, CniError, ErrorCode};
use cni_spec::{CniResult, IpConfig};
use std::net::IpAddr;

/// Who is asking: the attachment and anything it asked for by name.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub container_id: String,
    pub ifname: String,
    /// Static addresses (runtimeConfig.ips, args.cni.ips or CNI_ARGS IP=), each inside one set.
    pub requested: Vec<IpAddr>,
}

/// Reserves one address per range set for the attachment; all or nothing.
pub fn allocate(cfg: &IpamConfig, req: &Request) -> Result<CniResult, CniError> {
    let (store, _lock) = Store::open_locked(&cfg.data_dir, &cfg.network)?;
    let mut requested = req.requested.clone();
    let mut reserved: Vec<IpAddr> = Vec::new();
    let result = (|| {
        let mut ips = Vec::new();
        let already = store.find(&req.container_id, &req.ifname)?;
        for (idx, set) in cfg.ranges.iter().enumerate() {
            if let Some(ip) = already.iter().find(|ip| set.contains(**ip)) {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    format!(
                        "{} already holds {ip} in network {:?}",
                        attachment(req),
                        cfg.network
                    ),
                )
                .with_details("a second ADD needs a DEL first"));
            }
            let wanted = requested
                .iter()
                .position(|ip| set.contains(*ip))
                .map(|i| requested.remove(i));
            let (ip, range) = match wanted {
                Some(ip) => {
                    let range = set.range_of(ip).expect("contained");
                    if range.gateway == Some(ip)
                        || !store.reserve(ip, &req.container_id, &req.ifname)?
                    {
                        return Err(CniError::new(
                            ErrorCode::InvalidConfig,
                            format!(
                                "requested address {ip} is not available in network {:?}",
                                cfg.network
                            ),
                        ));
                    }
                    (ip, range)
                }
                None => {
                    let last = store.last_reserved(idx)?;
                    let mut found = None;
                    for (ip, range) in set.iter_from(last) {
                        if store.reserve(ip, &req.container_id, &req.ifname)? {
                            found = Some((ip, range));
                            break;
                        }
                    }
                    found.ok_or_else(|| {
                        CniError::new(
                            ErrorCode::RangeFull,
                            format!(
                                "no free address left in range set {idx} ({set}) of network {:?}",
                                cfg.network
                            ),
                        )
                    })?
                }
            };
            reserved.push(ip);
            store.set_last_reserved(idx, ip)?;
            ips.push(IpConfig {
                version: None,
                address: ipnet::IpNet::new(ip, range.subnet.prefix_len()).expect("prefix fits"),
                gateway: range.gateway,
                interface: None,
            });
        }
        if !requested.is_empty() {
            let list: Vec<String> = requested.iter().map(|ip| ip.to_string()).collect();
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "requested addresses {} are in no range of network {:?}",
                    list.join(", "),
                    cfg.network
                ),
            )
            .with_details(format!("ranges: {}", cfg.describe_ranges())));
        }
        Ok(CniResult {
            ips,
            routes: cfg.routes.clone(),
            dns: cfg.dns()?,
            ..Default::default()
        })
    })();
    if result.is_err() {
        for ip in reserved {
            store.release_ip(ip)?;
        }
    }
    result
}

/// Frees every address the attachment holds. Nothing held is not an error (DEL is idempotent).
pub fn release(
    cfg: &IpamConfig,
    container_id: &str,
    ifname: &str,
) -> Result<Vec<IpAddr>, CniError> {
    let (store, _lock) = Store::open_locked(&cfg.data_dir, &cfg.network)?;
    let ips = store.find(container_id, ifname)?;
    for ip in &ips {
        store.release_ip(*ip)?;
    }
    Ok(ips)
}

/// The addresses the attachment holds, for CHECK.
pub fn held(cfg: &IpamConfig, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
    let (store, _lock) = Store::open_locked(&cfg.data_dir, &cfg.network)?;
    store.find(container_id, ifname)
}

/// Frees every lease whose attachment is not in `valid`; returns what it freed.
pub fn gc(cfg: &IpamConfig, valid: &[(String, String)]) -> Result<Vec<Lease>, CniError> {
    let (store, _lock) = Store::open_locked(&cfg.data_dir, &cfg.network)?;
    let mut freed = Vec::new();
    for lease in store.leases()? {
        let keep = valid.iter().any(|(id, ifname)| {
            lease.container_id == *id && lease.ifname.as_deref().is_none_or(|n| n == ifname)
        });
        if !keep {
            store.release_ip(lease.ip)?;
            freed.push(lease);
        }
    }
    Ok(freed)
}

/// STATUS: can the next ADD get an address? (The data dir is writable and each set has room.)
pub fn status(cfg: &IpamConfig) -> Result<(), CniError> {
    let (store, _lock) = Store::open_locked(&cfg.data_dir, &cfg.network)
        .map_err(|e| CniError::new(ErrorCode::NotAvailable, e.to_string()))?;
    for (idx, set) in cfg.ranges.iter().enumerate() {
        let mut free = false;
        for (ip, _) in set.iter_from(None) {
            if !store.is_taken(ip) {
                free = true;
                break;
            }
        }
        if !free {
            return Err(CniError::new(
                ErrorCode::NotAvailable,
                format!(
                    "range set {idx} ({set}) of network {:?} is full",
                    cfg.network
                ),
            ));
        }
    }
    Ok(())
}

fn attachment(req: &Request) -> String {
    format!(
        "container {:?} interface {:?}",
        req.container_id, req.ifname
    )
}

pub(crate) fn io(what: impl std::fmt::Display, err: std::io::Error) -> CniError {
    io_error(what, err)
}
