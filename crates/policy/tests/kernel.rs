//! The applier in a throw-away node: a bridge with three pods in their own namespaces, real TCP
//! connections through the `forward` hook (bridged, as same-node pods talk), the table the
//! planner's elements describe.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use netns::TempNetNs;
use policy::apply::Applier;
use policy::model::PodFacts;
use policy::plan::Planner;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

struct Node {
    node: TempNetNs,
    pods: Vec<(TempNetNs, Ipv4Addr)>,
}

/// A node with a bridge `cni0` (10.244.1.1/24) and `n` pods at 10.244.1.10 + i.
fn node(n: usize) -> Node {
    let node = TempNetNs::new("fnt-pol").unwrap();
    let ips: Vec<Ipv4Addr> = (0..n)
        .map(|i| Ipv4Addr::new(10, 244, 1, 10 + i as u8))
        .collect();
    let pods = policy::bench::bridged_pods(&node, "10.244.1.1/24", &ips).unwrap();
    Node {
        node,
        pods: pods.into_iter().zip(ips).collect(),
    }
}

fn facts(name: &str, ip: Ipv4Addr) -> PodFacts {
    PodFacts {
        namespace: "x".into(),
        name: name.into(),
        labels: [("pod".to_string(), name.to_string())].into(),
        ip: Some(ip),
        node: Some("n1".into()),
        host_network: false,
        ports: vec![("http".into(), cluster::Proto::Tcp, 80)],
    }
}

fn np(name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "x"}, "spec": spec}))
        .unwrap()
}

/// Accepts connections on `port` in `pod` and echoes what it reads.
fn serve(pod: &TempNetNs, ip: Ipv4Addr, port: u16) {
    let l = pod
        .ns()
        .run(|| TcpListener::bind((ip, port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn connect(from: &TempNetNs, to: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    from.ns()
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(2)))
        .unwrap()
}

/// One request/answer on a connection.
fn echo(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

fn sync(p: &mut Planner, a: &mut Applier) {
    a.apply(&p.take_pending()).unwrap();
}

#[test]
fn policies_hold_in_the_kernel_from_the_first_packet_and_cut_what_they_deny() {
    if !netns::can_create() {
        eprintln!("skipped: needs root");
        return;
    }
    let n = node(4);
    let [(a, a_ip), (b, b_ip), (c, c_ip), (d, d_ip)] = &n.pods[..] else {
        unreachable!()
    };
    for (pod, ip) in &n.pods {
        serve(pod, *ip, 80);
        serve(pod, *ip, 81);
        serve(pod, *ip, 83);
    }
    n.node
        .ns()
        .run(|| {
            policy::apply::ensure_bridge_filtering().unwrap();
            let mut p = Planner::new("n1", Some("10.244.1.0/24".parse().unwrap()));
            for (name, ip) in [("a", a_ip), ("b", b_ip), ("c", c_ip)] {
                p.pod_changed(&("x".into(), name.into()), Some(facts(name, *ip)));
            }
            let mut ap = Applier::new().unwrap();
            p.clear_pending();
            ap.load(&p.entries()).unwrap();
            // No policy: everyone reaches everyone, d (unknown to the planner) too.
            assert!(connect(c, *a_ip, 81).is_ok());
            assert!(connect(d, *a_ip, 80).is_ok());

            // a takes ingress only from b, on its named port "http" (80).
            p.policy_changed(
                &("x".into(), "a-from-b".into()),
                Some(&np("a-from-b", json!({"podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "http"}]}]}))),
            );
            sync(&mut p, &mut ap);
            let mut kept = connect(b, *a_ip, 80).expect("b reaches a:80");
            assert!(echo(&mut kept));
            let refused = connect(b, *a_ip, 81).unwrap_err();
            assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "a TCP reset, at once");
            assert!(connect(c, *a_ip, 80).is_err(), "c is not b");
            assert!(connect(a, *c_ip, 81).is_ok(), "a's egress is not isolated");
            // d's address is in the pod CIDR but no pod the planner knows: refused both ways.
            assert!(connect(d, *b_ip, 80).is_err());
            assert!(connect(b, *d_ip, 80).is_err());

            // Ranges: c reaches a on ports 81-82 from an ipBlock (a range element), then on
            // every TCP port (a protocol element).
            let from_c = |ports: Value| {
                np("a-from-c", json!({"podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{"from": [{"ipBlock": {"cidr": format!("{c_ip}/32")}}], "ports": ports}]}))
            };
            p.policy_changed(&("x".into(), "a-from-c".into()), Some(&from_c(json!([{"port": 81, "endPort": 82}]))));
            sync(&mut p, &mut ap);
            let text = nft::list_table("ip flatnet-policy").unwrap().unwrap();
            assert!(text.contains(&format!("0x00000001 . {c_ip} . tcp . 81-82")), "{text}");
            assert!(connect(c, *a_ip, 81).is_ok(), "c reaches a through a range");
            assert!(connect(c, *a_ip, 83).is_err(), "83 is past the range");
            p.policy_changed(&("x".into(), "a-from-c".into()), Some(&from_c(json!([{"protocol": "TCP"}]))));
            sync(&mut p, &mut ap);
            let text = nft::list_table("ip flatnet-policy").unwrap().unwrap();
            assert!(text.contains(&format!("0x00000001 . {c_ip} . tcp }}")), "{text}");
            assert!(connect(c, *a_ip, 83).is_ok(), "c reaches a on every TCP port");
            p.policy_changed(&("x".into(), "a-from-c".into()), None);

            // Deny everything in x: the open connection from b is cut at its next packet.
            p.policy_changed(&("x".into(), "deny".into()), Some(&np("deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))));
            p.policy_changed(&("x".into(), "a-from-b".into()), None);
            sync(&mut p, &mut ap);
            assert!(!echo(&mut kept), "a newly denied established connection is cut");
            assert!(connect(b, *a_ip, 80).is_err());
            assert!(connect(c, *b_ip, 81).is_err());
            // Every denied packet is counted per address, in the direction that denied it.
            let mut conn = nft::netlink::Conn::open().unwrap();
            let count = |conn: &mut nft::netlink::Conn, set: &str, ip: &Ipv4Addr| {
                conn.counted_elements(nft::netlink::FAMILY_IPV4, "flatnet-policy", set)
                    .unwrap()
                    .into_iter()
                    .find(|(k, _)| k[..] == ip.octets())
                    .map_or(0, |(_, n)| n)
            };
            // Into a, one SYN each while a-from-b stood: b to 81, c to 80. (After the deny, b's
            // own egress refuses first: the egress set counts those.)
            assert!(count(&mut conn, "ingress-denied", a_ip) >= 2);
            assert!(count(&mut conn, "egress-denied", b_ip) >= 1);
            // Out of c after the deny (its egress is isolated now; b's ingress would be too).
            let c_out = count(&mut conn, "egress-denied", c_ip);
            assert!(c_out >= 1);
            assert!(connect(c, *a_ip, 80).is_err());
            assert_eq!(count(&mut conn, "egress-denied", c_ip), c_out + 1, "one SYN, one count");

            // A restarted agent loads the same elements in one transaction; the table reads
            // back in nft's own syntax.
            let mut again = Applier::new().unwrap();
            again.load(&p.entries()).unwrap();
            let text = nft::list_table("ip flatnet-policy").unwrap().unwrap();
            assert!(text.contains("10.244.1.0/24 . 0.0.0.0/0"), "{text}");
            assert!(connect(c, *b_ip, 81).is_err());

            // Policies gone: open again, the guard with them.
            p.policy_changed(&("x".into(), "deny".into()), None);
            sync(&mut p, &mut again);
            assert!(connect(c, *b_ip, 81).is_ok());
            assert!(connect(d, *a_ip, 80).is_ok());
            let text = nft::list_table("ip flatnet-policy").unwrap().unwrap();
            // (The denied addresses' counters stay until they time out.)
            let planned = text.split("set egress-denied").next().unwrap();
            assert_eq!(planned.matches("elements").count(), 3, "only known-pods and the generation have elements: {text}");
        })
        .unwrap();
}
