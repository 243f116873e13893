//! The lab: a whole cluster network on one machine, out of network namespaces.
//!
//! ```text
//!   flatnet.<lab>.internet  203.0.113.10 (runs `flatnet serve`)
//!            │
//!   flatnet.<lab>.router    .1 on every underlay subnet, 203.0.113.1; forwards, never NATs
//!            │
//!   flatnet.<lab>.underlay  one bridge per underlay subnet (ul0, ul1, …)
//!       │          │
//!   flatnet.<lab>.node.<n>  eth0 on the underlay, cni0 for its pods, flatnet.1 (VXLAN),
//!       │                   one `flatnet agent` reading <root>/cluster (the file source)
//!   flatnet.<lab>.pod.<ns>.<name>  eth0 from the real CNI plugin, the pod's processes
//! ```
//!
//! State lives in `<root>/<lab>/`: the lab document and manifests as applied, `state.json`
//! (written as the lab is built), the Node objects agents read, per-node CNI configs and IPAM,
//! logs. Everything the lab makes can also be found by its namespace prefix, so `down` works
//! after a crash too.

pub mod bench;
pub mod cli;
pub mod dns;
pub mod edge;
pub mod graph;
pub mod infra;
mod kubelet;
mod objects;
pub mod plan;
mod pods;
pub mod policies;
pub mod probes;
mod publish;
pub mod services;
mod status;

use cluster::{LabSpec, Manifests, NodeInfo};
use infra::{ns_name, Proc};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use netlink::LinkInfo;
use plan::{NodePlan, PodWant};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const DEFAULT_ROOT: &str = "/var/lib/flatnet/lab";
const INTERNET_HOST: &str = "203.0.113.10";
const INTERNET_ROUTER: &str = "203.0.113.1";
const CNI_VERSION: &str = "1.0.0";
/// How long a command waits for every agent and DNS pod to load the state it wrote. Twice in CI,
/// with a dozen labs starting at once on two CPUs, one of them missed a 15 s limit; the error now
/// carries the laggard's log, should it miss this one.
const SYNC_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ip: Option<Ipv4Addr>,
    pub hash: String,
    pub result: Value,
    pub procs: Vec<Proc>,
    /// Why a workload did not start, if one did not.
    pub error: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<plan::NamedPort>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub subdomain: Option<String>,
    /// Runs in its node's namespace with the node's address (no CNI, nothing of its own to
    /// remove but its processes).
    #[serde(default)]
    pub host_network: bool,
    /// The containers as started (the prober restarts one from here), probes included.
    #[serde(default)]
    pub workloads: Vec<plan::Workload>,
    /// Containers whose readiness probe has not passed (yet, or any more); none: Ready.
    #[serde(default)]
    pub not_ready: Vec<String>,
    /// Container restarts after failed liveness probes.
    #[serde(default)]
    pub restarts: u32,
}

impl PodRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the pod serves: running and every readiness probe passing.
    pub fn is_ready(&self) -> bool {
        self.not_ready.is_empty() && self.status() == "Running"
    }

    /// `kubectl get pods`' READY: running containers whose readiness probe (if any) passes.
    pub fn ready_column(&self) -> String {
        let ready = (self.workloads.iter().zip(&self.procs))
            .filter(|(w, p)| p.alive() && !self.not_ready.contains(&w.container))
            .count();
        format!("{ready}/{}", self.procs.len().max(self.workloads.len()))
    }

    /// `kubectl get pods`' STATUS: Running while every process runs.
    pub fn status(&self) -> &'static str {
        if self.error.is_some() {
            "Error"
        } else if self.procs.iter().all(Proc::alive) {
            "Running"
        } else {
            "Completed"
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub spec: LabSpec,
    pub nodes: Vec<NodePlan>,
    pub agents: BTreeMap<String, Proc>,
    /// Each node's prober (the kubelet's probe runner).
    #[serde(default)]
    pub kubelets: BTreeMap<String, Proc>,
    pub internet: Option<Proc>,
    /// The lab internet's DNS server (`example.com`, the cluster DNS's upstream).
    #[serde(default)]
    pub internet_dns: Option<Proc>,
    pub pods: Vec<PodRecord>,
    pub pending: BTreeMap<String, String>,
    /// Set once `up` finished; a state without it is a crashed run.
    pub complete: bool,
    /// ClusterIPs and NodePorts the lab allocated, kept while their Service lives.
    #[serde(default)]
    pub allocations: services::Allocations,
    /// The Services as published (allocations filled in).
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A lab on disk.
pub struct Lab {
    pub dir: PathBuf,
    pub exe: PathBuf,
}

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    state::write_atomic(path, text).map_err(|e| io(path.display(), e))
}

/// Reads manifest files into one set.
pub fn read_files(files: &[PathBuf]) -> Result<Manifests, String> {
    let mut all = Manifests::default();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| io(f.display(), e))?;
        all.extend(Manifests::parse(&text, &f.display().to_string()).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    Ok(all)
}

/// Progress on a terminal (one line rewritten in place); a log gets only the final count.
fn progress(what: &str, done: usize, total: usize) {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    if tty {
        eprint!("\r{what}: {done}/{total}");
        if done == total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    } else if done == total {
        eprintln!("{what}: {total}/{total}");
    }
}

impl Lab {
    /// The lab called `name` under `root`, or the only lab there when `name` is `None`.
    pub fn find(root: &Path, name: Option<&str>) -> Result<Lab, String> {
        let exe = std::env::current_exe().map_err(|e| io("locating the flatnet binary", e))?;
        if let Some(n) = name {
            return Ok(Lab {
                dir: root.join(n),
                exe,
            });
        }
        let labs: Vec<PathBuf> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("state.json").exists())
            .collect();
        match labs.as_slice() {
            [one] => Ok(Lab {
                dir: one.clone(),
                exe,
            }),
            [] => Err(format!(
                "no lab under {} (run `flatnet lab up FILE` first)",
                root.display()
            )),
            _ => Err(format!(
                "several labs under {}; name one with --name",
                root.display()
            )),
        }
    }

    fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn load(&self) -> Result<State, String> {
        let p = self.dir.join("state.json");
        let text = std::fs::read_to_string(&p)
            .map_err(|e| io(format!("{} (is the lab up?)", p.display()), e))?;
        serde_json::from_str(&text).map_err(|e| io(p.display(), e))
    }

    /// Holds the lab's lock (beside its directory, so `down` cannot pull it from under a
    /// waiter) until dropped: every command that changes the lab, and the probers, take it.
    pub fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
        use nix::fcntl::{Flock, FlockArg};
        Flock::lock(self.lock_file()?, FlockArg::LockExclusive)
            .map_err(|(_, e)| io("locking the lab", e))
    }

    /// [`Lab::lock`] if nobody holds it now.
    fn try_lock(&self) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, String> {
        use nix::fcntl::{Flock, FlockArg};
        match Flock::lock(self.lock_file()?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io("locking the lab", e)),
        }
    }

    fn lock_file(&self) -> Result<std::fs::File, String> {
        let path = self.dir.with_extension("lock");
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent.display(), e))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(path.display(), e))
    }

    pub(crate) fn save(&self, s: &State) -> Result<(), String> {
        write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_string_pretty(s).expect("serializable"),
        )
    }

    fn manifests(&self) -> Result<Manifests, String> {
        let dir = self.dir.join("manifests");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| io(dir.display(), e))?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        read_files(&files)
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    /// Builds the lab from `files` (one of which holds the Lab document). Running it again on
    /// a complete lab only applies what changed; a crashed run is torn down and rebuilt.
    pub fn up(root: &Path, files: &[PathBuf]) -> Result<Lab, String> {
        let m = read_files(files)?;
        let spec = m
            .lab
            .clone()
            .ok_or("no `kind: Lab` document among the files (see examples/)")?;
        let wants = plan::desired_pods(&m, &spec.nodes).map_err(|e| e.to_string())?;
        plan::check_node_names(&wants, &spec.nodes).map_err(|e| e.to_string())?;
        let lab = Lab::find(root, Some(&spec.name))?;
        let _lock = lab.lock()?;
        if let Ok(s) = lab.load() {
            if s.complete && s.spec == spec && lab.infra_alive(&s) {
                lab.restart_dead_agents()?;
                // Objects are added or replaced by name, as `lab apply` does: the files may
                // have another name than last time, and what `lab apply` added stays.
                lab.apply(files)?;
                return Ok(lab);
            }
            eprintln!(
                "lab {}: an earlier run did not finish or the lab changed; rebuilding",
                spec.name
            );
        }
        lab.down()?;
        std::fs::create_dir_all(&lab.dir).map_err(|e| io(lab.dir.display(), e))?;
        lab.store_manifests(files)?;
        let nodes = plan::allocate_nodes(&spec, &[]).map_err(|e| e.to_string())?;
        let mut state = State {
            spec,
            nodes,
            agents: BTreeMap::new(),
            kubelets: BTreeMap::new(),
            internet: None,
            internet_dns: None,
            pods: Vec::new(),
            pending: BTreeMap::new(),
            complete: false,
            allocations: Default::default(),
            services: Vec::new(),
        };
        lab.save(&state)?;
        lab.build_infra(&mut state)?;
        for i in 0..state.nodes.len() {
            let n = state.nodes[i].clone();
            lab.build_node(&mut state, &n)?;
            progress("nodes", i + 1, state.nodes.len());
        }
        lab.save(&state)?;
        lab.wait_synced(&state)?;
        state.complete = true;
        lab.save(&state)?;
        lab.reconcile()?;
        Ok(lab)
    }

    fn store_manifests(&self, files: &[PathBuf]) -> Result<(), String> {
        let dir = self.dir.join("manifests");
        std::fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
        for (i, f) in files.iter().enumerate() {
            let text = std::fs::read_to_string(f).map_err(|e| io(f.display(), e))?;
            let base = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            write_atomic(&dir.join(format!("{i:02}-{base}")), &text)?;
        }
        Ok(())
    }

    fn infra_alive(&self, s: &State) -> bool {
        let lab = self.name();
        let have = infra::lab_namespaces(&lab);
        s.nodes
            .iter()
            .all(|n| have.contains(&ns_name(&lab, &format!("node.{}", n.name))))
            && have.contains(&ns_name(&lab, "router"))
    }

    /// Like a kubelet restarting a crashed DaemonSet pod: agents that died are started again,
    /// and each adopts the rules its predecessor left (nothing is flushed).
    fn restart_dead_agents(&self) -> Result<(), String> {
        let mut s = self.load()?;
        let lab = self.name();
        let mut restarted = false;
        for n in &s.nodes.clone() {
            let agent_up = s.agents.get(&n.name).is_some_and(Proc::alive);
            let kubelet_up = s.kubelets.get(&n.name).is_some_and(Proc::alive);
            if agent_up && kubelet_up {
                continue;
            }
            let ns = infra::open_ns(&ns_name(&lab, &format!("node.{}", n.name)))?;
            if !agent_up {
                eprintln!(
                    "lab {lab}: agent of {} was not running; restarting it",
                    n.name
                );
                s.agents
                    .insert(n.name.clone(), self.spawn_agent(&ns, &n.name)?);
            }
            if !kubelet_up {
                s.kubelets
                    .insert(n.name.clone(), self.spawn_kubelet(&ns, &n.name)?);
            }
            restarted = true;
        }
        if restarted {
            self.save(&s)?;
        }
        Ok(())
    }

    fn build_infra(&self, s: &mut State) -> Result<(), String> {
        let lab = self.name();
        let mtu = s.spec.underlay.mtu;
        let ul = infra::create_ns(&ns_name(&lab, "underlay"))?;
        let rt = infra::create_ns(&ns_name(&lab, "router"))?;
        let inet = infra::create_ns(&ns_name(&lab, "internet"))?;
        for (i, subnet) in s.spec.underlay.subnets.iter().enumerate() {
            let br = infra::bridge(&ul, &format!("ul{i}"), Some(mtu))?;
            let idx = infra::wire(
                &ul,
                &format!("rt{i}"),
                Some(br),
                &rt,
                &format!("eth{i}"),
                mtu,
            )?;
            let addr = Ipv4Net::new(plan::router_ip(*subnet), subnet.prefix_len()).expect("prefix");
            infra::address(&rt, idx, &format!("eth{i}"), addr, None)?;
        }
        let idx = infra::wire(&rt, "inet0", None, &inet, "eth0", mtu)?;
        let inet0 = infra::nl(&rt)?
            .link_by_name("inet0")
            .map_err(|e| e.to_string())?
            .ok_or("inet0 vanished")?;
        infra::address(
            &rt,
            inet0.index(),
            "inet0",
            format!("{INTERNET_ROUTER}/24").parse().expect("valid"),
            None,
        )?;
        infra::address(
            &inet,
            idx,
            "eth0",
            format!("{INTERNET_HOST}/24").parse().expect("valid"),
            Some(INTERNET_ROUTER.parse().expect("valid")),
        )?;
        infra::sysctl(&rt, "net/ipv4/ip_forward", "1")?;
        for d in [
            "logs",
            "pods",
            "status/dns",
            "status/ingress",
            "status/internet-dns",
            "internet",
        ] {
            std::fs::create_dir_all(self.dir.join(d)).map_err(|e| io(d, e))?;
        }
        write_atomic(
            &self.internet_hosts(),
            &edge::hosts(&Manifests::default(), &Value::Null),
        )?;
        write_atomic(
            &self.dir.join("internet/resolv.conf"),
            &format!("nameserver {INTERNET_HOST}\n"),
        )?;
        s.internet = Some(infra::spawn(
            &inet,
            "internet",
            &[
                self.exe.display().to_string(),
                "serve".into(),
                "--http".into(),
                "80".into(),
            ],
            &[
                ("POD_NAME".into(), "internet".into()),
                ("NODE_NAME".into(), "internet".into()),
            ],
            &self.dir.join("logs/internet.log"),
            None,
        )?);
        s.internet_dns = Some(infra::spawn(
            &inet,
            "internet",
            &dns::internet_argv(
                &self.exe,
                INTERNET_HOST.parse().expect("valid"),
                &self.internet_hosts(),
                &self.dir.join("status/internet-dns"),
            ),
            &[],
            &self.dir.join("logs/internet-dns.log"),
            None,
        )?);
        // The CNI plugin as a runtime finds it: a bin dir holding `flatnet`.
        let bin = self.dir.join("bin");
        std::fs::create_dir_all(&bin).map_err(|e| io(bin.display(), e))?;
        let _ = std::fs::remove_file(bin.join("flatnet"));
        std::os::unix::fs::symlink(&self.exe, bin.join("flatnet"))
            .map_err(|e| io("linking the plugin", e))?;
        let net_conf = json!({"Network": s.spec.cluster_cidr.to_string(), "Backend": {"Type": s.spec.backend.as_str()}});
        write_atomic(&self.dir.join("net-conf.json"), &net_conf.to_string())?;
        std::fs::create_dir_all(self.dir.join("cluster/nodes")).map_err(|e| io("cluster", e))?;
        self.save(s)
    }

    fn build_node(&self, s: &mut State, n: &NodePlan) -> Result<(), String> {
        let lab = self.name();
        let mtu = s.spec.underlay.mtu;
        let ul = infra::open_ns(&ns_name(&lab, "underlay"))?;
        let ns = infra::create_ns(&ns_name(&lab, &format!("node.{}", n.name)))?;
        let ulnl = infra::nl(&ul)?;
        let br = ulnl
            .link_by_name(&format!("ul{}", n.subnet))
            .map_err(|e| e.to_string())?
            .ok_or("the underlay bridge is missing")?;
        let idx = infra::wire(
            &ul,
            &format!("n{}", n.id),
            Some(br.index()),
            &ns,
            "eth0",
            mtu,
        )?;
        infra::address(
            &ns,
            idx,
            "eth0",
            Ipv4Net::new(n.ip, n.underlay.prefix_len()).expect("prefix"),
            Some(n.gateway),
        )?;
        infra::sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        let dir = self.node_dir(&n.name);
        for d in ["net.d", "ipam"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| io(dir.display(), e))?;
        }
        let cfg = routing::Config {
            backend: s.spec.backend,
            cluster_cidr: s.spec.cluster_cidr,
            underlay_mtu: mtu,
        };
        let conflist = routing::cni_conflist(&cfg, n.pod_cidr, Some(&dir.join("ipam")));
        write_atomic(
            &dir.join("net.d/10-flatnet.conflist"),
            &serde_json::to_string_pretty(&conflist).expect("json"),
        )?;
        std::fs::create_dir_all(self.dir.join("status")).map_err(|e| io("status", e))?;
        let info = NodeInfo {
            name: n.name.clone(),
            ip: n.ip,
            pod_cidr: n.pod_cidr,
            labels: n.labels.clone(),
        };
        write_atomic(
            &self.dir.join(format!("cluster/nodes/{}.json", n.name)),
            &serde_json::to_string_pretty(&info.to_node()).expect("json"),
        )?;
        let agent = self.spawn_agent(&ns, &n.name)?;
        s.agents.insert(n.name.clone(), agent);
        let kubelet = self.spawn_kubelet(&ns, &n.name)?;
        s.kubelets.insert(n.name.clone(), kubelet);
        Ok(())
    }

    /// Starts `node`'s agent in its namespace (a restarted agent adopts what the last one left).
    fn spawn_agent(&self, ns: &netns::NetNs, node: &str) -> Result<Proc, String> {
        infra::spawn(
            ns,
            node,
            &[
                self.exe.display().to_string(),
                "agent".into(),
                "--node".into(),
                node.to_string(),
                "--source".into(),
                "file".into(),
                "--dir".into(),
                self.dir.join("cluster").display().to_string(),
                "--net-conf".into(),
                self.dir.join("net-conf.json").display().to_string(),
                "--status-file".into(),
                self.dir
                    .join(format!("status/{node}"))
                    .display()
                    .to_string(),
            ],
            &[],
            &self.dir.join(format!("logs/agent-{node}.log")),
            None,
        )
    }

    /// Starts `node`'s prober in its namespace (the probes come from the node, as the kubelet's).
    fn spawn_kubelet(&self, ns: &netns::NetNs, node: &str) -> Result<Proc, String> {
        let argv = [
            self.exe.display().to_string(),
            "lab".into(),
            "--root".into(),
            self.dir
                .parent()
                .unwrap_or(Path::new("/"))
                .display()
                .to_string(),
            "--name".into(),
            self.name(),
            "kubelet".into(),
            node.to_string(),
        ];
        infra::spawn(
            ns,
            node,
            &argv,
            &[],
            &self.dir.join(format!("logs/kubelet-{node}.log")),
            None,
        )
    }

    /// The last lines of the log of a laggard (a node's agent, or `dns/POD`), for an error
    /// that names it (the lab's directory may be gone by the time someone reads the error).
    fn log_tail(&self, laggard: &str) -> String {
        let file = match laggard.strip_prefix("dns/") {
            None => Some(format!("agent-{laggard}.log")),
            Some(pod) => std::fs::read_dir(self.dir.join("logs"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .find(|f| f.starts_with("pod-") && f.contains(pod)),
        };
        let Some(file) = file else {
            return String::new();
        };
        let Ok(text) = std::fs::read_to_string(self.dir.join("logs").join(&file)) else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
        format!("\nlast lines of {file}:\n  {tail}")
    }

    /// Polls `laggards` until it names none; after [`SYNC_WAIT`], an error naming them.
    fn wait_for(
        &self,
        what: &str,
        mut laggards: impl FnMut() -> Result<Vec<String>, String>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            let behind = laggards()?;
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tails: String = behind.iter().map(|b| self.log_tail(b)).collect();
                return Err(format!(
                    "{what} within {} s: {} (see {}/logs){tails}",
                    SYNC_WAIT.as_secs(),
                    behind.join(", "),
                    self.dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every agent has applied the cluster state as it is now (each writes the
    /// fingerprint of what it applied), so traffic works when a command returns.
    fn wait_synced(&self, s: &State) -> Result<(), String> {
        let want = state::file::fingerprint(&self.dir.join("cluster")).to_string();
        let behind = |file: String| {
            std::fs::read_to_string(self.dir.join("status").join(file))
                .ok()
                .as_deref()
                != Some(want.as_str())
        };
        self.wait_for(
            "agents, DNS and ingress pods did not load the cluster state",
            || {
                let agents = s.nodes.iter().map(|n| n.name.clone());
                let running = s.pods.iter().filter(|p| p.status() == "Running");
                let dns_pods = running.clone().filter_map(|p| {
                    if dns::is_dns_pod(p) {
                        Some(format!("dns/{}", p.name))
                    } else if edge::is_controller_pod(p) {
                        Some(format!("ingress/{}", p.name))
                    } else {
                        None
                    }
                });
                Ok(agents
                    .chain(dns_pods)
                    .filter(|f| behind(f.clone()))
                    .collect())
            },
        )
    }

    /// The manifests as applied, with the lab's own (the cluster DNS).
    fn cluster_manifests(&self, s: &State) -> Result<Manifests, String> {
        let mut m = self.manifests()?;
        dns::add_builtin(
            &mut m,
            s.spec.service_cidr,
            &self.exe,
            &self.dir,
            INTERNET_HOST.parse().expect("valid"),
        )?;
        edge::add_builtin(&mut m, &self.exe, &self.dir)?;
        Ok(m)
    }

    /// Makes the running pods match the manifests: creates missing ones, removes extra or changed
    /// ones (pods keep their node while it exists).
    pub fn reconcile(&self) -> Result<(), String> {
        let mut s = self.load()?;
        let m = self.cluster_manifests(&s)?;
        // Policies first: a new pod they select is isolated from its first packet.
        let policies_changed = self.publish_policies(&m)?;
        if self.publish_edge(&m)? || policies_changed {
            self.wait_synced(&s)?;
        }
        let wants = plan::desired_pods(&m, &s.spec.nodes).map_err(|e| e.to_string())?;
        let running: BTreeMap<String, String> =
            s.pods.iter().map(|p| (p.key(), p.node.clone())).collect();
        let placement = plan::place(&wants, &s.nodes, &running);
        let want_by_key: BTreeMap<String, &PodWant> = wants.iter().map(|w| (w.key(), w)).collect();
        // Remove pods no longer wanted, changed, or on a node that is gone.
        let (keep, drop): (Vec<PodRecord>, Vec<PodRecord>) = s.pods.drain(..).partition(|p| {
            want_by_key.get(&p.key()).is_some_and(|w| w.hash == p.hash)
                && placement.bound.get(&p.key()) == Some(&p.node)
        });
        s.pods = keep;
        // Labels change in place, as `kubectl label` does: selectors and policies follow.
        for p in &mut s.pods {
            if let Some(w) = want_by_key.get(&p.key()) {
                p.labels.clone_from(&w.labels);
            }
        }
        if !drop.is_empty() {
            // Like a terminating pod: out of the EndpointSlices first; the pod goes only once
            // every agent has the new endpoints (no new connection can reach it), and after a
            // moment for connections already sent there to finish their exchange.
            self.publish_services(&mut s, &m.services)?;
            self.wait_synced(&s)?;
            std::thread::sleep(Duration::from_millis(200));
        }
        for p in &drop {
            self.remove_pod(p);
        }
        s.pending = placement.pending.clone();
        self.save(&s)?;
        let todo: Vec<(PodWant, NodePlan)> = wants
            .iter()
            .filter(|w| !s.pods.iter().any(|p| p.key() == w.key()))
            .filter_map(|w| {
                let node = placement.bound.get(&w.key())?;
                Some((w.clone(), s.nodes.iter().find(|n| &n.name == node)?.clone()))
            })
            .collect();
        let errors = self.create_pods(&mut s, todo);
        self.publish_services(&mut s, &m.services)?;
        self.wait_synced(&s)?;
        self.publish_hostnames(&m)?;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// Takes a node's agent, Node object, namespace, wire and files away.
    fn remove_node_infra(&self, s: &mut State, name: &str) -> Result<(), String> {
        let lab = self.name();
        for p in [s.agents.remove(name), s.kubelets.remove(name)]
            .into_iter()
            .flatten()
        {
            p.kill();
        }
        let _ = std::fs::remove_file(self.dir.join(format!("cluster/nodes/{name}.json")));
        let node_ns = ns_name(&lab, &format!("node.{name}"));
        infra::kill_inside(std::slice::from_ref(&node_ns));
        // The underlay end of its wire goes now, not when the kernel gets round to the namespace.
        if let Some(n) = s.nodes.iter().find(|n| n.name == name) {
            let ul = infra::open_ns(&ns_name(&lab, "underlay"))?;
            let nl = infra::nl(&ul)?;
            let port = format!("n{}", n.id);
            if let Some(l) = nl.link_by_name(&port).map_err(|e| e.to_string())? {
                nl.run(netlink::Request::delete_link(l.index(), &port))
                    .map_err(|e| e.to_string())?;
            }
        }
        let _ = netns::delete_named(&node_ns);
        let _ = std::fs::remove_dir_all(self.node_dir(name));
        let _ = std::fs::remove_file(self.dir.join(format!("status/{name}")));
        Ok(())
    }

    /// Adds a node: it joins the underlay, gets a pod CIDR, starts its agent; every other agent
    /// routes to it. Pending pods it can take are placed.
    pub fn node_add(
        &self,
        name: &str,
        subnet: usize,
        labels: BTreeMap<String, String>,
    ) -> Result<(), String> {
        let mut s = self.load()?;
        if s.spec.nodes.iter().any(|n| n.name == name) {
            return Err(format!("node {name:?} already exists"));
        }
        let mut spec = s.spec.clone();
        spec.nodes.push(cluster::NodeSpec {
            name: name.into(),
            subnet,
            labels,
        });
        let doc = json!({"apiVersion": cluster::lab::API_VERSION, "kind": "Lab", "metadata": {"name": spec.name},
            "spec": {"nodes": spec.nodes, "backend": spec.backend, "clusterCIDR": spec.cluster_cidr, "serviceCIDR": spec.service_cidr,
                     "nodeCIDRMaskSize": spec.node_cidr_mask_size, "underlay": spec.underlay,
                     "loadBalancerPool": spec.load_balancer_pool}});
        let spec = LabSpec::from_value(&doc).map_err(|e| e.to_string())?;
        let nodes = plan::allocate_nodes(&spec, &s.nodes).map_err(|e| e.to_string())?;
        let new = nodes
            .iter()
            .find(|n| n.name == name)
            .expect("allocated")
            .clone();
        s.spec = spec;
        s.nodes = nodes;
        if let Err(e) = self.build_node(&mut s, &new) {
            let _ = self.remove_node_infra(&mut s, name);
            return Err(e);
        }
        self.save(&s)?;
        self.wait_synced(&s)?;
        self.reconcile()
    }

    /// Removes a node: its pods go (Deployment pods are placed again elsewhere), its agent
    /// stops, its Node object goes, and every other agent drops its routes.
    pub fn node_remove(&self, name: &str) -> Result<(), String> {
        let mut s = self.load()?;
        if !s.spec.nodes.iter().any(|n| n.name == name) {
            return Err(format!("node {name:?} does not exist"));
        }
        if s.spec.nodes.len() == 1 {
            return Err("the last node cannot be removed; use `lab down`".into());
        }
        for p in s.pods.iter().filter(|p| p.node == name) {
            self.remove_pod(p);
        }
        s.pods.retain(|p| p.node != name);
        self.remove_node_infra(&mut s, name)?;
        s.spec.nodes.retain(|n| n.name != name);
        s.nodes.retain(|n| n.name != name);
        self.save(&s)?;
        self.wait_synced(&s)?;
        self.reconcile()
    }

    /// Removes everything the lab made: processes, namespaces, files. Works from the namespace
    /// prefix alone, so also after a crash.
    pub fn down(&self) -> Result<(), String> {
        if let Ok(s) = self.load() {
            for p in s
                .agents
                .values()
                .chain(s.kubelets.values())
                .chain(s.internet.iter())
                .chain(s.internet_dns.iter())
                .chain(s.pods.iter().flat_map(|p| &p.procs))
            {
                p.kill();
            }
        }
        infra::teardown(&self.name());
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(self.dir.display(), e)),
            _ => Ok(()),
        }
    }

    /// The Service rules' verdict for a packet from `from` (a pod name, or an address on
    /// `node`) to `to` (`IP:PORT[/proto]`), as the source's node plans them.
    pub fn explain(&self, from: &str, to: &str, node: Option<&str>) -> Result<String, String> {
        let s = self.load()?;
        let (src, node) = match s.pods.iter().find(|p| p.name == from) {
            Some(p) => (
                p.ip.ok_or("that pod has no address")?,
                node.unwrap_or(&p.node).to_string(),
            ),
            None => (
                from.parse()
                    .map_err(|_| format!("{from:?} is neither a pod nor an IPv4 address"))?,
                node.or_else(|| s.nodes.first().map(|n| n.name.as_str()))
                    .unwrap_or_default()
                    .to_string(),
            ),
        };
        let (dst, dport, proto) = proxy::parse_target(to).map_err(|e| format!("TO: {e}"))?;
        let me = s
            .nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| format!("no node {node:?}"))?;
        let cfg = proxy::Config {
            node: node.clone(),
            node_ips: vec![me.ip],
            cluster_cidr: s.spec.cluster_cidr,
            service_cidr: s.spec.service_cidr,
            pod_cidr: me.pod_cidr,
            node_ports: services::NODE_PORTS,
        };
        let mut store = cluster::Store::new();
        store.apply(state::file::load(&self.dir.join("cluster")));
        let cluster = store.snapshot();
        let rs = proxy::plan::plan_node(&cfg, &s.services, &cluster.endpoint_slices, &cluster.pods)
            .map_err(|e| e.to_string())?;
        let to_node = s.nodes.iter().any(|n| n.ip == dst);
        let pkt = proxy::Packet {
            src,
            dst,
            proto,
            dport,
            to_node,
        };
        let mut out = format!("on {node}: ");
        out += &proxy::explain(&rs, &pkt);
        // The policies see the packet after DNAT: each endpoint it may go to.
        let src_node = s
            .nodes
            .iter()
            .find(|n| n.ip == src)
            .map(|n| n.name.as_str());
        for (ip, port) in proxy::destinations(&rs, &pkt) {
            out += "\n";
            out += &policies::verdict(&store, src, ip, proto, port, src_node);
        }
        if let Some(owner) = s.nodes.iter().find(|n| n.pod_cidr.contains(&dst)) {
            out += &format!(
                "
{dst} is in {}'s pod CIDR {}",
                owner.name, owner.pod_cidr
            );
        }
        Ok(out)
    }
}
