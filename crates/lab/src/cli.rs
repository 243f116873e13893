//! `flatnet lab …`: the quickstart commands.

use crate::{graph, Lab, DEFAULT_ROOT};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build a lab from manifest files (one holds the `kind: Lab` document); idempotent.
    Up { files: Vec<PathBuf> },
    /// Add or change Pods, Deployments, StatefulSets, DaemonSets and Services in the running lab.
    Apply { files: Vec<PathBuf> },
    /// Remove a Pod, Deployment, StatefulSet, DaemonSet or Service (`lab delete service NAME -n NAMESPACE`).
    Delete {
        kind: String,
        object: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Nodes and pods with their addresses, like `kubectl get -o wide`.
    Status {
        /// `json` for machine-readable output.
        #[arg(short, long)]
        output: Option<String>,
    },
    /// Run a command inside a pod's network namespace: `lab exec POD -- CMD…`; or on the lab
    /// internet's host (203.0.113.10, resolving through its DNS), outside the cluster: `lab exec
    /// --internet -- curl https://shop.example.com/`.
    Exec {
        #[arg(required_unless_present = "internet")]
        pod: Option<String>,
        /// Run on the lab internet's host instead of in a pod.
        #[arg(long, conflicts_with = "pod")]
        internet: bool,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Walk a packet through the Service rules of the node it leaves from: `lab explain POD
    /// IP:PORT[/udp|/sctp]` (the source is a pod's name, or an address with --node).
    Explain {
        from: String,
        to: String,
        /// The node whose rules apply when FROM is an address.
        #[arg(long)]
        node: Option<String>,
    },
    /// Add or remove a node.
    Node {
        #[command(subcommand)]
        op: NodeOp,
    },
    /// Remove everything the lab made (also after a crash).
    Down,
    /// Benchmarks: bring-up time by size, and iperf3 throughput against raw baselines.
    Bench {
        /// Nodes of the bring-up labs.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Pod counts to bring up, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,100,500,1000")]
        sizes: Vec<usize>,
        /// Skip the bring-up runs.
        #[arg(long)]
        no_bring_up: bool,
        /// Skip the iperf3 runs.
        #[arg(long)]
        no_iperf: bool,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// iperf3 runs per path (alternating with its baseline); the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Run a node's probes (the lab starts one per node, in the node's namespace).
    #[command(hide = true)]
    Kubelet { node: String },
    /// Write a picture of the lab (SVG).
    Graph {
        #[arg(short, long, default_value = "lab.svg")]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum NodeOp {
    Add {
        node: String,
        /// Index of the underlay subnet to join.
        #[arg(long, default_value_t = 0)]
        subnet: usize,
        /// Node labels, key=value.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    Remove {
        node: String,
    },
}

#[derive(clap::Args)]
pub struct LabArgs {
    /// Where labs keep their state.
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Which lab (default: the only one under --root).
    #[arg(long, global = true)]
    pub name: Option<String>,
    #[command(subcommand)]
    pub cmd: LabCmd,
}

pub fn run(a: LabArgs) -> ExitCode {
    match run_inner(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(a: LabArgs) -> Result<ExitCode, String> {
    let find = || Lab::find(&a.root, a.name.as_deref());
    match a.cmd {
        LabCmd::Up { files } => {
            if files.is_empty() {
                return Err("lab up FILE…: name at least one manifest file (see examples/)".into());
            }
            let started = std::time::Instant::now();
            let lab = Lab::up(&a.root, &files)?;
            print!("{}", lab.status(false)?);
            eprintln!(
                "ready in {:.1} s; try: flatnet lab exec POD -- curl …",
                started.elapsed().as_secs_f64()
            );
        }
        LabCmd::Apply { files } => {
            let lab = find()?;
            let _lock = lab.lock()?;
            lab.apply(&files)?
        }
        LabCmd::Delete {
            kind,
            object,
            namespace,
        } => {
            let lab = find()?;
            let _lock = lab.lock()?;
            lab.delete(&kind, &object, &namespace)?
        }
        LabCmd::Kubelet { node } => crate::kubelet::run(&find()?, &node)?,
        LabCmd::Status { output } => {
            let json = match output.as_deref() {
                None | Some("wide") => false,
                Some("json") => true,
                Some(o) => return Err(format!("--output {o:?}: use json or wide")),
            };
            print!("{}", find()?.status(json)?);
        }
        LabCmd::Exec {
            pod,
            internet,
            namespace,
            command,
        } => {
            let lab = find()?;
            let code = match pod {
                Some(pod) if !internet => lab.exec(&pod, &namespace, &command)?,
                _ => lab.exec_internet(&command)?,
            };
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        LabCmd::Node {
            op:
                NodeOp::Add {
                    node,
                    subnet,
                    labels,
                },
        } => {
            let labels = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| format!("--label {l:?}: use key=value"))
                })
                .collect::<Result<_, _>>()?;
            let lab = find()?;
            let _lock = lab.lock()?;
            lab.node_add(&node, subnet, labels)?;
        }
        LabCmd::Node {
            op: NodeOp::Remove { node },
        } => {
            let lab = find()?;
            let _lock = lab.lock()?;
            lab.node_remove(&node)?
        }
        LabCmd::Down => {
            let lab = find()?;
            let _lock = lab.lock()?;
            lab.down()?
        }
        LabCmd::Explain { from, to, node } => {
            println!("{}", find()?.explain(&from, &to, node.as_deref())?)
        }
        LabCmd::Bench {
            nodes,
            sizes,
            no_bring_up,
            no_iperf,
            seconds,
            rounds,
        } => {
            std::fs::create_dir_all(&a.root).map_err(|e| format!("{}: {e}", a.root.display()))?;
            if !no_bring_up {
                crate::bench::bring_up(&a.root, nodes, &sizes)?;
            }
            if !no_iperf {
                crate::bench::throughput(&a.root, seconds, rounds.max(1))?;
            }
        }
        LabCmd::Graph { output } => {
            let s = find()?.load()?;
            std::fs::write(&output, graph::svg(&s))
                .map_err(|e| format!("{}: {e}", output.display()))?;
            eprintln!("wrote {}", output.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
