//! The node-routing applier: makes the calling thread's namespace match a [`Plan`], touching only
//! flatnet's own objects — routes with protocol [`PROTOCOL`], the `flatnet.1` device and its
//! entries, the `flatnet-routing` nftables table. It diffs before it writes, so applying the same
//! plan twice (an agent restart) changes nothing.

use crate::plan::{Plan, Via, VxlanPlan, NFT_TABLE, PROTOCOL, VXLAN_DEVICE};
use ipnet::{IpNet, Ipv4Net};
use netlink::netlink_packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkInfo as Info, LinkMessage,
};
use netlink::{LinkInfo, Netlink, Request, RouteSpec, VxlanSpec};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What an apply changed, by kind (all zero when the kernel already matched).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub device: usize,
    pub routes: usize,
    pub neighbours: usize,
    pub fdb: usize,
    pub masquerade: usize,
}

impl Changes {
    pub fn total(&self) -> usize {
        self.device + self.routes + self.neighbours + self.fdb + self.masquerade
    }
}

fn vxlan_info(l: &LinkMessage) -> Vec<InfoVxlan> {
    l.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })
        .flatten()
        .filter_map(|i| match i {
            Info::Data(InfoData::Vxlan(v)) => Some(v.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn vxlan_matches(l: &LinkMessage, v: &VxlanPlan, underlay_dev: u32) -> bool {
    let info = vxlan_info(l);
    let has = |want: &InfoVxlan| info.contains(want);
    l.mac() == Some(v.mac)
        && l.mtu() == Some(v.mtu)
        && has(&InfoVxlan::Id(v.vni))
        && has(&InfoVxlan::Local(v.local))
        && has(&InfoVxlan::Port(v.port))
        && has(&InfoVxlan::Link(underlay_dev))
}

/// Makes sure of the VXLAN device (recreated if its settings differ); returns its index.
fn ensure_vxlan(
    nl: &Netlink,
    v: &VxlanPlan,
    underlay_dev: u32,
    ch: &mut Changes,
) -> Result<u32, String> {
    let existing = nl.link_by_name(&v.name).map_err(|e| e.to_string())?;
    let link = match existing {
        Some(l) if vxlan_matches(&l, v, underlay_dev) => l,
        other => {
            if let Some(old) = other {
                nl.run(Request::delete_link(old.index(), &v.name))
                    .map_err(|e| e.to_string())?;
            }
            let spec = VxlanSpec {
                name: v.name.clone(),
                vni: v.vni,
                local: v.local,
                dev: underlay_dev,
                port: v.port,
                mtu: v.mtu,
                mac: v.mac,
            };
            nl.run(Request::create_vxlan(&spec))
                .map_err(|e| e.to_string())?;
            ch.device += 1;
            nl.link_by_name(&v.name)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{} vanished after creation", v.name))?
        }
    };
    let idx = link.index();
    if !link.is_up() {
        nl.run(Request::set_up(idx, &v.name))
            .map_err(|e| e.to_string())?;
        ch.device += 1;
    }
    let want = IpNet::V4(v.addr);
    let have = nl.addresses(idx).map_err(|e| e.to_string())?;
    for stale in have.iter().filter(|a| a.addr().is_ipv4() && **a != want) {
        nl.run(Request::delete_address(idx, *stale))
            .map_err(|e| e.to_string())?;
        ch.device += 1;
    }
    if !have.contains(&want) {
        nl.run(Request::add_address(idx, want, false))
            .map_err(|e| e.to_string())?;
        ch.device += 1;
    }
    Ok(idx)
}

fn route_key(r: &RouteSpec) -> (IpNet, Option<IpAddr>, u32, bool) {
    (r.dst, r.gw, r.dev, r.onlink)
}

/// Applies `plan`; `underlay_dev` is the index of the device holding the node IP.
pub fn apply(nl: &Netlink, plan: &Plan, underlay_dev: u32) -> Result<Changes, String> {
    let mut ch = Changes::default();
    let vx = match &plan.vxlan {
        Some(v) => Some(ensure_vxlan(nl, v, underlay_dev, &mut ch)?),
        None => {
            if let Some(l) = nl.link_by_name(VXLAN_DEVICE).map_err(|e| e.to_string())? {
                nl.run(Request::delete_link(l.index(), VXLAN_DEVICE))
                    .map_err(|e| e.to_string())?;
                ch.device += 1;
            }
            None
        }
    };

    // Routes: ours are the ones with our protocol number.
    let mut want: BTreeMap<Ipv4Net, RouteSpec> = BTreeMap::new();
    for r in &plan.routes {
        let dev = match r.via {
            Via::Underlay => underlay_dev,
            Via::Vxlan => vx.ok_or("a VXLAN route without the VXLAN device")?,
        };
        let mut spec = RouteSpec::new(IpNet::V4(r.dst), Some(IpAddr::V4(r.gw)), dev);
        spec.onlink = r.via == Via::Vxlan;
        spec.protocol = Some(PROTOCOL);
        want.insert(r.dst, spec);
    }
    let have: Vec<RouteSpec> = nl
        .routes(true)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|r| r.protocol == Some(PROTOCOL))
        .collect();
    let mut batch = Vec::new();
    for h in &have {
        let keep = match h.dst {
            IpNet::V4(d) => want.get(&d).is_some_and(|w| route_key(w) == route_key(h)),
            IpNet::V6(_) => false,
        };
        if !keep {
            batch.push(Request::delete_route(h));
        }
    }
    for w in want.values() {
        if !have.iter().any(|h| route_key(h) == route_key(w)) {
            batch.push(Request::replace_route(w));
        }
    }
    ch.routes = batch.len();

    // Neighbour and FDB entries on our own device.
    if let Some(idx) = vx {
        let have_n = nl.neighbours(idx, false).map_err(|e| e.to_string())?;
        for n in have_n.iter().filter(|n| n.permanent) {
            if !plan
                .neighbours
                .iter()
                .any(|(ip, mac)| IpAddr::V4(*ip) == n.ip && *mac == n.mac)
            {
                batch.push(Request::delete_neighbour(idx, n.ip));
                ch.neighbours += 1;
            }
        }
        for (ip, mac) in &plan.neighbours {
            if !have_n
                .iter()
                .any(|n| n.permanent && n.ip == IpAddr::V4(*ip) && n.mac == *mac)
            {
                batch.push(Request::replace_neighbour(idx, IpAddr::V4(*ip), *mac));
                ch.neighbours += 1;
            }
        }
        let have_f = nl.neighbours(idx, true).map_err(|e| e.to_string())?;
        for f in &have_f {
            if !plan
                .fdb
                .iter()
                .any(|(mac, dst)| *mac == f.mac && IpAddr::V4(*dst) == f.ip)
            {
                batch.push(Request::delete_fdb(idx, f.mac, f.ip));
                ch.fdb += 1;
            }
        }
        for (mac, dst) in &plan.fdb {
            if !have_f
                .iter()
                .any(|f| f.mac == *mac && f.ip == IpAddr::V4(*dst))
            {
                batch.push(Request::replace_fdb(idx, *mac, IpAddr::V4(*dst)));
                ch.fdb += 1;
            }
        }
    }
    // Deletions first (a replaced route's old twin may share its key), then additions.
    batch.sort_by_key(|r| !r.is_delete());
    nl.apply(batch).map_err(|e| e.to_string())?;

    ch.masquerade = ensure_masquerade(&plan.masquerade)?;
    Ok(ch)
}

/// The masquerade table's comment, `None` without the table. Asked of the kernel natively:
/// `nft list table` would dump every table of the namespace first, the service proxy's too
/// (1.4 s with 10k Services), on every re-check.
fn masquerade_comment() -> Result<Option<String>, String> {
    let name = NFT_TABLE.trim_start_matches("ip ");
    let mut conn = nft::netlink::Conn::open().map_err(|e| format!("nf_tables netlink: {e}"))?;
    Ok(conn
        .table_info(nft::netlink::FAMILY_IPV4, name)?
        .map(|(comment, _)| comment))
}

/// Replaces the masquerade table unless it already carries this plan's fingerprint.
fn ensure_masquerade(script: &str) -> Result<usize, String> {
    let tag = format!("plan-{}", hex(&Sha256::digest(script.as_bytes())[..8]));
    if masquerade_comment()?.is_some_and(|c| c == tag) {
        return Ok(0);
    }
    let tagged = script.replacen('{', &format!("{{\n  comment \"{tag}\""), 1);
    let full = format!("table {NFT_TABLE}\ndelete table {NFT_TABLE}\n{tagged}");
    nft::apply(&full).map_err(|e| e.to_string())?;
    Ok(1)
}

/// Removes everything flatnet's node routing made in this namespace.
pub fn teardown(nl: &Netlink) -> Result<(), String> {
    let mut batch: Vec<Request> = nl
        .routes(true)
        .map_err(|e| e.to_string())?
        .iter()
        .filter(|r| r.protocol == Some(PROTOCOL))
        .map(Request::delete_route)
        .collect();
    if let Some(l) = nl.link_by_name(VXLAN_DEVICE).map_err(|e| e.to_string())? {
        batch.push(Request::delete_link(l.index(), VXLAN_DEVICE));
    }
    nl.apply(batch).map_err(|e| e.to_string())?;
    if masquerade_comment()?.is_some() {
        nft::apply(&format!("delete table {NFT_TABLE}\n")).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
