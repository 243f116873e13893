//! Allocation against a real lease directory (no root needed).

use cni_spec::ErrorCode;
use ipam::{allocate, gc, held, release, IpamConfig, Request};
use serde_json::json;
use std::collections::HashSet;
use std::net::IpAddr;

fn config(dir: &std::path::Path, ranges: serde_json::Value) -> IpamConfig {
    IpamConfig::parse(
        "testnet",
        &json!({"type": "flatnet", "ranges": ranges, "dataDir": dir}),
        None,
    )
    .unwrap()
}

fn req(id: &str) -> Request {
    Request {
        container_id: id.into(),
        ifname: "eth0".into(),
        requested: vec![],
    }
}

#[test]
fn dual_stack_one_address_per_set_and_host_local_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        json!([[{"subnet": "10.5.0.0/24"}], [{"subnet": "fd05::/64"}]]),
    );
    let r = allocate(&cfg, &req("c1")).unwrap();
    let addrs: Vec<String> = r.ips.iter().map(|i| i.address.to_string()).collect();
    assert_eq!(addrs, vec!["10.5.0.2/24", "fd05::2/64"]);
    assert_eq!(r.ips[0].gateway, Some("10.5.0.1".parse().unwrap()));
    let lease = std::fs::read_to_string(tmp.path().join("testnet/10.5.0.2")).unwrap();
    assert_eq!(lease, "c1\r\neth0");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("testnet/last_reserved_ip.0")).unwrap(),
        "10.5.0.2"
    );
}

#[test]
fn second_add_for_same_attachment_is_refused_and_keeps_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), json!([[{"subnet": "10.5.0.0/24"}]]));
    allocate(&cfg, &req("c1")).unwrap();
    let e = allocate(&cfg, &req("c1")).unwrap_err();
    assert!(e.msg.contains("already holds 10.5.0.2"), "{e}");
    assert_eq!(held(&cfg, "c1", "eth0").unwrap().len(), 1);
}

#[test]
fn round_robin_does_not_reuse_a_freed_address_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), json!([[{"subnet": "10.5.0.0/29"}]]));
    let a = allocate(&cfg, &req("a")).unwrap().ips[0].address.addr();
    release(&cfg, "a", "eth0").unwrap();
    let b = allocate(&cfg, &req("b")).unwrap().ips[0].address.addr();
    assert_ne!(a, b);
}

#[test]
fn exhaustion_and_release() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), json!([[{"subnet": "10.5.0.0/29"}]])); // .2-.6 usable
    for i in 0..5 {
        allocate(&cfg, &req(&format!("c{i}"))).unwrap();
    }
    let e = allocate(&cfg, &req("c5")).unwrap_err();
    assert!(e.is(ErrorCode::RangeFull), "{e}");
    assert!(ipam::status(&cfg).unwrap_err().is(ErrorCode::NotAvailable));
    assert_eq!(release(&cfg, "c3", "eth0").unwrap().len(), 1);
    assert_eq!(
        release(&cfg, "c3", "eth0").unwrap().len(),
        0,
        "release is idempotent"
    );
    allocate(&cfg, &req("c5")).unwrap();
}

#[test]
fn requested_addresses_and_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        json!([[{"subnet": "10.5.0.0/24"}], [{"subnet": "fd05::/64"}]]),
    );
    let mut r = req("s");
    r.requested = vec!["10.5.0.77".parse().unwrap()];
    let res = allocate(&cfg, &r).unwrap();
    assert_eq!(
        res.ips[0].address.addr(),
        "10.5.0.77".parse::<IpAddr>().unwrap()
    );
    // A requested address outside every set fails and leaves nothing behind.
    let mut bad = req("t");
    bad.requested = vec!["192.168.1.1".parse().unwrap()];
    let e = allocate(&cfg, &bad).unwrap_err();
    assert!(e.msg.contains("192.168.1.1"), "{e}");
    assert!(held(&cfg, "t", "eth0").unwrap().is_empty(), "rolled back");
    // A taken one fails too.
    let mut dup = req("u");
    dup.requested = vec!["10.5.0.77".parse().unwrap()];
    assert!(allocate(&cfg, &dup)
        .unwrap_err()
        .msg
        .contains("not available"));
}

#[test]
fn gc_keeps_only_valid_attachments() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), json!([[{"subnet": "10.5.0.0/24"}]]));
    for id in ["a", "b", "c"] {
        allocate(&cfg, &req(id)).unwrap();
    }
    let freed = gc(&cfg, &[("b".into(), "eth0".into())]).unwrap();
    let freed: HashSet<String> = freed.into_iter().map(|l| l.container_id).collect();
    assert_eq!(freed, HashSet::from(["a".to_string(), "c".to_string()]));
    assert_eq!(held(&cfg, "b", "eth0").unwrap().len(), 1);
}

#[test]
fn concurrent_allocations_never_collide() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), json!([[{"subnet": "10.5.0.0/24"}]]));
    let ips: Vec<IpAddr> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let cfg = &cfg;
                s.spawn(move || {
                    allocate(cfg, &req(&format!("c{i}"))).unwrap().ips[0]
                        .address
                        .addr()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let unique: HashSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), 64);
}
