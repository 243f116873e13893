//! The `file` source: a directory of manifests (`*.yaml`, `*.yml`, `*.json`, in any
//! subdirectory), watched with inotify. A changed file is read again, alone, and what it
//! defined before is diffed against what it defines now; nothing else is read. The lab writes
//! its cluster state this way (one file per Node, Service, EndpointSlice and Pod), and anyone can
//! point an agent at a directory of their own manifests.
//!
//! Files are expected to be replaced atomically (written aside, renamed into place), as the lab
//! and `kubectl`-style tools do; a file that does not parse keeps what it defined before and is
//! reported as an [`Update::Error`]. Each update batch ends with an [`Update::Mark`]: the
//! directory's [`fingerprint`] as the source has read it, which a lab compares with the
//! fingerprint of what it wrote.

use cluster::store::{Key, Kind, Update};
use cluster::Manifests;
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// After a first event, further events are gathered until this much quiet (a lab writes a
/// Service, its slices and pods in a row: one batch), and at most for `GATHER_MAX`.
const QUIET: Duration = Duration::from_millis(3);
const GATHER_MAX: Duration = Duration::from_millis(30);

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// One file's share of the fingerprint: its path, size and modification time.
fn file_print(p: &Path, m: &std::fs::Metadata) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    m.len().hash(&mut h);
    (m.mtime(), m.mtime_nsec()).hash(&mut h);
    h.finish()
}

/// The manifest files under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if is_manifest(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The directory's fingerprint: changes whenever a manifest file appears, goes or is rewritten.
/// A sum of per-file hashes, so the watcher keeps it up to date file by file.
pub fn fingerprint(dir: &Path) -> u64 {
    files(dir)
        .iter()
        .filter_map(|p| Some(file_print(p, &std::fs::metadata(p).ok()?)))
        .fold(0u64, u64::wrapping_add)
}

/// What the source has read: each file's objects and print.
#[derive(Default)]
struct Reader {
    files: HashMap<PathBuf, (u64, Vec<(Kind, Key)>)>,
    /// Which file an object came from (a later file defining it again takes it over).
    owner: HashMap<(Kind, Key), PathBuf>,
    /// Directories holding files read (a removed one is recognised without a walk).
    dirs: HashSet<PathBuf>,
    fingerprint: u64,
}

impl Reader {
    /// Reads `path` again if it changed (or drops what it defined, if it is gone).
    fn read(&mut self, path: &Path, out: &mut Vec<Update>) {
        let opened = std::fs::File::open(path).and_then(|f| Ok((f.metadata()?, f)));
        let (meta, mut file) = match opened {
            Ok(x) if x.0.is_file() => x,
            Ok(_) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(path, HashSet::new(), out);
                return;
            }
            Err(e) => {
                out.push(Update::Error(format!("{}: {e}", path.display())));
                return;
            }
        };
        let print = file_print(path, &meta);
        if self.files.get(path).is_some_and(|(p, _)| *p == print) {
            return;
        }
        let mut text = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut file, &mut text) {
            out.push(Update::Error(format!("{}: {e}", path.display())));
            return;
        }
        let objects = match Manifests::parse(&text, &path.display().to_string()) {
            Ok(m) => m.into_objects().collect::<Vec<_>>(),
            Err(e) => {
                out.push(Update::Error(e.to_string()));
                return;
            }
        };
        let keys: Vec<(Kind, Key)> = objects.iter().map(|o| (o.kind(), o.key())).collect();
        self.forget(path, keys.iter().cloned().collect(), out);
        for (o, k) in objects.into_iter().zip(&keys) {
            self.owner.insert(k.clone(), path.to_path_buf());
            out.push(Update::apply(o));
        }
        self.fingerprint = self.fingerprint.wrapping_add(print);
        self.files.insert(path.to_path_buf(), (print, keys));
        if let Some(d) = path.parent() {
            if !self.dirs.contains(d) {
                self.dirs.insert(d.to_path_buf());
            }
        }
    }

    /// Drops `path`'s record, deleting the objects it owned that `keeping` does not name.
    fn forget(&mut self, path: &Path, keeping: HashSet<(Kind, Key)>, out: &mut Vec<Update>) {
        let Some((print, keys)) = self.files.remove(path) else {
            return;
        };
        self.fingerprint = self.fingerprint.wrapping_sub(print);
        for k in keys {
            if !keeping.contains(&k) && self.owner.get(&k).map(PathBuf::as_path) == Some(path) {
                self.owner.remove(&k);
                out.push(Update::Delete(k.0, k.1));
            }
        }
    }

    /// Reads every file under `dir` that changed, and forgets the ones gone.
    fn rescan(&mut self, dir: &Path, out: &mut Vec<Update>) {
        let present = files(dir);
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| p.starts_with(dir) && !present.contains(p))
            .cloned()
            .collect();
        for p in gone {
            self.forget(&p, HashSet::new(), out);
        }
        for p in present {
            self.read(&p, out);
        }
    }
}

/// Reads the whole directory once (for one-shot use: `--once`, `explain`).
pub fn load(dir: &Path) -> Vec<Update> {
    let mut out = Vec::new();
    Reader::default().rescan(dir, &mut out);
    out.push(Update::Synced);
    out
}

/// Starts watching `dir`: the first batch is the whole directory (then `Synced`), each later
/// one what changed. Fails only if the directory cannot be watched.
pub fn watch(dir: PathBuf, tx: Sender<Vec<Update>>) -> Result<(), String> {
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (ntx, nrx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(ntx).map_err(|e| format!("inotify: {e}"))?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|e| format!("watching {}: {e}", dir.display()))?;
    std::thread::Builder::new()
        .name("file-source".into())
        .spawn(move || {
            let _watcher = watcher; // dropping it would end the events
            run(&dir, &nrx, &tx)
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn run(dir: &Path, events: &Receiver<notify::Result<notify::Event>>, tx: &Sender<Vec<Update>>) {
    let mut reader = Reader::default();
    let mut out = Vec::new();
    reader.rescan(dir, &mut out);
    out.push(Update::Synced);
    out.push(Update::Mark(reader.fingerprint.to_string()));
    if tx.send(out).is_err() {
        return;
    }
    loop {
        let first = match events.recv() {
            Ok(Ok(ev)) if matches!(ev.kind, EventKind::Access(_)) => continue,
            Ok(ev) => ev,
            Err(_) => return,
        };
        // Paths touched, and whether the kernel dropped events (then everything is re-read).
        let mut touched: Vec<PathBuf> = Vec::new();
        let mut rescan = false;
        let mut take = |ev: notify::Result<notify::Event>| match ev {
            // Reads (ours and every other reader's) are not changes.
            Ok(ev) if matches!(ev.kind, EventKind::Access(_)) => {}
            Ok(ev) => {
                rescan |= ev.need_rescan();
                touched.extend(ev.paths);
            }
            Err(_) => rescan = true,
        };
        take(first);
        let started = Instant::now();
        while started.elapsed() < GATHER_MAX {
            match events.recv_timeout(QUIET) {
                Ok(ev) => take(ev),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        touched.sort();
        touched.dedup();
        let mut out = Vec::new();
        if rescan {
            reader.rescan(dir, &mut out);
        } else {
            for p in &touched {
                if p.is_dir() {
                    // A new directory: its files may predate the watch on it.
                    reader.rescan(p, &mut out);
                } else if is_manifest(p) {
                    reader.read(p, &mut out);
                } else if reader.dirs.contains(p) && !p.exists() {
                    reader.dirs.retain(|d| !d.starts_with(p));
                    reader.rescan(p, &mut out); // a directory removed
                }
            }
        }
        out.push(Update::Mark(reader.fingerprint.to_string()));
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// A mark for a text file's content, for a reader to report what it loaded (the writer computes
/// the same mark of what it wrote).
pub fn text_mark(text: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Calls `changed` with the text of `path` (empty while it does not exist) now and again each
/// time the file is written, replaced or removed. The parent directory is watched, so an
/// atomic replace (write aside, rename) is seen.
pub fn watch_text(
    path: PathBuf,
    mut changed: impl FnMut(&str) + Send + 'static,
) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (ntx, nrx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(ntx).map_err(|e| format!("inotify: {e}"))?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("watching {}: {e}", dir.display()))?;
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut last = read(&path);
    changed(&last);
    std::thread::Builder::new()
        .name("text-watch".into())
        .spawn(move || {
            let _watcher = watcher; // dropping it would end the events
            while let Ok(ev) = nrx.recv() {
                let ours = match ev {
                    Ok(ev) => ev.need_rescan() || ev.paths.iter().any(|p| p == &path),
                    Err(_) => true,
                };
                // Several events per replace: the content decides.
                let now = read(&path);
                if ours && now != last {
                    changed(&now);
                    last = now;
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::Store;
    use k8s_openapi::api::core::v1::Service;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        crate::write_atomic(path, text).unwrap();
    }

    fn service(name: &str, port: u16) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: {port}}}]}}\n")
    }

    /// Receives batches until the store's mark equals the directory's fingerprint.
    fn settle(rx: &Receiver<Vec<Update>>, store: &mut Store, dir: &Path) -> usize {
        let want = fingerprint(dir).to_string();
        let mut changes = 0;
        while store.mark() != Some(want.as_str()) {
            let batch = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the watcher reports the change");
            changes += store.apply(batch).len();
        }
        changes
    }

    #[test]
    fn follows_files_as_they_are_written_renamed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("a.yaml"), &service("a", 80));
        let (tx, rx) = std::sync::mpsc::channel();
        watch(d.to_path_buf(), tx).unwrap();
        let mut store = Store::new();
        settle(&rx, &mut store, d);
        assert!(store.synced());
        assert_eq!(store.count(Kind::Service), 1);

        // A new file in a new subdirectory, two Services in one file.
        write(
            &d.join("sub/bc.yaml"),
            &format!("{}---\n{}", service("b", 1), service("c", 2)),
        );
        assert_eq!(settle(&rx, &mut store, d), 2);
        // Rewriting one file: only its changed object is a change.
        write(
            &d.join("sub/bc.yaml"),
            &format!("{}---\n{}", service("b", 1), service("c", 3)),
        );
        assert_eq!(settle(&rx, &mut store, d), 1);
        let c: &Service = store.get("default", "c").unwrap();
        assert_eq!(c.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 3);
        // An object dropped from its file is deleted; a removed file deletes its objects.
        write(&d.join("sub/bc.yaml"), &service("b", 1));
        assert_eq!(settle(&rx, &mut store, d), 1);
        assert!(store.get::<Service>("default", "c").is_none());
        std::fs::remove_file(d.join("a.yaml")).unwrap();
        assert_eq!(settle(&rx, &mut store, d), 1);
        assert_eq!(store.count(Kind::Service), 1);
        // A file that does not parse keeps what it had and is reported.
        write(&d.join("sub/bc.yaml"), "kind: [");
        let batch = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            batch
                .iter()
                .any(|u| matches!(u, Update::Error(e) if e.contains("bc.yaml"))),
            "{batch:?}"
        );
        store.apply(batch);
        assert_eq!(store.count(Kind::Service), 1);
        // Removing the whole subdirectory.
        std::fs::remove_dir_all(d.join("sub")).unwrap();
        settle(&rx, &mut store, d);
        assert_eq!(store.count(Kind::Service), 0);
    }

    #[test]
    fn load_reads_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("x/a.json"), &service("a", 80));
        write(&dir.path().join("b.yml"), &service("b", 80));
        write(&dir.path().join("notes.txt"), "not a manifest");
        let mut store = Store::new();
        store.apply(load(dir.path()));
        assert_eq!(store.count(Kind::Service), 2);
        assert!(store.synced());
    }

    #[test]
    fn watched_text_follows_replaces_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "1.2.3.4 a.example\n").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        watch_text(path.clone(), move |t| tx.send(t.to_string()).unwrap()).unwrap();
        let next = || rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(next(), "1.2.3.4 a.example\n");
        // Replaced atomically, as the lab writes it.
        let tmp = dir.path().join("hosts.tmp");
        std::fs::write(&tmp, "5.6.7.8 b.example\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(next(), "5.6.7.8 b.example\n");
        assert_eq!(
            text_mark("5.6.7.8 b.example\n"),
            text_mark("5.6.7.8 b.example\n")
        );
        assert_ne!(text_mark("x"), text_mark("y"));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(next(), "");
    }
}
