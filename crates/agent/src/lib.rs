//! The node agent: reads cluster state from a source, plans this node's routing and applies it,
//! again whenever the state changes (polled every 100 ms, so a joining or leaving node is
//! routed within a second) and every 10 s regardless (repairing drift). Like flanneld, it
//! takes its network settings from a Flannel-style `net-conf.json`.

pub mod cli;
pub mod health;

use cluster::{Backend, ClusterState, FileSource, NodeInfo};
use ipnet::{IpNet, Ipv4Net};
use netlink::{LinkInfo, Netlink};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

/// Flannel's net-conf.json: `{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}`;
/// `"DirectRouting": true` on vxlan (Flannel's spelling) or `"Type": "auto"` both mean auto.
pub fn read_net_conf(path: &Path) -> Result<(Ipv4Net, Backend), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let network = v
        .get("Network")
        .and_then(|n| n.as_str())
        .ok_or_else(|| {
            format!(
                "{}: field Network (the cluster CIDR) is missing",
                path.display()
            )
        })?
        .parse::<Ipv4Net>()
        .map_err(|e| format!("{}: field Network: {e}", path.display()))?;
    let ty = v
        .pointer("/Backend/Type")
        .and_then(|t| t.as_str())
        .unwrap_or("vxlan");
    let direct = v
        .pointer("/Backend/DirectRouting")
        .and_then(|d| d.as_bool())
        .unwrap_or(false);
    let backend = match (ty, direct) {
        ("host-gw", _) => Backend::HostGw,
        ("vxlan", false) => Backend::Vxlan,
        ("vxlan", true) | ("auto", _) => Backend::Auto,
        (other, _) => {
            return Err(format!(
                "{}: field Backend.Type: {other:?} is not one of host-gw, vxlan, auto",
                path.display()
            ))
        }
    };
    Ok((network, backend))
}

pub struct Agent {
    pub node: String,
    pub source: FileSource,
    pub cluster_cidr: Ipv4Net,
    pub backend: Backend,
    pub service_cidr: Ipv4Net,
    pub node_ports: (u16, u16),
    pub status_file: Option<std::path::PathBuf>,
}

/// Where this node sits: the link and subnet holding its node IP.
fn underlay(nl: &Netlink, ip: Ipv4Addr) -> Result<(u32, Ipv4Net, u32), String> {
    let (idx, net) = nl
        .all_addresses()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find_map(|(i, a)| match a {
            IpNet::V4(v4) if v4.addr() == ip => Some((i, v4)),
            _ => None,
        })
        .ok_or_else(|| format!("no interface holds the node IP {ip}"))?;
    let mtu = nl
        .links()
        .map_err(|e| e.to_string())?
        .iter()
        .find(|l| l.index() == idx)
        .and_then(|l| l.mtu())
        .unwrap_or(1500);
    Ok((idx, net.trunc(), mtu))
}

impl Agent {
    /// This node in `state`.
    fn me<'a>(&self, state: &'a ClusterState) -> Result<&'a NodeInfo, String> {
        state
            .nodes
            .iter()
            .find(|n| n.name == self.node)
            .ok_or_else(|| format!("node {:?} is not in the cluster state (yet)", self.node))
    }

    /// This node's plan for `state`, and the index of its underlay device.
    pub fn plan(&self, nl: &Netlink, state: &ClusterState) -> Result<(routing::Plan, u32), String> {
        let me = self.me(state)?;
        let (dev, subnet, mtu) = underlay(nl, me.ip)?;
        let cfg = routing::Config {
            backend: self.backend,
            cluster_cidr: self.cluster_cidr,
            underlay_mtu: mtu,
        };
        let who = routing::Me {
            name: me.name.clone(),
            ip: me.ip,
            underlay: subnet,
            pod_cidr: me.pod_cidr,
        };
        Ok((routing::plan(&cfg, &who, &state.nodes), dev))
    }

    /// One reconcile against `state`; returns what changed.
    pub fn sync(&self, nl: &Netlink, state: &ClusterState) -> Result<routing::Changes, String> {
        let (plan, dev) = self.plan(nl, state)?;
        routing::apply(nl, &plan, dev)
    }

    /// The service proxy's view of this node.
    fn proxy_config(&self, state: &ClusterState) -> Result<proxy::Config, String> {
        let me = self.me(state)?;
        Ok(proxy::Config {
            node: self.node.clone(),
            node_ips: vec![me.ip],
            cluster_cidr: self.cluster_cidr,
            service_cidr: self.service_cidr,
            node_ports: self.node_ports,
        })
    }

    /// Brings the service proxy up to `state`: only changed Services are re-planned and sent.
    fn sync_proxy(
        &self,
        proxy: &mut Option<proxy::Proxy>,
        state: &ClusterState,
    ) -> Result<proxy::Report, String> {
        let cfg = self.proxy_config(state)?;
        let p = match proxy {
            Some(p) => {
                p.set_config(cfg);
                p
            }
            None => proxy.insert(proxy::Proxy::new(cfg)?),
        };
        p.replace_all(&state.services, &state.endpoint_slices, &state.pods);
        let before = p.errors.clone();
        let report = p.sync();
        for (svc, e) in &p.errors {
            if before.get(svc) != Some(e) {
                let what = match svc.1.strip_prefix("pod/") {
                    Some(pod) => format!("hostPorts of Pod {}/{pod}", svc.0),
                    None => format!("Service {}/{}", svc.0, svc.1),
                };
                self.log(&format!(
                    "{what} not applied (its last good rules stay): {e}"
                ));
            }
        }
        report
    }

    fn log(&self, msg: &str) {
        eprintln!(
            "{:.3} agent {}: {msg}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            self.node
        );
    }

    /// Loads the state and syncs once.
    pub fn once(&self, nl: &Netlink) -> Result<routing::Changes, String> {
        let state = self.source.load().map_err(|e| e.to_string())?;
        self.sync(nl, &state)
    }

    /// Runs until killed.
    pub fn run(&self) -> ! {
        let nl = loop {
            match Netlink::connect() {
                Ok(nl) => break nl,
                Err(e) => {
                    self.log(&format!("netlink: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        let mut seen = None;
        let mut last = Instant::now() - Duration::from_secs(3600);
        let mut proxy = None;
        let mut health = health::HealthChecks::default();
        loop {
            let fp = self.source.fingerprint();
            if seen != Some(fp) || last.elapsed() > Duration::from_secs(10) {
                match self.source.load() {
                    Ok(state) => {
                        let routed = self.sync(&nl, &state);
                        match &routed {
                            Ok(ch) if ch.total() > 0 => self.log(&format!("routes synced: {ch:?}")),
                            Ok(_) => {}
                            Err(e) => self.log(&format!("routing sync failed (will retry): {e}")),
                        }
                        let proxied = self.sync_proxy(&mut proxy, &state);
                        if let Some(p) = &proxy {
                            let any = |p: u16| std::net::SocketAddr::from(([0, 0, 0, 0], p));
                            for (port, e) in health.update(&p.health_checks(), any) {
                                self.log(&format!("healthCheckNodePort {port}: {e}"));
                            }
                        }
                        match &proxied {
                            Ok(r) if r.objects == 0 => {}
                            Ok(r) => self.log(&format!(
                                "service proxy synced: {} Services, {} kernel objects",
                                r.services, r.objects
                            )),
                            Err(e) => {
                                self.log(&format!("service proxy sync failed (will retry): {e}"))
                            }
                        }
                        if routed.is_ok() && proxied.is_ok() {
                            seen = Some(fp);
                            if let Some(f) = &self.status_file {
                                let tmp = f.with_extension("tmp");
                                let _ = std::fs::write(&tmp, fp.to_string())
                                    .and_then(|()| std::fs::rename(&tmp, f));
                            }
                        }
                    }
                    Err(e) => self.log(&format!("reading cluster state (will retry): {e}")),
                }
                last = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
