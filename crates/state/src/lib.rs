//! The sources of cluster state: the `kube` source (kube-rs watchers on the Kubernetes API) and
//! the `file` source (a directory of manifests under inotify), both feeding the same
//! [`cluster::Store`] through [`cluster::Update`] batches on a channel; the daemons' shared
//! source flags, metrics and status endpoints; and a stand-in API server for tests and benches.

pub mod args;
pub mod file;
pub mod kube;
pub mod metrics;
pub mod standin;

pub use args::{SourceArgs, SourceKind};
pub use metrics::SourceMetrics;
