//! The node-routing planner: from this node and the cluster's nodes to the exact routes, VXLAN
//! device, FDB and neighbour entries and masquerade rules this node needs. Pure; no I/O.
//!
//! Design (after Flannel's host-gw and vxlan backends, and its DirectRouting option):
//! every node owns one pod CIDR of the cluster CIDR. Reaching a pod on another node means
//! reaching that node first.
//!
//! - **host-gw** needs the nodes on one L2 segment. Per remote node: one route,
//!   `podCIDR via nodeIP dev <underlay>`. Nothing is encapsulated, so pods get the underlay MTU.
//! - **vxlan** works across any routed underlay. One device per node (`flatnet.1`, VNI 1,
//!   UDP 4789, learning off, MTU = underlay − 50 for the outer IPv4 + UDP + VXLAN headers) carries
//!   the remote pod CIDR network address as its /32, and its MAC is derived from the node name,
//!   so every node knows every VTEP's MAC without publishing it. Per remote node: 1 route
//!   (`podCIDR via podCIDR.0 dev flatnet.1 onlink`), 1 neighbour entry (`podCIDR.0 lladdr
//!   <remote VTEP MAC>`) and 1 FDB entry (`<remote VTEP MAC> dst <remote node IP>`), all
//!   permanent: no ARP, no flooding, no learning.
//! - **auto**: host-gw routes to nodes on this node's underlay subnet, VXLAN to the others.
//!
//! Routes carry flatnet's own protocol number ([`PROTOCOL`]) so the applier can tell its routes
//! from everyone else's; the neighbour and FDB entries live on flatnet's own device.
//! Masquerade: pod traffic that leaves the cluster CIDR takes the node's address (multicast
//! excepted); pod-to-pod traffic keeps its source IP.

use cluster::{Backend, NodeInfo};
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};
use std::net::Ipv4Addr;

/// The route protocol number marking flatnet's routes (`ip route … proto 201`).
pub const PROTOCOL: u8 = 201;
pub const VXLAN_DEVICE: &str = "flatnet.1";
pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// The nftables table holding the node's masquerade rules.
pub const NFT_TABLE: &str = "ip flatnet-routing";

/// The node-routing settings (Flannel's net-conf.json).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub backend: Backend,
    pub cluster_cidr: Ipv4Net,
    pub underlay_mtu: u32,
}

impl Config {
    /// The MTU pods must use so that their packets fit after encapsulation.
    pub fn pod_mtu(&self) -> u32 {
        match self.backend {
            Backend::HostGw => self.underlay_mtu,
            Backend::Vxlan | Backend::Auto => self.underlay_mtu - VXLAN_OVERHEAD,
        }
    }
}

/// The CNI network configuration list of a node (`10-flatnet.conflist`): the flatnet plugin on
/// bridge `cni0`, the node's pod CIDR as its IPAM range, the pod MTU of the backend. What the
/// agent writes for the kubelet's runtime once it knows the node's pod CIDR, and what the lab
/// writes for its nodes. `data_dir`: where IPAM keeps its leases (default: the plugin's).
pub fn cni_conflist(
    cfg: &Config,
    pod_cidr: Ipv4Net,
    data_dir: Option<&std::path::Path>,
) -> serde_json::Value {
    let mut ipam = serde_json::json!({"type": "flatnet", "ranges": [[{"subnet": pod_cidr.to_string()}]],
                                      "routes": [{"dst": "0.0.0.0/0"}]});
    if let Some(d) = data_dir {
        ipam["dataDir"] = d.display().to_string().into();
    }
    serde_json::json!({"cniVersion": "1.0.0", "name": "flatnet", "plugins": [{
        "type": "flatnet", "bridge": "cni0", "isGateway": true, "hairpinMode": true,
        "mtu": cfg.pod_mtu(), "ipam": ipam}]})
}

/// This node: who it is and where it sits on the underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The underlay subnet of `ip` (same segment = inside it).
    pub underlay: Ipv4Net,
    pub pod_cidr: Ipv4Net,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    /// Directly on the underlay, via the remote node's IP.
    Underlay,
    /// Through the VXLAN device, onlink via the remote VTEP's address.
    Vxlan,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedRoute {
    pub dst: Ipv4Net,
    pub gw: Ipv4Addr,
    pub via: Via,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPlan {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// The device's own address: this node's pod CIDR network address, /32.
    pub addr: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub vxlan: Option<VxlanPlan>,
    pub routes: Vec<PlannedRoute>,
    /// (remote VTEP MAC, remote node IP)
    pub fdb: Vec<([u8; 6], Ipv4Addr)>,
    /// (remote VTEP address, remote VTEP MAC)
    pub neighbours: Vec<(Ipv4Addr, [u8; 6])>,
    pub masquerade: String,
}

/// The plan as the commands that would build it by hand (`flatnet agent --dry-run`).
impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mac = |m: &[u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        if let Some(v) = &self.vxlan {
            writeln!(
                f,
                "ip link add {} address {} mtu {} type vxlan id {} local {} dev <underlay> dstport {} nolearning",
                v.name, mac(&v.mac), v.mtu, v.vni, v.local, v.port
            )?;
            writeln!(f, "ip addr add {} dev {}", v.addr, v.name)?;
        }
        for r in &self.routes {
            match r.via {
                Via::Underlay => writeln!(
                    f,
                    "ip route replace {} via {} dev <underlay> proto {PROTOCOL}",
                    r.dst, r.gw
                )?,
                Via::Vxlan => writeln!(
                    f,
                    "ip route replace {} via {} dev {VXLAN_DEVICE} onlink proto {PROTOCOL}",
                    r.dst, r.gw
                )?,
            }
        }
        for (ip, m) in &self.neighbours {
            writeln!(
                f,
                "ip neigh replace {ip} lladdr {} dev {VXLAN_DEVICE} nud permanent",
                mac(m)
            )?;
        }
        for (m, dst) in &self.fdb {
            writeln!(
                f,
                "bridge fdb replace {} dev {VXLAN_DEVICE} dst {dst} self permanent",
                mac(m)
            )?;
        }
        write!(f, "nft -f - <<EOF\n{}EOF", self.masquerade)
    }
}

/// A node's VTEP MAC: derived from its name, locally administered and unicast.
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let h = Sha256::digest(format!("flatnet-vtep:{node}").as_bytes());
    [(h[0] & 0xfe) | 0x02, h[1], h[2], h[3], h[4], h[5]]
}

pub fn plan(cfg: &Config, me: &Me, nodes: &[NodeInfo]) -> Plan {
    let mut p = Plan {
        vxlan: None,
        routes: Vec::new(),
        fdb: Vec::new(),
        neighbours: Vec::new(),
        masquerade: masquerade(cfg.cluster_cidr),
    };
    if cfg.backend != Backend::HostGw {
        p.vxlan = Some(VxlanPlan {
            name: VXLAN_DEVICE.into(),
            vni: VXLAN_VNI,
            port: VXLAN_PORT,
            local: me.ip,
            mtu: cfg.underlay_mtu - VXLAN_OVERHEAD,
            mac: vtep_mac(&me.name),
            addr: Ipv4Net::new(me.pod_cidr.network(), 32).expect("/32"),
        });
    }
    for n in nodes {
        if n.name == me.name || n.ip == me.ip {
            continue;
        }
        let direct = match cfg.backend {
            Backend::HostGw => true,
            Backend::Vxlan => false,
            Backend::Auto => me.underlay.contains(&n.ip),
        };
        if direct {
            p.routes.push(PlannedRoute {
                dst: n.pod_cidr,
                gw: n.ip,
                via: Via::Underlay,
            });
        } else {
            let vtep = n.pod_cidr.network();
            let mac = vtep_mac(&n.name);
            p.routes.push(PlannedRoute {
                dst: n.pod_cidr,
                gw: vtep,
                via: Via::Vxlan,
            });
            p.neighbours.push((vtep, mac));
            p.fdb.push((mac, n.ip));
        }
    }
    p.routes.sort();
    p.fdb.sort();
    p.neighbours.sort();
    p
}

/// The node's masquerade table: pod traffic leaving the cluster CIDR takes the node's address.
fn masquerade(cluster: Ipv4Net) -> String {
    format!(
        "table {NFT_TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {cluster} ip daddr {cluster} return
    ip saddr {cluster} ip daddr 224.0.0.0/4 return
    ip saddr {cluster} masquerade fully-random
  }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, cidr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ip: ip.parse().unwrap(),
            pod_cidr: cidr.parse().unwrap(),
            labels: Default::default(),
        }
    }

    fn cluster() -> Vec<NodeInfo> {
        vec![
            node("a", "172.18.0.2", "10.244.0.0/24"),
            node("b", "172.18.0.3", "10.244.1.0/24"),
            node("c", "172.19.0.2", "10.244.2.0/24"),
        ]
    }

    fn me() -> Me {
        Me {
            name: "a".into(),
            ip: "172.18.0.2".parse().unwrap(),
            underlay: "172.18.0.0/24".parse().unwrap(),
            pod_cidr: "10.244.0.0/24".parse().unwrap(),
        }
    }

    fn cfg(backend: Backend) -> Config {
        Config {
            backend,
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            underlay_mtu: 1500,
        }
    }

    #[test]
    fn host_gw_routes_via_node_ips_and_no_device() {
        let p = plan(&cfg(Backend::HostGw), &me(), &cluster());
        assert!(p.vxlan.is_none());
        assert_eq!(
            p.routes,
            vec![
                PlannedRoute {
                    dst: "10.244.1.0/24".parse().unwrap(),
                    gw: "172.18.0.3".parse().unwrap(),
                    via: Via::Underlay
                },
                PlannedRoute {
                    dst: "10.244.2.0/24".parse().unwrap(),
                    gw: "172.19.0.2".parse().unwrap(),
                    via: Via::Underlay
                },
            ]
        );
        assert!(p.fdb.is_empty() && p.neighbours.is_empty());
    }

    #[test]
    fn vxlan_has_one_route_neighbour_and_fdb_entry_per_remote() {
        let p = plan(&cfg(Backend::Vxlan), &me(), &cluster());
        let v = p.vxlan.unwrap();
        assert_eq!(v.mtu, 1450);
        assert_eq!(v.addr.to_string(), "10.244.0.0/32");
        assert_eq!(v.mac, vtep_mac("a"));
        assert_eq!(p.routes.len(), 2);
        assert!(p
            .routes
            .iter()
            .all(|r| r.via == Via::Vxlan && r.gw == r.dst.network()));
        assert_eq!(
            p.neighbours,
            vec![
                ("10.244.1.0".parse().unwrap(), vtep_mac("b")),
                ("10.244.2.0".parse().unwrap(), vtep_mac("c"))
            ]
        );
        let mut fdb = vec![
            (vtep_mac("b"), "172.18.0.3".parse().unwrap()),
            (vtep_mac("c"), "172.19.0.2".parse().unwrap()),
        ];
        fdb.sort();
        assert_eq!(p.fdb, fdb);
    }

    #[test]
    fn auto_goes_direct_on_the_segment_and_vxlan_beyond() {
        let p = plan(&cfg(Backend::Auto), &me(), &cluster());
        let b = p
            .routes
            .iter()
            .find(|r| r.dst.to_string() == "10.244.1.0/24")
            .unwrap();
        let c = p
            .routes
            .iter()
            .find(|r| r.dst.to_string() == "10.244.2.0/24")
            .unwrap();
        assert_eq!(
            (b.via, b.gw.to_string().as_str()),
            (Via::Underlay, "172.18.0.3")
        );
        assert_eq!(
            (c.via, c.gw.to_string().as_str()),
            (Via::Vxlan, "10.244.2.0")
        );
        assert_eq!(p.fdb.len(), 1);
        assert_eq!(p.neighbours.len(), 1);
    }

    #[test]
    fn dry_run_reads_as_commands() {
        let text = plan(&cfg(Backend::Auto), &me(), &cluster()).to_string();
        assert!(
            text.contains("ip route replace 10.244.1.0/24 via 172.18.0.3 dev <underlay> proto 201"),
            "{text}"
        );
        assert!(
            text.contains(
                "ip route replace 10.244.2.0/24 via 10.244.2.0 dev flatnet.1 onlink proto 201"
            ),
            "{text}"
        );
        assert!(text.contains("bridge fdb replace"), "{text}");
        assert!(text.contains("masquerade"), "{text}");
    }

    #[test]
    fn vtep_macs_are_unicast_local_and_distinct() {
        let (a, b) = (vtep_mac("node-1"), vtep_mac("node-2"));
        assert_ne!(a, b);
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn masquerade_spares_pod_to_pod() {
        let p = plan(&cfg(Backend::Vxlan), &me(), &[]);
        assert!(p
            .masquerade
            .contains("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return"));
        assert!(p.routes.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn every_remote_node_gets_exactly_one_route(n in 1usize..40, backend in 0u8..3) {
            let backend = [Backend::HostGw, Backend::Vxlan, Backend::Auto][backend as usize];
            let nodes: Vec<NodeInfo> = (0..n).map(|i| node(&format!("n{i}"), &format!("172.{}.0.{}", 18 + i % 2, 2 + i), &format!("10.244.{i}.0/24"))).collect();
            let me = Me { name: "n0".into(), ip: nodes[0].ip, underlay: "172.18.0.0/24".parse().unwrap(), pod_cidr: nodes[0].pod_cidr };
            let p = plan(&cfg(backend), &me, &nodes);
            proptest::prop_assert_eq!(p.routes.len(), n - 1);
            proptest::prop_assert_eq!(p.fdb.len(), p.neighbours.len());
            proptest::prop_assert!(p.routes.iter().all(|r| r.dst != me.pod_cidr));
        }
    }
}
