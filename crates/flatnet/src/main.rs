//! The one flatnet binary. With `CNI_COMMAND` set it is a CNI plugin (how runtimes call
//! `/opt/cni/bin/flatnet`); otherwise it is the command line. This file only dispatches.

use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flatnet",
    version,
    about = "The Kubernetes network model on the real Linux dataplane"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// CNI tools: conformance suite and benchmark for any CNI plugin binary.
    Cni {
        #[command(subcommand)]
        tool: cni_harness::cli::Tool,
    },
    /// A multi-node cluster network on this machine, out of network namespaces.
    Lab(lab::cli::LabArgs),
    /// The node daemon: keeps this node's routes to every other node's pods.
    Agent(agent::cli::AgentArgs),
    /// The lab's built-in workload: HTTP and TCP/UDP echo naming the pod and the client it saw.
    Serve(serve::ServeArgs),
    /// The cluster DNS server: the Kubernetes DNS specification's records, forwarding, cache
    /// (`flatnet dns bench`: against unbound and knot).
    #[command(args_conflicts_with_subcommands = true)]
    Dns {
        #[command(subcommand)]
        tool: Option<dns::cli::DnsTool>,
        #[command(flatten)]
        args: dns::cli::DnsArgs,
    },
    /// The HTTP edge: Ingress and Gateway API routes over HTTP/1.1, HTTP/2 and TLS, straight to
    /// the endpoints; route changes swap in without dropping a request (`flatnet ingress
    /// bench`: against nginx and haproxy).
    #[command(args_conflicts_with_subcommands = true)]
    Ingress {
        #[command(subcommand)]
        tool: Option<ingress::bench::IngressTool>,
        #[command(flatten)]
        args: ingress::daemon::Options,
    },
    /// Copies this binary into a CNI plugin directory as `flatnet` (atomically), as the
    /// DaemonSet's init container does on every node.
    InstallCni {
        /// The host's CNI plugin directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        dest: std::path::PathBuf,
    },
    /// Cluster-state tools: propagation benchmark (one change → kernel and DNS, per source).
    State {
        #[command(subcommand)]
        tool: StateTool,
    },
    /// Service-proxy tools: sync cost benchmark.
    Proxy {
        #[command(subcommand)]
        tool: ProxyTool,
    },
    /// Network-policy tools: change-to-kernel and data-path benchmark.
    Policy {
        #[command(subcommand)]
        tool: PolicyTool,
    },
}

#[derive(Subcommand)]
enum PolicyTool {
    /// Cold start, policy / pod-label / namespace-label changes to the kernel, and the data path
    /// between two selected pods with the table and without (needs root, iperf3).
    Bench {
        /// Pods in the cluster (one in 100 on this node).
        #[arg(long, default_value_t = 10_000)]
        pods: usize,
        /// Policies.
        #[arg(long, default_value_t = 1000)]
        policies: usize,
        /// Changes timed of each kind.
        #[arg(long, default_value_t = 30)]
        changes: usize,
    },
}

#[derive(Subcommand)]
enum StateTool {
    /// With N Services present, times one EndpointSlice, Service and Node change from the
    /// `file` and the `kube` source to the kernel and to DNS answers (needs root).
    Bench {
        /// Service counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        sizes: Vec<usize>,
        /// Endpoints per Service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Changes timed of each kind.
        #[arg(long, default_value_t = 30)]
        changes: usize,
    },
}

#[derive(Subcommand)]
enum ProxyTool {
    /// Cold-start, add-one, change-one and restart costs with N Services present, beside the
    /// structure with a chain per endpoint (needs root).
    Bench {
        /// Service counts, comma-separated; `SERVICESxENDPOINTS` sets the endpoints of one size
        /// (e.g. `10000,1000x1000`).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        sizes: Vec<String>,
        /// Endpoints per Service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
    },
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni_main();
    }
    let cli = Cli::parse();
    // Daemon logs (and kube-rs's) through tracing, to stderr; FLATNET_LOG filters (default info).
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLATNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match cli.command {
        Cmd::Cni { tool } => cni_harness::cli::run(tool),
        Cmd::Lab(a) => lab::cli::run(a),
        Cmd::Agent(a) => agent::cli::run(a),
        Cmd::Serve(a) => serve::main(a),
        Cmd::Dns { tool: Some(t), .. } => dns::cli::tool(t),
        Cmd::Dns { tool: None, args } => dns::cli::main(args),
        Cmd::Ingress { tool: Some(t), .. } => ingress::bench::tool(t),
        Cmd::Ingress { tool: None, args } => {
            report(ingress::daemon::run(args).map(|()| "drained".into()))
        }
        Cmd::State {
            tool:
                StateTool::Bench {
                    sizes,
                    endpoints,
                    changes,
                },
        } => {
            let o = agent::bench::BenchOptions {
                sizes,
                endpoints,
                changes,
            };
            report(agent::bench::run(&o))
        }
        Cmd::Policy {
            tool:
                PolicyTool::Bench {
                    pods,
                    policies,
                    changes,
                },
        } => match policy::bench::run(pods, policies, changes) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::InstallCni { dest } => {
            report(install_cni(&dest).map(|p| format!("installed {}", p.display())))
        }
        Cmd::Proxy {
            tool: ProxyTool::Bench { sizes, endpoints },
        } => match sizes
            .iter()
            .map(|s| proxy::bench::parse_shape(s, endpoints))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|shapes| proxy::bench::run(&shapes))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Prints a command's report, or its error.
fn report(r: Result<String, String>) -> ExitCode {
    match r {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Copies the running binary to `<dest>/flatnet`: written aside, then renamed over the old
/// one, so a runtime calling the plugin meanwhile runs either the old or the new binary whole.
fn install_cni(dest: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    std::fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let target = dest.join("flatnet");
    let tmp = dest.join(".flatnet.tmp");
    std::fs::copy(&me, &tmp)
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        })
        .and_then(|()| std::fs::rename(&tmp, &target))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", target.display())
        })?;
    Ok(target)
}

fn cni_main() -> ExitCode {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = cni_plugin::run(|k| std::env::var(k).ok(), &stdin);
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(out.stdout.as_bytes());
    let _ = so.flush();
    ExitCode::from(out.exit_code as u8)
}
