//! Names and MACs derived from the attachment, so the same pod always gets the same ones and DEL
//! can find the host side without the pod's namespace.

use sha2::{Digest, Sha256};

fn digest(salt: &str, network: &str, container_id: &str, ifname: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [salt, network, container_id, ifname] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// The host end of the pod's veth: `fn` + 10 hex digits (kernel names stop at 15 bytes).
pub fn host_veth(network: &str, container_id: &str, ifname: &str) -> String {
    let d = digest("veth", network, container_id, ifname);
    let hex: String = d[..5].iter().map(|b| format!("{b:02x}")).collect();
    format!("fn{hex}")
}

/// A locally administered unicast MAC, stable per (network, container, interface, side).
pub fn mac(side: &str, network: &str, container_id: &str, ifname: &str) -> [u8; 6] {
    let d = digest(side, network, container_id, ifname);
    [(d[0] & 0xfe) | 0x02, d[1], d[2], d[3], d[4], d[5]]
}

/// The ifalias flatnet writes on both veth ends: how GC and DEL recognise what flatnet made.
pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{}{container_id}/{ifname}", alias_prefix(network))
}

pub fn alias_prefix(network: &str) -> String {
    format!("flatnet:{network}/")
}

/// Parses an alias back into (container ID, ifname) if it belongs to `network`.
pub fn parse_alias<'a>(network: &str, alias: &'a str) -> Option<(&'a str, &'a str)> {
    alias.strip_prefix(&alias_prefix(network))?.rsplit_once('/')
}

/// The alias of a veth that DEL detached and a reaper is deleting; GC removes any left over.
pub fn detached_alias(network: &str) -> String {
    format!("flatnet-detached:{network}")
}

/// A free name for a detached link: the ifindex is unique among live links of a namespace.
pub fn detached_name(index: u32) -> String {
    format!("fnd{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_valid_names_and_macs() {
        let n = host_veth("net", "abc", "eth0");
        assert_eq!(n, host_veth("net", "abc", "eth0"));
        assert_ne!(n, host_veth("net", "abc", "eth1"));
        assert!(n.len() <= 15);
        let m = mac("pod", "net", "abc", "eth0");
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
        assert_ne!(m, mac("host", "net", "abc", "eth0"));
        let a = alias("net", "abc", "eth0");
        assert_eq!(parse_alias("net", &a), Some(("abc", "eth0")));
        assert_eq!(parse_alias("other", &a), None);
    }
}
