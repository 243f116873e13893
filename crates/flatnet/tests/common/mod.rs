//! What the lab tests share: a lab with a unique name and its own `--root`, taken down when the
//! test ends (also on failure), and the probes they send.
#![allow(dead_code)] // each test crate uses its share

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_flatnet");

pub struct TestLab {
    pub name: String,
    pub root: tempfile::TempDir,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl TestLab {
    pub fn new() -> Option<TestLab> {
        if !netns::can_create() {
            eprintln!("skipped: needs root to create network namespaces");
            return None;
        }
        let name = format!(
            "t{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        Some(TestLab {
            name,
            root: tempfile::tempdir().unwrap(),
        })
    }

    pub fn flatnet(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("lab")
            .arg("--root")
            .arg(self.root.path())
            .args(["--name", &self.name])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn file(&self, spec: &str, workloads: &str) -> PathBuf {
        let p = self.root.path().join("lab.yaml");
        let text = format!(
            "apiVersion: flatnet.dev/v1alpha1\nkind: Lab\nmetadata: {{name: {}}}\nspec: {spec}\n---\n{workloads}",
            self.name
        );
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `lab apply FILE`, which must succeed.
    pub fn apply(&self, file: &Path) {
        let out = self.flatnet(&["apply", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "lab apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `lab apply` of manifests given as text.
    pub fn apply_text(&self, manifests: &str) {
        let f = self.root.path().join("more.yaml");
        std::fs::write(&f, manifests).unwrap();
        self.apply(&f);
    }

    pub fn up(&self, file: &Path) {
        let out = Command::new(BIN)
            .args(["lab", "up", "--root"])
            .arg(self.root.path())
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lab up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn status(&self) -> Value {
        let out = self.flatnet(&["status", "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn ns(&self, role: &str) -> netns::NetNs {
        netns::NetNs::open(format!("/run/netns/flatnet.{}.{role}", self.name)).unwrap()
    }

    pub fn namespaces(&self) -> Vec<String> {
        let prefix = format!("flatnet.{}.", self.name);
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Routes with flatnet's protocol in a node's namespace.
    pub fn flatnet_routes(&self, node: &str) -> usize {
        let ns = self.ns(&format!("node.{node}"));
        let nl = netlink::Netlink::connect_in(&ns).unwrap();
        nl.routes(true)
            .unwrap()
            .iter()
            .filter(|r| r.protocol == Some(201))
            .count()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.flatnet(&["down"]);
    }
}

/// The line a `flatnet serve` echo port answers a new connection with (`pod=… node=… client=…`).
pub fn try_hello(
    from: &netns::NetNs,
    to: IpAddr,
    port: u16,
    wait: Duration,
) -> std::io::Result<String> {
    let addr = SocketAddr::new(to, port);
    from.run(|| -> std::io::Result<String> {
        let s = TcpStream::connect_timeout(&addr, wait)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    })?
}

/// [`try_hello`] that must succeed.
pub fn hello(from: &netns::NetNs, to: IpAddr, port: u16) -> String {
    try_hello(from, to, port, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("connecting to {to}:{port}: {e}"))
}

pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or("")
}
