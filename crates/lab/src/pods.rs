//! Pods as the kubelet and the container runtime make them: a network namespace, its network
//! through the real CNI plugin (or the node's own, for `hostNetwork` pods), the pod's processes;
//! and their removal, `lab exec` into them.

use crate::infra::Proc;
use crate::infra::{self, ns_name};
use crate::plan::{NodePlan, PodWant, Workload};
use crate::{dns, io, progress, write_atomic, Lab, PodRecord, State, CNI_VERSION, INTERNET_HOST};
use cluster::LabSpec;
use cni_harness::conflist::{Attachment, NetList, Runtime};
use serde_json::json;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

impl Lab {
    /// Creates pods with a few workers in parallel; returns the failures.
    pub(crate) fn create_pods(&self, s: &mut State, todo: Vec<(PodWant, NodePlan)>) -> Vec<String> {
        let total = todo.len();
        if total == 0 {
            return Vec::new();
        }
        let queue = Mutex::new(todo.into_iter().collect::<std::collections::VecDeque<_>>());
        let done = Mutex::new(Vec::new());
        let errors = Mutex::new(Vec::new());
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() * 2)
            .unwrap_or(4)
            .min(8);
        std::thread::scope(|sc| {
            for _ in 0..workers {
                sc.spawn(|| loop {
                    let Some((w, n)) = queue.lock().expect("queue").pop_front() else {
                        return;
                    };
                    match self.add_pod(&s.spec, &w, &n) {
                        Ok(rec) => {
                            let mut d = done.lock().expect("done");
                            d.push(rec);
                            progress("pods", d.len(), total);
                        }
                        Err(e) => errors
                            .lock()
                            .expect("errors")
                            .push(format!("pod {}: {e}", w.key())),
                    }
                });
            }
        });
        s.pods.extend(done.into_inner().expect("done"));
        s.pods.sort_by_key(|p| p.key());
        let mut errors = errors.into_inner().expect("errors");
        if let Err(e) = self.save(s) {
            errors.push(e);
        }
        errors
    }

    fn runtime_parts(&self, node: &str) -> Result<(NetList, netns::NetNs), String> {
        let list = NetList::load(&self.node_dir(node).join("net.d/10-flatnet.conflist"))?;
        let ns = infra::open_ns(&ns_name(&self.name(), &format!("node.{node}")))?;
        Ok((list, ns))
    }

    fn attachment(&self, w_ns: &str, w_name: &str, netns: &str) -> Attachment {
        use sha2::Digest;
        let id = sha2::Sha256::digest(format!("{}/{w_ns}/{w_name}", self.name()).as_bytes());
        Attachment {
            container_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            netns: Some(netns::named_path(netns)),
            ifname: "eth0".into(),
            args: Some(format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={w_ns};K8S_POD_NAME={w_name}"
            )),
        }
    }

    /// Creates one pod: its namespace, its network through the CNI plugin, its processes. A
    /// hostNetwork pod gets none of its own: it runs in the node's namespace with its address.
    fn add_pod(&self, spec: &LabSpec, w: &PodWant, n: &NodePlan) -> Result<PodRecord, String> {
        let lab = self.name();
        let (netns, ns, ip, result, container_id) = if w.host_network {
            let netns = ns_name(&lab, &format!("node.{}", n.name));
            let ns = infra::open_ns(&netns)?;
            (netns, ns, Some(n.ip), json!({}), String::new())
        } else {
            let netns = ns_name(&lab, &format!("pod.{}.{}", w.namespace, w.name));
            if netns::named_path(&netns).exists() {
                self.clear_leftover_pod(spec, w, &netns);
            }
            let ns = infra::create_ns(&netns)?;
            let (list, node_ns) = self.runtime_parts(&n.name)?;
            let rt = Runtime {
                bin_dirs: vec![self.dir.join("bin")],
                node: Some(&node_ns),
                runtime_config: json!({}),
            };
            let att = self.attachment(&w.namespace, &w.name, &netns);
            let result = match rt.add(&list, CNI_VERSION, &att) {
                Ok(r) => r,
                Err(e) => {
                    let _ = netns::delete_named(&netns);
                    return Err(format!("CNI ADD: {e}"));
                }
            };
            let ip = result["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| {
                    i["address"]
                        .as_str()?
                        .split('/')
                        .next()?
                        .parse::<Ipv4Addr>()
                        .ok()
                })
                .next();
            (netns, ns, ip, result, att.container_id)
        };
        let mut rec = PodRecord {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            node: n.name.clone(),
            netns,
            container_id,
            ip,
            hash: w.hash.clone(),
            result,
            procs: Vec::new(),
            error: None,
            labels: w.labels.clone(),
            ports: w.ports.clone(),
            hostname: w.hostname.clone(),
            subdomain: w.subdomain.clone(),
            host_network: w.host_network,
            workloads: w.workloads.clone(),
            not_ready: (w.workloads.iter())
                .filter(|c| c.readiness.is_some())
                .map(|c| c.container.clone())
                .collect(),
            restarts: 0,
        };
        let resolv = self.resolv_conf_path(&w.namespace, &w.name);
        write_atomic(
            &resolv,
            &dns::resolv_conf(
                &w.namespace,
                &w.dns,
                dns::service_ip(spec.service_cidr),
                INTERNET_HOST.parse().expect("valid"),
            ),
        )?;
        for wl in &w.workloads {
            match self.start_container(&rec, &ns, wl) {
                Ok(p) => rec.procs.push(p),
                Err(e) => rec.error = Some(format!("container {}: {e}", wl.container)),
            }
        }
        Ok(rec)
    }

    /// The hostname a pod's processes see: the node's for a hostNetwork pod, as the kubelet
    /// gives it.
    pub(crate) fn pod_hostname(p: &PodRecord) -> &str {
        if p.host_network {
            &p.node
        } else {
            p.hostname.as_deref().unwrap_or(&p.name)
        }
    }

    /// Starts one container of pod `p` (also again, when its liveness probe failed).
    pub(crate) fn start_container(
        &self,
        p: &PodRecord,
        ns: &netns::NetNs,
        wl: &Workload,
    ) -> Result<Proc, String> {
        let argv = if wl.argv.is_empty() {
            vec![
                self.exe.display().to_string(),
                "serve".into(),
                "--http".into(),
                wl.http_port.to_string(),
            ]
        } else {
            wl.argv.clone()
        };
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("POD_NAME".into(), p.name.clone()),
            ("POD_NAMESPACE".into(), p.namespace.clone()),
            ("NODE_NAME".into(), p.node.clone()),
            (
                "POD_IP".into(),
                p.ip.map(|i| i.to_string()).unwrap_or_default(),
            ),
        ];
        env.extend(wl.env.iter().cloned());
        let log = self.dir.join(format!(
            "logs/pod-{}-{}-{}.log",
            p.namespace, p.name, wl.container
        ));
        let resolv = self.resolv_conf_path(&p.namespace, &p.name);
        infra::spawn(ns, Lab::pod_hostname(p), &argv, &env, &log, Some(&resolv))
    }

    /// A pod namespace no record names: a run killed after creating the pod and before saving
    /// it. Its processes, its attachment (released on every node: the record of which node
    /// held it died with the run) and the namespace go.
    fn clear_leftover_pod(&self, spec: &LabSpec, w: &PodWant, netns: &str) {
        infra::kill_inside(&[netns.to_string()]);
        let att = self.attachment(&w.namespace, &w.name, netns);
        for node in &spec.nodes {
            if let Ok((list, node_ns)) = self.runtime_parts(&node.name) {
                let rt = Runtime {
                    bin_dirs: vec![self.dir.join("bin")],
                    node: Some(&node_ns),
                    runtime_config: json!({}),
                };
                let _ = rt.del(&list, CNI_VERSION, &att, None);
            }
        }
        let _ = netns::delete_named(netns);
    }

    pub(crate) fn remove_pod(&self, p: &PodRecord) {
        for proc_ in &p.procs {
            proc_.kill();
        }
        if p.host_network {
            // The namespace is the node's: only the pod's own processes go.
            let _ = std::fs::remove_file(self.resolv_conf_path(&p.namespace, &p.name));
            return;
        }
        infra::kill_inside(std::slice::from_ref(&p.netns));
        if let Ok((list, node_ns)) = self.runtime_parts(&p.node) {
            let rt = Runtime {
                bin_dirs: vec![self.dir.join("bin")],
                node: Some(&node_ns),
                runtime_config: json!({}),
            };
            let att = self.attachment(&p.namespace, &p.name, &p.netns);
            let _ = rt.del(&list, CNI_VERSION, &att, Some(&p.result));
        }
        let _ = netns::delete_named(&p.netns);
        let _ = std::fs::remove_file(self.resolv_conf_path(&p.namespace, &p.name));
    }

    /// The pod's /etc/resolv.conf (mounted there for its processes and `lab exec`).
    pub(crate) fn resolv_conf_path(&self, namespace: &str, name: &str) -> PathBuf {
        self.dir
            .join(format!("pods/{namespace}.{name}.resolv.conf"))
    }

    /// Runs `argv` inside a pod's network namespace (and its hostname), as `kubectl exec`.
    pub fn exec(&self, pod: &str, namespace: &str, argv: &[String]) -> Result<i32, String> {
        let s = self.load()?;
        let p = s
            .pods
            .iter()
            .find(|p| p.name == pod && p.namespace == namespace)
            .ok_or_else(|| format!("pod {namespace}/{pod} not found (see `flatnet lab status`)"))?;
        if argv.is_empty() {
            return Err("nothing to run: lab exec POD -- COMMAND [ARGS…]".into());
        }
        let ns = infra::open_ns(&p.netns)?;
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("POD_NAME", &p.name)
            .env("NODE_NAME", &p.node);
        let resolv = self.resolv_conf_path(&p.namespace, &p.name);
        let resolv = resolv.exists().then_some(resolv.as_path());
        run_entered(cmd, &ns, Lab::pod_hostname(p), resolv)
    }

    /// Runs a command on the lab internet's host: its network namespace, its DNS.
    pub fn exec_internet(&self, argv: &[String]) -> Result<i32, String> {
        if argv.is_empty() {
            return Err("nothing to run: lab exec --internet -- COMMAND [ARGS…]".into());
        }
        let ns = infra::open_ns(&infra::ns_name(&self.name(), "internet"))?;
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let resolv = self.dir.join("internet/resolv.conf");
        run_entered(cmd, &ns, "internet", Some(&resolv))
    }
}

/// Runs `cmd` in the foreground inside `ns` (its hostname, its resolv.conf); its exit code.
fn run_entered(
    mut cmd: std::process::Command,
    ns: &netns::NetNs,
    hostname: &str,
    resolv: Option<&std::path::Path>,
) -> Result<i32, String> {
    infra::enter(&mut cmd, ns, hostname, false, resolv);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd
        .status()
        .map_err(|e| io(format!("running {program}"), e))?;
    Ok(status.code().unwrap_or(1))
}
