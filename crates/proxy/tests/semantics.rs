//! Service semantics, checked by tracing packets through the planned ruleset (no kernel), as
//! kube-proxy's own tests do.

use cluster::{Kind, Resource, Update};
use proxy::{plan, trace, Config, Hop, Packet, Proto, Verdict};
use serde_json::json;

fn cfg() -> Config {
    Config {
        node: "node-1".into(),
        node_ips: vec!["172.18.0.2".parse().unwrap()],
        cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        pod_cidr: "10.244.0.0/28".parse().unwrap(),
        node_ports: (30000, 32767),
    }
}

fn svc(name: &str, spec: serde_json::Value) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec})).unwrap()
}

/// An EndpointSlice for `service`: (ip, node, ready, serving, terminating) per endpoint.
fn slice(
    service: &str,
    port_name: &str,
    port: u16,
    eps: &[(&str, &str, bool, bool, bool)],
) -> cluster::slim::EndpointSlice {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(ip, node, ready, serving, terminating)| {
            json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    serde_json::from_value(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("{service}-x"), "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}], "endpoints": endpoints}))
    .unwrap()
}

/// A full listing of these Services and slices, as a source sends it after a re-list.
fn listing(
    services: &[k8s_openapi::api::core::v1::Service],
    slices: &[cluster::slim::EndpointSlice],
) -> Vec<Update> {
    let kinds = [Kind::Service, Kind::EndpointSlice];
    let objects = (services.iter().map(|s| s.clone().into_object()))
        .chain(slices.iter().map(|s| s.clone().into_object()));
    (kinds.iter().map(|k| Update::Relist(*k)))
        .chain(objects.map(Update::apply))
        .chain(kinds.iter().map(|k| Update::Listed(*k)))
        .collect()
}

fn pkt(src: &str, dst: &str, dport: u16) -> Packet {
    Packet {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        proto: Proto::Tcp,
        dport,
        to_node: dst == "172.18.0.2",
    }
}

fn hops(v: &Verdict) -> Vec<(String, bool)> {
    match v {
        Verdict::Dnat(h) => h
            .iter()
            .map(
                |Hop {
                     ip,
                     port,
                     masquerade,
                 }| (format!("{ip}:{port}"), *masquerade),
            )
            .collect(),
        other => panic!("expected DNAT, got {other:?}"),
    }
}

const POD: &str = "10.244.0.5";
const OUTSIDE: &str = "203.0.113.10";

#[test]
fn cluster_ip_spreads_over_ready_endpoints_without_nat_from_pods() {
    let s = svc(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}),
    );
    let e = slice(
        "web",
        "http",
        8080,
        &[
            ("10.244.1.2", "node-2", true, true, false),
            ("10.244.2.2", "node-3", true, true, false),
            ("10.244.2.3", "node-3", false, false, false),
        ],
    );
    let rs = plan(&cfg(), &[s], &[e]).unwrap();
    assert_eq!(
        hops(&trace(&rs, &pkt(POD, "10.96.0.10", 80))),
        vec![
            ("10.244.1.2:8080".into(), false),
            ("10.244.2.2:8080".into(), false)
        ]
    );
    // From the node itself (outside the cluster CIDR): masqueraded.
    assert!(hops(&trace(&rs, &pkt("172.18.0.2", "10.96.0.10", 80)))
        .iter()
        .all(|(_, m)| *m));
    // Other ports of the ClusterIP are not the Service's.
    assert_eq!(trace(&rs, &pkt(POD, "10.96.0.10", 81)), Verdict::Untouched);
}

#[test]
fn hairpin_is_masqueraded() {
    let s = svc(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
    );
    let e = slice(
        "web",
        "",
        8080,
        &[
            ("10.244.0.5", "node-1", true, true, false),
            ("10.244.1.2", "node-2", true, true, false),
        ],
    );
    let rs = plan(&cfg(), &[s], &[e]).unwrap();
    let h = hops(&trace(&rs, &pkt("10.244.0.5", "10.96.0.10", 80)));
    assert_eq!(
        h,
        vec![
            ("10.244.0.5:8080".into(), true),
            ("10.244.1.2:8080".into(), false)
        ]
    );
}

#[test]
fn no_endpoints_rejects_and_terminating_ones_are_the_last_resort() {
    let s = svc(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
    );
    let none = plan(
        &cfg(),
        std::slice::from_ref(&s),
        &[slice(
            "web",
            "",
            8080,
            &[("10.244.1.2", "node-2", false, false, false)],
        )],
    )
    .unwrap();
    assert_eq!(trace(&none, &pkt(POD, "10.96.0.10", 80)), Verdict::Rejected);
    let terminating = plan(
        &cfg(),
        &[s],
        &[slice(
            "web",
            "",
            8080,
            &[("10.244.1.2", "node-2", false, true, true)],
        )],
    )
    .unwrap();
    assert_eq!(
        hops(&trace(&terminating, &pkt(POD, "10.96.0.10", 80))),
        vec![("10.244.1.2:8080".into(), false)]
    );
}

#[test]
fn node_port_cluster_policy_masquerades_and_local_policy_keeps_the_client() {
    let spec = |policy: &str| {
        json!({"type": "NodePort", "clusterIP": "10.96.0.11", "externalTrafficPolicy": policy, "healthCheckNodePort": 31999,
                                      "ports": [{"port": 80, "nodePort": 30080}]})
    };
    let eps = [
        ("10.244.0.7", "node-1", true, true, false),
        ("10.244.1.2", "node-2", true, true, false),
    ];
    let cluster = plan(
        &cfg(),
        &[svc("np", spec("Cluster"))],
        &[slice("np", "", 8080, &eps)],
    )
    .unwrap();
    let h = hops(&trace(&cluster, &pkt(OUTSIDE, "172.18.0.2", 30080)));
    assert_eq!(h.len(), 2);
    assert!(h.iter().all(|(_, m)| *m), "{h:?}");
    let local = plan(
        &cfg(),
        &[svc("np", spec("Local"))],
        &[slice("np", "", 8080, &eps)],
    )
    .unwrap();
    assert_eq!(
        hops(&trace(&local, &pkt(OUTSIDE, "172.18.0.2", 30080))),
        vec![("10.244.0.7:8080".into(), false)]
    );
    // Pods still use every endpoint.
    assert_eq!(
        hops(&trace(&local, &pkt(POD, "172.18.0.2", 30080))).len(),
        2
    );
    assert_eq!(local.health_checks.get(&31999), Some(&1));
    // A NodePort is only a NodePort on the node's own addresses.
    let mut elsewhere = pkt(OUTSIDE, "172.18.0.9", 30080);
    elsewhere.to_node = false;
    assert_eq!(trace(&local, &elsewhere), Verdict::Untouched);
}

#[test]
fn node_ports_without_usable_endpoints_drop_or_reject() {
    let s = svc(
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.11", "externalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let rs = plan(
        &cfg(),
        &[s],
        &[slice(
            "np",
            "",
            8080,
            &[("10.244.1.2", "node-2", true, true, false)],
        )],
    )
    .unwrap();
    assert_eq!(
        trace(&rs, &pkt(OUTSIDE, "172.18.0.2", 30080)),
        Verdict::Dropped
    );
    // No ready endpoint anywhere: rejected, and no chain left pointing at a missing one.
    let s = svc(
        "np",
        json!({"type": "NodePort", "clusterIP": "10.96.0.11", "ports": [{"port": 80, "nodePort": 30080}]}),
    );
    let none = [("10.244.1.2", "node-2", false, false, false)];
    let rs = plan(&cfg(), &[s], &[slice("np", "", 8080, &none)]).unwrap();
    assert_eq!(
        trace(&rs, &pkt(OUTSIDE, "172.18.0.2", 30080)),
        Verdict::Rejected
    );
    assert!(rs.chains.is_empty(), "{:?}", rs.chains.keys());
}

#[test]
fn load_balancer_ips_external_ips_and_source_ranges() {
    let mut s = svc(
        "lb",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12", "externalIPs": ["198.51.100.7"],
        "loadBalancerSourceRanges": ["203.0.113.0/28"], "ports": [{"port": 443, "nodePort": 30443}]}),
    );
    s.status =
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.200"}]}}))
            .unwrap();
    let rs = plan(
        &cfg(),
        &[s],
        &[slice(
            "lb",
            "",
            8443,
            &[("10.244.1.2", "node-2", true, true, false)],
        )],
    )
    .unwrap();
    assert_eq!(
        hops(&trace(&rs, &pkt("203.0.113.10", "198.51.100.200", 443))),
        vec![("10.244.1.2:8443".into(), true)]
    );
    assert_eq!(
        trace(&rs, &pkt("192.0.2.1", "198.51.100.200", 443)),
        Verdict::Dropped
    );
    assert_eq!(
        hops(&trace(&rs, &pkt(POD, "198.51.100.200", 443))).len(),
        1,
        "pods are always allowed"
    );
    // Source ranges guard the LB IP only.
    assert_eq!(
        hops(&trace(&rs, &pkt("192.0.2.1", "198.51.100.7", 443))).len(),
        1
    );
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_only() {
    let s = svc(
        "web",
        json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
    );
    let rs = plan(
        &cfg(),
        &[s],
        &[slice(
            "web",
            "",
            8080,
            &[
                ("10.244.0.7", "node-1", true, true, false),
                ("10.244.1.2", "node-2", true, true, false),
            ],
        )],
    )
    .unwrap();
    assert_eq!(
        hops(&trace(&rs, &pkt(POD, "10.96.0.10", 80))),
        vec![("10.244.0.7:8080".into(), false)]
    );
}

#[test]
fn headless_and_external_name_are_not_proxied() {
    let h = svc("h", json!({"clusterIP": "None", "ports": [{"port": 80}]}));
    let x = svc(
        "x",
        json!({"type": "ExternalName", "externalName": "example.org"}),
    );
    let rs = plan(&cfg(), &[h, x], &[]).unwrap();
    assert!(rs.service_ips.is_empty() && rs.no_endpoints.is_empty() && rs.chains.is_empty());
}

#[test]
fn bad_services_are_refused_by_field() {
    let e = plan(
        &cfg(),
        &[svc(
            "a",
            json!({"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}),
        )],
        &[],
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.clusterIP");
    let e = plan(&cfg(), &[svc("a", json!({"type": "NodePort", "clusterIP": "10.96.0.1", "ports": [{"port": 80, "nodePort": 8080}]}))], &[]).unwrap_err();
    assert_eq!(e.field, "spec.ports[0].nodePort");
    assert!(e.message.contains("30000-32767"), "{e}");
    let np = |name: &str, ip: &str| {
        svc(
            name,
            json!({"type": "NodePort", "clusterIP": ip, "ports": [{"port": 80, "nodePort": 30001}]}),
        )
    };
    let e = plan(&cfg(), &[np("a", "10.96.0.1"), np("b", "10.96.0.2")], &[]).unwrap_err();
    assert_eq!(e.object, "Service default/b");
    assert!(e.message.contains("default/a"), "{e}");
}

#[test]
fn affinity_pins_clients_with_a_timeout_set_per_endpoint() {
    let s = svc(
        "web",
        json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}, "ports": [{"port": 80}]}),
    );
    let rs = plan(
        &cfg(),
        &[s],
        &[slice(
            "web",
            "",
            8080,
            &[
                ("10.244.1.2", "node-2", true, true, false),
                ("10.244.2.2", "node-3", true, true, false),
            ],
        )],
    )
    .unwrap();
    let text = rs.render();
    assert_eq!(text.matches("timeout 60s").count(), 2, "{text}");
    assert_eq!(text.matches("update @aff_").count(), 2, "{text}");
    assert_eq!(hops(&trace(&rs, &pkt(POD, "10.96.0.10", 80))).len(), 2);
}

#[test]
fn lookups_stay_one_map_element_per_frontend() {
    let services: Vec<_> = (0..2000)
        .map(|i| svc(&format!("s{i}"), json!({"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1), "ports": [{"port": 80}]})))
        .collect();
    let slices: Vec<_> = (0..2000)
        .map(|i| {
            slice(
                &format!("s{i}"),
                "",
                8080,
                &[("10.244.1.2", "node-2", true, true, false)],
            )
        })
        .collect();
    let rs = plan(&cfg(), &services, &slices).unwrap();
    assert_eq!(rs.service_ips.len(), 2000);
    assert_eq!(
        hops(&trace(&rs, &pkt(POD, "10.96.7.250", 80))),
        vec![("10.244.1.2:8080".into(), false)]
    );
}

/// A small table with every kind of chain: two ports (TCP and UDP), a Local LoadBalancer with
/// source ranges and a health check, a Service without endpoints.
fn sample() -> proxy::Ruleset {
    let mut lb = svc(
        "lb",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12", "loadBalancerSourceRanges": ["203.0.113.0/28"],
        "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000, "ports": [{"name": "https", "port": 443, "nodePort": 30443}]}),
    );
    lb.status =
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.200"}]}}))
            .unwrap();
    let web = svc(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}),
    );
    let empty = svc(
        "empty",
        json!({"clusterIP": "10.96.0.13", "ports": [{"port": 80}]}),
    );
    let mut dns = slice(
        "web",
        "dns",
        5353,
        &[("10.244.1.2", "node-2", true, true, false)],
    );
    dns.ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
    dns.metadata.name = Some("web-dns".into());
    let slices = [
        slice(
            "web",
            "http",
            8080,
            &[
                ("10.244.1.2", "node-2", true, true, false),
                ("10.244.0.7", "node-1", true, true, false),
            ],
        ),
        dns,
        slice(
            "lb",
            "https",
            8443,
            &[("10.244.0.7", "node-1", true, true, false)],
        ),
    ];
    plan(&cfg(), &[web, lb, empty], &slices).unwrap()
}

#[test]
fn the_rendered_table_matches_the_golden_file() {
    let text = sample().render();
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/basic.nft");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    assert_eq!(
        text, want,
        "the ruleset changed; review it and rerun with UPDATE_GOLDEN=1"
    );
}

/// The sample ruleset is valid nftables, and the native applier builds exactly the table the
/// text describes: `nft -f` of the rendered text in one namespace and the applier's netlink
/// batches in another list the same. A second applier then adopts the table and finds nothing
/// to change, whether it asks for objects by name or has to list them all (as root, in
/// throw-away namespaces).
#[test]
fn native_batches_build_the_table_the_text_describes_and_are_adopted() {
    if !netns::can_create() {
        eprintln!("skipped: needs root");
        return;
    }
    let rs = sample();
    let by_text = netns::TempNetNs::new("fnt-pxt").unwrap();
    let text_listing = by_text
        .ns()
        .run(|| {
            nft::apply(&rs.render()).unwrap();
            nft::list_table(proxy::ruleset::TABLE).unwrap().unwrap()
        })
        .unwrap();
    let native = netns::TempNetNs::new("fnt-pxn").unwrap();
    let (native_listing, adopted) = native
        .ns()
        .run(|| {
            let mut a = proxy::Applier::new().unwrap();
            let held = a.adopt(&[&rs]).unwrap();
            assert_eq!(
                held,
                proxy::Ruleset {
                    cluster_cidr: rs.cluster_cidr,
                    ..proxy::Ruleset::default()
                },
                "a fresh table holds nothing but is written for the plan's cluster CIDR"
            );
            a.apply(&proxy::ruleset::diff(&held, &rs)).unwrap();
            let listing = nft::list_table(proxy::ruleset::TABLE).unwrap().unwrap();
            // Asked for by name: what the plan wants and the maps point at.
            let again = proxy::Applier::new().unwrap().adopt(&[&rs]).unwrap();
            // Wanting nothing, the count of the table's objects does not add up: listed whole.
            let listed = proxy::Applier::new().unwrap().adopt(&[]).unwrap();
            assert_eq!(
                listed.chains.keys().collect::<Vec<_>>(),
                again.chains.keys().collect::<Vec<_>>()
            );
            assert_eq!(
                listed.sets.keys().collect::<Vec<_>>(),
                again.sets.keys().collect::<Vec<_>>()
            );
            (listing, again)
        })
        .unwrap();
    assert!(
        text_listing.contains("10.96.0.10 . tcp . 80"),
        "{text_listing}"
    );
    assert_eq!(native_listing, text_listing);
    let left = proxy::ruleset::diff(&adopted, &rs);
    assert!(left.is_empty(), "adoption missed something: {left:?}");
}

#[test]
fn a_change_to_one_service_sends_only_its_own_objects() {
    let services: Vec<_> = (0..50)
        .map(|i| {
            svc(
                &format!("s{i}"),
                json!({"clusterIP": format!("10.96.1.{}", i + 1), "ports": [{"port": 80}]}),
            )
        })
        .collect();
    let mut slices: Vec<_> = (0..50)
        .map(|i| {
            slice(
                &format!("s{i}"),
                "",
                8080,
                &[("10.244.1.2", "node-2", true, true, false)],
            )
        })
        .collect();
    let before = plan(&cfg(), &services, &slices).unwrap();
    assert!(
        proxy::ruleset::diff(&before, &before).is_empty(),
        "no change, nothing sent"
    );
    // Every Service shares one chain; endpoints are elements.
    assert_eq!(before.shared.iter().collect::<Vec<_>>(), ["cluster-1"]);
    assert!(before.chains.is_empty(), "{:?}", before.chains.keys());
    let key = proxy::ruleset::Key::Ip(("10.96.1.8".parse().unwrap(), proxy::Proto::Tcp, 80));
    let ep = |ip: &str| (ip.parse().unwrap(), 8080);
    // A second endpoint: the frontend moves to the chain for two, and one element is added.
    slices[7] = slice(
        "s7",
        "",
        8080,
        &[
            ("10.244.1.2", "node-2", true, true, false),
            ("10.244.2.9", "node-3", true, true, false),
        ],
    );
    let after = plan(&cfg(), &services, &slices).unwrap();
    let d = proxy::ruleset::diff(&before, &after);
    let new_chains: Vec<&String> = d.new_chains.iter().map(|(n, ..)| n).collect();
    assert_eq!(new_chains, ["cluster-2"], "{d:?}");
    assert!(d.gone_chains.is_empty(), "cluster-1 still serves 49: {d:?}");
    assert_eq!(
        d.maps,
        vec![(
            "service-ips",
            vec![key],
            vec![(key, "cluster-2".to_string())]
        )]
    );
    // Element 0 is rewritten with every change to its pool: it carries the pool's seal.
    let sealed = |r: &proxy::Ruleset| Some(proxy::ruleset::seal(&r.endpoints[&("endpoints", key)]));
    assert_eq!(
        d.endpoints,
        vec![(
            "endpoints",
            vec![(key, 0)],
            vec![
                (key, 0, ep("10.244.1.2"), sealed(&after)),
                (key, 1, ep("10.244.2.9"), None)
            ]
        )]
    );
    // An endpoint replaced: its element and element 0, no chain, no verdict element.
    slices[7] = slice(
        "s7",
        "",
        8080,
        &[
            ("10.244.1.2", "node-2", true, true, false),
            ("10.244.3.3", "node-3", true, true, false),
        ],
    );
    let replaced = plan(&cfg(), &services, &slices).unwrap();
    let d = proxy::ruleset::diff(&after, &replaced);
    assert_eq!(
        d.endpoints,
        vec![(
            "endpoints",
            vec![(key, 0), (key, 1)],
            vec![
                (key, 0, ep("10.244.1.2"), sealed(&replaced)),
                (key, 1, ep("10.244.3.3"), None)
            ]
        )],
        "{d:?}"
    );
    assert_eq!(d.size(), 4, "{d:?}");
    // Endpoints gone: the frontend moves to the reject map, its elements go, and the chain for
    // two goes with its last user.
    slices[7] = slice("s7", "", 8080, &[]);
    let gone = plan(&cfg(), &services, &slices).unwrap();
    let d = proxy::ruleset::diff(&replaced, &gone);
    let map = |name: &str| d.maps.iter().find(|(m, ..)| *m == name).cloned();
    assert_eq!(map("service-ips").map(|m| m.1), Some(vec![key]), "{d:?}");
    assert_eq!(
        map("no-endpoint-services").map(|m| m.2),
        Some(vec![(key, "reject-chain".to_string())]),
        "{d:?}"
    );
    assert_eq!(d.gone_chains, ["cluster-2"], "{d:?}");
    assert_eq!(d.endpoints[0].1.len(), 2, "{d:?}");
}

#[test]
fn a_diff_over_fragments_is_the_diff_over_their_union() {
    let services: Vec<_> = (0..6)
        .map(|i| {
            svc(
                &format!("s{i}"),
                json!({"clusterIP": format!("10.96.2.{}", i + 1), "type": "NodePort", "ports": [{"port": 80, "nodePort": 30100 + i}], "sessionAffinity": if i % 2 == 0 { "ClientIP" } else { "None" }}),
            )
        })
        .collect();
    let slices = |shift: usize| -> Vec<_> {
        (0..6)
            .map(|i| {
                let ip = format!("10.244.1.{}", i + shift);
                slice(
                    &format!("s{i}"),
                    "",
                    8080,
                    &[(ip.as_str(), "node-2", true, true, false)],
                )
            })
            .collect()
    };
    let old = plan(&cfg(), &services[..4], &slices(0)).unwrap();
    // The new table as one fragment per Service, as the agent holds it.
    let new_slices = slices(3);
    let fragments: Vec<proxy::Ruleset> = services[1..]
        .iter()
        .map(|s| plan(&cfg(), std::slice::from_ref(s), &new_slices).unwrap())
        .collect();
    let union = plan(&cfg(), &services[1..], &new_slices).unwrap();
    let by_fragments = proxy::ruleset::diff_all(&old, &fragments.iter().collect::<Vec<_>>());
    let whole = proxy::ruleset::diff(&old, &union);
    let sorted = |d: &proxy::ruleset::Diff| {
        let mut chains: Vec<String> = d.new_chains.iter().map(|(n, ..)| n.clone()).collect();
        chains.sort();
        let mut maps = d.maps.clone();
        for (_, del, add) in &mut maps {
            del.sort();
            add.sort();
        }
        maps.sort();
        let mut sets = d.new_sets.clone();
        sets.sort();
        let mut endpoints = d.endpoints.clone();
        for (_, del, add) in &mut endpoints {
            del.sort();
            add.sort();
        }
        endpoints.sort();
        (
            chains,
            d.gone_chains.clone(),
            sets,
            d.gone_sets.clone(),
            maps,
            endpoints,
            d.hairpin.clone(),
        )
    };
    assert_eq!(sorted(&by_fragments), sorted(&whole));
    assert!(
        !whole.gone_chains.is_empty() && !whole.new_sets.is_empty(),
        "{whole:?}"
    );
}

#[test]
fn explain_names_the_service_port_and_each_destination() {
    let s = svc(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
    );
    let rs = plan(
        &cfg(),
        &[s],
        &[slice(
            "web",
            "http",
            8080,
            &[("10.244.1.2", "node-2", true, true, false)],
        )],
    )
    .unwrap();
    let text = proxy::explain(&rs, &pkt(POD, "10.96.0.10", 80));
    assert!(text.contains("Service port default/web:http"), "{text}");
    assert!(text.contains("10.244.1.2:8080  (source kept)"), "{text}");
    assert!(proxy::explain(&rs, &pkt(POD, "10.96.0.99", 80)).contains("not a Service frontend"));
}

fn host_port_pod(
    name: &str,
    node: &str,
    ip: &str,
    ports: serde_json::Value,
) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
        "status": {"podIP": ip}}))
    .unwrap()
}

#[test]
fn host_ports_dnat_to_their_pod_on_this_node_only() {
    let here = host_port_pod(
        "edge",
        "node-1",
        POD,
        json!([{"containerPort": 8080, "hostPort": 80}, {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "172.18.0.2"}]),
    );
    let mut rs = proxy::plan::node_part(&cfg());
    rs.merge(proxy::plan::plan_host_ports(&cfg(), &here, |_| None).unwrap());
    // From outside: to the pod, the client's address kept (as the portmap plugin does).
    assert_eq!(
        hops(&trace(&rs, &pkt(OUTSIDE, "172.18.0.2", 80))),
        [(format!("{POD}:8080"), false)]
    );
    // The pod reaching itself through its hostPort is masqueraded (hairpin).
    assert_eq!(
        hops(&trace(&rs, &pkt(POD, "172.18.0.2", 80))),
        [(format!("{POD}:8080"), true)]
    );
    // A hostIP binds the mapping to that address only.
    let udp = Packet {
        proto: Proto::Udp,
        ..pkt(OUTSIDE, "172.18.0.2", 5353)
    };
    assert_eq!(hops(&trace(&rs, &udp)), [(format!("{POD}:53"), false)]);
    assert!(rs.node_ports.contains_key(&(Proto::Tcp, 80)));
    assert!(!rs.node_ports.contains_key(&(Proto::Udp, 5353)));
    // A pod of another node has nothing here.
    let there = host_port_pod(
        "far",
        "node-2",
        "10.244.1.5",
        json!([{"containerPort": 8080, "hostPort": 80}]),
    );
    assert_eq!(
        proxy::plan::plan_host_ports(&cfg(), &there, |_| None).unwrap(),
        proxy::Ruleset::default()
    );
    // A hostPort a Service's NodePort holds is refused, naming the field.
    let clash = host_port_pod(
        "clash",
        "node-1",
        POD,
        json!([{"containerPort": 8080, "hostPort": 30080}]),
    );
    let e = proxy::plan::plan_host_ports(&cfg(), &clash, |p| {
        (p == (Proto::Tcp, 30080)).then(|| "default/web".to_string())
    })
    .unwrap_err();
    assert_eq!(e.object, "Pod default/clash");
    assert_eq!(e.field, "spec.containers[0].ports[0].hostPort");
    assert!(e.message.contains("default/web"), "{e}");
}

/// The incremental proxy leaves in the kernel exactly the table a fresh plan describes, after
/// each of a run of changes (endpoints added, replaced, removed; Services added and deleted;
/// affinity, Local and NodePort paths): a fresh applier adopts it and finds nothing to send,
/// shared chains and hairpin addresses included, and nothing left over (as root, in a
/// throw-away namespace).
#[test]
fn incremental_syncs_leave_the_table_a_fresh_plan_describes() {
    if !netns::can_create() {
        eprintln!("skipped: needs root");
        return;
    }
    let spec = |i: usize| match i % 3 {
        0 => json!({"clusterIP": format!("10.96.3.{}", i + 1), "ports": [{"port": 80}]}),
        1 => {
            json!({"type": "NodePort", "clusterIP": format!("10.96.3.{}", i + 1), "externalTrafficPolicy": "Local",
                    "ports": [{"port": 80, "nodePort": 30200 + i}]})
        }
        _ => {
            json!({"clusterIP": format!("10.96.3.{}", i + 1), "sessionAffinity": "ClientIP", "ports": [{"port": 80}]})
        }
    };
    let endpoints = |i: usize, round: usize| -> Vec<(String, &'static str)> {
        (0..(i + round) % 4)
            .map(|e| {
                let node = if e % 2 == 0 { "node-1" } else { "node-2" };
                (
                    format!("10.244.{}.{}", e % 2, 10 + (i * 7 + e * 3 + round) % 20),
                    node,
                )
            })
            .collect()
    };
    let tmp = netns::TempNetNs::new("fnt-pxi").unwrap();
    tmp.ns()
        .run(|| {
            let mut p = proxy::Proxy::new(cfg()).unwrap();
            let mut store = cluster::Store::new();
            for round in 0..6 {
                // Services come and go: round r has Services r/2 .. 6 + r.
                let present: Vec<usize> = (round / 2..6 + round).collect();
                let services: Vec<_> = present
                    .iter()
                    .map(|i| svc(&format!("s{i}"), spec(*i)))
                    .collect();
                let slices: Vec<_> = present
                    .iter()
                    .map(|i| {
                        let eps = endpoints(*i, round);
                        let eps: Vec<_> = eps
                            .iter()
                            .map(|(ip, node)| (ip.as_str(), *node, true, true, false))
                            .collect();
                        slice(&format!("s{i}"), "", 8080, &eps)
                    })
                    .collect();
                p.take_changes(&store.apply(listing(&services, &slices)));
                p.sync().unwrap();
                let mut whole = plan(&cfg(), &services, &slices).unwrap();
                let mut fresh = proxy::Applier::new().unwrap();
                let held = fresh.adopt(&[&whole]).unwrap();
                whole.keep_positions(&held);
                let left = proxy::ruleset::diff(&held, &whole);
                assert!(left.is_empty(), "round {round}: {left:?}");
                // The ledger counted every element the rounds added and deleted: what the plan
                // has was found by key, and nothing had to be listed.
                assert!(fresh.listed.is_empty(), "round {round}: {:?}", fresh.listed);
                // With no plan, nothing is found by key: each set is listed, each pool carries
                // its seal.
                let read = fresh.adopt(&[]).unwrap();
                assert!(fresh.listed.contains(&"service-ips"), "{:?}", fresh.listed);
                assert_eq!(read.endpoints, whole.endpoints, "round {round}");
                assert_eq!(read.service_ips, whole.service_ips, "round {round}");
                assert_eq!(read.hairpin, whole.hairpin, "round {round}");
                assert!(
                    read.unsealed.is_empty(),
                    "round {round}: {:?}",
                    read.unsealed
                );
                assert!(!whole.shared.is_empty() && !whole.hairpin.is_empty());
            }
            // A restarted proxy adopts the table: nothing read whole, nothing sent.
            let mut again = proxy::Proxy::new(cfg()).unwrap();
            again.take_store(&store);
            let report = again.sync().unwrap();
            assert_eq!((report.objects, report.listed), (0, vec![]));
            // Deleted while no proxy ran: the ledger tells the next one to read the sets whole.
            let services = [svc("s11", spec(11))];
            drop((again, p));
            let mut again = proxy::Proxy::new(cfg()).unwrap();
            let mut fewer = cluster::Store::new();
            fewer.apply(listing(&services, &[]));
            again.take_store(&fewer);
            let report = again.sync().unwrap();
            assert!(report.listed.contains(&"service-ips"), "{report:?}");
            let held = proxy::Applier::new().unwrap().adopt(&[]).unwrap();
            // Its one frontend (without endpoints: rejected) is all that is left.
            assert!(held.service_ips.is_empty(), "{:?}", held.service_ips);
            assert_eq!(held.no_endpoints.len(), 1, "{:?}", held.no_endpoints);
            // No Service left: only the fixed part and the node's part are.
            again.take_changes(&fewer.apply(listing(&[], &[])));
            again.sync().unwrap();
            let held = proxy::Applier::new().unwrap().adopt(&[]).unwrap();
            assert_eq!(held, proxy::plan::node_part(&cfg()));
        })
        .unwrap();
}

/// What an adopting applier reads behind a map element (the pools a shared chain's name says it
/// reads) is what the chain and the chain it may go to pick from.
#[test]
fn shared_chain_names_say_which_endpoints_they_read() {
    let rs = sample();
    assert!(rs.shared.len() >= 4, "{:?}", rs.shared);
    for name in &rs.shared {
        let mut picks = Vec::new();
        for r in rs.chain_rules(name).unwrap().iter() {
            match r {
                proxy::ruleset::Rule::Pick(map, n) => picks.push((*map, *n)),
                proxy::ruleset::Rule::GotoIfFrom(_, next) => {
                    assert!(rs.shared.contains(next), "{next}");
                    for r in rs.chain_rules(next).unwrap().iter() {
                        if let proxy::ruleset::Rule::Pick(map, n) = r {
                            picks.push((*map, *n));
                        }
                    }
                }
                _ => {}
            }
        }
        picks.sort();
        let mut said = proxy::plan::pools_read_by(name);
        said.sort();
        assert_eq!(said, picks, "{name}");
    }
    assert!(proxy::plan::pools_read_by("svc_0123456789_default_web_80").is_empty());
}

/// Many Services are planned on several threads, each against the NodePorts held before the
/// sync; a NodePort two of them claim still goes to the first in key order, and the other gets
/// the error it would have got planned in line (as root, in a namespace of its own).
#[test]
fn a_nodeport_claimed_twice_goes_to_the_first_however_many_are_planned() {
    if !netns::can_create() {
        eprintln!("skipped: needs root");
        return;
    }
    let spec = |i: usize| {
        let node_port = if i == 100 || i == 1400 {
            30001
        } else {
            30002 + i
        };
        json!({"type": "NodePort", "clusterIP": format!("10.96.{}.{}", 10 + i / 250, 1 + i % 250),
               "ports": [{"port": 80, "nodePort": node_port}]})
    };
    let services: Vec<_> = (0..1500)
        .map(|i| svc(&format!("s{i:04}"), spec(i)))
        .collect();
    let tmp = netns::TempNetNs::new("fnt-pxc").unwrap();
    tmp.ns()
        .run(|| {
            let mut p = proxy::Proxy::new(cfg()).unwrap();
            let mut store = cluster::Store::new();
            p.take_changes(&store.apply(listing(&services, &[])));
            p.sync().unwrap();
            let key = |i: usize| ("default".to_string(), format!("s{i:04}"));
            assert_eq!(p.errors.keys().collect::<Vec<_>>(), [&key(1400)]);
            assert_eq!(
                p.errors[&key(1400)],
                "Service default/s1400: spec.ports[0].nodePort: 30001/tcp is already used by default/s0100"
            );
        })
        .unwrap();
}

/// The shared chains test the cluster CIDR, which their names do not say: a new CIDR (node
/// facts changed, or an agent restarted with another) replaces them, never leaves the old one.
#[test]
fn a_new_cluster_cidr_replaces_the_chains_that_test_it() {
    if !netns::can_create() {
        eprintln!("skipped: needs root");
        return;
    }
    let moved = Config {
        cluster_cidr: "10.200.0.0/16".parse().unwrap(),
        ..cfg()
    };
    let services = [svc(
        "web",
        json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
    )];
    let eps = [
        ("10.244.1.2", "node-2", true, true, false),
        ("10.244.2.2", "node-3", true, true, false),
    ];
    let slices = [slice("web", "", 8080, &eps)];
    let tmp = netns::TempNetNs::new("fnt-pxc").unwrap();
    tmp.ns()
        .run(|| {
            let table = || nft::list_table(proxy::ruleset::TABLE).unwrap().unwrap();
            let mut store = cluster::Store::new();
            store.apply(listing(&services, &slices));
            let mut p = proxy::Proxy::new(cfg()).unwrap();
            p.take_store(&store);
            p.sync().unwrap();
            assert!(table().contains("10.244.0.0/16"), "{}", table());
            p.set_config(moved.clone());
            p.sync().unwrap();
            let text = table();
            assert!(text.contains("10.200.0.0/16"), "{text}");
            assert!(!text.contains("10.244.0.0/16"), "{text}");
            // A restarted agent with the first CIDR again.
            drop(p);
            let mut again = proxy::Proxy::new(cfg()).unwrap();
            again.take_store(&store);
            again.sync().unwrap();
            let text = table();
            assert!(text.contains("10.244.0.0/16"), "{text}");
            assert!(!text.contains("10.200.0.0/16"), "{text}");
            // The kernel holds what a fresh plan describes.
            let mut whole = plan(&cfg(), &services, &slices).unwrap();
            let held = proxy::Applier::new().unwrap().adopt(&[&whole]).unwrap();
            whole.keep_positions(&held);
            let left = proxy::ruleset::diff(&held, &whole);
            assert!(left.is_empty(), "{left:?}");
        })
        .unwrap();
}
