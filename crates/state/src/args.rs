//! The source flags every daemon shares (`--source`, `--dir`, `--kubeconfig`, `--api-server`)
//! and starting the source they name.

use crate::kube::{Connection, Watch};
use clap::{Args, ValueEnum};
use cluster::store::{Store, Update};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// A directory of manifests (`--dir`), watched with inotify: the lab's, or your own.
    File,
    /// The Kubernetes API (`--kubeconfig`, `$KUBECONFIG`, or the in-cluster service account).
    Kube,
}

#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Where cluster state comes from.
    #[arg(long, value_enum, default_value = "file")]
    pub source: SourceKind,
    /// The file source's directory of manifests.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The kube source's kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kube source's API server URL, overriding the kubeconfig's (e.g.
    /// https://192.168.1.10:6443: the agent cannot use the `kubernetes` ClusterIP before its own
    /// rules exist).
    #[arg(long, env = "FLATNET_API_SERVER")]
    pub api_server: Option<String>,
}

impl SourceArgs {
    /// Starts the source; its batches arrive on the returned channel.
    pub fn start(&self, watches: Vec<Watch>) -> Result<Receiver<Vec<Update>>, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        match self.source {
            SourceKind::File => {
                let dir = self.dir.clone().ok_or("--source file needs --dir")?;
                crate::file::watch(dir, tx)?;
            }
            SourceKind::Kube => {
                let c = Connection {
                    kubeconfig: self.kubeconfig.clone(),
                    api_server: self.api_server.clone().filter(|s| !s.is_empty()),
                };
                crate::kube::watch(&c, watches, tx)?;
            }
        }
        Ok(rx)
    }

    /// The whole state once (for `--once`, `--dry-run`): waits until the source has listed
    /// every kind, for at most `timeout`.
    pub fn load(&self, watches: Vec<Watch>, timeout: Duration) -> Result<Store, String> {
        let rx = self.start(watches)?;
        let deadline = Instant::now() + timeout;
        let mut store = Store::new();
        let mut last_error = None;
        while !store.synced() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(batch) => {
                    store.apply(batch);
                    last_error = store.take_errors().pop().or(last_error);
                }
                Err(_) => {
                    return Err(format!(
                        "the {:?} source did not deliver the cluster state within {timeout:?}{}",
                        self.source,
                        last_error.map(|e| format!(": {e}")).unwrap_or_default()
                    ))
                }
            }
        }
        Ok(store)
    }
}
