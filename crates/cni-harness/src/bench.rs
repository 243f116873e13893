//! ADD/DEL latency of two plugins side by side, and a concurrency soak.
//!
//! Each cycle makes a fresh pod namespace (not timed), then times ADD and DEL as a runtime sees
//! them: from spawning the plugin to its exit. The two plugins alternate which goes first, so
//! neither always runs on a warmer cache.

use crate::conflist::{Attachment, NetList, Runtime};
use netns::TempNetNs;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One contender: a config and where its plugins live.
pub struct Contender {
    pub label: String,
    pub config: Value,
    pub bin_dirs: Vec<PathBuf>,
}

/// flatnet and the reference bridge + host-local, configured alike (bridge, gateway, one /16,
/// default route), each on its own bridge and subnet so they can share a node.
pub fn standard_pair(
    flatnet_dir: &Path,
    reference_dir: &Path,
    data_dir: &Path,
    ip_masq: bool,
) -> [Contender; 2] {
    let conf = |ty: &str, ipam: &str, bridge: &str, subnet: &str| {
        json!({"cniVersion": "1.0.0", "name": format!("bench-{ty}"), "type": ty, "bridge": bridge,
               "isGateway": true, "ipMasq": ip_masq,
               "ipam": {"type": ipam, "dataDir": data_dir, "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}})
    };
    [
        Contender {
            label: "flatnet".into(),
            config: conf("flatnet", "flatnet", "cnifn0", "10.201.0.0/16"),
            bin_dirs: vec![flatnet_dir.into()],
        },
        Contender {
            label: "reference bridge+host-local".into(),
            config: conf("bridge", "host-local", "cniref0", "10.202.0.0/16"),
            bin_dirs: vec![reference_dir.into()],
        },
    ]
}

#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub add: Vec<Duration>,
    pub del: Vec<Duration>,
}

pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs `cycles` ADD+DEL per contender (after `warmup` untimed ones) in one node namespace.
pub fn latency(
    contenders: &[Contender],
    cycles: usize,
    warmup: usize,
) -> Result<Vec<Samples>, String> {
    let node = TempNetNs::new("cnib-node").map_err(|e| e.to_string())?;
    let lists: Vec<NetList> = contenders
        .iter()
        .map(|c| NetList::from_value(&c.config))
        .collect::<Result<_, _>>()?;
    let mut samples = vec![Samples::default(); contenders.len()];
    for i in 0..cycles + warmup {
        for k in 0..contenders.len() {
            let k = if i % 2 == 0 {
                k
            } else {
                contenders.len() - 1 - k
            };
            let rt = Runtime {
                bin_dirs: contenders[k].bin_dirs.clone(),
                node: Some(node.ns()),
                runtime_config: Value::Null,
            };
            let pod = TempNetNs::new("cnib-pod").map_err(|e| e.to_string())?;
            let att = Attachment {
                container_id: format!("bench{i}"),
                netns: Some(pod.path().into()),
                ifname: "eth0".into(),
                args: None,
            };
            let add = rt
                .call(&lists[k], 0, "1.0.0", "ADD", &att, None)
                .map_err(|e| format!("{}: {e}", contenders[k].label))?;
            let result = add.json();
            let del = rt
                .call(&lists[k], 0, "1.0.0", "DEL", &att, result.as_ref())
                .map_err(|e| format!("{}: {e}", contenders[k].label))?;
            if i >= warmup {
                samples[k].add.push(add.elapsed);
                samples[k].del.push(del.elapsed);
            }
        }
    }
    Ok(samples)
}

pub fn latency_report(contenders: &[Contender], samples: &[Samples]) -> String {
    let mut out = format!(
        "{:<30} {:>10} {:>10} {:>10} {:>10}\n",
        "plugin", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    for (c, s) in contenders.iter().zip(samples) {
        out += &format!(
            "{:<30} {:>10} {:>10} {:>10} {:>10}\n",
            c.label,
            ms(percentile(&s.add, 0.5)),
            ms(percentile(&s.add, 0.99)),
            ms(percentile(&s.del, 0.5)),
            ms(percentile(&s.del, 0.99))
        );
    }
    if samples.len() == 2 {
        let ratio = |a: &[Duration], b: &[Duration], p| {
            percentile(a, p).as_secs_f64() / percentile(b, p).as_secs_f64()
        };
        out += &format!(
            "ratio {} / {}: ADD p50 {:.3}x p99 {:.3}x, DEL p50 {:.3}x p99 {:.3}x\n",
            contenders[0].label,
            contenders[1].label,
            ratio(&samples[0].add, &samples[1].add, 0.5),
            ratio(&samples[0].add, &samples[1].add, 0.99),
            ratio(&samples[0].del, &samples[1].del, 0.5),
            ratio(&samples[0].del, &samples[1].del, 0.99)
        );
    }
    out
}

/// `n` concurrent ADDs into one network, then `n` concurrent DELs; checks no address is handed
/// out twice, none is lost, and that afterwards no lease file and no pod veth remains.
pub fn concurrent(c: &Contender, n: usize, data_dir: &Path) -> Result<String, String> {
    let node = TempNetNs::new("cnib-node").map_err(|e| e.to_string())?;
    let list = NetList::from_value(&c.config)?;
    let pods: Vec<TempNetNs> = (0..n)
        .map(|_| TempNetNs::new("cnib-pod"))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let rt = Runtime {
        bin_dirs: c.bin_dirs.clone(),
        node: Some(node.ns()),
        runtime_config: Value::Null,
    };
    let att = |i: usize| Attachment {
        container_id: format!("conc{i}"),
        netns: Some(pods[i].path().into()),
        ifname: "eth0".into(),
        args: None,
    };
    let start = std::time::Instant::now();
    let results: Vec<Result<Value, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let (rt, list, a) = (&rt, &list, att(i));
                s.spawn(move || rt.add(list, "1.0.0", &a).map_err(|e| e.to_string()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let add_wall = start.elapsed();
    let mut ips = Vec::new();
    for r in &results {
        let r = r
            .as_ref()
            .map_err(|e| format!("concurrent ADD failed: {e}"))?;
        ips.push(
            r["ips"][0]["address"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let unique: HashSet<&String> = ips.iter().collect();
    let leases_dir = data_dir.join(&list.name);
    let lease_count = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .parse::<std::net::IpAddr>()
                            .is_ok()
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let leases = lease_count(&leases_dir);
    if unique.len() != n || leases != n {
        return Err(format!(
            "{n} concurrent ADDs gave {} distinct addresses and {leases} leases",
            unique.len()
        ));
    }
    let start = std::time::Instant::now();
    let dels: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let (rt, list, a, r) = (&rt, &list, att(i), results[i].as_ref().ok());
                s.spawn(move || rt.del(list, "1.0.0", &a, r).map_err(|e| e.to_string()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let del_wall = start.elapsed();
    dels.into_iter().collect::<Result<Vec<()>, String>>()?;
    let leases_after = lease_count(&leases_dir);
    // Unregistering veths finishes asynchronously (see the plugin's DEL) and the kernel does it one
    // at a time under its rtnl lock, ~15 ms each: allow for all of them. A dump racing many
    // changes can come back short, so emptiness must be seen twice.
    let pod_veths = || {
        crate::conformance::link_names(&node)
            .map(|ls| {
                ls.iter()
                    .filter(|l| l.starts_with("fn") || l.starts_with("veth"))
                    .count()
            })
            .unwrap_or(usize::MAX)
    };
    let limit = Duration::from_millis(50 * n as u64 + 1000);
    crate::conformance::wait_until(limit, || pod_veths() == 0 && pod_veths() == 0);
    let veths_after = pod_veths();
    if leases_after != 0 || veths_after != 0 {
        return Err(format!(
            "after {n} DELs: {leases_after} leases and {veths_after} veths remain"
        ));
    }
    Ok(format!(
        "{}: {n} concurrent ADDs in {} → {n} distinct addresses, {n} leases; {n} concurrent DELs in {} → 0 leases, 0 veths left\n",
        c.label,
        ms(add_wall),
        ms(del_wall)
    ))
}
