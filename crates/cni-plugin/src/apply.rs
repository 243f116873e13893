//! The applier: makes the kernel match a [`Plan`] over rtnetlink, and takes it apart again.
//! It touches only what flatnet made: the bridge it was told to use, and veths carrying its alias.

use crate::naming;
use crate::plan::Plan;
use cni_spec::error::{invalid_config, CniError, ErrorCode};
use cni_spec::CniResult;
use ipnet::IpNet;
use netlink::netlink_packet_route::link::LinkMessage;
use netlink::{LinkInfo, Netlink, NlError, Request, RouteSpec, VethEnd};
use netns::NetNs;
use std::path::Path;

pub fn kernel(e: NlError) -> CniError {
    let hint = if e.is(netlink::EEXIST) && e.op.starts_with("creating veth") {
        " (is this container already attached? DEL it first)"
    } else {
        ""
    };
    CniError::new(ErrorCode::Kernel, format!("{e}{hint}"))
}

fn io(what: &str, e: std::io::Error) -> CniError {
    cni_spec::error::io_error(what, e)
}

/// Opens the pod's namespace; a path that is not one is the spec's "unknown container".
pub fn open_netns(path: &Path) -> Result<NetNs, CniError> {
    let ns = NetNs::open(path).map_err(|e| {
        CniError::new(
            ErrorCode::UnknownContainer,
            format!("CNI_NETNS {}: {e}", path.display()),
        )
    })?;
    ns.run(|| ()).map_err(|e| {
        CniError::new(
            ErrorCode::UnknownContainer,
            format!(
                "CNI_NETNS {} is not a network namespace: {e}",
                path.display()
            ),
        )
    })?;
    Ok(ns)
}

/// Writes a sysctl under /proc/sys/net of the calling thread's namespace, skipping the write
/// when it already holds the value.
pub fn sysctl(path: &str, value: &str) -> Result<(), CniError> {
    let full = format!("/proc/sys/net/{path}");
    match std::fs::read_to_string(&full) {
        Ok(cur) if cur.trim() == value => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()), // family disabled in this kernel
        _ => std::fs::write(&full, value).map_err(|e| io(&full, e)),
    }
}

/// Creates the attachment; on any failure after the veth pair exists, removes it again.
/// Returns the bridge's MAC for the result.
///
/// Three batches on the hot path: the bridge lookup (plus its gateway address), the veth pair,
/// then one batch of changes per side.
pub fn add(plan: &Plan, pod_ns: &NetNs) -> Result<Option<[u8; 6]>, CniError> {
    let host = Netlink::connect().map_err(|e| io("opening netlink", e))?;
    let mut bridge = None;
    if let Some(b) = &plan.bridge {
        let (link, _) = host.ensure_bridge(&b.name, b.mtu).map_err(kernel)?;
        let idx = link.index();
        let mut changes = Vec::new();
        if !link.is_up() {
            changes.push(Request::set_up(idx, &b.name));
        }
        if b.promisc {
            changes.push(Request::set_promisc(idx, &b.name, true));
        }
        host.apply(changes).map_err(kernel)?;
        ensure_gateways(&host, idx, b)?;
        bridge = Some((idx, link.mac()));
    }
    let host_end = VethEnd {
        name: plan.host.name.clone(),
        mac: plan.host.mac,
        mtu: plan.pod.mtu,
        netns_fd: None,
        master: bridge.map(|(i, _)| i),
        up: true,
    };
    let pod_end = VethEnd {
        name: plan.pod.ifname.clone(),
        mac: plan.pod.mac,
        mtu: plan.pod.mtu,
        netns_fd: Some(pod_ns.fd()),
        master: None,
        up: false,
    };
    let link = host.create_veth(&host_end, &pod_end).map_err(kernel)?;
    let configured = configure(plan, &host, pod_ns, &link, bridge.is_some());
    if let Err(e) = configured {
        let _ = host.run(Request::delete_link(link.index(), &plan.host.name));
        return Err(e);
    }
    Ok(bridge.and_then(|(_, mac)| mac))
}

/// Gives the bridge its gateway addresses. Like the reference plugin, an address already there is
/// the common case (one request); a new one must not share its subnet with another address
/// unless `forceAddress` says to replace that one.
fn ensure_gateways(host: &Netlink, idx: u32, b: &crate::plan::BridgePlan) -> Result<(), CniError> {
    let adds = b
        .gateway_addrs
        .iter()
        .map(|gw| Request::add_address(idx, *gw, true))
        .collect();
    let added = host.apply(adds).map_err(kernel)?;
    if !added.contains(&true) {
        return Ok(());
    }
    let existing = host.addresses(idx).map_err(kernel)?;
    for (gw, _) in b.gateway_addrs.iter().zip(&added).filter(|(_, new)| **new) {
        let clash = existing
            .iter()
            .find(|a| a.trunc() == gw.trunc() && a.addr() != gw.addr());
        if let Some(old) = clash {
            if !b.force_address {
                let _ = host.run(Request::delete_address(idx, *gw));
                return Err(invalid_config(format!(
                    "bridge {} already has address {old}, not the gateway {gw}; set forceAddress to replace it",
                    b.name
                )));
            }
            host.run(Request::delete_address(idx, *old))
                .map_err(kernel)?;
        }
    }
    Ok(())
}

fn configure(
    plan: &Plan,
    host: &Netlink,
    pod_ns: &NetNs,
    host_link: &LinkMessage,
    bridged: bool,
) -> Result<(), CniError> {
    let host_idx = host_link.index();
    let mut changes = vec![Request::set_alias(host_idx, &plan.host.alias)];
    if let Some(b) = plan
        .bridge
        .as_ref()
        .filter(|b| bridged && (b.hairpin || b.isolated))
    {
        changes.push(Request::set_bridge_port(
            host_idx,
            &plan.host.name,
            b.hairpin,
            b.isolated,
        ));
    }
    for a in &plan.host.addrs {
        changes.push(Request::add_address(host_idx, *a, true));
    }
    for r in &plan.host.routes {
        let mut spec = RouteSpec::new(*r, None, host_idx);
        spec.scope_link = true;
        changes.push(Request::add_route(&spec));
    }
    host.apply(changes).map_err(kernel)?;

    let has_v6 = plan.pod.addrs.iter().any(|a| a.addr().is_ipv6());
    if plan.pod.nodad && has_v6 {
        // Also the link-local address, which IPv6 neighbour discovery starts from.
        let key = format!("ipv6/conf/{}/accept_dad", plan.pod.ifname);
        pod_ns
            .run(|| sysctl(&key, "0"))
            .map_err(|e| io("entering the pod namespace", e))??;
    }
    let pod =
        Netlink::connect_in(pod_ns).map_err(|e| io("opening netlink in the pod namespace", e))?;
    // The host end's IFLA_LINK names the pod end's index in the pod namespace.
    let pod_idx = match host_link.peer_index() {
        Some(i) => i,
        None => pod
            .link_by_name(&plan.pod.ifname)
            .map_err(kernel)?
            .map(|l| l.index())
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::Kernel,
                    format!("{} did not appear in the pod namespace", plan.pod.ifname),
                )
            })?,
    };
    let mut changes: Vec<Request> = plan
        .pod
        .addrs
        .iter()
        .map(|a| Request::add_address(pod_idx, *a, plan.pod.nodad))
        .collect();
    changes.push(Request::set_up(1, "lo"));
    if plan.pod.up {
        changes.push(Request::set_up(pod_idx, &plan.pod.ifname));
        for r in &plan.pod.routes {
            let mut spec = RouteSpec::new(r.route.dst, r.route.gw, pod_idx);
            spec.scope_link = r.scope_link;
            spec.mtu = r.route.mtu;
            spec.adv_mss = r.route.adv_mss;
            spec.priority = r.route.priority;
            spec.table = r.route.table;
            changes.push(Request::add_route(&spec));
        }
    }
    pod.apply(changes).map_err(kernel)?;
    if plan.forward_v4 {
        sysctl("ipv4/ip_forward", "1")?;
    }
    if plan.forward_v6 {
        sysctl("ipv6/conf/all/forwarding", "1")?;
    }
    if let Some(script) = &plan.masquerade {
        nft::apply(script).map_err(|e| CniError::new(ErrorCode::Kernel, format!("ipMasq: {e}")))?;
    }
    Ok(())
}

/// Removes the attachment's veth pair, found through its host end by the derived name (so no pod
/// namespace is needed) and confirmed by flatnet's alias; a device not flatnet's is left alone.
///
/// The kernel's unregister of a veth waits out RCU grace periods (15-30 ms here, the bulk of the
/// reference plugin's DEL). So DEL only *detaches* synchronously — both ends down (no packet moves
/// from here on) and renamed (the pod's interface name and the host name are free for a new ADD at
/// once) — and a detached reaper process performs the unregister. GC sweeps any a reaper missed.
pub fn del(
    network: &str,
    container_id: &str,
    ifname: &str,
    pod_ns: Option<&NetNs>,
) -> Result<(), CniError> {
    let host = Netlink::connect().map_err(|e| io("opening netlink", e))?;
    let name = naming::host_veth(network, container_id, ifname);
    let link = match host.link_by_name(&name).map_err(kernel)? {
        Some(l) if l.alias() == Some(naming::alias(network, container_id, ifname).as_str()) => l,
        _ => return Ok(()),
    };
    let gone = naming::detached_alias(network);
    if let Some(pod) = pod_ns.and_then(|ns| Netlink::connect_in(ns).ok()) {
        if let Some(peer) = pod.link_by_name(ifname).map_err(kernel)? {
            // Only the peer of our host end: a veth's IFLA_LINK names its peer's index.
            if peer.peer_index() == Some(link.index()) {
                let detached = naming::detached_name(peer.index());
                pod.run(Request::detach(peer.index(), &detached, &gone))
                    .map_err(kernel)?;
            }
        }
    }
    let detached = naming::detached_name(link.index());
    host.run(Request::detach(link.index(), &detached, &gone))
        .map_err(kernel)?;
    reap_in_background(detached);
    Ok(())
}

/// Deletes `name` (in the calling thread's namespace) from a grandchild process with its stdio on
/// /dev/null, so neither this process nor the runtime reading our stdout waits for it.
fn reap_in_background(name: String) {
    use nix::unistd::{fork, ForkResult};
    // SAFETY: the plugin is single-threaded; the children only make syscalls before _exit.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            let _ = nix::sys::wait::waitpid(child, None);
        }
        Ok(ForkResult::Child) => {
            if let Ok(ForkResult::Child) = unsafe { fork() } {
                let _ = nix::unistd::setsid();
                if let Ok(null) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                {
                    let _ = nix::unistd::dup2_stdin(&null);
                    let _ = nix::unistd::dup2_stdout(&null);
                    let _ = nix::unistd::dup2_stderr(&null);
                }
                if let Ok(nl) = Netlink::connect() {
                    if let Ok(Some(link)) = nl.link_by_name(&name) {
                        let _ = nl.run(Request::delete_link(link.index(), &name));
                    }
                }
            }
            unsafe { nix::libc::_exit(0) };
        }
        Err(_) => {} // the link stays detached; GC removes it
    }
}

/// CHECK: the pod interface, its MAC, addresses and routes, and the host end, as `prev` says.
pub fn check(
    network: &str,
    container_id: &str,
    ifname: &str,
    bridge: Option<&str>,
    netns: &NetNs,
    prev: &CniResult,
) -> Result<(), CniError> {
    let fail = |msg: String| CniError::new(ErrorCode::CheckFailed, msg);
    let idx = prev.sandbox_interface(ifname).ok_or_else(|| {
        fail(format!(
            "prevResult lists no interface {ifname} inside a sandbox"
        ))
    })?;
    let host = Netlink::connect().map_err(|e| io("opening netlink", e))?;
    let pod =
        Netlink::connect_in(netns).map_err(|e| io("opening netlink in the pod namespace", e))?;
    let link = pod.link_by_name(ifname).map_err(kernel)?.ok_or_else(|| {
        fail(format!(
            "interface {ifname} is missing from the pod namespace"
        ))
    })?;
    if let Some(want) = &prev.interfaces[idx].mac {
        let have = link.mac().map(netlink::format_mac).unwrap_or_default();
        if !have.eq_ignore_ascii_case(want) {
            return Err(fail(format!(
                "interface {ifname} has MAC {have}, prevResult says {want}"
            )));
        }
    }
    let addrs = pod.addresses(link.index()).map_err(kernel)?;
    for ip in prev.ips.iter().filter(|i| i.interface == Some(idx)) {
        if !addrs.iter().any(|a| a.addr() == ip.address.addr()) {
            return Err(fail(format!(
                "interface {ifname} lacks address {}",
                ip.address
            )));
        }
    }
    for v4 in [true, false] {
        let want: Vec<&IpNet> = prev
            .routes
            .iter()
            .map(|r| &r.dst)
            .filter(|d| d.addr().is_ipv4() == v4)
            .collect();
        if want.is_empty() {
            continue;
        }
        let have = pod.routes(v4).map_err(kernel)?;
        for dst in want {
            if !have.iter().any(|r| r.dst == *dst) {
                return Err(fail(format!("the pod has no route to {dst}")));
            }
        }
    }
    let name = naming::host_veth(network, container_id, ifname);
    let host_link = host
        .link_by_name(&name)
        .map_err(kernel)?
        .ok_or_else(|| fail(format!("host interface {name} is missing")))?;
    if let Some(bridge) = bridge {
        let b = host
            .link_by_name(bridge)
            .map_err(kernel)?
            .ok_or_else(|| fail(format!("bridge {bridge} is missing")))?;
        if host_link.master() != Some(b.index()) {
            return Err(fail(format!(
                "host interface {name} is not attached to bridge {bridge}"
            )));
        }
    }
    Ok(())
}

/// GC: removes every flatnet veth of `network` whose attachment is not in `valid`.
pub fn gc(network: &str, valid: &[(String, String)]) -> Result<usize, CniError> {
    let host = Netlink::connect().map_err(|e| io("opening netlink", e))?;
    let mut removed = 0;
    for link in host.links().map_err(kernel)? {
        let Some((id, ifname)) = link.alias().and_then(|a| naming::parse_alias(network, a)) else {
            continue;
        };
        if !valid
            .iter()
            .any(|(v_id, v_if)| v_id == id && v_if == ifname)
        {
            host.run(Request::delete_link(
                link.index(),
                link.name().unwrap_or("?"),
            ))
            .map_err(kernel)?;
            removed += 1;
        }
    }
    Ok(removed)
}
