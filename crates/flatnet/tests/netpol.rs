//! NetworkPolicy in the lab, as a user applies it: the reachability matrix by pod IP, by
//! ClusterIP and by DNS name; `lab explain` and the drop log naming the policy; a new pod isolated
//! from its first packet; an established connection cut when a policy change denies it. Needs
//! root, as the other lab tests.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const PODS: [(&str, &str, &str); 4] = [
    ("x", "xa", "node-1"),
    ("x", "xb", "node-2"),
    ("y", "ya", "node-1"),
    ("y", "yb", "node-2"),
];

fn workloads() -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: blue}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: \"y\"}\n---\n",
    );
    for (ns, name, node) in PODS {
        out += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: \"{ns}\", labels: {{pod: {name}}}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: flatnet-serve, ports: [{{name: http, containerPort: 8080}}, {{name: echo, containerPort: 9000}}]}}]\n---\n"
        );
    }
    out + "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec:\n  selector: {pod: xa}\n  ports: [{port: 80, targetPort: http}]\n"
}

const POLICIES: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: x}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-y, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: "y"}}}]
    ports: [{port: echo}, {port: http}]
"#;

struct Pods {
    ips: Vec<(String, IpAddr)>,
}

impl Pods {
    fn of(lab: &TestLab) -> Pods {
        let st = lab.status();
        let ips = PODS
            .iter()
            .map(|(ns, name, _)| {
                let p = st["pods"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == *name && p["namespace"] == *ns)
                    .unwrap();
                (
                    format!("{ns}/{name}"),
                    p["ip"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
        Pods { ips }
    }

    fn ip(&self, key: &str) -> IpAddr {
        self.ips.iter().find(|(k, _)| k == key).unwrap().1
    }
}

fn pod_ns(lab: &TestLab, key: &str) -> netns::NetNs {
    let (ns, name) = key.split_once('/').unwrap();
    lab.ns(&format!("pod.{ns}.{name}"))
}

/// Every ordered pair over the echo port: whether it connects. As the upstream suite probes,
/// a matrix that differs is probed again (a workload may still be starting), three times.
fn matrix(lab: &TestLab, pods: &Pods, want: impl Fn(&str, &str) -> bool) {
    let mut wrong = Vec::new();
    for round in 0..3 {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        wrong.clear();
        for (from, _) in &pods.ips {
            for (to, ip) in &pods.ips {
                if from == to {
                    continue;
                }
                let got =
                    try_hello(&pod_ns(lab, from), *ip, 9000, Duration::from_millis(1500)).is_ok();
                if got != want(from, to) {
                    wrong.push(format!("{from} -> {to}: got {got}"));
                }
            }
        }
        if wrong.is_empty() {
            return;
        }
    }
    panic!("{wrong:?}");
}

fn curl(lab: &TestLab, from: &str, url: &str) -> Option<String> {
    let (ns, name) = from.split_once('/').unwrap();
    let out = lab.flatnet(&["exec", "-n", ns, name, "--", "curl", "-s", "-m", "3", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn agent_logs(lab: &TestLab) -> String {
    let mut out = String::new();
    let mut stack = vec![lab.root.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("agent-"))
            {
                out += &std::fs::read_to_string(&p).unwrap_or_default();
            }
        }
    }
    out
}

#[test]
fn policies_isolate_explain_log_and_cut() {
    let Some(lab) = TestLab::new() else { return };
    let f = lab.file("{nodes: 2, backend: host-gw}", &workloads());
    lab.up(&f);
    let pods = Pods::of(&lab);
    matrix(&lab, &pods, |_, _| true);

    lab.apply_text(POLICIES);
    let st = lab.flatnet(&["status"]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains("default-deny") && text.contains("from-y"),
        "{text}"
    );
    // Into x only from y (named ports resolved on the x pods); y is open.
    matrix(&lab, &pods, |from, to| {
        !to.starts_with("x/") || from.starts_with("y/")
    });
    // By ClusterIP and by DNS name: the policies see the endpoint after DNAT.
    let st = lab.status();
    let vip = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let via_ip = curl(&lab, "y/yb", &format!("http://{vip}/")).expect("y reaches the Service");
    assert!(via_ip.contains("pod=xa"), "{via_ip}");
    assert!(curl(&lab, "y/ya", "http://web.x/").is_some_and(|o| o.contains("pod=xa")));
    assert!(
        curl(&lab, "x/xb", &format!("http://{vip}/")).is_none(),
        "x/xb is not in y"
    );
    assert!(curl(&lab, "x/xb", "http://web.x/").is_none());

    // explain names the policies and why.
    let out = lab.flatnet(&["explain", "xb", &format!("{}:9000", pods.ip("x/xa"))]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("policy: DENIED")
            && text.contains("x/default-deny")
            && text.contains("x/from-y"),
        "{text}"
    );
    let out = lab.flatnet(&["explain", "ya", &format!("{vip}:80")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("allowed by NetworkPolicy x/from-y ingress[0]"),
        "{text}"
    );
    // The drop log of xa's node names them too.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = agent_logs(&lab);
        if logs.contains("pod x/xa is isolated by NetworkPolicy x/default-deny, x/from-y") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no drop logged for x/xa:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Every denied packet is counted, past the log's rate limit: 120 refused connections in a
    // burst add at least 120 to each isolating policy's counter on xa's node.
    let denied = |policy: &str| -> u64 {
        let text = lab
            .ns("node.node-1")
            .run(|| -> std::io::Result<String> {
                let mut s = TcpStream::connect("127.0.0.1:10256")?;
                s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
                let mut t = String::new();
                std::io::Read::read_to_string(&mut s, &mut t)?;
                Ok(t)
            })
            .unwrap()
            .unwrap();
        let series = format!(
            "flatnet_policy_denied_total{{namespace=\"x\",policy=\"{policy}\",direction=\"ingress\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    };
    let before = [denied("default-deny"), denied("from-y")];
    let xb = pod_ns(&lab, "x/xb");
    for _ in 0..120 {
        assert!(try_hello(&xb, pods.ip("x/xa"), 9000, Duration::from_secs(1)).is_err());
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    while denied("default-deny") < before[0] + 120 || denied("from-y") < before[1] + 120 {
        assert!(
            Instant::now() < deadline,
            "counted {} and {} after {before:?}",
            denied("default-deny"),
            denied("from-y")
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // A new pod a policy selects never gets a packet out; one it does not select does.
    lab.apply_text(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: new-no-egress, namespace: \"y\"}\nspec: {podSelector: {matchLabels: {role: new}}, policyTypes: [Egress]}\n",
    );
    let target = pods.ip("y/yb");
    let mut new_pods = String::new();
    for role in ["new", "other"] {
        let file = lab.root.path().join(format!("first-{role}"));
        new_pods += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: first-{role}, namespace: \"y\", labels: {{role: {role}}}}}\nspec:\n  nodeName: node-1\n  containers: [{{name: c, image: curl, command: [sh, -c, \"curl -s -m 5 -o /dev/null -w %{{http_code}} http://{target}:8080/ > {}.tmp; mv {}.tmp {}; sleep 1000\"]}}]\n---\n",
            file.display(), file.display(), file.display()
        );
    }
    lab.apply_text(&new_pods);
    let read = |role: &str| {
        let file = lab.root.path().join(format!("first-{role}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(t) = std::fs::read_to_string(&file) {
                return t;
            }
            assert!(Instant::now() < deadline, "first-{role} wrote nothing");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(read("other"), "200", "a pod no policy selects gets through");
    assert_eq!(
        read("new"),
        "000",
        "a selected pod's first packets never leave"
    );

    // An established connection that a change now denies is cut at its next packet.
    let mut conn = pod_ns(&lab, "y/ya")
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::new(pods.ip("x/xa"), 9000),
                Duration::from_secs(2),
            )
        })
        .unwrap()
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    conn.write_all(b"ping\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "ping\n");
    lab.flatnet(&["delete", "networkpolicy", "from-y", "-n", "x"]);
    line.clear();
    let cut = conn.write_all(b"again\n").is_err()
        || !matches!(reader.read_line(&mut line), Ok(n) if n > 0);
    assert!(cut, "the connection went on: {line:?}");

    // All policies gone: open again.
    for (name, ns) in [("default-deny", "x"), ("new-no-egress", "y")] {
        let out = lab.flatnet(&["delete", "networkpolicy", name, "-n", ns]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    matrix(&lab, &pods, |_, _| true);
}

/// Polls `cond` for up to `secs` seconds; the failure shows the probers' logs.
fn eventually(lab: &TestLab, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if Instant::now() > deadline {
            let logs = lab.root.path().join(&lab.name).join("logs");
            let tails: String = ["kubelet-node-1.log", "kubelet-node-2.log"]
                .iter()
                .map(|f| std::fs::read_to_string(logs.join(f)).unwrap_or_default())
                .collect();
            panic!("{what} within {secs} s; probers:\n{tails}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pod_field(lab: &TestLab, ns: &str, name: &str, key: &str) -> serde_json::Value {
    lab.status()["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name && p["namespace"] == ns)
        .unwrap_or_else(|| panic!("no pod {ns}/{name}"))[key]
        .clone()
}

/// The kubelet's part under a default-deny policy: readiness probes (exec, tcpSocket) decide
/// the endpoints, liveness probes (httpGet, exec) restart a container, both from the node, so
/// the policy does not stop them. A hostNetwork pod runs with its node's address, reaches a pod
/// on another node without NAT, and no policy of its namespace selects it.
#[test]
fn probes_pass_default_deny_and_host_network_pods_use_the_node() {
    let Some(lab) = TestLab::new() else { return };
    let ready = lab.root.path().join("ready");
    let alive = lab.root.path().join("alive");
    std::fs::write(&alive, "").unwrap();
    let serve = "image: flatnet-serve, ports: [{name: http, containerPort: 8080}]";
    let workloads = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: p}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: q}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: default-deny, namespace: p}}
spec: {{podSelector: {{}}, policyTypes: [Ingress, Egress]}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-q, namespace: p}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: q}}}}}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: p, labels: {{app: web}}}}
spec:
  nodeName: node-1
  containers:
  - {{name: web, {serve},
     readinessProbe: {{exec: {{command: [test, -e, "{ready}"]}}, periodSeconds: 1, failureThreshold: 1}},
     livenessProbe: {{httpGet: {{port: http, path: /healthz}}, periodSeconds: 1, failureThreshold: 2}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: live, namespace: p}}
spec:
  nodeName: node-1
  containers:
  - {{name: live, {serve},
     readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}},
     livenessProbe: {{exec: {{command: [test, -e, "{alive}"]}}, periodSeconds: 1, failureThreshold: 2}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: hostpod, namespace: p}}
spec:
  nodeName: node-2
  hostNetwork: true
  containers: [{{name: c, image: busybox, command: [sleep, infinity]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: target, namespace: q}}
spec:
  nodeName: node-1
  containers: [{{name: c, {serve}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: p}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
"#,
        ready = ready.display(),
        alive = alive.display()
    );
    let f = lab.file("{nodes: 2, backend: host-gw}", &workloads);
    lab.up(&f);
    let slice = lab
        .root
        .path()
        .join(&lab.name)
        .join("cluster/endpointslices/p.web.json");
    let web_ready_in_slice = || {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&slice).unwrap()).unwrap();
        s["endpoints"][0]["conditions"]["ready"] == true
    };

    // Not ready until its probe passes: the Service has no endpoint to send to.
    assert_eq!(pod_field(&lab, "p", "web", "ready"), false);
    assert!(!web_ready_in_slice());
    assert!(curl(&lab, "q/target", "http://web.p/").is_none());
    // A tcpSocket probe from the node gets through the default deny.
    eventually(&lab, 10, "live ready", || {
        pod_field(&lab, "p", "live", "ready") == true
    });

    std::fs::write(&ready, "").unwrap();
    eventually(&lab, 10, "web ready", || {
        pod_field(&lab, "p", "web", "ready") == true
    });
    assert!(web_ready_in_slice());
    eventually(&lab, 10, "the Service reaching web", || {
        curl(&lab, "q/target", "http://web.p/").is_some_and(|o| o.contains("pod=web"))
    });
    std::fs::remove_file(&ready).unwrap();
    eventually(&lab, 10, "web not ready again", || !web_ready_in_slice());
    assert_eq!(pod_field(&lab, "p", "web", "ready"), false);

    // A failing liveness probe restarts the container.
    std::fs::remove_file(&alive).unwrap();
    eventually(&lab, 15, "live restarted", || {
        pod_field(&lab, "p", "live", "restarts").as_u64() >= Some(1)
    });
    std::fs::write(&alive, "").unwrap();
    eventually(&lab, 10, "live ready after its restart", || {
        pod_field(&lab, "p", "live", "ready") == true
    });
    // web's httpGet liveness probe passed all along, under the default deny.
    assert_eq!(pod_field(&lab, "p", "web", "restarts"), 0);

    // hostNetwork: the node's address and name; reaches a pod on the other node unNATed, and
    // p's default deny (which would stop its egress) does not select it.
    let node2 = lab.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-2")
        .unwrap()["ip"]
        .clone();
    assert_eq!(pod_field(&lab, "p", "hostpod", "ip"), node2);
    assert_eq!(pod_field(&lab, "p", "hostpod", "hostNetwork"), true);
    let out = lab.flatnet(&["exec", "-n", "p", "hostpod", "--", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "node-2");
    let target = pod_field(&lab, "q", "target", "ip");
    let target = target.as_str().unwrap();
    let got = curl(&lab, "p/hostpod", &format!("http://{target}:8080/"))
        .expect("hostpod reaches q/target");
    assert_eq!(
        field(&got, "client").rsplit_once(':').unwrap().0,
        node2.as_str().unwrap(),
        "{got}"
    );
    let out = lab.flatnet(&["explain", "hostpod", &format!("{target}:8080")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("policy: allowed"), "{text}");
    // … while the policy-selected web still refuses it (another node's address, not web's own).
    let web = pod_field(&lab, "p", "web", "ip");
    assert!(curl(
        &lab,
        "p/hostpod",
        &format!("http://{}:8080/", web.as_str().unwrap())
    )
    .is_none());
    let out = lab.flatnet(&[
        "explain",
        "hostpod",
        &format!("{}:8080", web.as_str().unwrap()),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("policy: DENIED") && text.contains("p/default-deny"),
        "{text}"
    );
}

/// The upstream suite's shape (`test/e2e/network/netpol`): namespaces x, y, z, pods a, b, c in
/// each (a and c on node-1, b on node-2), serving TCP and UDP on 80 and 81, one Service per pod.
fn upstream_workloads() -> String {
    let mut out = String::new();
    for ns in ["x", "y", "z"] {
        out += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: \"{ns}\", labels: {{ns: \"{ns}\"}}}}\n---\n"
        );
        for pod in ["a", "b", "c"] {
            out += &upstream_pod(ns, pod, pod);
            out += &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s-{ns}-{pod}, namespace: \"{ns}\"}}\nspec:\n  selector: {{pod: {pod}}}\n  ports: [{{name: t80, port: 80}}, {{name: t81, port: 81}}, {{name: u80, port: 80, protocol: UDP}}, {{name: u81, port: 81, protocol: UDP}}]\n---\n"
            );
        }
    }
    out
}

/// Pod `ns/pod` labelled `pod: <label>`.
fn upstream_pod(ns: &str, pod: &str, label: &str) -> String {
    let node = if pod == "b" { "node-2" } else { "node-1" };
    let serve = |port: u16| {
        format!(
            "{{name: c{port}, command: [{BIN}, serve, --http, \"8{port:03}\", --tcp, \"{port}\", --udp, \"{port}\"], ports: [{{name: serve-{port}-tcp, containerPort: {port}}}, {{name: serve-{port}-udp, containerPort: {port}, protocol: UDP}}]}}"
        )
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: \"{ns}\", labels: {{pod: {label}}}}}\nspec:\n  nodeName: {node}\n  containers: [{}, {}]\n---\n",
        serve(80),
        serve(81)
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    PodIp,
    ClusterIp,
}

/// One probe from the source's namespace: a TCP connection answered by the echo's greeting, or
/// a UDP datagram answered.
fn reach(to: IpAddr, port: u16, udp: bool) -> bool {
    let addr = SocketAddr::new(to, port);
    if udp {
        let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") else {
            return false;
        };
        let mut buf = [0u8; 256];
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.connect(addr).is_ok()
            && s.send(b"x").is_ok()
            && matches!(s.recv(&mut buf), Ok(n) if buf[..n].starts_with(b"pod="))
    } else {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok_and(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("pod=")
        })
    }
}

/// The 9×9 matrix (self pairs left out) over TCP 80, TCP 81, UDP 80 and UDP 81 by pod IP, and
/// TCP 80 and UDP 81 by ClusterIP, checked against the decision function on the lab's own
/// cluster state (which `policy`'s pure tests check against written truth tables). A matrix
/// that differs is probed again, as upstream does, three rounds at most.
fn upstream_matrix(lab: &TestLab, case: &str) {
    let dir = lab.root.path().join(&lab.name).join("cluster");
    let st = lab.status();
    let pods: Vec<(String, IpAddr)> = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| ["x", "y", "z"].contains(&p["namespace"].as_str().unwrap_or("")))
        .map(|p| {
            (
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                ),
                p["ip"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(pods.len(), 9, "{st}");
    // The ClusterIP in front of each pod that is its Service's only endpoint (a relabelled pod
    // may leave its Service for another's).
    let vips: std::collections::BTreeMap<IpAddr, IpAddr> =
        std::fs::read_dir(dir.join("endpointslices"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let slice: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok()?;
                let svc = slice["metadata"]["labels"]["kubernetes.io/service-name"].as_str()?;
                let ns = slice["metadata"]["namespace"].as_str()?;
                let [ep] = slice["endpoints"].as_array()?.as_slice() else {
                    return None;
                };
                let row = st["services"]
                    .as_array()?
                    .iter()
                    .find(|s| s["name"] == svc && s["namespace"] == ns)?;
                Some((
                    ep["addresses"][0].as_str()?.parse().ok()?,
                    row["clusterIP"].as_str()?.parse().ok()?,
                ))
            })
            .collect();
    assert!(vips.len() >= 7, "ClusterIPs to probe: {vips:?}");
    let mut store = cluster::Store::new();
    store.apply(state::file::load(&dir));
    let mut planner = policy::plan::Planner::new("", None);
    planner.take_store(&store);
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    let probes: [(u16, bool, Via); 6] = [
        (80, false, Via::PodIp),
        (81, false, Via::PodIp),
        (80, true, Via::PodIp),
        (81, true, Via::PodIp),
        (80, false, Via::ClusterIp),
        (81, true, Via::ClusterIp),
    ];
    let mut wrong = Vec::new();
    for round in 0..3 {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        wrong = std::thread::scope(|sc| {
            let handles: Vec<_> = pods
                .iter()
                .map(|(from, src)| {
                    let (pods, planner, vips) = (&pods, &planner, &vips);
                    sc.spawn(move || {
                        let mut wrong = Vec::new();
                        let ns = pod_ns(lab, from);
                        for (to, dst) in pods.iter().filter(|(k, _)| k != from) {
                            for (port, udp, via) in probes {
                                let want = planner
                                    .cluster
                                    .decide(&policy::Packet {
                                        src: v4(*src),
                                        dst: v4(*dst),
                                        proto: if udp { 17 } else { 6 },
                                        port,
                                    })
                                    .allowed();
                                let addr = match via {
                                    Via::PodIp => *dst,
                                    Via::ClusterIp => match vips.get(dst) {
                                        Some(vip) => *vip,
                                        None => continue,
                                    },
                                };
                                let got = ns.run(|| reach(addr, port, udp)).unwrap();
                                if got != want {
                                    let proto = if udp { "udp" } else { "tcp" };
                                    wrong.push(format!(
                                        "{from} -> {to} {port}/{proto} by {via:?}: got {got}, want {want}"
                                    ));
                                }
                            }
                        }
                        wrong
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        if wrong.is_empty() {
            return;
        }
    }
    panic!("case {case}: {} wrong:\n{}", wrong.len(), wrong.join("\n"));
}

/// Upstream-shaped cases in the lab, each probed whole: every isolated and every allowed pair
/// matches the decision function; the model itself is held to truth tables in `policy`'s tests.
#[test]
fn upstream_matrix_in_the_kernel_matches_the_model() {
    let Some(lab) = TestLab::new() else { return };
    let f = lab.file("{nodes: 2, backend: host-gw}", &upstream_workloads());
    lab.up(&f);
    upstream_matrix(&lab, "no policies");

    // Ingress into x only from y, and only to a on its named port serve-80-tcp; b and c of x
    // from anyone on UDP 81. z may send only to y, on 81 by number with endPort, both protocols.
    let policies = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: "y"}}}], ports: [{port: serve-80-tcp}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bc-udp-81, namespace: x}
spec:
  podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}
  ingress: [{ports: [{port: 81, protocol: UDP}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: z-to-y-81, namespace: z}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: ["y"]}]}}], ports: [{port: 81, endPort: 81}, {port: 81, protocol: UDP}]}]
"#;
    lab.apply_text(policies);
    upstream_matrix(&lab, "selectors, named ports, endPort, UDP");

    // The same answer from the agent on a node, as an operator would ask it.
    let cluster_dir = lab.root.path().join(&lab.name).join("cluster");
    let net_conf = lab.root.path().join(&lab.name).join("net-conf.json");
    let ip = |key: &str| {
        let (ns, name) = key.split_once('/').unwrap();
        pod_field(&lab, ns, name, "ip")
            .as_str()
            .unwrap()
            .to_string()
    };
    let agent_explain = |from: &str, to: &str| {
        let out = std::process::Command::new(BIN)
            .args([
                "agent", "--node", "node-1", "--source", "file", "--http", "",
            ])
            .arg("--dir")
            .arg(&cluster_dir)
            .arg("--net-conf")
            .arg(&net_conf)
            .args(["--explain", from, to])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = agent_explain(&ip("z/b"), &format!("{}:80", ip("x/a")));
    assert!(
        text.contains("policy: DENIED")
            && text.contains("z/z-to-y-81")
            && text.contains("x/deny-ingress"),
        "{text}"
    );
    let text = agent_explain(&ip("y/b"), &format!("{}:80", ip("x/a")));
    assert!(
        text.contains("allowed by NetworkPolicy x/a-from-y ingress[0]"),
        "{text}"
    );

    // By DNS name: the Service's name resolves in the pod and the connection gets the verdict
    // of the endpoint behind it.
    let by_name = |from: &str, name: &str| {
        let (ns, pod) = from.split_once('/').unwrap();
        let script = format!("exec 3<>/dev/tcp/{name}/80 && head -c 4 <&3");
        let out = lab.flatnet(&[
            "exec", "-n", ns, pod, "--", "timeout", "3", "bash", "-c", &script,
        ]);
        out.status.success() && out.stdout.starts_with(b"pod=")
    };
    assert!(by_name("y/c", "s-x-a.x.svc.cluster.local"));
    assert!(!by_name("z/c", "s-x-a.x.svc.cluster.local"));
    assert!(!by_name("y/c", "s-x-b.x"));

    // Updates: a pod relabelled in place (x/b now `pod: a`: a-from-y selects it, bc-udp-81 no
    // longer does); y loses its namespace label and z gains it.
    let before = pod_field(&lab, "x", "b", "ip");
    lab.apply_text(&upstream_pod("x", "b", "a"));
    assert_eq!(
        pod_field(&lab, "x", "b", "ip"),
        before,
        "relabelled, not recreated"
    );
    upstream_matrix(&lab, "pod relabelled");
    lab.apply_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: \"y\", labels: {ns: other}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: z, labels: {ns: \"y\"}}\n",
    );
    upstream_matrix(&lab, "namespaces relabelled");
    lab.flatnet(&["delete", "networkpolicy", "a-from-y", "-n", "x"]);
    upstream_matrix(&lab, "a policy deleted");
    for (name, ns) in [
        ("deny-ingress", "x"),
        ("bc-udp-81", "x"),
        ("z-to-y-81", "z"),
    ] {
        lab.flatnet(&["delete", "networkpolicy", name, "-n", ns]);
    }
    upstream_matrix(&lab, "all deleted");
}
