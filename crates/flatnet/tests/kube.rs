//! `--source kube` end to end: `flatnet agent` and `flatnet dns` against a stand-in API server
//! that speaks the Kubernetes wire format (lists with resourceVersion, watch streams,
//! bookmarks, 410 Gone), inside a network namespace the test creates as a node (an `eth0`
//! holding the node's address) and always removes. Needs root; elsewhere each test says it
//! skipped.

use serde_json::{json, Value};
use state::standin::ApiServer;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flatnet");

/// A node namespace with `eth0` at 172.18.0.2/24, the stand-in API server on its loopback, and
/// the daemons started in it (killed when dropped).
struct Node {
    ns: netns::TempNetNs,
    api: ApiServer,
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn node(name: &str, ip: &str, cidr: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn slice(service: &str, ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abc"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": eps,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

impl Node {
    fn new() -> Option<Node> {
        if !netns::can_create() {
            eprintln!("skipped: needs root to create network namespaces");
            return None;
        }
        let ns = netns::TempNetNs::new("fn-kube").unwrap();
        for cmd in [
            "ip link set lo up",
            "ip link add eth0 type veth peer name eth0p",
            "ip link set eth0p up",
            "ip addr add 172.18.0.2/24 dev eth0",
            "ip link set eth0 up",
        ] {
            let ok = Command::new("ip")
                .args(["netns", "exec", ns.name()])
                .args(cmd.split(' '))
                .status()
                .unwrap();
            assert!(ok.success(), "{cmd}");
        }
        let api = ns.ns().run(ApiServer::start).unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        api.write_kubeconfig(&dir.path().join("kubeconfig"))
            .unwrap();
        std::fs::write(
            dir.path().join("net-conf.json"),
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#,
        )
        .unwrap();
        for o in [
            node("node-1", "172.18.0.2", "10.244.1.0/24"),
            node("node-2", "172.18.0.3", "10.244.2.0/24"),
            service("web", "10.96.0.20"),
            slice("web", &["10.244.2.5", "10.244.1.7"]),
        ] {
            api.apply(o).unwrap();
        }
        Some(Node {
            ns,
            api,
            dir,
            daemons: Vec::new(),
        })
    }

    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }

    fn exec(&self, argv: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .args(argv)
            .output()
            .unwrap()
    }

    fn text(&self, argv: &[&str]) -> String {
        String::from_utf8_lossy(&self.exec(argv).stdout).into_owned()
    }

    fn spawn(&mut self, args: &[&str], log: &str) {
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns.name(), BIN])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemons.push(child);
    }

    fn agent_args(&self) -> Vec<String> {
        [
            "agent",
            "--node",
            "node-1",
            "--source",
            "kube",
            "--kubeconfig",
            &self.path("kubeconfig"),
            "--net-conf",
            &self.path("net-conf.json"),
            "--cni-conf-dir",
            &self.path("net.d"),
            "--http",
            "127.0.0.1:10256",
        ]
        .map(String::from)
        .to_vec()
    }

    /// The HTTP status of a GET inside the namespace.
    fn status_code(&self, url: &str) -> String {
        self.text(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url])
    }

    fn routes(&self) -> String {
        self.text(&["ip", "route", "show", "proto", "201"])
    }

    fn proxy_table(&self) -> String {
        self.text(&["nft", "list", "table", "ip", "flatnet-proxy"])
    }

    fn log(&self, f: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default()
    }
}

/// Polls `cond` for up to 10 s (convergence, not a timing assertion).
fn eventually(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}; {}", context());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn has_route(routes: &str, dst: &str, via: &str) -> bool {
    routes
        .lines()
        .any(|l| l.starts_with(dst) && l.contains(&format!("via {via}")))
}

#[test]
fn agent_programs_routes_and_service_rules_from_the_api_and_keeps_them_while_it_is_away() {
    let Some(mut n) = Node::new() else { return };
    let args = n.agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // --once --dry-run: the plan from what the API server returns, nothing changed.
    let mut dry: Vec<&str> = args.clone();
    dry.extend(["--once", "--dry-run"]);
    let out = n.exec(&[&[BIN][..], &dry].concat());
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(plan.contains("10.244.2.0/24 via 172.18.0.3"), "{plan}");
    assert!(plan.contains("10.96.0.20 . tcp . 80"), "{plan}");
    assert!(plan.contains("10.244.2.5"), "{plan}");
    assert!(n.routes().is_empty(), "a dry run changes nothing");

    n.spawn(&args, "agent.log");
    let ctx = || format!("routes:\n{}\nlog:\n{}", n.routes(), n.log("agent.log"));
    eventually(
        "the route to node-2's pods",
        || has_route(&n.routes(), "10.244.2.0/24", "172.18.0.3"),
        ctx,
    );
    eventually(
        "the web Service in the proxy table",
        || n.proxy_table().contains("10.96.0.20 . tcp . 80"),
        ctx,
    );
    // The node's CNI config, with its pod CIDR as the IPAM range.
    let conflist: Value = serde_json::from_str(
        &std::fs::read_to_string(n.path("net.d/10-flatnet.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        conflist["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
        "10.244.1.0/24"
    );
    let ready = n.status_code("http://127.0.0.1:10256/readyz");
    assert_eq!(ready, "200");
    let metrics = n.text(&["curl", "-s", "http://127.0.0.1:10256/metrics"]);
    assert!(
        metrics.contains("flatnet_source_objects{kind=\"Service\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flatnet_sync_seconds_count{part=\"proxy\"}"),
        "{metrics}"
    );

    // Changes through the API server follow: a node joins, a Service goes.
    n.api
        .apply(node("node-3", "172.18.0.4", "10.244.3.0/24"))
        .unwrap();
    n.api.delete(cluster::Kind::Service, "default", "web");
    eventually(
        "node-3's route",
        || has_route(&n.routes(), "10.244.3.0/24", "172.18.0.4"),
        ctx,
    );
    eventually(
        "the deleted Service leaves the table",
        || !n.proxy_table().contains("10.96.0.20 . tcp . 80"),
        ctx,
    );

    // The API server goes away: nothing is flushed.
    n.api.set_available(false);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        has_route(&n.routes(), "10.244.2.0/24", "172.18.0.3"),
        "{}",
        ctx()
    );
    assert!(
        has_route(&n.routes(), "10.244.3.0/24", "172.18.0.4"),
        "{}",
        ctx()
    );
    // While it is away, history is compacted and things change: the agent's next watch gets
    // 410 Gone, it lists again and catches up.
    n.api.apply(service("api", "10.96.0.21")).unwrap();
    n.api.apply(slice("api", &["10.244.2.9"])).unwrap();
    n.api.delete(cluster::Kind::Node, "", "node-3");
    n.api.compact();
    n.api.set_available(true);
    eventually(
        "the Service created while the API was away",
        || n.proxy_table().contains("10.96.0.21 . tcp . 80"),
        ctx,
    );
    eventually(
        "node-3's route goes with its Node",
        || !has_route(&n.routes(), "10.244.3.0/24", "172.18.0.4"),
        ctx,
    );
    let lists = n.api.log().iter().filter(|l| *l == "LIST services").count();
    assert!(lists >= 2, "re-listed after the outage: {:?}", n.api.log());
    assert!(
        n.api.log().iter().any(|l| l.starts_with("WATCH pods")),
        "{:?}",
        n.api.log()
    );
    let metrics = n.text(&["curl", "-s", "http://127.0.0.1:10256/metrics"]);
    assert!(
        !metrics.contains("flatnet_source_errors_total 0"),
        "errors counted: {metrics}"
    );
}

fn dig(n: &Node, name: &str) -> String {
    n.text(&[
        "dig",
        "+short",
        "+time=1",
        "+tries=1",
        "@127.0.0.1",
        "-p",
        "5353",
        name,
    ])
}

#[test]
fn dns_answers_from_the_api_and_follows_it() {
    let Some(mut n) = Node::new() else { return };
    let kubeconfig = n.path("kubeconfig");
    n.spawn(
        &[
            "dns",
            "--source",
            "kube",
            "--kubeconfig",
            &kubeconfig,
            "--listen",
            "127.0.0.1:5353",
            "--http",
            "127.0.0.1:18080",
            "--no-forward",
            "--workers",
            "1",
        ],
        "dns.log",
    );
    let ctx = || n.log("dns.log");
    eventually(
        "web's A record",
        || dig(&n, "web.default.svc.cluster.local") == "10.96.0.20\n",
        ctx,
    );
    // A headless Service: one A record per ready endpoint, following its slice.
    let mut headless = service("db", "None");
    headless["spec"]["clusterIPs"] = json!(["None"]);
    n.api.apply(headless).unwrap();
    n.api
        .apply(slice("db", &["10.244.1.8", "10.244.2.8"]))
        .unwrap();
    let answers = |n: &Node| {
        let mut v: Vec<String> = dig(n, "db.default.svc.cluster.local")
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    eventually(
        "db's two endpoints",
        || answers(&n) == ["10.244.1.8", "10.244.2.8"],
        ctx,
    );
    n.api.apply(slice("db", &["10.244.2.8"])).unwrap();
    eventually("db's one endpoint", || answers(&n) == ["10.244.2.8"], ctx);
    // Away, compacted, changed, back: it re-lists and catches up, answering all along.
    n.api.set_available(false);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(dig(&n, "web.default.svc.cluster.local"), "10.96.0.20\n");
    n.api.delete(cluster::Kind::Service, "default", "web");
    n.api.compact();
    n.api.set_available(true);
    eventually(
        "the Service deleted while the API was away is gone",
        || {
            let out = n.text(&[
                "dig",
                "+time=1",
                "+tries=1",
                "@127.0.0.1",
                "-p",
                "5353",
                "web.default.svc.cluster.local",
            ]);
            out.contains("NXDOMAIN")
        },
        ctx,
    );
    let ready = n.status_code("http://127.0.0.1:18080/ready");
    assert_eq!(ready, "200");
}

#[test]
fn an_unreachable_api_server_is_a_clear_error_for_one_shot_runs() {
    let Some(n) = Node::new() else { return };
    std::fs::write(
        n.dir.path().join("bad-kubeconfig"),
        "apiVersion: v1\nkind: Config\nclusters: []\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "agent",
            "--node",
            "node-1",
            "--source",
            "kube",
            "--kubeconfig",
        ])
        .arg(Path::new(&n.path("bad-kubeconfig")))
        .args([
            "--net-conf",
            &n.path("net-conf.json"),
            "--once",
            "--dry-run",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kubeconfig") && err.contains("bad-kubeconfig"),
        "{err}"
    );
}

#[test]
fn an_rbac_denial_is_logged_and_counted_and_the_agent_waits_until_it_is_granted() {
    let Some(mut n) = Node::new() else { return };
    n.api.forbid("endpointslices", true);
    let args = n.agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    n.spawn(&args, "agent.log");
    let ctx = || format!("routes:\n{}\nlog:\n{}", n.routes(), n.log("agent.log"));
    eventually(
        "a log line naming the denied resource",
        || n.log("agent.log").contains("endpointslices is forbidden"),
        ctx,
    );
    // Half a listing is never planned from: not ready, nothing written.
    let ready = n.status_code("http://127.0.0.1:10256/readyz");
    assert_eq!(ready, "503");
    assert!(n.routes().is_empty(), "{}", ctx());
    let metrics = n.text(&["curl", "-s", "http://127.0.0.1:10256/metrics"]);
    assert!(
        !metrics.contains("flatnet_source_errors_total 0"),
        "{metrics}"
    );
    // Granted: the watcher's retry lists it and everything is programmed.
    n.api.forbid("endpointslices", false);
    eventually(
        "the routes and rules once the denial is lifted",
        || {
            has_route(&n.routes(), "10.244.2.0/24", "172.18.0.3")
                && n.proxy_table().contains("10.96.0.20 . tcp . 80")
        },
        ctx,
    );
}
