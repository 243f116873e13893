//! The attachment planner: configuration + IPAM result → the exact links, addresses, routes and
//! masquerade rules an ADD creates. Pure, so every mode and option is unit-tested without root.
//!
//! **bridge** (the reference `bridge` plugin's model, the one the seeds draw): one bridge per node
//! (`cni0`), holding the gateway address when `isGateway`; per pod a veth pair, host end enslaved
//! to the bridge, pod end renamed to `CNI_IFNAME` and given the pod's addresses with a prefix the
//! size of the subnet, so same-node pods talk over L2 and the rest goes via the gateway.
//! Per node: 1 bridge, 1 address per family; per pod: 1 veth pair, 1 FDB entry learned.
//!
//! **ptp** (Calico's model, the reference `ptp` plugin's addressing): no bridge; the pod end gets a
//! /32 (/128) and reaches the gateway address through an on-link route; the host end carries the
//! gateway address and the host a /32 route to the pod. Per pod: 1 veth pair, 1 host route, no L2
//! flooding between pods, every packet routed by the node.
//!
//! Both: names and MACs are derived from the attachment (stable per pod, found again by DEL
//! without the pod's namespace); IPv6 addresses skip duplicate address detection so they work at
//! once (`enabledad` turns it back on); `ipMasq` masquerades traffic from the pod subnets to
//! anything outside them and outside `clusterCIDR`, with one nftables chain per network rather
//! than one per pod.

use crate::conf::{Mode, NetConf};
use crate::naming;
use cni_spec::{CniResult, Dns, Interface, IpConfig, Route};
use ipnet::IpNet;
use std::net::IpAddr;
use std::path::PathBuf;

/// Who the attachment is.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub bridge: Option<BridgePlan>,
    pub host: HostEnd,
    pub pod: PodEnd,
    /// IPv4 / IPv6 forwarding to switch on in the host namespace.
    pub forward_v4: bool,
    pub forward_v6: bool,
    /// The nftables script for `ipMasq`, idempotent per network.
    pub masquerade: Option<String>,
    pub dns: Dns,
    /// Routes as reported in the result (what IPAM asked for, plus the default route).
    pub result_routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePlan {
    pub name: String,
    pub mtu: Option<u32>,
    pub gateway_addrs: Vec<IpNet>,
    pub force_address: bool,
    pub promisc: bool,
    pub hairpin: bool,
    pub isolated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEnd {
    pub name: String,
    pub mac: [u8; 6],
    pub alias: String,
    /// ptp: the gateway addresses (/32, /128) and one host route per pod address.
    pub addrs: Vec<IpNet>,
    pub routes: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEnd {
    pub ifname: String,
    pub mac: [u8; 6],
    pub mtu: Option<u32>,
    pub addrs: Vec<IpNet>,
    pub routes: Vec<PodRoute>,
    pub up: bool,
    pub nodad: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    pub route: Route,
    /// On-link route to the gateway itself (ptp).
    pub scope_link: bool,
}

pub fn plan(conf: &NetConf, att: &Attachment, ipam: &CniResult, mac: Option<[u8; 6]>) -> Plan {
    let (net, id, ifname) = (&att.network, &att.container_id, &att.ifname);
    let gateways: Vec<IpAddr> = ipam.ips.iter().filter_map(|i| i.gateway).collect();
    let gw_of = |v4: bool| gateways.iter().copied().find(|g| g.is_ipv4() == v4);
    let has_v4 = ipam.ips.iter().any(|i| i.address.addr().is_ipv4());
    let has_v6 = ipam.ips.iter().any(|i| i.address.addr().is_ipv6());

    // Result routes: IPAM's, plus a default route per family via the gateway when asked.
    let mut result_routes: Vec<Route> = ipam.routes.clone();
    if conf.mode == Mode::Bridge && conf.is_default_gateway {
        for gw in &gateways {
            let default: IpNet = if gw.is_ipv4() {
                "0.0.0.0/0".parse().unwrap()
            } else {
                "::/0".parse().unwrap()
            };
            result_routes.retain(|r| r.dst != default);
            result_routes.push(Route::new(default, Some(*gw)));
        }
    }
    // In the pod, a route without a gateway goes via the gateway of its family (as the reference
    // plugins configure it); one with no gateway of its family is on-link.
    let mut pod_routes: Vec<PodRoute> = Vec::new();
    if conf.mode == Mode::Ptp {
        for gw in &gateways {
            let host = IpNet::new(*gw, if gw.is_ipv4() { 32 } else { 128 }).unwrap();
            pod_routes.push(PodRoute {
                route: Route::new(host, None),
                scope_link: true,
            });
        }
    }
    for r in &result_routes {
        let gw = r.gw.or_else(|| gw_of(r.dst.addr().is_ipv4()));
        pod_routes.push(PodRoute {
            route: Route { gw, ..r.clone() },
            scope_link: false,
        });
    }

    let pod_addrs: Vec<IpNet> = ipam
        .ips
        .iter()
        .map(|i| match conf.mode {
            Mode::Bridge => i.address,
            Mode::Ptp => IpNet::new(i.address.addr(), i.address.max_prefix_len()).unwrap(),
        })
        .collect();

    let bridge = (conf.mode == Mode::Bridge).then(|| BridgePlan {
        name: conf.bridge.clone(),
        mtu: conf.mtu,
        gateway_addrs: if conf.is_gateway {
            ipam.ips
                .iter()
                .filter_map(|i| {
                    i.gateway
                        .map(|g| IpNet::new(g, i.address.prefix_len()).unwrap())
                })
                .collect()
        } else {
            vec![]
        },
        force_address: conf.force_address,
        promisc: conf.promisc_mode,
        hairpin: conf.hairpin_mode,
        isolated: conf.port_isolation,
    });
    let host = HostEnd {
        name: naming::host_veth(net, id, ifname),
        mac: naming::mac("host", net, id, ifname),
        alias: naming::alias(net, id, ifname),
        addrs: if conf.mode == Mode::Ptp {
            gateways
                .iter()
                .map(|g| IpNet::new(*g, if g.is_ipv4() { 32 } else { 128 }).unwrap())
                .collect()
        } else {
            vec![]
        },
        routes: if conf.mode == Mode::Ptp {
            pod_addrs.clone()
        } else {
            vec![]
        },
    };
    let routed = conf.mode == Mode::Ptp || conf.is_gateway;
    Plan {
        bridge,
        host,
        pod: PodEnd {
            ifname: ifname.clone(),
            mac: mac.unwrap_or_else(|| naming::mac("pod", net, id, ifname)),
            mtu: conf.mtu,
            addrs: pod_addrs,
            routes: pod_routes,
            up: !conf.disable_container_interface,
            nodad: !conf.enable_dad,
        },
        forward_v4: routed && has_v4,
        forward_v6: routed && has_v6,
        masquerade: conf
            .ip_masq
            .then(|| masquerade_script(net, &ipam.ips, &conf.cluster_cidrs)),
        dns: ipam.dns.clone(),
        result_routes,
    }
}

pub const NFT_TABLE: &str = "flatnet-cni";

/// The chain name for a network's masquerade rules: readable, and unique even when two network
/// names differ only in characters nft identifiers cannot hold.
pub fn masquerade_chain(network: &str) -> String {
    let clean: String = network
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let tag = &naming::host_veth(network, "", "")[2..8];
    format!("masq_{clean}_{tag}")
}

/// One base chain per network at postrouting/srcnat, rewritten whole on every ADD (add + flush +
/// rules in one transaction), so applying it twice changes nothing and never duplicates a rule.
pub fn masquerade_script(network: &str, ips: &[IpConfig], cluster: &[IpNet]) -> String {
    let chain = masquerade_chain(network);
    let mut s = format!(
        "add table inet {NFT_TABLE}\n\
         add chain inet {NFT_TABLE} {chain} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain inet {NFT_TABLE} {chain}\n"
    );
    let mut subnets: Vec<IpNet> = ips.iter().map(|i| i.address.trunc()).collect();
    subnets.dedup();
    for subnet in subnets {
        let (fam, multicast) = if subnet.addr().is_ipv4() {
            ("ip", "224.0.0.0/4")
        } else {
            ("ip6", "ff00::/8")
        };
        let mut keep: Vec<String> = vec![subnet.to_string()];
        keep.extend(
            cluster
                .iter()
                .filter(|c| c.addr().is_ipv4() == subnet.addr().is_ipv4())
                .map(|c| c.to_string()),
        );
        keep.push(multicast.to_string());
        s += &format!(
            "add rule inet {NFT_TABLE} {chain} {fam} saddr {subnet} {fam} daddr != {{ {} }} masquerade comment {}\n",
            keep.join(", "),
            nft::quote(&format!("flatnet network {network}"))
        );
    }
    s
}

impl Plan {
    /// The ADD result in the reference plugins' shape: bridge mode lists [bridge, host veth, pod
    /// interface], ptp [host veth, pod interface]; every IP points at the pod interface.
    pub fn result(&self, ipam: &CniResult, bridge_mac: Option<[u8; 6]>, netns: &str) -> CniResult {
        let mut interfaces = Vec::new();
        if let Some(b) = &self.bridge {
            interfaces.push(Interface {
                name: b.name.clone(),
                mac: bridge_mac.map(netlink::format_mac),
                ..Default::default()
            });
        }
        interfaces.push(Interface {
            name: self.host.name.clone(),
            mac: Some(netlink::format_mac(self.host.mac)),
            ..Default::default()
        });
        interfaces.push(Interface {
            name: self.pod.ifname.clone(),
            mac: Some(netlink::format_mac(self.pod.mac)),
            mtu: self.pod.mtu,
            sandbox: Some(netns.to_string()),
            ..Default::default()
        });
        let pod_index = interfaces.len() - 1;
        CniResult {
            cni_version: String::new(),
            interfaces,
            ips: ipam
                .ips
                .iter()
                .map(|i| IpConfig {
                    interface: Some(pod_index),
                    ..i.clone()
                })
                .collect(),
            routes: self.result_routes.clone(),
            dns: self.dns.clone(),
        }
    }
}

/// Chaining: a plugin that is not first adds its interfaces and IPs to what came before.
pub fn merge(prev: Option<&CniResult>, ours: CniResult) -> CniResult {
    let Some(prev) = prev else { return ours };
    let offset = prev.interfaces.len();
    let mut out = prev.clone();
    out.interfaces.extend(ours.interfaces);
    out.ips.extend(ours.ips.into_iter().map(|i| IpConfig {
        interface: i.interface.map(|x| x + offset),
        ..i
    }));
    out.routes.extend(ours.routes);
    out.dns = prev.dns.clone().or(&ours.dns);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(extra: serde_json::Value) -> NetConf {
        let mut v = json!({"cniVersion": "1.1.0", "name": "k8s", "type": "flatnet"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        NetConf::parse(&v).unwrap()
    }

    fn att() -> Attachment {
        Attachment {
            network: "k8s".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/p".into(),
        }
    }

    fn ipam() -> CniResult {
        CniResult {
            ips: vec![
                IpConfig {
                    version: None,
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: None,
                },
                IpConfig {
                    version: None,
                    address: "fd00:1::5/64".parse().unwrap(),
                    gateway: Some("fd00:1::1".parse().unwrap()),
                    interface: None,
                },
            ],
            routes: vec![Route::new("10.96.0.0/12".parse().unwrap(), None)],
            ..Default::default()
        }
    }

    #[test]
    fn bridge_gateway_default_route() {
        let p = plan(
            &conf(json!({"isDefaultGateway": true, "mtu": 1450, "hairpinMode": true})),
            &att(),
            &ipam(),
            None,
        );
        let b = p.bridge.as_ref().unwrap();
        assert_eq!(b.name, "cni0");
        assert_eq!(
            b.gateway_addrs,
            vec![
                "10.244.1.1/24".parse::<IpNet>().unwrap(),
                "fd00:1::1/64".parse().unwrap()
            ]
        );
        assert!(b.hairpin);
        assert_eq!(p.pod.addrs[0].to_string(), "10.244.1.5/24");
        let dsts: Vec<String> = p
            .pod
            .routes
            .iter()
            .map(|r| format!("{} {:?}", r.route.dst, r.route.gw))
            .collect();
        assert_eq!(
            dsts,
            vec![
                "10.96.0.0/12 Some(10.244.1.1)",
                "0.0.0.0/0 Some(10.244.1.1)",
                "::/0 Some(fd00:1::1)"
            ]
        );
        assert!(p.forward_v4 && p.forward_v6);
        assert!(p.pod.nodad && p.pod.up);
        let r = p.result(&ipam(), Some([2, 0, 0, 0, 0, 1]), "/run/netns/p");
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.interfaces[2].sandbox.as_deref(), Some("/run/netns/p"));
        assert!(r.ips.iter().all(|i| i.interface == Some(2)));
        assert_eq!(r.routes.len(), 3);
    }

    #[test]
    fn bridge_without_gateway_adds_no_address_and_no_forwarding() {
        let p = plan(&conf(json!({})), &att(), &ipam(), None);
        assert!(p.bridge.unwrap().gateway_addrs.is_empty());
        assert!(!p.forward_v4);
        assert!(p.masquerade.is_none());
    }

    #[test]
    fn ptp_routes_through_host_end() {
        let p = plan(&conf(json!({"mode": "ptp"})), &att(), &ipam(), None);
        assert!(p.bridge.is_none());
        assert_eq!(p.pod.addrs[0].to_string(), "10.244.1.5/32");
        assert_eq!(p.pod.addrs[1].to_string(), "fd00:1::5/128");
        assert!(
            p.pod.routes[0].scope_link && p.pod.routes[0].route.dst.to_string() == "10.244.1.1/32"
        );
        assert_eq!(p.host.addrs[0].to_string(), "10.244.1.1/32");
        assert_eq!(p.host.routes, p.pod.addrs);
        let r = p.result(&ipam(), None, "/x");
        assert_eq!(r.interfaces.len(), 2);
        assert!(r.ips.iter().all(|i| i.interface == Some(1)));
    }

    #[test]
    fn masquerade_is_per_network_and_exempts_cluster() {
        let p = plan(
            &conf(json!({"ipMasq": true, "clusterCIDR": ["10.244.0.0/16", "fd00::/48"]})),
            &att(),
            &ipam(),
            None,
        );
        let s = p.masquerade.unwrap();
        assert!(s.contains("flush chain inet flatnet-cni masq_k8s_"), "{s}");
        assert!(s.contains("ip saddr 10.244.1.0/24 ip daddr != { 10.244.1.0/24, 10.244.0.0/16, 224.0.0.0/4 } masquerade"), "{s}");
        assert!(s.contains("ip6 saddr fd00:1::/64 ip6 daddr != { fd00:1::/64, fd00::/48, ff00::/8 } masquerade"), "{s}");
        assert_ne!(masquerade_chain("a.b"), masquerade_chain("a_b"));
    }

    #[test]
    fn requested_mac_wins_and_default_is_stable() {
        let a = plan(&conf(json!({})), &att(), &ipam(), None);
        let b = plan(&conf(json!({})), &att(), &ipam(), None);
        assert_eq!(a.pod.mac, b.pod.mac);
        let c = plan(
            &conf(json!({})),
            &att(),
            &ipam(),
            Some([0x0a, 0, 0, 0, 0, 9]),
        );
        assert_eq!(c.pod.mac, [0x0a, 0, 0, 0, 0, 9]);
    }

    #[test]
    fn merge_offsets_interface_indexes() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "x".into(),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                version: None,
                address: "1.1.1.1/32".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            ..Default::default()
        };
        let p = plan(&conf(json!({})), &att(), &ipam(), None);
        let m = merge(Some(&prev), p.result(&ipam(), None, "/x"));
        assert_eq!(m.interfaces.len(), 4);
        assert_eq!(m.ips[0].interface, Some(0));
        assert_eq!(m.ips[1].interface, Some(3));
    }
}
