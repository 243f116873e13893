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

use cluster::Update;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Adds to `batch` what else arrives on `rx` until it has been quiet for `quiet`, for at most
/// `max`: changes made together (a Service and its EndpointSlice, written a millisecond apart)
/// are then applied as one batch, one kernel transaction. Returns false once `rx` is closed.
pub fn gather(
    rx: &Receiver<Vec<Update>>,
    batch: &mut Vec<Update>,
    quiet: Duration,
    max: Duration,
) -> bool {
    let deadline = Instant::now() + max;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        match rx.recv_timeout(quiet.min(left)) {
            Ok(more) => batch.extend(more),
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// Writes `text` to `path` atomically: aside first, then renamed into place, so a reader (a
/// runtime reading a CNI config, a lab reading a status file) sees the old or the new file whole.
/// `<dir>/<hostname><suffix>`: where one replica of a daemon reports the state it loaded, so a
/// lab or a test can wait for every replica.
pub fn replica_status_path(dir: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    dir.join(format!("{}{suffix}", host.trim()))
}

pub fn write_atomic(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
