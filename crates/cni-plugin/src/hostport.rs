//! The `portMappings` capability (hostPort): traffic to a node address on `hostPort` is DNATed to
//! the pod's `containerPort`, as the reference `portmap` plugin does — here in nftables.
//!
//! Each attachment gets its own three base chains in table `inet flatnet-cni`, named from a hash
//! of the attachment: `hp_<tag>_pre` (prerouting, dstnat: from other hosts and pods),
//! `hp_<tag>_out` (output, dstnat: from the node itself, loopback excepted), `hp_<tag>_post`
//! (postrouting, srcnat: a pod reaching itself through its own hostPort is masqueraded so the
//! reply takes the same way back). Own chains need no rule handles: DEL deletes the chains, and
//! ADD rewrites them whole, in one transaction either way. A marker file under
//! [`MARKER_DIR`] (tmpfs: gone at reboot, like the rules) tells DEL and GC which attachments have
//! chains, so attachments without hostPorts never pay for an `nft` run.

use crate::conf::PortMapping;
use crate::naming;
use crate::plan::NFT_TABLE;
use cni_spec::error::{invalid_config, CniError};
use cni_spec::IpConfig;
use std::net::IpAddr;
use std::path::PathBuf;

pub const MARKER_DIR: &str = "/run/flatnet/hostports";

/// (chain suffix, hook, priority). Numeric: nft names `dstnat` only for the prerouting hook;
/// -100 and 100 are what `dstnat` and `srcnat` stand for.
const HOOKS: [(&str, &str, i32); 3] = [
    ("pre", "prerouting", -100),
    ("out", "output", -100),
    ("post", "postrouting", 100),
];

fn tag(network: &str, id: &str, ifname: &str) -> String {
    naming::host_veth(network, id, ifname)[2..].to_string()
}

fn chain(tag: &str, part: &str) -> String {
    format!("hp_{tag}_{part}")
}

/// The marker recording that this attachment has hostPort chains; it holds the alias text
/// (`flatnet:<network>/<id>/<ifname>`) so GC can tell whose they are.
pub fn marker(network: &str, id: &str, ifname: &str) -> PathBuf {
    PathBuf::from(MARKER_DIR).join(tag(network, id, ifname))
}

/// Checks the mappings and renders the chains for the pod's addresses.
pub fn script(
    network: &str,
    id: &str,
    ifname: &str,
    ips: &[IpConfig],
    mappings: &[PortMapping],
) -> Result<String, CniError> {
    let t = tag(network, id, ifname);
    let mut s = format!("add table inet {NFT_TABLE}\n");
    for (part, hook, prio) in HOOKS {
        let c = chain(&t, part);
        s += &format!(
            "add chain inet {NFT_TABLE} {c} {{ type nat hook {hook} priority {prio}; policy accept; }}\nflush chain inet {NFT_TABLE} {c}\n"
        );
    }
    for (i, m) in mappings.iter().enumerate() {
        let field = |f: &str| format!("runtimeConfig.portMappings[{i}].{f}");
        let proto = m.protocol.to_ascii_lowercase();
        if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
            return Err(invalid_config(format!(
                "{}: {:?} is not tcp, udp or sctp",
                field("protocol"),
                m.protocol
            )));
        }
        if m.host_port == 0 || m.container_port == 0 {
            return Err(invalid_config(format!(
                "{} and {} must be 1-65535",
                field("hostPort"),
                field("containerPort")
            )));
        }
        let host_ip: Option<IpAddr> = match m.host_ip.as_str() {
            "" | "0.0.0.0" | "::" => None,
            h => Some(h.parse().map_err(|_| {
                invalid_config(format!("{}: {h:?} is not an IP address", field("hostIP")))
            })?),
        };
        for ip in ips.iter().map(|c| c.address.addr()) {
            if host_ip.is_some_and(|h| h.is_ipv4() != ip.is_ipv4()) {
                continue;
            }
            let (fam, lo, to) = if ip.is_ipv4() {
                ("ip", "127.0.0.0/8", format!("{ip}:{}", m.container_port))
            } else {
                ("ip6", "::1", format!("[{ip}]:{}", m.container_port))
            };
            let only = host_ip
                .map(|h| format!("{fam} daddr {h} "))
                .unwrap_or_default();
            let dnat = format!(
                "fib daddr type local {only}{proto} dport {} dnat {fam} to {to}",
                m.host_port
            );
            s += &format!("add rule inet {NFT_TABLE} {} {dnat}\n", chain(&t, "pre"));
            s += &format!(
                "add rule inet {NFT_TABLE} {} {fam} daddr != {lo} {dnat}\n",
                chain(&t, "out")
            );
            s += &format!(
                "add rule inet {NFT_TABLE} {} {fam} saddr {ip} {fam} daddr {ip} {proto} dport {} ct status dnat masquerade\n",
                chain(&t, "post"),
                m.container_port
            );
        }
    }
    Ok(s)
}

/// Removes an attachment's chains; harmless when they do not exist (each is made, then deleted,
/// in the same transaction).
pub fn teardown_script(network: &str, id: &str, ifname: &str) -> String {
    let t = tag(network, id, ifname);
    let mut s = format!("add table inet {NFT_TABLE}\n");
    for (part, hook, prio) in HOOKS {
        let c = chain(&t, part);
        s += &format!(
            "add chain inet {NFT_TABLE} {c} {{ type nat hook {hook} priority {prio}; policy accept; }}\ndelete chain inet {NFT_TABLE} {c}\n"
        );
    }
    s
}

fn kernel(e: nft::NftError) -> CniError {
    CniError::new(
        cni_spec::error::ErrorCode::Kernel,
        format!("portMappings: {e}"),
    )
}

/// Installs an attachment's chains (`script` from [`script`]), marker first, so a crash in
/// between still leaves DEL something to find.
pub fn install(network: &str, id: &str, ifname: &str, script: &str) -> Result<(), CniError> {
    let m = marker(network, id, ifname);
    std::fs::create_dir_all(MARKER_DIR)
        .and_then(|()| std::fs::write(&m, naming::alias(network, id, ifname)))
        .map_err(|e| cni_spec::error::io_error(m.display(), e))?;
    nft::apply(script).map_err(kernel)
}

/// Removes an attachment's chains if it has any (DEL: one `stat` when it has none).
pub fn remove(network: &str, id: &str, ifname: &str) -> Result<(), CniError> {
    let m = marker(network, id, ifname);
    if !m.exists() {
        return Ok(());
    }
    nft::apply(&teardown_script(network, id, ifname)).map_err(kernel)?;
    std::fs::remove_file(&m).map_err(|e| cni_spec::error::io_error(m.display(), e))
}

/// GC: removes the chains of every attachment of `network` not in `valid`.
pub fn gc(network: &str, valid: &[(String, String)]) -> Result<(), CniError> {
    for e in std::fs::read_dir(MARKER_DIR)
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(alias) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Some((id, ifname)) = naming::parse_alias(network, &alias) else {
            continue;
        };
        if !valid
            .iter()
            .any(|(v_id, v_if)| v_id == id && v_if == ifname)
        {
            remove(network, id, ifname)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(host: u16, container: u16, proto: &str, ip: &str) -> PortMapping {
        PortMapping {
            host_port: host,
            container_port: container,
            protocol: proto.into(),
            host_ip: ip.into(),
        }
    }

    fn ips() -> Vec<IpConfig> {
        ["10.1.0.5/24", "fd00::5/64"]
            .iter()
            .map(|a| IpConfig {
                version: None,
                address: a.parse().unwrap(),
                gateway: None,
                interface: Some(2),
            })
            .collect()
    }

    #[test]
    fn every_family_gets_dnat_in_three_chains() {
        let s = script("n", "c", "eth0", &ips(), &[pm(8080, 80, "TCP", "")]).unwrap();
        assert!(
            s.contains("fib daddr type local tcp dport 8080 dnat ip to 10.1.0.5:80"),
            "{s}"
        );
        assert!(
            s.contains("fib daddr type local tcp dport 8080 dnat ip6 to [fd00::5]:80"),
            "{s}"
        );
        assert!(
            s.contains("ip daddr != 127.0.0.0/8 fib daddr type local"),
            "{s}"
        );
        assert!(
            s.contains(
                "ip saddr 10.1.0.5 ip daddr 10.1.0.5 tcp dport 80 ct status dnat masquerade"
            ),
            "{s}"
        );
        assert_eq!(s.matches("flush chain").count(), 3);
    }

    #[test]
    fn host_ip_limits_family_and_address() {
        let s = script("n", "c", "eth0", &ips(), &[pm(53, 53, "udp", "192.0.2.1")]).unwrap();
        assert!(
            s.contains("ip daddr 192.0.2.1 udp dport 53 dnat ip to 10.1.0.5:53"),
            "{s}"
        );
        assert!(!s.contains("dnat ip6"), "{s}");
    }

    #[test]
    fn bad_mappings_name_the_field() {
        let e = script("n", "c", "eth0", &ips(), &[pm(1, 1, "icmp", "")]).unwrap_err();
        assert!(e.msg.contains("portMappings[0].protocol"), "{}", e.msg);
        let e = script("n", "c", "eth0", &ips(), &[pm(1, 1, "tcp", "nope")]).unwrap_err();
        assert!(e.msg.contains("hostIP"), "{}", e.msg);
    }

    #[test]
    fn chains_are_per_attachment() {
        assert_ne!(
            teardown_script("n", "a", "eth0"),
            teardown_script("n", "b", "eth0")
        );
        assert_eq!(marker("n", "a", "eth0"), marker("n", "a", "eth0"));
    }
}
