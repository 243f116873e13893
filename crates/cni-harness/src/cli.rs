//! `flatnet cni conformance` and `flatnet cni bench`.

use crate::{bench, conflist::NetList, conformance::Suite};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum Tool {
    /// Walk a plugin (config or conflist) through the CNI spec's rules inside throw-away namespaces.
    Conformance {
        /// Network config or conflist naming the plugin(s) to test.
        #[arg(long)]
        config: PathBuf,
        /// Where plugin binaries are looked up (CNI_PATH), colon-separated.
        #[arg(
            long,
            default_value = "/opt/cni/bin:/usr/lib/cni",
            value_delimiter = ':'
        )]
        cni_path: Vec<PathBuf>,
        /// Capability arguments (JSON object) for plugins that declare them, e.g. '{"portMappings": [...]}'.
        #[arg(long, default_value = "{}")]
        runtime_config: String,
    },
    /// Time ADD and DEL of flatnet against the reference bridge + host-local, then a concurrency soak.
    Bench {
        /// ADD+DEL cycles per plugin.
        #[arg(long, default_value_t = 200)]
        cycles: usize,
        /// Directory of the reference plugins (Debian: containernetworking-plugins).
        #[arg(long, default_value = "/usr/lib/cni")]
        reference_dir: PathBuf,
        /// The flatnet binary to measure (default: this one).
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// Benchmark with ipMasq on (both plugins).
        #[arg(long)]
        ip_masq: bool,
        /// Concurrent ADDs (then DELs) into one network; 0 skips.
        #[arg(long, default_value_t = 200)]
        concurrent: usize,
    },
}

pub fn run(tool: Tool) -> ExitCode {
    match tool {
        Tool::Conformance {
            config,
            cni_path,
            runtime_config,
        } => {
            let outcome = (|| -> Result<bool, String> {
                let list = NetList::load(&config)?;
                let rc = serde_json::from_str(&runtime_config)
                    .map_err(|e| format!("--runtime-config: {e}"))?;
                let node = netns::TempNetNs::new("cnic-node")
                    .map_err(|e| format!("creating the node namespace (needs root): {e}"))?;
                let mut suite = Suite::new(list, cni_path, node.ns(), rc);
                suite.run_all().map_err(|e| e.to_string())?;
                print!("{}", suite.report());
                Ok(suite.failures() == 0)
            })();
            finish(outcome)
        }
        Tool::Bench {
            cycles,
            reference_dir,
            plugin,
            ip_masq,
            concurrent,
        } => {
            let outcome = (|| -> Result<bool, String> {
                let bin = match plugin {
                    Some(p) => p,
                    None => std::env::current_exe().map_err(|e| e.to_string())?,
                };
                // Plugins are found by type name: give flatnet its own directory holding "flatnet".
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                std::os::unix::fs::symlink(&bin, dir.path().join("flatnet"))
                    .map_err(|e| e.to_string())?;
                let data = tempfile::tempdir().map_err(|e| e.to_string())?;
                let pair = bench::standard_pair(dir.path(), &reference_dir, data.path(), ip_masq);
                println!("{cycles} ADD+DEL cycles each, alternating, ipMasq={ip_masq}");
                let samples = bench::latency(&pair, cycles, 5)?;
                print!("{}", bench::latency_report(&pair, &samples));
                if concurrent > 0 {
                    print!("{}", bench::concurrent(&pair[0], concurrent, data.path())?);
                }
                Ok(true)
            })();
            finish(outcome)
        }
    }
}

fn finish(outcome: Result<bool, String>) -> ExitCode {
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
