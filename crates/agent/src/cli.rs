//! `flatnet agent`: the node daemon's command line.

use crate::{read_net_conf, Agent};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, ValueEnum)]
pub enum Source {
    /// A directory of manifests (Node objects) — the lab's, or any you write.
    File,
}

#[derive(Args)]
pub struct AgentArgs {
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub node: Option<String>,
    #[arg(long, value_enum, default_value = "file")]
    pub source: Source,
    /// The manifest directory of the file source.
    #[arg(long)]
    pub dir: PathBuf,
    /// Flannel-style network config: {"Network": CIDR, "Backend": {"Type": host-gw|vxlan|auto}}.
    #[arg(long, default_value = "/etc/flatnet/net-conf.json")]
    pub net_conf: PathBuf,
    /// The Service CIDR (ClusterIPs outside it are refused).
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: ipnet::Ipv4Net,
    /// The NodePort range, FIRST-LAST.
    #[arg(long, default_value = "30000-32767")]
    pub node_port_range: String,
    /// After each complete sync, write the fingerprint of the state it applied here (so a lab or
    /// a test can wait for the agent to catch up).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Sync once, print what changed, exit.
    #[arg(long)]
    pub once: bool,
    /// Print the plan (routes, VXLAN device, FDB and neighbour entries, nftables) and exit
    /// without changing anything.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(a: AgentArgs) -> ExitCode {
    let node = a.node.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    });
    let (cluster_cidr, backend) = match read_net_conf(&a.net_conf) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(node_ports) = a
        .node_port_range
        .split_once('-')
        .and_then(|(lo, hi)| Some((lo.parse::<u16>().ok()?, hi.parse::<u16>().ok()?)))
        .filter(|(lo, hi)| lo <= hi)
    else {
        eprintln!(
            "error: --node-port-range {:?}: use FIRST-LAST, e.g. 30000-32767",
            a.node_port_range
        );
        return ExitCode::FAILURE;
    };
    let agent = Agent {
        node,
        source: cluster::FileSource::new(a.dir),
        cluster_cidr,
        backend,
        service_cidr: a.service_cidr,
        node_ports,
        status_file: a.status_file,
    };
    if a.once || a.dry_run {
        let result = netlink::Netlink::connect()
            .map_err(|e| format!("netlink: {e}"))
            .and_then(|nl| {
                if a.dry_run {
                    let state = agent.source.load().map_err(|e| e.to_string())?;
                    agent.plan(&nl, &state).map(|(plan, _)| plan.to_string())
                } else {
                    agent.once(&nl).map(|ch| format!("{ch:?}"))
                }
            });
        return match result {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    agent.run()
}
