//! The installed plugin, driven exactly as a runtime drives it, in namespaces made per test.
//! Needs root (CI runs as root); elsewhere each test says it skipped.

use cni_harness::conflist::{Attachment, NetList, Runtime};
use cni_harness::conformance::Suite;
use netns::TempNetNs;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;

const REFERENCE: &str = "/usr/lib/cni";

/// A directory holding `flatnet` (the binary under test) and the reference plugins beside it.
struct Env {
    bin: tempfile::TempDir,
    data: tempfile::TempDir,
    node: TempNetNs,
}

fn env() -> Option<Env> {
    if !netns::can_create() {
        eprintln!("skipped: needs root to create network namespaces");
        return None;
    }
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_flatnet"), bin.path().join("flatnet")).unwrap();
    Some(Env {
        bin,
        data: tempfile::tempdir().unwrap(),
        node: TempNetNs::new("fnt-node").unwrap(),
    })
}

impl Env {
    fn dirs(&self) -> Vec<PathBuf> {
        vec![self.bin.path().into(), REFERENCE.into()]
    }
    fn rt(&self, runtime_config: Value) -> Runtime<'_> {
        Runtime {
            bin_dirs: self.dirs(),
            node: Some(self.node.ns()),
            runtime_config,
        }
    }
    fn flatnet(&self, name: &str, extra: Value) -> Value {
        let mut c = json!({"cniVersion": "1.1.0", "name": name, "type": "flatnet", "bridge": "cnit0", "isGateway": true,
            "ipam": {"type": "flatnet", "dataDir": self.data.path(), "ranges": [[{"subnet": "10.77.0.0/24"}], [{"subnet": "fd77::/64"}]],
                     "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }
    fn leases(&self, network: &str) -> usize {
        std::fs::read_dir(self.data.path().join(network))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<IpAddr>().is_ok())
                    .count()
            })
            .unwrap_or(0)
    }
}

fn att(id: &str, pod: &TempNetNs) -> Attachment {
    Attachment {
        container_id: id.into(),
        netns: Some(pod.path().into()),
        ifname: "eth0".into(),
        args: None,
    }
}

/// Runs the suite; returns the names of the failed cases and the report.
fn run_suite(env: &Env, config: Value) -> (Vec<String>, String) {
    let mut suite = Suite::new(
        NetList::from_value(&config).unwrap(),
        env.dirs(),
        env.node.ns(),
        json!({}),
    );
    suite.run_all().unwrap();
    let failed = suite
        .cases
        .iter()
        .filter(|c| matches!(c.verdict, cni_harness::conformance::Verdict::Fail(_)))
        .map(|c| c.name.clone())
        .collect();
    (failed, suite.report())
}

#[test]
fn conformance_flatnet_bridge_ptp_and_reference() {
    let Some(env) = env() else { return };
    for config in [
        env.flatnet(
            "conf-bridge",
            json!({"ipMasq": true, "clusterCIDR": "10.77.0.0/16"}),
        ),
        env.flatnet(
            "conf-ptp",
            json!({"mode": "ptp", "bridge": null, "isGateway": null}),
        ),
    ] {
        let mut config = config;
        config.as_object_mut().unwrap().retain(|_, v| !v.is_null());
        let (failed, report) = run_suite(&env, config);
        println!("{report}");
        assert!(failed.is_empty(), "flatnet fails conformance:\n{report}");
    }
    let reference = json!({"cniVersion": "1.0.0", "name": "conf-ref", "type": "bridge", "bridge": "cnitref0", "isGateway": true,
        "ipam": {"type": "host-local", "dataDir": env.data.path(), "ranges": [[{"subnet": "10.78.0.0/24"}]]}});
    let (failed, report) = run_suite(&env, reference);
    println!("reference bridge + host-local:\n{report}");
    // The reference bridge builds its ADD result afresh and drops a prevResult handed to it,
    // against the spec; every other case must hold for it too.
    assert_eq!(
        failed,
        vec!["[chain] ADD given a prevResult returns it with its own additions".to_string()],
        "the suite must hold for the reference too:\n{report}"
    );
}

/// The keys and structure of a result, with values that differ by design (names, MACs,
/// addresses) blanked.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        Value::Number(n) => Value::Number(n.clone()),
        _ => json!("_"),
    }
}

#[test]
fn add_result_has_the_reference_shape() {
    let Some(env) = env() else { return };
    let ours = json!({"cniVersion": "1.0.0", "name": "shape-fn", "type": "flatnet", "bridge": "cnit1", "isGateway": true,
        "ipam": {"type": "flatnet", "dataDir": env.data.path(), "ranges": [[{"subnet": "10.79.0.0/24"}], [{"subnet": "fd79::/64"}]], "routes": [{"dst": "0.0.0.0/0"}]}});
    let mut theirs = ours.clone();
    theirs["name"] = json!("shape-ref");
    theirs["type"] = json!("bridge");
    theirs["bridge"] = json!("cnit2");
    theirs["ipam"]["type"] = json!("host-local");
    let rt = env.rt(json!({}));
    let mut results = Vec::new();
    for conf in [&ours, &theirs] {
        let pod = TempNetNs::new("fnt-pod").unwrap();
        let list = NetList::from_value(conf).unwrap();
        let r = rt.add(&list, "1.0.0", &att("shape", &pod)).unwrap();
        rt.del(&list, "1.0.0", &att("shape", &pod), Some(&r))
            .unwrap();
        results.push(r);
    }
    let (mut a, mut b) = (results[0].clone(), results[1].clone());
    // host-local reports an empty dns object; so do we.
    assert_eq!(shape(&a), shape(&b), "flatnet: {a}\nreference: {b}");
    // Same addresses within the same ranges, same gateways, same routes.
    for r in [&mut a, &mut b] {
        for ip in r["ips"].as_array_mut().unwrap() {
            let addr = ip["address"]
                .as_str()
                .unwrap()
                .replace("10.79.", "10.X.")
                .replace("fd79:", "fdX:");
            ip["address"] = json!(addr);
            ip["gateway"] = json!(ip["gateway"]
                .as_str()
                .unwrap()
                .replace("10.79.", "10.X.")
                .replace("fd79:", "fdX:"));
        }
    }
    assert_eq!(a["ips"], b["ips"]);
    assert_eq!(a["routes"], b["routes"]);
}

#[test]
fn reference_meta_plugins_chain_after_flatnet() {
    let Some(env) = env() else { return };
    let list = json!({"cniVersion": "1.0.0", "name": "chain", "plugins": [
        env.flatnet("chain", json!({}))["ipam"].clone().as_object().map(|_| {
            let mut c = env.flatnet("chain", json!({"ipMasq": true}));
            c.as_object_mut().unwrap().remove("cniVersion");
            c.as_object_mut().unwrap().remove("name");
            c
        }).unwrap(),
        {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
        {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.rp_filter": "2"}},
        {"type": "bandwidth", "capabilities": {"bandwidth": true}}
    ]});
    let rt = env.rt(json!({
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 1000000, "ingressBurst": 100000, "egressRate": 1000000, "egressBurst": 100000}
    }));
    let mut list = list;
    // IPv4 only: the reference portmap (1.1.1) cannot program IPv6 NAT on this kernel.
    list["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": "10.77.0.0/24"}]]);
    list["plugins"][0]["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}]);
    let list = NetList::from_value(&list).unwrap();
    let pod = TempNetNs::new("fnt-pod").unwrap();
    let a = att("chain1", &pod);
    let r = rt.add(&list, "1.0.0", &a).unwrap();
    assert_eq!(r["ips"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == "eth0"));
    let rp = pod
        .ns()
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/rp_filter").unwrap())
        .unwrap();
    assert_eq!(rp.trim(), "2", "tuning ran on flatnet's interface");
    // CHECK of flatnet within the chain (the reference portmap 1.1.1's own CHECK looks for IPv6
    // chains it never made and fails, so it is not called here).
    rt.call(&list, 0, "1.0.0", "CHECK", &a, Some(&r)).unwrap();
    rt.del(&list, "1.0.0", &a, Some(&r)).unwrap();
    assert_eq!(env.leases("chain"), 0);
}

#[test]
fn reference_bridge_uses_flatnet_as_ipam_and_flatnet_delegates_to_host_local() {
    let Some(env) = env() else { return };
    let rt = env.rt(json!({}));
    let bridge = json!({"cniVersion": "1.0.0", "name": "refbr", "type": "bridge", "bridge": "cnit3", "isGateway": true,
        "ipam": {"type": "flatnet", "dataDir": env.data.path(), "ranges": [[{"subnet": "10.81.0.0/24"}]]}});
    let pod = TempNetNs::new("fnt-pod").unwrap();
    let list = NetList::from_value(&bridge).unwrap();
    let r = rt.add(&list, "1.0.0", &att("refbr", &pod)).unwrap();
    assert!(
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("10.81.0."),
        "{r}"
    );
    assert_eq!(env.leases("refbr"), 1);
    rt.check(&list, "1.0.0", &att("refbr", &pod), &r).unwrap();
    rt.del(&list, "1.0.0", &att("refbr", &pod), Some(&r))
        .unwrap();
    assert_eq!(env.leases("refbr"), 0);

    let delegating = json!({"cniVersion": "1.0.0", "name": "deleg", "type": "flatnet", "bridge": "cnit4", "isGateway": true,
        "ipam": {"type": "host-local", "dataDir": env.data.path(), "ranges": [[{"subnet": "10.82.0.0/24"}]]}});
    let pod = TempNetNs::new("fnt-pod").unwrap();
    let list = NetList::from_value(&delegating).unwrap();
    let r = rt.add(&list, "1.0.0", &att("deleg", &pod)).unwrap();
    assert!(
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("10.82.0."),
        "{r}"
    );
    assert_eq!(env.leases("deleg"), 1, "host-local wrote the lease");
    rt.del(&list, "1.0.0", &att("deleg", &pod), Some(&r))
        .unwrap();
    assert_eq!(env.leases("deleg"), 0);
}

/// A TCP connection from pod `b` to pod `a` at `ip`, and the source address `a` saw.
fn connect(a: &TempNetNs, b: &TempNetNs, ip: IpAddr) -> IpAddr {
    let listener = a
        .ns()
        .run(|| TcpListener::bind(SocketAddr::new(ip, 7000)).unwrap())
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        peer.ip()
    });
    let mut c = b
        .ns()
        .run(|| {
            // Generous: the host ends' IPv6 addresses go through duplicate address detection
            // (up to ~2 s) and a SYN lost meanwhile is sent again after 1 s, then 3 s; on a
            // loaded CI machine 3 s was once not enough. Reachability is the point, not time.
            TcpStream::connect_timeout(
                &SocketAddr::new(ip, 7000),
                std::time::Duration::from_secs(15),
            )
        })
        .unwrap()
        .unwrap();
    c.write_all(b"ping").unwrap();
    server.join().unwrap()
}

fn addr_of(r: &Value, v4: bool) -> IpAddr {
    r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse::<IpAddr>()
                .unwrap()
        })
        .find(|ip| ip.is_ipv4() == v4)
        .unwrap()
}

#[test]
fn pods_reach_each_other_by_ip_v4_and_v6_at_once_bridge_and_ptp() {
    let Some(env) = env() else { return };
    let rt = env.rt(json!({}));
    for (name, extra) in [
        ("reach-br", json!({"hairpinMode": true})),
        ("reach-ptp", json!({"mode": "ptp"})),
    ] {
        let mut conf = env.flatnet(name, extra);
        if name == "reach-ptp" {
            conf.as_object_mut().unwrap().remove("bridge");
            conf.as_object_mut().unwrap().remove("isGateway");
        }
        let list = NetList::from_value(&conf).unwrap();
        let (pa, pb) = (
            TempNetNs::new("fnt-pod").unwrap(),
            TempNetNs::new("fnt-pod").unwrap(),
        );
        let ra = rt.add(&list, "1.1.0", &att("a", &pa)).unwrap();
        let rb = rt.add(&list, "1.1.0", &att("b", &pb)).unwrap();
        for v4 in [true, false] {
            // No waiting: the pod's IPv6 address skips duplicate address detection.
            let seen = connect(&pa, &pb, addr_of(&ra, v4));
            assert_eq!(
                seen,
                addr_of(&rb, v4),
                "{name}: the server sees the client's pod address (no NAT)"
            );
        }
        rt.del(&list, "1.1.0", &att("a", &pa), Some(&ra)).unwrap();
        rt.del(&list, "1.1.0", &att("b", &pb), Some(&rb)).unwrap();
        assert_eq!(env.leases(name), 0);
    }
}

#[test]
fn failed_add_rolls_back_and_errors_are_spec_objects() {
    let Some(env) = env() else { return };
    let rt = env.rt(json!({}));
    let list = NetList::from_value(&env.flatnet("rollback", json!({}))).unwrap();
    let pod = TempNetNs::new("fnt-pod").unwrap();
    // The pod already has an eth0: ADD must fail after IPAM and leave nothing behind.
    let status = std::process::Command::new("ip")
        .args([
            "-n",
            pod.name(),
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "other0",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let err = rt.add(&list, "1.1.0", &att("rb", &pod)).unwrap_err();
    let json = err.reply.json().expect("error object");
    assert_eq!(json["code"], 101, "{json}");
    assert!(
        json["msg"].as_str().unwrap().contains("File exists"),
        "{json}"
    );
    assert_eq!(env.leases("rollback"), 0, "addresses released");
    let host_links = std::process::Command::new("ip")
        .args(["-n", env.node.name(), "-o", "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&host_links.stdout).contains(" fn"),
        "no host veth left"
    );
}

#[test]
fn two_hundred_concurrent_adds_then_dels() {
    let Some(env) = env() else { return };
    let contender = cni_harness::bench::Contender {
        label: "flatnet".into(),
        config: env.flatnet("soak", json!({})),
        bin_dirs: env.dirs(),
    };
    let mut c = contender;
    c.config["ipam"]["ranges"] = json!([[{"subnet": "10.90.0.0/23"}]]);
    let report = cni_harness::bench::concurrent(&c, 200, env.data.path()).unwrap();
    println!("{report}");
}

/// Whether a TCP connection from `from` to `ip:port` is accepted within a second.
fn reaches(from: &TempNetNs, ip: IpAddr, port: u16) -> bool {
    from.ns()
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::new(ip, port),
                std::time::Duration::from_secs(1),
            )
            .is_ok()
        })
        .unwrap()
}

/// Whether a connection is accepted in one of five tries: a first SYN lost while the machine is
/// loaded (other tests add hundreds of pods meanwhile) is retransmitted only after a second.
fn reaches_soon(from: &TempNetNs, ip: IpAddr, port: u16) -> bool {
    (0..5).any(|_| reaches(from, ip, port))
}

#[test]
fn port_mappings_in_either_key_case_reach_the_pod_and_go_with_del() {
    let Some(env) = env() else { return };
    let mut conf = env.flatnet("hostport", json!({}));
    conf["capabilities"] = json!({"portMappings": true});
    let list = NetList::from_value(&conf).unwrap();
    for (i, mapping) in [
        json!({"HostPort": 18080, "ContainerPort": 7000, "Protocol": "tcp"}), // containerd
        json!({"hostPort": 18080, "containerPort": 7000, "protocol": "tcp"}), // podman
    ]
    .into_iter()
    .enumerate()
    {
        let rt = env.rt(json!({"portMappings": [mapping]}));
        let server = TempNetNs::new("fnt-hp").unwrap();
        let client = TempNetNs::new("fnt-hp").unwrap();
        let a = att(&format!("hp-server-{i}"), &server);
        let b = att(&format!("hp-client-{i}"), &client);
        let ra = rt.add(&list, "1.1.0", &a).unwrap();
        let plain = env.rt(json!({}));
        let rb = plain.add(&list, "1.1.0", &b).unwrap();
        let pod_ip = addr_of(&ra, true);
        let client_ip = addr_of(&rb, true);
        // The node's address on the bridge is a local address: hostPort traffic to it is DNATed.
        let node_ip: IpAddr = "10.77.0.1".parse().unwrap();
        let listener = server
            .ns()
            .run(|| TcpListener::bind(SocketAddr::new(pod_ip, 7000)).unwrap())
            .unwrap();
        let accepted = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer.ip()));
        assert!(
            reaches_soon(&client, node_ip, 18080),
            "hostPort 18080 did not reach the pod"
        );
        assert_eq!(
            accepted.join().unwrap().unwrap(),
            client_ip,
            "the pod saw another source"
        );
        rt.del(&list, "1.1.0", &a, Some(&ra)).unwrap();
        assert!(
            !reaches(&client, node_ip, 18080),
            "hostPort still open after DEL"
        );
        let rules = env.node.ns().run(nft_list).unwrap();
        assert!(
            !rules.contains("hp_"),
            "hostPort chains left after DEL:\n{rules}"
        );
        plain.del(&list, "1.1.0", &b, Some(&rb)).unwrap();
    }
}

fn nft_list() -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
