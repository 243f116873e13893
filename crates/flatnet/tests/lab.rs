//! The lab as a user runs it: `flatnet lab up` on a manifest file, then traffic between real pod
//! namespaces. Needs root (CI runs as root); elsewhere each test says it skipped. Every lab has a
//! unique name and its own --root, and is taken down when the test ends, also on failure.

mod common;

use common::*;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

const WORKLOADS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 4
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: flatnet-serve}]}
"#;

/// The pods of namespace `default` (the lab runs its DNS pods in `kube-system`).
fn workload_pods(st: &Value) -> Vec<Value> {
    st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["namespace"] == "default")
        .cloned()
        .collect()
}

/// All pairs of pods (same node and across nodes) talk without NAT; every pod reaches the lab
/// internet, which sees the pod's node address.
fn check_pod_network(lab: &TestLab) {
    let st = lab.status();
    let pods = workload_pods(&st);
    assert!(pods.len() >= 4, "{st}");
    let nodes: std::collections::BTreeSet<&str> =
        pods.iter().map(|p| p["node"].as_str().unwrap()).collect();
    assert!(nodes.len() >= 2, "pods spread over nodes: {st}");
    let node_ip = |n: &str| {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()["ip"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for a in &pods {
        let a_ns = lab.ns(&format!("pod.default.{}", a["name"].as_str().unwrap()));
        let a_ip = a["ip"].as_str().unwrap();
        for b in &pods {
            let b_ip: IpAddr = b["ip"].as_str().unwrap().parse().unwrap();
            let line = hello(&a_ns, b_ip, 9000);
            assert_eq!(field(&line, "pod"), b["name"].as_str().unwrap(), "{line}");
            let client = field(&line, "client");
            assert_eq!(
                client.rsplit_once(':').unwrap().0,
                a_ip,
                "{} -> {}: the server saw {client}, not the pod IP",
                a["name"],
                b["name"]
            );
        }
        let line = hello(&a_ns, "203.0.113.10".parse().unwrap(), 9000);
        let client = field(&line, "client");
        assert_eq!(
            client.rsplit_once(':').unwrap().0,
            node_ip(a["node"].as_str().unwrap()),
            "internet saw {client}"
        );
    }
}

fn backend(spec: &str) {
    let Some(lab) = TestLab::new() else { return };
    let f = lab.file(spec, WORKLOADS);
    lab.up(&f);
    check_pod_network(&lab);
}

#[test]
fn host_gw_pods_reach_each_other_and_the_internet() {
    backend("{nodes: 3, backend: host-gw}");
}

#[test]
fn vxlan_pods_reach_each_other_and_the_internet() {
    backend("{nodes: 3, backend: vxlan}");
}

#[test]
fn auto_across_two_subnets_mixes_direct_and_vxlan() {
    let Some(lab) = TestLab::new() else { return };
    let f = lab.file(
        "{backend: auto, underlay: {subnets: [172.18.0.0/24, 172.19.0.0/24]}, nodes: [{name: a}, {name: b}, {name: c, subnet: 1}]}",
        WORKLOADS,
    );
    lab.up(&f);
    check_pod_network(&lab);
    // a reaches b directly and c through the tunnel.
    let nl = netlink::Netlink::connect_in(&lab.ns("node.a")).unwrap();
    let routes: Vec<_> = nl
        .routes(true)
        .unwrap()
        .into_iter()
        .filter(|r| r.protocol == Some(201))
        .collect();
    assert_eq!(routes.len(), 2);
    assert_eq!(
        routes.iter().filter(|r| r.onlink).count(),
        1,
        "one VXLAN route: {routes:?}"
    );
}

#[test]
fn nodes_leave_and_join_and_agents_converge() {
    let Some(lab) = TestLab::new() else { return };
    let f = lab.file("{nodes: 3, backend: vxlan}", WORKLOADS);
    lab.up(&f);
    assert_eq!(lab.flatnet_routes("node-1"), 2);
    let out = lab.flatnet(&["node", "remove", "node-3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lab.flatnet_routes("node-1"),
        1,
        "node-1 still routes to the removed node"
    );
    assert!(lab.status()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["node"] != "node-3"));
    let out = lab.flatnet(&["node", "add", "node-3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.flatnet_routes("node-1"), 2);
    assert_eq!(lab.flatnet_routes("node-3"), 2);
    // A restarted agent finds nothing to change.
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/flatnet.{}.node.node-2", lab.name))
        .args([BIN, "agent", "--once", "--node", "node-2", "--dir"])
        .arg(lab.root.path().join(&lab.name).join("cluster"))
        .arg("--net-conf")
        .arg(lab.root.path().join(&lab.name).join("net-conf.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Changes { device: 0, routes: 0, neighbours: 0, fdb: 0, masquerade: 0 }"
    );
    check_pod_network(&lab);
}

#[test]
fn down_leaves_nothing_and_up_recovers_from_a_kill() {
    let Some(lab) = TestLab::new() else { return };
    let f = lab.file(
        "{nodes: 4, backend: vxlan}",
        &WORKLOADS.replace("replicas: 4", "replicas: 40"),
    );
    // Killed halfway through building.
    let mut child = Command::new(BIN)
        .args(["lab", "up", "--root"])
        .arg(lab.root.path())
        .arg(&f)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
    lab.up(&f);
    assert_eq!(workload_pods(&lab.status()).len(), 40);
    // Idempotent: a second up changes nothing and keeps the pods' addresses.
    let before = lab.status();
    lab.up(&f);
    assert_eq!(lab.status()["pods"], before["pods"]);
    // The same lab from a file of another name: objects are matched by name, not by file.
    let renamed = lab.root.path().join("renamed.yaml");
    std::fs::copy(&f, &renamed).unwrap();
    lab.up(&renamed);
    assert_eq!(lab.status()["pods"], before["pods"]);
    let out = lab.flatnet(&["down"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lab.namespaces().is_empty(),
        "namespaces left: {:?}",
        lab.namespaces()
    );
    assert!(
        !lab.root.path().join(&lab.name).exists(),
        "state left behind"
    );
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&lab.root.path().display().to_string()))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[test]
fn host_ports_reach_their_pod_with_one_pod_per_node_holding_each() {
    let Some(lab) = TestLab::new() else { return };
    // hostPort 7000 → the echo port of `flatnet serve`; three replicas for two nodes.
    let f = lab.file(
        "{nodes: 2, backend: host-gw}",
        &WORKLOADS.replace("replicas: 4", "replicas: 3").replace(
            "image: flatnet-serve}",
            "image: flatnet-serve, ports: [{containerPort: 9000, hostPort: 7000}]}",
        ),
    );
    lab.up(&f);
    let st = lab.status();
    let pods = st["pods"].as_array().unwrap();
    let pending: Vec<&Value> = pods.iter().filter(|p| p["status"] == "Pending").collect();
    assert_eq!(pending.len(), 1, "{st}");
    assert!(
        pending[0]["reason"].as_str().unwrap().contains("hostPort"),
        "{st}"
    );
    let internet = lab.ns("internet");
    for node in st["nodes"].as_array().unwrap() {
        let ip: IpAddr = node["ip"].as_str().unwrap().parse().unwrap();
        let line = hello(&internet, ip, 7000);
        assert_eq!(
            field(&line, "node"),
            node["name"].as_str().unwrap(),
            "{line}"
        );
        // The client's address survives, as with the reference portmap plugin.
        assert!(
            field(&line, "client").starts_with("203.0.113.10:"),
            "{line}"
        );
    }
    // A pod reaching its own node's hostPort (hairpin) is answered by the pod there.
    let running: Vec<&Value> = pods.iter().filter(|p| p["status"] == "Running").collect();
    let own = running[0];
    let own_node_ip: IpAddr = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == own["node"])
        .unwrap()["ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let from = lab.ns(&format!("pod.default.{}", own["name"].as_str().unwrap()));
    let line = hello(&from, own_node_ip, 7000);
    assert_eq!(field(&line, "pod"), own["name"].as_str().unwrap(), "{line}");
}

#[test]
fn bad_lab_files_get_errors_naming_the_field() {
    let Some(lab) = TestLab::new() else { return };
    let cases = [
        ("{nodes: 2, clusterCIDR: 10.96.0.0/16}", "", "spec.serviceCIDR"),
        ("{nodes: 2, backend: gre}", "", "host-gw"),
        ("{nodes: 2, nodez: 1}", "", "nodez"),
        ("{nodes: 300}", "", "spec.clusterCIDR"),
        ("{nodes: 2}", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: node-7, containers: [{name: c, image: x}]}\n", "spec.nodeName"),
        ("{nodes: 2}", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: x, ports: [{containerPort: 80, hostPort: 70000}]}]}\n", "spec.containers[0].ports[0].hostPort"),
    ];
    for (spec, workloads, want) in cases {
        let f = lab.file(spec, workloads);
        let out = Command::new(BIN)
            .args(["lab", "up", "--root"])
            .arg(lab.root.path())
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec} was accepted");
        assert!(
            err.contains(want),
            "{spec}: error does not mention {want}: {err}"
        );
        assert!(
            lab.namespaces().is_empty(),
            "a refused lab created namespaces"
        );
    }
}

const SERVICES: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: flatnet-serve, ports: [{name: echo, containerPort: 9000}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{name: echo, port: 80, targetPort: echo}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec: {type: NodePort, selector: {app: web}, ports: [{port: 80, targetPort: 9000, nodePort: 30090}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-lb}
spec: {type: LoadBalancer, selector: {app: web}, ports: [{port: 80, targetPort: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-lb-local}
spec: {type: LoadBalancer, externalTrafficPolicy: Local, selector: {app: web}, ports: [{port: 80, targetPort: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: nothing}
spec: {selector: {app: none}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec: {nodeName: node-1, containers: [{name: c, image: x, command: [sleep, infinity]}]}
"#;

fn cluster_ip(st: &Value, name: &str) -> IpAddr {
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()["clusterIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The backends that answered `n` connections from `from` to `ip:port`.
fn backends(
    from: &netns::NetNs,
    ip: IpAddr,
    port: u16,
    n: usize,
) -> std::collections::BTreeSet<String> {
    (0..n)
        .map(|_| field(&hello(from, ip, port), "pod").to_string())
        .collect()
}

/// Like [`backends`], but `None` if any connection failed (while the proxy converges).
fn try_backends(
    from: &netns::NetNs,
    ip: IpAddr,
    port: u16,
    n: usize,
) -> Option<std::collections::BTreeSet<String>> {
    (0..n)
        .map(|_| {
            Some(
                field(
                    &try_hello(from, ip, port, Duration::from_millis(500)).ok()?,
                    "pod",
                )
                .to_string(),
            )
        })
        .collect()
}

#[test]
fn services_balance_reject_without_endpoints_and_follow_endpoint_changes() {
    let Some(lab) = TestLab::new() else { return };
    let f = lab.file("{nodes: 4, backend: vxlan}", SERVICES);
    lab.up(&f);
    let st = lab.status();
    let client = lab.ns("pod.default.client");
    let client_ip = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "client")
        .unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let web = cluster_ip(&st, "web");
    assert!("10.96.0.0/12"
        .parse::<ipnet::IpNet>()
        .unwrap()
        .contains(&web));
    // Wait for the agents' first proxy sync, then spread and no NAT from a pod.
    assert!(cni_harness::conformance::wait_until(
        Duration::from_secs(5),
        || client
            .run(|| TcpStream::connect_timeout(
                &SocketAddr::new(web, 80),
                Duration::from_millis(300)
            )
            .is_ok())
            .unwrap()
    ));
    let line = hello(&client, web, 80);
    assert_eq!(
        field(&line, "client").rsplit_once(':').unwrap().0,
        client_ip,
        "{line}"
    );
    assert!(
        backends(&client, web, 80, 24).len() >= 2,
        "one backend answered 24 connections"
    );
    // No endpoints: refused at once, not a timeout.
    let err = client
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::new(cluster_ip(&st, "nothing"), 80),
                Duration::from_secs(3),
            )
        })
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // NodePort from the lab internet, on a node's address.
    let node_ip: IpAddr = st["nodes"][0]["ip"].as_str().unwrap().parse().unwrap();
    let inet = lab.ns("internet");
    assert!(!field(&hello(&inet, node_ip, 30090), "pod").is_empty());
    // LoadBalancer IPs from the lab internet: Cluster policy masquerades, Local keeps the client.
    let lb_ip = |name: &str| -> IpAddr {
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["externalIP"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let seen = field(&hello(&inet, lb_ip("web-lb"), 80), "client")
        .rsplit_once(':')
        .unwrap()
        .0
        .to_string();
    assert_ne!(seen, "203.0.113.10", "Cluster policy should masquerade");
    for _ in 0..6 {
        let line = hello(&inet, lb_ip("web-lb-local"), 80);
        assert_eq!(
            field(&line, "client").rsplit_once(':').unwrap().0,
            "203.0.113.10",
            "{line}"
        );
    }
    // Its health check answers 200 on nodes with a local endpoint, 503 elsewhere.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(
            lab.root
                .path()
                .join(&lab.name)
                .join("cluster/services/default.web-lb-local.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let hc = state["spec"]["healthCheckNodePort"].as_u64().unwrap() as u16;
    let mut answers = std::collections::BTreeSet::new();
    for n in st["nodes"].as_array().unwrap() {
        let local = st["pods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node"] == n["name"] && p["name"].as_str().unwrap().starts_with("web-"));
        let ip: IpAddr = n["ip"].as_str().unwrap().parse().unwrap();
        let status = inet
            .run(|| -> std::io::Result<String> {
                use std::io::{Read, Write};
                let mut s =
                    TcpStream::connect_timeout(&SocketAddr::new(ip, hc), Duration::from_secs(2))?;
                s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })
            .unwrap()
            .unwrap();
        let want = if local {
            "HTTP/1.1 200"
        } else {
            "HTTP/1.1 503"
        };
        assert!(status.starts_with(want), "node {}: {status}", n["name"]);
        answers.insert(want);
    }
    assert_eq!(
        answers.len(),
        2,
        "both a node with and one without local endpoints were asked"
    );
    // Scale to one replica: the Service follows.
    let f = lab.file(
        "{nodes: 4, backend: vxlan}",
        &SERVICES.replace("replicas: 3", "replicas: 1"),
    );
    lab.apply(&f);
    let left = lab.status()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"].as_str().unwrap().starts_with("web-"))
        .count();
    assert_eq!(left, 1);
    assert!(
        cni_harness::conformance::wait_until(Duration::from_secs(5), || try_backends(
            &client, web, 80, 8
        )
        .is_some_and(|b| b.len() == 1)),
        "connections still spread after scaling to one replica"
    );
}

#[test]
fn affinity_internal_local_policy_and_source_ranges() {
    let Some(lab) = TestLab::new() else { return };
    let extra = r#"---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec: {selector: {app: web}, sessionAffinity: ClientIP, ports: [{port: 80, targetPort: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: near}
spec: {selector: {app: web}, internalTrafficPolicy: Local, ports: [{port: 80, targetPort: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: guarded}
spec: {type: LoadBalancer, selector: {app: web}, loadBalancerSourceRanges: [192.0.2.0/24], ports: [{port: 80, targetPort: 9000}]}
"#;
    let f = lab.file("{nodes: 3, backend: vxlan}", &format!("{SERVICES}{extra}"));
    lab.up(&f);
    let st = lab.status();
    let client = lab.ns("pod.default.client");
    // ClientIP affinity: one client keeps its backend.
    assert_eq!(
        backends(&client, cluster_ip(&st, "sticky"), 80, 10).len(),
        1,
        "affinity did not hold"
    );
    // internalTrafficPolicy Local: only the client's node's endpoint (the client is on node-1).
    let here: Vec<String> = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["node"] == "node-1" && p["name"].as_str().unwrap().starts_with("web-"))
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !here.is_empty(),
        "the spread put no web pod beside the client: {st}"
    );
    let seen = backends(&client, cluster_ip(&st, "near"), 80, 10);
    assert!(
        seen.iter().all(|b| here.contains(b)),
        "{seen:?} not all on node-1 ({here:?})"
    );
    // loadBalancerSourceRanges: the lab internet (203.0.113.10) is not in 192.0.2.0/24.
    let lb: IpAddr = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "guarded")
        .unwrap()["externalIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let inet = lab.ns("internet");
    assert!(
        try_hello(&inet, lb, 80, Duration::from_millis(700)).is_err(),
        "a source outside the ranges got through"
    );
}

/// A client keeps connecting to a ClusterIP while every agent is killed and restarted (each
/// adopts the table its predecessor left) and while the Deployment scales down and up: not one
/// connection fails.
#[test]
fn connections_survive_agent_restarts_and_endpoint_churn() {
    let Some(lab) = TestLab::new() else { return };
    let f = lab.file("{nodes: 2, backend: vxlan}", SERVICES);
    lab.up(&f);
    let web = cluster_ip(&lab.status(), "web");
    let client = lab.ns("pod.default.client");
    assert!(
        try_backends(&client, web, 80, 4).is_some(),
        "the Service answers"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let client = lab.ns("pod.default.client");
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match try_hello(&client, web, 80, Duration::from_secs(2)) {
                    Ok(line) if !field(&line, "pod").is_empty() => ok += 1,
                    Ok(line) => failed.push(format!("odd answer {line:?}")),
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (ok, failed)
        })
    };
    let state_file = lab.root.path().join(&lab.name).join("state.json");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    for agent in state["agents"].as_object().unwrap().values() {
        let pid = agent["pid"].as_i64().unwrap() as i32;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    lab.up(&f);
    let agents = lab.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert!(
        agents.iter().all(|a| a == "Running"),
        "agents after up: {agents:?}"
    );
    for replicas in ["replicas: 1", "replicas: 4", "replicas: 2"] {
        let f = lab.file(
            "{nodes: 2, backend: vxlan}",
            &SERVICES.replace("replicas: 3", replicas),
        );
        lab.apply(&f);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.join().unwrap();
    assert!(ok >= 20, "only {ok} connections made");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
}

const DNS_WORKLOADS: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: x, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: dns-test-service}
spec:
  clusterIP: None
  selector: {dns-test: "true"}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: dns-querier-1, labels: {dns-test: "true"}}
spec:
  hostname: dns-querier-1
  subdomain: dns-test-service
  containers: [{name: web, image: x}]
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: www.example.com}
---
apiVersion: v1
kind: Pod
metadata: {name: custom-dns}
spec:
  dnsPolicy: "None"
  dnsConfig:
    nameservers: [10.96.0.10]
    searches: [shop.svc.cluster.local]
    options: [{name: ndots, value: "1"}]
  containers: [{name: c, image: x, command: [sleep, infinity]}]
"#;

impl TestLab {
    /// `dig +short ARGS` from the client pod (through its resolv.conf: kube-dns).
    fn dig(&self, args: &str) -> String {
        let mut argv = vec![
            "exec", "client", "--", "dig", "+time=2", "+tries=2", "+short",
        ];
        argv.extend(args.split_whitespace());
        let out = self.flatnet(&argv);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `dig`'s status line word (NOERROR, NXDOMAIN, …) and the authority section's types.
    fn dig_status(&self, args: &str) -> (String, Vec<String>) {
        let mut argv = vec!["exec", "client", "--", "dig", "+time=2", "+tries=2"];
        argv.extend(args.split_whitespace());
        let out = String::from_utf8_lossy(&self.flatnet(&argv).stdout).to_string();
        let status = out
            .split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("")
            .to_string();
        let authority = out
            .split(";; AUTHORITY SECTION:")
            .nth(1)
            .map(|s| {
                s.lines()
                    .skip(1)
                    .take_while(|l| !l.trim().is_empty())
                    .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        (status, authority)
    }
}

/// The Kubernetes e2e DNS tests' cases, with dig from a pod through kube-dns (10.96.0.10):
/// services, partial names through the search list, SRV, PTR, headless services with pod
/// hostname and subdomain, ExternalName followed to the lab internet, pod names, negative
/// answers with the SOA, TCP, forwarding, and records following `lab apply` at once.
#[test]
fn cluster_dns_answers_per_the_specification() {
    let Some(lab) = TestLab::new() else { return };
    // The client pod of the Service tests (the last document of SERVICES).
    let client = &SERVICES[SERVICES.rfind("---").unwrap()..];
    let f = lab.file(
        "{nodes: 3, backend: host-gw}",
        &format!("{DNS_WORKLOADS}{client}"),
    );
    lab.up(&f);
    let st = lab.status();
    let ip_of = |name: &str| {
        st["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["ip"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let shop_web = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web" && s["namespace"] == "shop")
        .unwrap()["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    // The pod's resolv.conf is the kubelet's.
    let out = lab.flatnet(&["exec", "client", "--", "cat", "/etc/resolv.conf"]);
    let resolv = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        resolv.contains("nameserver 10.96.0.10")
            && resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local")
            && resolv.contains("options ndots:5"),
        "{resolv}"
    );
    // dnsPolicy None with a dnsConfig: exactly what it says, and its search list works.
    let out = lab.flatnet(&["exec", "custom-dns", "--", "cat", "/etc/resolv.conf"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "search shop.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:1\n"
    );
    let out = lab.flatnet(&["exec", "custom-dns", "--", "getent", "hosts", "web"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&shop_web),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Services: full, partial (search list) names, over UDP and TCP.
    assert_eq!(lab.dig("web.shop.svc.cluster.local"), shop_web);
    assert_eq!(lab.dig("+tcp WEB.Shop.svc.cluster.local"), shop_web);
    assert_eq!(
        lab.dig("kubernetes-dns-missing.default.svc.cluster.local"),
        ""
    );
    for name in ["web.shop", "web.shop.svc"] {
        let out = lab.flatnet(&["exec", "client", "--", "getent", "hosts", name]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.starts_with(&shop_web), "getent hosts {name}: {text:?}");
    }
    assert_eq!(
        lab.dig("SRV _http._tcp.web.shop.svc.cluster.local"),
        "0 100 80 web.shop.svc.cluster.local."
    );
    let reverse: Vec<&str> = shop_web.split('.').rev().collect();
    assert_eq!(
        lab.dig(&format!("PTR {}.in-addr.arpa", reverse.join("."))),
        "web.shop.svc.cluster.local."
    );
    assert_eq!(
        lab.dig("kube-dns.kube-system.svc.cluster.local"),
        "10.96.0.10"
    );
    assert_eq!(lab.dig("TXT dns-version.cluster.local"), "\"1.0.1\"");
    // Headless Service with a pod's hostname and subdomain.
    let querier = ip_of("dns-querier-1");
    assert_eq!(
        lab.dig("dns-test-service.default.svc.cluster.local"),
        querier
    );
    assert_eq!(
        lab.dig("dns-querier-1.dns-test-service.default.svc.cluster.local"),
        querier
    );
    assert_eq!(
        lab.dig("SRV _http._tcp.dns-test-service.default.svc.cluster.local"),
        "0 100 8080 dns-querier-1.dns-test-service.default.svc.cluster.local."
    );
    // Pods by address, in their own namespace only (verified).
    let dashed = querier.replace('.', "-");
    assert_eq!(
        lab.dig(&format!("{dashed}.default.pod.cluster.local")),
        querier
    );
    let (status, _) = lab.dig_status(&format!("{dashed}.shop.pod.cluster.local"));
    assert_eq!(status, "NXDOMAIN");
    // ExternalName: a CNAME, followed through the upstream in the lab internet.
    assert_eq!(
        lab.dig("ext.default.svc.cluster.local"),
        "www.example.com.\n203.0.113.10"
    );
    assert_eq!(lab.dig("www.example.com"), "203.0.113.10");
    // Negative answers: NXDOMAIN and NODATA, each with the zone's SOA.
    let (status, auth) = lab.dig_status("nope.default.svc.cluster.local");
    assert_eq!(
        (status.as_str(), auth),
        ("NXDOMAIN", vec!["SOA".to_string()])
    );
    let (status, auth) = lab.dig_status("AAAA web.shop.svc.cluster.local");
    assert_eq!(
        (status.as_str(), auth),
        ("NOERROR", vec!["SOA".to_string()])
    );
    // A new Service is in DNS when `lab apply` returns.
    lab.apply_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: late}\nspec: {selector: {app: late}, ports: [{port: 80}]}\n",
    );
    let late = cluster_ip(&lab.status(), "late").to_string();
    assert_eq!(lab.dig("late.default.svc.cluster.local"), late);
    // And gone when `lab delete service` returns.
    let out = lab.flatnet(&["delete", "service", "late"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = lab.dig_status("late.default.svc.cluster.local");
    assert_eq!(status, "NXDOMAIN");
    // A StatefulSet behind its headless Service: each pod by its ordinal name.
    lab.apply_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec: {serviceName: db, replicas: 2, selector: {matchLabels: {app: db}}, template: {metadata: {labels: {app: db}}, spec: {containers: [{name: c, image: x}]}}}\n",
    );
    let st = lab.status();
    for pod in ["db-0", "db-1"] {
        let ip = st["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == pod)
            .unwrap_or_else(|| panic!("{pod} missing: {st}"))["ip"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(lab.dig(&format!("{pod}.db.default.svc.cluster.local")), ip);
    }
    // Metrics through the Service's metrics port.
    let out = lab.flatnet(&[
        "exec",
        "client",
        "--",
        "curl",
        "-s",
        "http://kube-dns.kube-system:9153/metrics",
    ]);
    let metrics = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        metrics.contains("flatnet_dns_requests_total{proto=\"udp\",type=\"A\"}"),
        "{metrics}"
    );
}
