//! The node agent: reads cluster state through the store (fed by the `kube` or `file` source)
//! and keeps this node's routing, service proxy and network policy in step with it. Each batch
//! of changes goes to the part it touches: Node changes re-plan the routes (a plan over the
//! nodes, as flanneld's), Service, EndpointSlice and Pod changes re-plan only their Services'
//! share of the proxy table, Pod, Namespace and NetworkPolicy changes only the policy elements
//! they touch. Routes are also re-checked every 10 s, repairing drift. Like flanneld, it
//! takes its network settings from a Flannel-style `net-conf.json` and waits for its Node's pod
//! CIDR; once it has it, it writes the node's CNI configuration for the runtime.

pub mod bench;
pub mod cli;
pub mod health;
pub mod netpol;

use cluster::store::{Change, Kind, Store, Update};
use cluster::{Backend, NodeInfo};
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Node, Pod};
use netlink::{LinkInfo, Netlink};
use state::kube::Watch;
use state::SourceMetrics;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often routes are re-checked without a change.
const RECHECK: Duration = Duration::from_secs(10);
/// How soon a failed sync is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Changes arriving together are gathered into one sync: until 2 ms pass without news, for at
/// most 20 ms (each proxy sync costs the kernel a walk of its table, so two syncs cost twice).
const GATHER_QUIET: Duration = Duration::from_millis(2);
const GATHER_MAX: Duration = Duration::from_millis(20);

/// The kinds the agent reads (its RBAC follows from them: get, list, watch on each).
pub const KINDS: [Kind; 6] = [
    Kind::Node,
    Kind::Namespace,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
    Kind::NetworkPolicy,
];

/// What the agent watches: every object of [`KINDS`]. Every pod, not only its node's: policies
/// name their peers by pod and namespace labels (as kube-router's and Calico's agents watch).
pub fn watches() -> Vec<Watch> {
    KINDS.into_iter().map(Watch::all).collect()
}

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
    /// What it watches ([`watches`] of its node).
    pub watches: Vec<Watch>,
    pub cluster_cidr: Ipv4Net,
    pub backend: Backend,
    pub service_cidr: Ipv4Net,
    pub node_ports: (u16, u16),
    /// After each complete sync, the source's mark is written here.
    pub status_file: Option<PathBuf>,
    /// Where this node's CNI conflist goes once its pod CIDR is known (none: not written).
    pub cni_conf_dir: Option<PathBuf>,
    /// Where denied packets are counted (none: the drop log is not read).
    pub deny_metrics: Option<Arc<netpol::DenyMetrics>>,
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
    /// This node's routing facts, once its Node has a pod CIDR and an InternalIP.
    fn me(&self, store: &Store) -> Result<NodeInfo, String> {
        let node = store
            .get::<Node>("", &self.node)
            .ok_or_else(|| format!("node {:?} is not in the cluster state (yet)", self.node))?;
        NodeInfo::from_node(node).ok_or_else(|| {
            format!(
                "node {:?} has no spec.podCIDR or InternalIP address yet (waiting, as flanneld does)",
                self.node
            )
        })
    }

    fn routing_config(&self, mtu: u32) -> routing::Config {
        routing::Config {
            backend: self.backend,
            cluster_cidr: self.cluster_cidr,
            underlay_mtu: mtu,
        }
    }

    /// This node's routing plan for the nodes in `store`, the index of its underlay device and
    /// its underlay MTU.
    pub fn plan(&self, nl: &Netlink, store: &Store) -> Result<(routing::Plan, u32, u32), String> {
        let me = self.me(store)?;
        let (dev, subnet, mtu) = underlay(nl, me.ip)?;
        let who = routing::Me {
            name: me.name.clone(),
            ip: me.ip,
            underlay: subnet,
            pod_cidr: me.pod_cidr,
        };
        let mut nodes: Vec<NodeInfo> = store
            .list::<Node>()
            .filter_map(NodeInfo::from_node)
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((
            routing::plan(&self.routing_config(mtu), &who, &nodes),
            dev,
            mtu,
        ))
    }

    /// The service proxy's view of this node.
    fn proxy_config(&self, me: &NodeInfo) -> proxy::Config {
        proxy::Config {
            node: self.node.clone(),
            node_ips: vec![me.ip],
            cluster_cidr: self.cluster_cidr,
            service_cidr: self.service_cidr,
            pod_cidr: me.pod_cidr,
            node_ports: self.node_ports,
        }
    }

    /// This node's whole service-proxy table for a snapshot (`--dry-run`, `--explain`).
    fn proxy_rules(
        &self,
        snap: &cluster::ClusterState,
        me: &NodeInfo,
    ) -> Result<proxy::Ruleset, String> {
        let on_node: Vec<Pod> = (snap.pods.iter())
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.node))
            .cloned()
            .collect();
        proxy::plan::plan_node(
            &self.proxy_config(me),
            &snap.services,
            &snap.endpoint_slices,
            &on_node,
        )
        .map_err(|e| e.to_string())
    }

    /// The plan as `--dry-run` prints it: routes as `ip`/`bridge`/`nft` commands, then the
    /// service proxy's table as an `nft -f` script.
    pub fn dry_run(&self, nl: &Netlink, store: &Store) -> Result<String, String> {
        let (plan, _, _) = self.plan(nl, store)?;
        let rules = self.proxy_rules(&store.snapshot(), &self.me(store)?)?;
        let mut policies = policy::plan::Planner::new(&self.node, Some(self.me(store)?.pod_cidr));
        policies.take_store(store);
        Ok(format!(
            "# routing ({} backend)\n{plan}\n# service proxy (nft -f)\n{}\n# network policy (nft -f)\n{}",
            match self.backend {
                Backend::HostGw => "host-gw",
                Backend::Vxlan => "vxlan",
                Backend::Auto => "auto",
            },
            rules.render(),
            policies.render()
        ))
    }

    /// `--explain SRC DST:PORT[/proto]`: the packet's way through this node's service proxy and
    /// the policy verdict on each endpoint it may reach (the source's egress and the
    /// destination's ingress, naming the policies that deny it and why).
    pub fn explain(&self, store: &Store, from: &str, to: &str) -> Result<String, String> {
        let me = self.me(store)?;
        let src: Ipv4Addr = from
            .parse()
            .map_err(|_| format!("SRC {from:?} is not an IPv4 address"))?;
        let (dst, dport, proto) = proxy::parse_target(to).map_err(|e| format!("DST: {e}"))?;
        let snap = store.snapshot();
        let node_ips: Vec<Ipv4Addr> = snap.nodes.iter().map(|n| n.ip).collect();
        let rules = self.proxy_rules(&snap, &me)?;
        let pkt = proxy::Packet {
            src,
            dst,
            proto,
            dport,
            to_node: node_ips.contains(&dst),
        };
        let mut out = format!("on {}: {}", self.node, proxy::explain(&rules, &pkt));
        let src_node = (snap.nodes.iter())
            .find(|n| n.ip == src)
            .map(|n| n.name.as_str());
        let mut policies = policy::plan::Planner::new(&self.node, Some(me.pod_cidr));
        policies.take_store(store);
        for (ip, port) in proxy::destinations(&rules, &pkt) {
            let reached = policy::Packet {
                src,
                dst: ip,
                proto: proto.number(),
                port,
            };
            out += "\n";
            out += &policies.cluster.verdict_text(&reached, src_node);
        }
        Ok(out)
    }

    /// Syncs routing and the proxy once against `store`; returns what changed.
    pub fn once(&self, nl: &Netlink, store: &Store) -> Result<String, String> {
        let (plan, dev, _) = self.plan(nl, store)?;
        let routes = routing::apply(nl, &plan, dev)?;
        let mut p = proxy::Proxy::new(self.proxy_config(&self.me(store)?))?;
        p.take_store(store);
        let report = p.sync()?;
        let mut policies = None;
        self.sync_policy(&mut policies, store, &[], &self.me(store)?)?;
        let mut out = format!("{routes:?}");
        if report.objects > 0 {
            out += &format!(
                "\nservice proxy: {} Services, {} kernel objects",
                report.services, report.objects
            );
        }
        Ok(out)
    }

    /// Writes this node's CNI conflist (atomically; only when it changes).
    fn write_conflist(&self, me: &NodeInfo, mtu: u32) -> Result<(), String> {
        let Some(dir) = &self.cni_conf_dir else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(&routing::cni_conflist(
            &self.routing_config(mtu),
            me.pod_cidr,
            None,
        ))
        .expect("json");
        let path = dir.join("10-flatnet.conflist");
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        std::fs::create_dir_all(dir)
            .and_then(|()| state::write_atomic(&path, &text))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        tracing::info!(node = %self.node, "wrote {} (pod CIDR {})", path.display(), me.pod_cidr);
        Ok(())
    }

    /// Runs until the source ends: applies each batch of updates as it comes.
    pub fn run(
        &self,
        updates: Receiver<Vec<Update>>,
        metrics: Arc<SourceMetrics>,
        ready: Arc<AtomicBool>,
    ) -> Result<(), String> {
        let nl = loop {
            match Netlink::connect() {
                Ok(nl) => break nl,
                Err(e) => {
                    tracing::warn!(node = %self.node, "netlink: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        let mut store = Store::new();
        let mut proxy: Option<proxy::Proxy> = None;
        let mut policies: Option<netpol::PolicyPart> = None;
        let mut health = health::HealthChecks::default();
        let mut last_routing: Option<Instant> = None;
        let mut waiting_said = String::new();
        let mut failed = false;
        loop {
            // After a failed sync, try again within a second even without news.
            let wait = if failed { RETRY } else { RECHECK };
            let mut batch = match updates.recv_timeout(wait) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout) => Vec::new(),
                Err(RecvTimeoutError::Disconnected) => return Err("the source ended".into()),
            };
            if !batch.is_empty() && !state::gather(&updates, &mut batch, GATHER_QUIET, GATHER_MAX) {
                return Err("the source ended".into());
            }
            let started = Instant::now();
            metrics.observe(&batch);
            let changes = store.apply(batch);
            metrics.count(&store);
            for e in store.take_errors() {
                tracing::warn!(node = %self.node, "{e}");
            }
            if !store.synced() {
                continue; // never plan from half a listing: it would remove what the rest needs
            }
            let me = match self.me(&store) {
                Ok(me) => me,
                Err(e) => {
                    if e != waiting_said {
                        tracing::info!(node = %self.node, "{e}");
                        waiting_said = e;
                    }
                    continue;
                }
            };
            let nodes_changed = changes.iter().any(|c| c.kind == Kind::Node);
            let mut ok = true;
            if nodes_changed || failed || last_routing.is_none_or(|t| t.elapsed() >= RECHECK) {
                let t = Instant::now();
                let routed = self.plan(&nl, &store).and_then(|(plan, dev, mtu)| {
                    self.write_conflist(&me, mtu)?;
                    routing::apply(&nl, &plan, dev)
                });
                match routed {
                    Ok(ch) => {
                        if ch.total() > 0 {
                            tracing::info!(node = %self.node, "routes synced: {ch:?}");
                        }
                        last_routing = Some(Instant::now());
                        metrics.synced("routing", t.elapsed());
                    }
                    Err(e) => {
                        ok = false;
                        tracing::warn!(node = %self.node, "routing sync failed (will retry): {e}");
                    }
                }
            }
            let t = Instant::now();
            match self.sync_proxy(&mut proxy, &store, &changes, &me) {
                Ok(r) => {
                    if r.objects > 0 {
                        tracing::info!(node = %self.node, "service proxy synced: {} Services, {} kernel objects", r.services, r.objects);
                    }
                    metrics.synced("proxy", t.elapsed());
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(node = %self.node, "service proxy sync failed (will retry): {e}");
                }
            }
            let t = Instant::now();
            match self.sync_policy(&mut policies, &store, &changes, &me) {
                Ok(()) => metrics.synced("policy", t.elapsed()),
                Err(e) => {
                    ok = false;
                    tracing::warn!(node = %self.node, "network policy sync failed (will retry): {e}");
                }
            }
            if let Some(p) = &policies {
                metrics.set_refused("policy", p.planner.lock().expect("planner").errors.len());
            }
            if let Some(p) = &proxy {
                metrics.set_refused("proxy", p.errors.len());
                let any = |p: u16| std::net::SocketAddr::from(([0, 0, 0, 0], p));
                for (port, e) in health.update(&p.health_checks(), any) {
                    tracing::warn!(node = %self.node, "healthCheckNodePort {port}: {e}");
                }
            }
            failed = !ok;
            if ok {
                ready.store(true, Ordering::Relaxed);
                metrics.synced("agent", started.elapsed());
                if let (Some(f), Some(mark)) = (&self.status_file, store.mark()) {
                    let _ = state::write_atomic(f, mark);
                }
            }
        }
    }

    /// Brings the network policy table up to the store: the elements `changes` touch (the whole
    /// table at the start).
    fn sync_policy(
        &self,
        part: &mut Option<netpol::PolicyPart>,
        store: &Store,
        changes: &[Change],
        me: &NodeInfo,
    ) -> Result<(), String> {
        let p = match part {
            Some(p) => p,
            None => {
                let p = part.insert(netpol::PolicyPart::new(&self.node, store, me.pod_cidr)?);
                if let Some(m) = &self.deny_metrics {
                    p.watch_drops(&self.node, m.clone());
                }
                p
            }
        };
        let s = p.sync(&self.node, changes, me.pod_cidr)?;
        if s.whole {
            tracing::info!(node = %self.node, "network policy table loaded: {} elements", s.elements);
        } else if s.elements > 0 {
            tracing::debug!(node = %self.node, "network policy synced: {} elements changed", s.elements);
        }
        Ok(())
    }

    /// Brings the service proxy up to the store: only the Services that `changes` touch are
    /// re-planned and sent (all of them when the proxy starts or the node's facts change).
    fn sync_proxy(
        &self,
        proxy: &mut Option<proxy::Proxy>,
        store: &Store,
        changes: &[Change],
        me: &NodeInfo,
    ) -> Result<proxy::Report, String> {
        let cfg = self.proxy_config(me);
        let p = match proxy {
            Some(p) => {
                p.set_config(cfg);
                p.take_changes(changes);
                p
            }
            None => {
                let p = proxy.insert(proxy::Proxy::new(cfg)?);
                p.take_store(store);
                p
            }
        };
        let before = p.errors.clone();
        let report = p.sync();
        if let Some(listed) = report.as_ref().ok().filter(|r| !r.listed.is_empty()) {
            tracing::info!(node = %self.node, "adopting the service table, read whole (they held elements no plan accounts for): {}", listed.listed.join(", "));
        }
        for (svc, e) in &p.errors {
            if before.get(svc) != Some(e) {
                let what = match svc.1.strip_prefix("pod/") {
                    Some(pod) => format!("hostPorts of Pod {}/{pod}", svc.0),
                    None => format!("Service {}/{}", svc.0, svc.1),
                };
                tracing::warn!(node = %self.node, "{what} not applied (its last good rules stay): {e}");
            }
        }
        report
    }
}
