//! A conformance suite for CNI plugins: the rules of the spec, checked against any plugin binary.
//!
//! Every case builds its own pod namespaces; the plugin runs inside a throw-away "node" namespace,
//! so nothing reaches the machine's own network. Cases the plugin's versions make meaningless are
//! skipped (GC and STATUS need 1.1.0, CHECK 0.4.0), not failed.

use crate::conflist::{Attachment, NetList, Runtime};
use crate::exec::{self, Call};
use netns::TempNetNs;
use serde_json::{json, Value};
use std::path::PathBuf;

pub const SPEC_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
    Skip(String),
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub verdict: Verdict,
}

pub struct Suite<'a> {
    pub list: NetList,
    pub rt: Runtime<'a>,
    pub cases: Vec<Case>,
    seq: u32,
}

type Check = Result<(), String>;

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Check {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

impl<'a> Suite<'a> {
    pub fn new(
        list: NetList,
        bin_dirs: Vec<PathBuf>,
        node: &'a netns::NetNs,
        runtime_config: Value,
    ) -> Suite<'a> {
        Suite {
            list,
            rt: Runtime {
                bin_dirs,
                node: Some(node),
                runtime_config,
            },
            cases: Vec::new(),
            seq: 0,
        }
    }

    fn record(&mut self, name: impl Into<String>, verdict: Verdict) {
        self.cases.push(Case {
            name: name.into(),
            verdict,
        });
    }

    fn check(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Self) -> Check) {
        let v = match f(self) {
            Ok(()) => Verdict::Pass,
            Err(e) => Verdict::Fail(e),
        };
        self.record(name, v);
    }

    fn attachment(&mut self, pod: &TempNetNs) -> Attachment {
        self.seq += 1;
        Attachment {
            container_id: format!("conf{}-{}", std::process::id(), self.seq),
            netns: Some(pod.path().to_path_buf()),
            ifname: "eth0".into(),
            args: None,
        }
    }

    fn first_plugin(&self) -> PathBuf {
        self.rt.find(self.list.plugin_type(0))
    }

    /// The versions every plugin of the list supports, from VERSION.
    fn supported(&mut self) -> Vec<String> {
        let mut common: Option<Vec<String>> = None;
        for i in 0..self.list.plugins.len() {
            let bin = self.rt.find(self.list.plugin_type(i));
            let call = Call {
                command: "VERSION".into(),
                ..Default::default()
            };
            let reply = exec::run(&bin, &call, br#"{"cniVersion":"1.0.0"}"#, self.rt.node);
            let versions: Vec<String> = reply
                .ok()
                .and_then(|r| r.json())
                .and_then(|v| v.get("supportedVersions").cloned())
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            common = Some(match common {
                None => versions,
                Some(c) => c.into_iter().filter(|v| versions.contains(v)).collect(),
            });
        }
        common.unwrap_or_default()
    }

    pub fn run_all(&mut self) -> std::io::Result<()> {
        let supported = self.supported();
        self.check("VERSION answers with supportedVersions", |_| {
            ensure(!supported.is_empty(), || {
                "VERSION printed no supportedVersions".into()
            })
        });
        let versions: Vec<String> = SPEC_VERSIONS
            .iter()
            .map(|s| s.to_string())
            .filter(|v| supported.contains(v))
            .collect();
        for v in &versions {
            self.lifecycle(v)?;
        }
        let latest = versions
            .last()
            .cloned()
            .unwrap_or_else(|| self.list.cni_version.clone());
        self.del_without_netns(&latest)?;
        self.chained_add(&latest)?;
        self.check("DEL of an attachment never added succeeds", |s| {
            let att = Attachment {
                container_id: "never-added".into(),
                netns: None,
                ifname: "eth0".into(),
                args: None,
            };
            s.rt.del(&s.list, &latest, &att, None)
                .map_err(|e| e.to_string())
        });
        self.error_codes(&latest, &supported)?;
        if supported.iter().any(|v| v == "1.1.0") {
            self.gc_and_status()?;
        } else {
            self.record(
                "GC frees what is not in cni.dev/valid-attachments",
                Verdict::Skip("plugin does not speak 1.1.0".into()),
            );
            self.record(
                "STATUS reports ready",
                Verdict::Skip("plugin does not speak 1.1.0".into()),
            );
        }
        Ok(())
    }

    /// ADD → result shape → interface in the pod → CHECK → DEL → DEL again, in one version.
    fn lifecycle(&mut self, v: &str) -> std::io::Result<()> {
        let pod = TempNetNs::new("cnic-pod")?;
        let att = self.attachment(&pod);
        let mut result = Value::Null;
        self.check(
            format!("[{v}] ADD succeeds with a result of that version"),
            |s| {
                result = s.rt.add(&s.list, v, &att).map_err(|e| e.to_string())?;
                result_shape(&result, v, pod.path().to_str().unwrap_or_default())
            },
        );
        let added = !result.is_null();
        self.check(
            format!("[{v}] ADD configured the interface and addresses in the pod"),
            |_| {
                ensure(added, || "ADD failed".into())?;
                pod_has_result(&pod, &result, "eth0")
            },
        );
        if v >= "0.4.0" {
            self.check(format!("[{v}] CHECK with prevResult succeeds"), |s| {
                ensure(added, || "ADD failed".into())?;
                s.rt.check(&s.list, v, &att, &result)
                    .map_err(|e| e.to_string())
            });
        }
        self.check(
            format!("[{v}] DEL succeeds and removes the interface"),
            |s| {
                s.rt.del(&s.list, v, &att, added.then_some(&result))
                    .map_err(|e| e.to_string())?;
                ensure(!link_exists(&pod, "eth0"), || {
                    "eth0 still exists in the pod after DEL".into()
                })?;
                // Removal may finish asynchronously, but must finish: nothing but lo within a second.
                let empty = wait_until(std::time::Duration::from_secs(1), || {
                    link_names(&pod).is_ok_and(|ls| ls.iter().all(|l| l == "lo"))
                });
                ensure(empty, || {
                    format!(
                        "a second after DEL the pod still has {:?}",
                        link_names(&pod).unwrap_or_default()
                    )
                })
            },
        );
        self.check(format!("[{v}] DEL again succeeds (idempotent)"), |s| {
            s.rt.del(&s.list, v, &att, added.then_some(&result))
                .map_err(|e| e.to_string())
        });
        Ok(())
    }

    /// The spec: a plugin handed a prevResult must output it, with its own changes added. The
    /// first plugin of the list is run as if a plugin before it had attached `chain0`.
    fn chained_add(&mut self, v: &str) -> std::io::Result<()> {
        let pod = TempNetNs::new("cnic-pod")?;
        let att = self.attachment(&pod);
        let sandbox = pod.path().display().to_string();
        let mut ip = json!({"address": "192.0.2.10/32", "interface": 0});
        if v < "1.0.0" {
            ip["version"] = json!("4");
        }
        let prev = json!({"cniVersion": v, "interfaces": [{"name": "chain0", "sandbox": sandbox}],
                          "ips": [ip], "routes": [{"dst": "198.51.100.0/24"}]});
        self.check(
            "[chain] ADD given a prevResult returns it with its own additions",
            |s| {
                let r =
                    s.rt.call(&s.list, 0, v, "ADD", &att, Some(&prev))
                        .map_err(|e| e.to_string())?;
                let out = r.json().unwrap_or(Value::Null);
                let _ = s.rt.call(&s.list, 0, v, "DEL", &att, Some(&out));
                let has = |key: &str, field: &str, want: &str| {
                    out[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|x| x[field] == want)
                };
                ensure(has("interfaces", "name", "chain0"), || {
                    format!("prevResult's interface chain0 is missing: {out}")
                })?;
                ensure(has("ips", "address", "192.0.2.10/32"), || {
                    format!("prevResult's address 192.0.2.10/32 is missing: {out}")
                })?;
                ensure(has("routes", "dst", "198.51.100.0/24"), || {
                    format!("prevResult's route 198.51.100.0/24 is missing: {out}")
                })?;
                ensure(
                    out["interfaces"].as_array().is_some_and(|a| a.len() > 1),
                    || format!("the plugin added no interface of its own: {out}"),
                )
            },
        );
        Ok(())
    }

    fn del_without_netns(&mut self, v: &str) -> std::io::Result<()> {
        let pod = TempNetNs::new("cnic-pod")?;
        let att = self.attachment(&pod);
        self.check("DEL without CNI_NETNS releases the attachment", |s| {
            let r = s.rt.add(&s.list, v, &att).map_err(|e| e.to_string())?;
            let bare = Attachment {
                netns: None,
                ..att.clone()
            };
            s.rt.del(&s.list, v, &bare, Some(&r))
                .map_err(|e| format!("DEL without netns: {e}"))?;
            // Addresses must be free again: the same attachment can be added anew in a fresh pod.
            let pod2 = TempNetNs::new("cnic-pod").map_err(|e| e.to_string())?;
            let again = Attachment {
                netns: Some(pod2.path().to_path_buf()),
                ..att.clone()
            };
            let r2 =
                s.rt.add(&s.list, v, &again)
                    .map_err(|e| format!("re-ADD after DEL without netns: {e}"))?;
            s.rt.del(&s.list, v, &again, Some(&r2))
                .map_err(|e| e.to_string())
        });
        Ok(())
    }

    fn error_codes(&mut self, v: &str, supported: &[String]) -> std::io::Result<()> {
        let pod = TempNetNs::new("cnic-pod")?;
        let netns = pod.path().to_path_buf();
        let conf = self.list.plugin_config(0, v, None, &self.rt.runtime_config);
        let bin = self.first_plugin();
        let node = self.rt.node;
        let path = self.rt.bin_dirs.clone();
        let expect = |call: Call, stdin: Vec<u8>, code: u64| -> Check {
            let r = exec::run(&bin, &call, &stdin, node).map_err(|e| e.to_string())?;
            ensure(!r.ok(), || {
                format!("exit 0, expected error code {code}: {}", r.stdout)
            })?;
            let json = r
                .json()
                .ok_or_else(|| format!("stdout is not an error object: {:?}", r.stdout))?;
            ensure(json.get("msg").and_then(Value::as_str).is_some(), || {
                format!("error object has no msg: {json}")
            })?;
            ensure(r.error_code() == Some(code), || {
                format!(
                    "error code {:?}, expected {code}: {}",
                    r.error_code(),
                    r.stdout.trim()
                )
            })
        };
        let add = |ifname: &str| Call::new("ADD", "errcase", Some(&netns), ifname, &path);
        let mut bad_version = conf.clone();
        bad_version["cniVersion"] = json!("99.0.0");
        self.check("error 1: unsupported cniVersion", |_| {
            expect(add("eth0"), bad_version.to_string().into_bytes(), 1)
        });
        self.check("error 6: stdin is not JSON", |_| {
            expect(add("eth0"), b"{not json".to_vec(), 6)
        });
        self.check("error 4: CNI_CONTAINERID missing on ADD", |_| {
            let mut c = add("eth0");
            c.container_id = None;
            expect(c, conf.to_string().into_bytes(), 4)
        });
        self.check("error 4: CNI_IFNAME with '/'", |_| {
            expect(add("a/b"), conf.to_string().into_bytes(), 4)
        });
        self.check("error 4: CNI_IFNAME longer than 15", |_| {
            expect(add("a-very-long-ifname"), conf.to_string().into_bytes(), 4)
        });
        self.check("error 4: unknown CNI_COMMAND", |_| {
            let mut c = add("eth0");
            c.command = "FROB".into();
            expect(c, conf.to_string().into_bytes(), 4)
        });
        if supported.iter().any(|s| s == "0.3.1") {
            let mut old = conf.clone();
            old["cniVersion"] = json!("0.3.1");
            self.check("error 1: CHECK with cniVersion 0.3.1", |_| {
                let c = Call::new("CHECK", "errcase", Some(&netns), "eth0", &path);
                expect(c, old.to_string().into_bytes(), 1)
            });
        }
        if supported.iter().any(|s| s == "1.1.0") && supported.iter().any(|s| s == "1.0.0") {
            let mut old = conf.clone();
            old["cniVersion"] = json!("1.0.0");
            self.check("error 1: GC with cniVersion 1.0.0", |_| {
                let c = Call {
                    command: "GC".into(),
                    path: path.clone(),
                    ..Default::default()
                };
                expect(c, old.to_string().into_bytes(), 1)
            });
        }
        Ok(())
    }

    fn gc_and_status(&mut self) -> std::io::Result<()> {
        let pod_a = TempNetNs::new("cnic-pod")?;
        let pod_b = TempNetNs::new("cnic-pod")?;
        let a = self.attachment(&pod_a);
        let b = self.attachment(&pod_b);
        self.check("GC frees what is not in cni.dev/valid-attachments", |s| {
            let ra = s.rt.add(&s.list, "1.1.0", &a).map_err(|e| e.to_string())?;
            s.rt.add(&s.list, "1.1.0", &b).map_err(|e| e.to_string())?;
            s.rt.gc(&s.list, "1.1.0", &[(&a.container_id, &a.ifname)])
                .map_err(|e| format!("GC: {e}"))?;
            s.rt.check(&s.list, "1.1.0", &a, &ra)
                .map_err(|e| format!("the valid attachment broke: {e}"))?;
            // B's addresses are free: B can be added again (into a fresh namespace).
            let pod_b2 = TempNetNs::new("cnic-pod").map_err(|e| e.to_string())?;
            let b2 = Attachment {
                netns: Some(pod_b2.path().to_path_buf()),
                ..b.clone()
            };
            let rb2 =
                s.rt.add(&s.list, "1.1.0", &b2)
                    .map_err(|e| format!("re-ADD after GC: {e}"))?;
            s.rt.del(&s.list, "1.1.0", &b2, Some(&rb2))
                .map_err(|e| e.to_string())?;
            s.rt.del(&s.list, "1.1.0", &a, Some(&ra))
                .map_err(|e| e.to_string())
        });
        self.check("STATUS reports ready", |s| {
            let conf = s.list.plugin_config(0, "1.1.0", None, &s.rt.runtime_config);
            let call = Call {
                command: "STATUS".into(),
                path: s.rt.bin_dirs.clone(),
                ..Default::default()
            };
            let r = exec::run(
                &s.first_plugin(),
                &call,
                conf.to_string().as_bytes(),
                s.rt.node,
            )
            .map_err(|e| e.to_string())?;
            ensure(r.ok(), || format!("STATUS failed: {}", r.stdout))
        });
        Ok(())
    }

    pub fn failures(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| matches!(c.verdict, Verdict::Fail(_)))
            .count()
    }

    pub fn report(&self) -> String {
        let mut out = String::new();
        for c in &self.cases {
            let line = match &c.verdict {
                Verdict::Pass => format!("PASS  {}\n", c.name),
                Verdict::Fail(why) => format!("FAIL  {}\n      {why}\n", c.name),
                Verdict::Skip(why) => format!("SKIP  {} ({why})\n", c.name),
            };
            out += &line;
        }
        let pass = self
            .cases
            .iter()
            .filter(|c| c.verdict == Verdict::Pass)
            .count();
        out += &format!(
            "{pass} passed, {} failed, {} skipped\n",
            self.failures(),
            self.cases.len() - pass - self.failures()
        );
        out
    }
}

/// The result is of version `v`: the spec's required fields, family tags only before 1.0.0,
/// interface indexes in range, the pod interface with its sandbox.
pub fn result_shape(r: &Value, v: &str, sandbox: &str) -> Check {
    ensure(
        r.get("cniVersion").and_then(Value::as_str) == Some(v),
        || format!("cniVersion is {:?}, asked {v}", r.get("cniVersion")),
    )?;
    let ips = r
        .get("ips")
        .and_then(Value::as_array)
        .ok_or("result has no ips")?;
    ensure(!ips.is_empty(), || "result has no ips".into())?;
    let ifaces = r
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for ip in ips {
        let has_tag = ip.get("version").is_some();
        ensure(has_tag == (v < "1.0.0"), || {
            format!(
                "ip {ip}: \"version\" field {} in a {v} result",
                if has_tag { "present" } else { "missing" }
            )
        })?;
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            ensure((i as usize) < ifaces.len(), || {
                format!("ip {ip}: interface index {i} out of range")
            })?;
        }
        let addr = ip
            .get("address")
            .and_then(Value::as_str)
            .unwrap_or_default();
        ensure(addr.contains('/'), || {
            format!("ip address {addr:?} is not in CIDR form")
        })?;
    }
    ensure(
        ifaces
            .iter()
            .any(|i| i.get("sandbox").and_then(Value::as_str) == Some(sandbox)),
        || format!("no interface has sandbox {sandbox}"),
    )
}

fn in_pod<T>(pod: &TempNetNs, f: impl FnOnce(&netlink::Netlink) -> T) -> Result<T, String> {
    let nl = netlink::Netlink::connect_in(pod.ns()).map_err(|e| e.to_string())?;
    Ok(f(&nl))
}

fn link_exists(pod: &TempNetNs, ifname: &str) -> bool {
    in_pod(pod, |nl| nl.link_by_name(ifname).ok().flatten().is_some()).unwrap_or(false)
}

/// Polls `done` until it holds or `limit` passes.
pub fn wait_until(limit: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

/// The names of every link in `ns`.
pub fn link_names(ns: &TempNetNs) -> Result<Vec<String>, String> {
    use netlink::LinkInfo;
    in_pod(ns, |nl| {
        let links = nl.links().map_err(|e| e.to_string())?;
        Ok(links
            .iter()
            .filter_map(|l| l.name().map(str::to_string))
            .collect())
    })?
}

/// The pod namespace holds `ifname` with every address the result gives it.
pub fn pod_has_result(pod: &TempNetNs, r: &Value, ifname: &str) -> Check {
    let want: Vec<String> = r["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or("").to_string())
        .collect();
    let have: Vec<String> = in_pod(pod, |nl| {
        use netlink::LinkInfo;
        let Some(link) = nl.link_by_name(ifname).ok().flatten() else {
            return Vec::new();
        };
        nl.addresses(link.index())
            .unwrap_or_default()
            .iter()
            .map(|a| a.addr().to_string())
            .collect()
    })?;
    ensure(!have.is_empty(), || {
        format!("{ifname} is missing or has no addresses in the pod")
    })?;
    for w in &want {
        ensure(have.contains(w), || {
            format!("{ifname} lacks {w} (has {have:?})")
        })?;
    }
    Ok(())
}
