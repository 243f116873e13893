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
    /// Sync once, print what changed, exit.
    #[arg(long)]
    pub once: bool,
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
    let agent = Agent {
        node,
        source: cluster::FileSource::new(a.dir),
        cluster_cidr,
        backend,
    };
    if a.once {
        let nl = match netlink::Netlink::connect() {
            Ok(nl) => nl,
            Err(e) => {
                eprintln!("error: netlink: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match agent.once(&nl) {
            Ok(ch) => {
                println!("{ch:?}");
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
