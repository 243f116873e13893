//! `flatnet agent`: the node daemon's command line.

use crate::{read_net_conf, Agent};
use clap::Args;
use state::{SourceArgs, SourceKind, SourceMetrics};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct AgentArgs {
    /// This node's name (default: $NODE_NAME, else the hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Flannel-style network config: {"Network": CIDR, "Backend": {"Type": host-gw|vxlan|auto}}.
    #[arg(long, default_value = "/etc/flatnet/net-conf.json")]
    pub net_conf: PathBuf,
    /// The Service CIDR (ClusterIPs outside it are refused).
    #[arg(long, env = "FLATNET_SERVICE_CIDR", default_value = "10.96.0.0/12")]
    pub service_cidr: ipnet::Ipv4Net,
    /// The NodePort range, FIRST-LAST.
    #[arg(long, default_value = "30000-32767")]
    pub node_port_range: String,
    /// Where this node's CNI conflist (10-flatnet.conflist) is written once its pod CIDR is
    /// known. Default with `--source kube`: /etc/cni/net.d; with `--source file`: not written.
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// /healthz, /readyz and /metrics (empty: none).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub http: String,
    /// After each complete sync, write the source's mark here (so a lab or a test can wait for
    /// the agent to catch up).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Sync once, print what changed, exit.
    #[arg(long)]
    pub once: bool,
    /// Print the plan (routes, VXLAN device, FDB and neighbour entries, the service proxy's
    /// and the network policy's nftables tables) and exit without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Explain a packet from SRC (an address) to DST:PORT[/tcp|udp|sctp] on this node: its
    /// Service DNAT and the network policy verdict, then exit.
    #[arg(long, num_args = 2, value_names = ["SRC", "DST:PORT"])]
    pub explain: Option<Vec<String>>,
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

pub fn run(a: AgentArgs) -> ExitCode {
    let node = a.node.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    });
    let (cluster_cidr, backend) = match read_net_conf(&a.net_conf) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let Some(node_ports) = a
        .node_port_range
        .split_once('-')
        .and_then(|(lo, hi)| Some((lo.parse::<u16>().ok()?, hi.parse::<u16>().ok()?)))
        .filter(|(lo, hi)| lo <= hi)
    else {
        return fail(format!(
            "--node-port-range {:?}: use FIRST-LAST, e.g. 30000-32767",
            a.node_port_range
        ));
    };
    let http: Option<SocketAddr> = match a.http.as_str() {
        "" => None,
        h => match h.parse() {
            Ok(addr) => Some(addr),
            Err(_) => return fail(format!("--http {h:?}: expected IP:PORT")),
        },
    };
    let cni_conf_dir = a
        .cni_conf_dir
        .clone()
        .or_else(|| (a.source.source == SourceKind::Kube).then(|| PathBuf::from("/etc/cni/net.d")));
    let deny_metrics = Arc::new(crate::netpol::DenyMetrics::default());
    let agent = Agent {
        deny_metrics: Some(deny_metrics.clone()),
        watches: crate::watches(),
        node,
        cluster_cidr,
        backend,
        service_cidr: a.service_cidr,
        node_ports,
        status_file: a.status_file,
        cni_conf_dir,
    };
    if a.once || a.dry_run || a.explain.is_some() {
        let result = a
            .source
            .load(agent.watches.clone(), Duration::from_secs(30))
            .and_then(|store| {
                if let Some([from, to]) = a.explain.as_deref() {
                    return agent.explain(&store, from, to);
                }
                let nl = netlink::Netlink::connect().map_err(|e| format!("netlink: {e}"))?;
                if a.dry_run {
                    agent.dry_run(&nl, &store)
                } else {
                    agent.once(&nl, &store)
                }
            });
        return match result {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let metrics = Arc::new(SourceMetrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = http {
        let m = metrics.clone();
        let encode = move || {
            let mut r = prometheus_client::registry::Registry::default();
            m.register(&mut r);
            deny_metrics.register(&mut r);
            let mut out = String::new();
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
            out
        };
        if let Err(e) = state::metrics::serve_http(addr, ready.clone(), encode) {
            return fail(format!("--http {addr}: {e}"));
        }
    }
    let updates = match a.source.start(agent.watches.clone()) {
        Ok(rx) => rx,
        Err(e) => return fail(e),
    };
    match agent.run(updates, metrics, ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
