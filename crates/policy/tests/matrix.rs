//! Truth tables in the shape of the upstream e2e suite (`test/e2e/network/netpol`): namespaces
//! x, y, z with pods a, b, c each serving ports 80 and 81 over TCP, UDP and SCTP under the names
//! agnhost gives them (`serve-80-tcp`, …). Every case checks the whole 9×9 matrix for each port
//! and protocol twice: against the decision function and by tracing the planner's elements, and
//! checks that the planner's diffs add up to its full plan after every step.

use cluster::Proto;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy::model::Direction;
use policy::model::{Key, PodFacts};
use policy::plan::{trace, Allow, Entry, Planner, Traced};
use policy::Packet;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

fn ip(ns: &str, pod: &str) -> Ipv4Addr {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() as u8;
    let p = PODS.iter().position(|x| *x == pod).unwrap() as u8;
    Ipv4Addr::new(10, 244, 1, 10 + n * 3 + p)
}

/// Pod `ns/pod` as the e2e suite makes it; `node` says where it runs.
fn pod(ns: &str, name: &str, node: &str, extra: &[(&str, &str)]) -> PodFacts {
    let mut labels: policy::model::Labels = [("pod".to_string(), name.to_string())].into();
    for (k, v) in extra {
        labels.insert(k.to_string(), v.to_string());
    }
    PodFacts {
        namespace: ns.into(),
        name: name.into(),
        labels,
        ip: Some(ip(ns, name)),
        node: Some(node.into()),
        host_network: false,
        ports: [80u16, 81]
            .into_iter()
            .flat_map(|port| PROTOS.map(|p| (format!("serve-{port}-{}", p.as_str()), p, port)))
            .collect(),
    }
}

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

fn np(ns: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
        .unwrap()
}

/// The planners of a cluster split over `nodes` (pod `a` of each namespace on the first node,
/// the rest on the last), with the elements each node's kernel would hold, kept from the diffs.
struct Lab {
    planners: Vec<(Planner, BTreeSet<Entry>)>,
    node_of: Box<dyn Fn(&str) -> String>,
}

impl Lab {
    fn new(two_nodes: bool) -> Lab {
        let node_of: Box<dyn Fn(&str) -> String> = if two_nodes {
            Box::new(|pod: &str| if pod == "a" { "n1".into() } else { "n2".into() })
        } else {
            Box::new(|_: &str| "n1".into())
        };
        let nodes: &[&str] = if two_nodes { &["n1", "n2"] } else { &["n1"] };
        let mut lab = Lab {
            planners: nodes
                .iter()
                // Split, the nodes' pods share one /24 here: no guard (it has a test of its own).
                .map(|n| {
                    let cidr = (!two_nodes).then(|| "10.244.1.0/24".parse().unwrap());
                    // The kernel starts with a whole load of the empty plan.
                    let p = Planner::new(n, cidr);
                    let kernel = p.entries();
                    (p, kernel)
                })
                .collect(),
            node_of,
        };
        for ns in NAMESPACES {
            lab.each(|p| p.namespace_changed(ns, Some(&namespace(ns, json!({"ns": ns})))));
            for name in PODS {
                let f = pod(ns, name, &(lab.node_of)(name), &[]);
                lab.each(|p| p.pod_changed(&(ns.into(), name.into()), Some(f.clone())));
            }
        }
        lab
    }

    /// Applies a change to every node's planner and checks that the diffs it hands out add up
    /// to the elements it would load whole.
    fn each(&mut self, f: impl Fn(&mut Planner)) {
        for (p, kernel) in &mut self.planners {
            f(p);
            for (e, add) in p.take_pending() {
                if add {
                    assert!(kernel.insert(e.clone()), "added twice: {e:?}");
                } else {
                    assert!(kernel.remove(&e), "removed but absent: {e:?}");
                }
            }
            assert_eq!(*kernel, p.entries(), "the diffs add up to the plan");
            // The kernel refuses overlapping elements in a set of concatenated ranges.
            let ranges: Vec<(Direction, u32, Allow)> = kernel
                .iter()
                .filter_map(|e| match e {
                    Entry::Allow(d, id, a @ Allow::Range { .. }) => Some((*d, *id, *a)),
                    _ => None,
                })
                .collect();
            for (i, x) in ranges.iter().enumerate() {
                for y in &ranges[i + 1..] {
                    assert!(
                        x.0 != y.0 || x.1 != y.1 || !overlap(&x.2, &y.2),
                        "{x:?} overlaps {y:?}"
                    );
                }
            }
        }
    }

    fn apply(&mut self, policies: &[NetworkPolicy]) {
        for n in policies {
            let key: Key = cluster::manifests::namespaced(&n.metadata);
            self.each(|p| p.policy_changed(&key, Some(n)));
            for (p, _) in &self.planners {
                assert!(p.errors.is_empty(), "{:?}", p.errors);
            }
        }
    }

    fn delete(&mut self, ns: &str, name: &str) {
        self.each(|p| p.policy_changed(&(ns.into(), name.into()), None));
    }

    /// Checks every pair, port and protocol against `expect(from, to, port, proto)`.
    fn check(&self, case: &str, expect: impl Fn(&str, &str, u16, Proto) -> bool) {
        let mut wrong = Vec::new();
        for from in all_pods() {
            for to in all_pods() {
                if from == to {
                    continue; // a pod's traffic to itself never leaves it
                }
                for port in [80u16, 81] {
                    for proto in PROTOS {
                        let pkt = Packet {
                            src: ip(&from.0, &from.1),
                            dst: ip(&to.0, &to.1),
                            proto: proto.number(),
                            port,
                        };
                        let want = expect(&name(&from), &name(&to), port, proto);
                        let decided = self.planners[0].0.cluster.decide(&pkt).allowed();
                        // The source's node checks its egress, the destination's its ingress.
                        let traced = self.planners.iter().all(|(p, kernel)| {
                            let _ = p;
                            trace(kernel, &pkt) == Traced::Accept
                        });
                        if decided != want || traced != want {
                            wrong.push(format!(
                                "{} -> {} {port}/{}: want {want}, decided {decided}, traced {traced}",
                                name(&from),
                                name(&to),
                                proto.as_str()
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{case}: {} wrong:\n{}",
            wrong.len(),
            wrong[..wrong.len().min(20)].join("\n")
        );
    }
}

fn overlap(a: &Allow, b: &Allow) -> bool {
    let (
        Allow::Range {
            addr: a0,
            proto: p0,
            port: q0,
        },
        Allow::Range {
            addr: a1,
            proto: p1,
            port: q1,
        },
    ) = (a, b)
    else {
        return false;
    };
    a0.0 <= a1.1 && a1.0 <= a0.1 && p0.0 <= p1.1 && p1.0 <= p0.1 && q0.0 <= q1.1 && q1.0 <= q0.1
}

fn all_pods() -> Vec<(String, String)> {
    NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| (n.to_string(), p.to_string())))
        .collect()
}

fn name(k: &(String, String)) -> String {
    format!("{}/{}", k.0, k.1)
}

/// Runs a case on one node and split over two.
fn case(policies: &[NetworkPolicy], expect: impl Fn(&str, &str, u16, Proto) -> bool + Copy) {
    for two in [false, true] {
        let mut lab = Lab::new(two);
        lab.apply(policies);
        lab.check(&format!("two nodes: {two}"), expect);
    }
}

fn ns_of(p: &str) -> &str {
    &p[..1]
}

#[test]
fn no_policy_allows_everything() {
    case(&[], |_, _, _, _| true);
}

#[test]
fn deny_all_ingress_isolates_the_namespace() {
    case(
        &[np("x", "deny", json!({"podSelector": {}}))],
        |_, to, _, _| ns_of(to) != "x",
    );
}

#[test]
fn allow_all_ingress_with_an_empty_rule() {
    case(
        &[
            np("x", "deny", json!({"podSelector": {}})),
            np("x", "all", json!({"podSelector": {}, "ingress": [{}]})),
        ],
        |_, _, _, _| true,
    );
}

#[test]
fn deny_all_egress_and_ingress() {
    case(
        &[np(
            "x",
            "deny",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        )],
        |from, to, _, _| ns_of(from) != "x" && ns_of(to) != "x",
    );
}

#[test]
fn egress_types_default_from_the_rules() {
    // Egress rules but policyTypes [Ingress]: the egress rules are not in force.
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}], "ingress": [{}]}),
        )],
        |_, _, _, _| true,
    );
    // No policyTypes and an egress rule: egress is isolated too.
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        |from, to, _, _| (from != "x/a" || to == "x/b") && to != "x/a",
    );
}

#[test]
fn ingress_from_a_namespace_selector() {
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
        |from, to, _, _| to != "x/a" || ns_of(from) == "y",
    );
}

#[test]
fn both_selectors_in_one_peer_are_and_separate_peers_are_or() {
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        |from, to, _, _| to != "x/a" || from == "y/b",
    );
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        |from, to, _, _| to != "x/a" || ns_of(from) == "y" || from == "x/b",
    );
}

#[test]
fn a_pod_selector_alone_means_the_policys_namespace() {
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        |from, to, _, _| to != "x/a" || from == "x/b",
    );
    // An empty namespaceSelector is every namespace.
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        |from, to, _, _| to != "x/a" || from.ends_with("/b"),
    );
}

#[test]
fn match_expressions_every_operator() {
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                                  "podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"}]}}]}]}),
        )],
        |from, to, _, _| !(to == "x/a" || to == "x/b") || ns_of(from) != "x",
    );
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]}}),
        )],
        |_, _, _, _| true,
    );
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["z"]}]}}]}]}),
        )],
        |from, to, _, _| ns_of(to) != "x" || ns_of(from) == "z",
    );
}

#[test]
fn ports_by_number_name_range_and_protocol() {
    let only = |ports: Value| {
        vec![np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": ports}]}),
        )]
    };
    case(&only(json!([{"port": 81}])), |_, to, port, proto| {
        to != "x/a" || (port == 81 && proto == Proto::Tcp)
    });
    case(
        &only(json!([{"protocol": "UDP", "port": 80}])),
        |_, to, port, proto| to != "x/a" || (port == 80 && proto == Proto::Udp),
    );
    case(&only(json!([{"protocol": "SCTP"}])), |_, to, _, proto| {
        to != "x/a" || proto == Proto::Sctp
    });
    case(
        &only(json!([{"port": 80, "endPort": 81}])),
        |_, to, _, proto| to != "x/a" || proto == Proto::Tcp,
    );
    case(
        &only(json!([{"port": 81, "endPort": 90, "protocol": "UDP"}])),
        |_, to, port, proto| to != "x/a" || (proto == Proto::Udp && port == 81),
    );
    case(
        &only(json!([{"port": "serve-80-udp", "protocol": "UDP"}])),
        |_, to, port, proto| to != "x/a" || (proto == Proto::Udp && port == 80),
    );
    // A named port whose protocol does not match the name's: nothing.
    case(&only(json!([{"port": "serve-80-udp"}])), |_, to, _, _| {
        to != "x/a"
    });
}

#[test]
fn named_ports_resolve_on_the_destination_for_egress_too() {
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
        )],
        |from, _, port, proto| from != "x/a" || (port == 81 && proto == Proto::Tcp),
    );
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": format!("{}/32", ip("y", "b"))}}], "ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]}),
        )],
        |from, to, port, proto| from != "x/a" || (to == "y/b" && port == 80 && proto == Proto::Udp),
    );
}

#[test]
fn ip_blocks_with_except_match_pod_addresses() {
    // 10.244.1.0/28 holds x/* (…10-12) and y/* (…13-15); except …12/31 (x/c, y/a).
    case(
        &[np(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/28", "except": ["10.244.1.12/31"]}}]}]}),
        )],
        |from, to, _, _| to != "x/a" || ["x/b", "y/b", "y/c"].contains(&from),
    );
    case(
        &[np(
            "y",
            "p",
            json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.244.1.16/28"}}]}]}),
        )],
        |from, to, _, _| {
            // …16 and up: z/a (16), z/b (17), z/c (18); y/c is …15.
            ns_of(from) != "y" || ns_of(to) == "z"
        },
    );
}

#[test]
fn overlapping_ranges_of_several_rules_and_policies_add_up() {
    case(
        &[
            np(
                "x",
                "p1",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/24"}}], "ports": [{"port": 80, "endPort": 81, "protocol": "UDP"}]},
                            {"from": [{"ipBlock": {"cidr": "10.244.1.0/28", "except": ["10.244.1.12/30"]}}], "ports": [{"port": 81, "endPort": 90, "protocol": "UDP"}]}]}),
            ),
            np(
                "x",
                "p2",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.16/29"}}], "ports": [{"protocol": "UDP"}, {"port": 80, "endPort": 80}]}]}),
            ),
        ],
        |from, to, port, proto| {
            // z/* are …16-18: every UDP port and TCP 80; the rest of the /24: UDP 80-81.
            to != "x/a"
                || proto == Proto::Udp && (port <= 81 || ns_of(from) == "z")
                || (ns_of(from) == "z" && proto == Proto::Tcp && port == 80)
        },
    );
}

#[test]
fn policies_add_up() {
    case(
        &[
            np(
                "x",
                "deny",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            ),
            np(
                "x",
                "in",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}]}),
            ),
            np(
                "x",
                "out",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
            ),
        ],
        |from, to, port, proto| {
            let out_ok = ns_of(from) != "x" || to == "x/a";
            let in_ok = ns_of(to) != "x"
                || (to == "x/a"
                    && ((ns_of(from) == "y" && port == 80 && proto == Proto::Tcp)
                        || ns_of(from) == "x"));
            // x/* to x/a: egress allowed by "out"; ingress of x/a needs y (or nothing from x allows it).
            let in_ok = if to == "x/a" && ns_of(from) == "x" {
                false
            } else {
                in_ok
            };
            out_ok && in_ok
        },
    );
}

#[test]
fn deny_all_plus_allow_all_is_allow_all() {
    case(
        &[
            np(
                "x",
                "deny",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            ),
            np(
                "x",
                "all",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}),
            ),
        ],
        |_, _, _, _| true,
    );
}

#[test]
fn updates_of_pods_namespaces_and_policies_take_effect() {
    for two in [false, true] {
        let mut lab = Lab::new(two);
        lab.apply(&[np("x", "p", json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}, "podSelector": {"matchLabels": {"role": "client"}}}]}]}))]);
        lab.check("before", |_, to, _, _| to != "x/a");
        // y becomes blue: still no pod labelled client.
        lab.each(|p| {
            p.namespace_changed(
                "y",
                Some(&namespace("y", json!({"ns": "y", "team": "blue"}))),
            )
        });
        lab.check("blue y", |_, to, _, _| to != "x/a");
        // y/b becomes a client.
        let node = (lab.node_of)("b");
        lab.each(|p| {
            p.pod_changed(
                &("y".into(), "b".into()),
                Some(pod("y", "b", &node, &[("role", "client")])),
            )
        });
        lab.check("client y/b", |from, to, _, _| to != "x/a" || from == "y/b");
        // x/a relabelled: no longer selected.
        let node = (lab.node_of)("a");
        lab.each(|p| {
            p.pod_changed(
                &("x".into(), "a".into()),
                Some(pod("x", "a", &node, &[("pod", "other")])),
            )
        });
        lab.check("x/a unselected", |_, _, _, _| true);
        lab.each(|p| p.pod_changed(&("x".into(), "a".into()), Some(pod("x", "a", &node, &[]))));
        // The policy changes to allow only port 81, then goes.
        lab.apply(&[np("x", "p", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 81}]}]}))]);
        lab.check("port 81", |_, to, port, proto| {
            to != "x/a" || (port == 81 && proto == Proto::Tcp)
        });
        // y loses its labels; a pod goes.
        lab.each(|p| p.namespace_changed("y", None));
        lab.each(|p| p.pod_changed(&("z".into(), "c".into()), None));
        lab.delete("x", "p");
        lab.check("deleted", |_, _, _, _| true);
        for (_, kernel) in &lab.planners {
            assert!(
                kernel
                    .iter()
                    .all(|e| matches!(e, Entry::Known(_) | Entry::Current(_) | Entry::Stamp(_))),
                "only known pods and the generation stay: {kernel:?}"
            );
        }
    }
}

#[test]
fn an_unknown_local_address_is_refused_while_policies_exist() {
    let mut lab = Lab::new(false);
    let stranger = Ipv4Addr::new(10, 244, 1, 99);
    let pkt = |src, dst| Packet {
        src,
        dst,
        proto: 6,
        port: 80,
    };
    let kernel = |lab: &Lab| lab.planners[0].1.clone();
    assert_eq!(
        trace(&kernel(&lab), &pkt(stranger, ip("x", "a"))),
        Traced::Accept
    );
    lab.apply(&[np(
        "z",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "c"}}}),
    )]);
    assert_eq!(
        trace(&kernel(&lab), &pkt(stranger, ip("x", "a"))),
        Traced::UnknownPod(stranger)
    );
    assert_eq!(
        trace(&kernel(&lab), &pkt(ip("x", "a"), stranger)),
        Traced::UnknownPod(stranger)
    );
    // Outside the pod CIDR is not this node's pods' business.
    assert_eq!(
        trace(
            &kernel(&lab),
            &pkt(Ipv4Addr::new(192, 0, 2, 1), ip("x", "a"))
        ),
        Traced::Accept
    );
}

#[test]
fn bad_policies_are_refused_naming_the_field() {
    let bad = [
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}),
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"endPort": 80}]}]}),
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
            "spec.ingress[0].from[0].ipBlock.cidr",
        ),
        (
            json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
            "spec.egress[0].to[0].ipBlock.except[0]",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
            "spec.ingress[0].from[0]",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            json!({"podSelector": {}, "policyTypes": ["Sideways"]}),
            "spec.policyTypes[0]",
        ),
    ];
    for (spec, field) in bad {
        let e = policy::Policy::parse(&np("x", "bad", spec.clone())).unwrap_err();
        assert_eq!(e.field, field, "{spec}: {e}");
        assert_eq!(e.object, "NetworkPolicy x/bad");
        // Refused by the planner: a good version stays in force.
        let mut lab = Lab::new(false);
        lab.apply(&[np("x", "bad", json!({"podSelector": {}}))]);
        lab.each(|p| {
            p.policy_changed(
                &("x".into(), "bad".into()),
                Some(&np("x", "bad", spec.clone())),
            )
        });
        assert!(lab.planners[0]
            .0
            .errors
            .contains_key(&("x".to_string(), "bad".to_string())));
        lab.check("last good version", |_, to, _, _| ns_of(to) != "x");
    }
}

#[test]
fn explain_names_the_isolating_policy_and_why() {
    let mut lab = Lab::new(false);
    lab.apply(&[np("x", "web-only", json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}))]);
    let c = &lab.planners[0].0.cluster;
    let d = c.decide(&Packet {
        src: ip("y", "b"),
        dst: ip("x", "a"),
        proto: 6,
        port: 81,
    });
    assert!(!d.allowed());
    let text = d.explain();
    assert!(text.contains("ingress of pod x/a: DENIED"), "{text}");
    assert!(text.contains("NetworkPolicy x/web-only"), "{text}");
    assert!(text.contains("pod y/b"), "{text}");
    assert!(
        text.contains("port 81/TCP is not one of: 80/TCP")
            || text.contains("is not one of: pods {pod=b} in namespace x"),
        "{text}"
    );
    let ok = c.decide(&Packet {
        src: ip("x", "b"),
        dst: ip("x", "a"),
        proto: 6,
        port: 80,
    });
    assert!(ok.allowed());
    assert!(
        ok.explain()
            .contains("allowed by NetworkPolicy x/web-only ingress[0]"),
        "{}",
        ok.explain()
    );
}
