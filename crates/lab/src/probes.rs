//! Container probes as the kubelet reads and runs them: `readinessProbe` and `livenessProbe` with
//! an `httpGet`, `tcpSocket` or `exec` handler, checked as the API server checks them, and one
//! run of a probe (from the node's namespace; `exec` inside the pod's).
//!
//! The HTTP probe is a plain HTTP/1.1 GET on a blocking socket, as the kubelet's prober sends it
//! (`User-Agent: kube-probe/…`, success on 200–399): a client library would bring an async
//! runtime into a loop that only needs one request and a status line.

use cluster::ModelError;
use k8s_openapi::api::core::v1::{Container, Probe as ApiProbe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// GET `path` on `host` (default: the pod's IP) and `port`.
    Http {
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A TCP connection to `host` (default: the pod's IP) and `port`.
    Tcp { host: Option<String>, port: u16 },
    /// A command run in the container; exit status 0 is success.
    Exec { command: Vec<String> },
}

/// A checked probe with the API's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// The User-Agent the kubelet's prober sends (its minor version is the kubelet's).
const USER_AGENT: &str = "kube-probe/1.37";

/// Reads `container.<field>` (`readinessProbe` or `livenessProbe`) of container `index`.
pub fn parse(
    object: &str,
    index: usize,
    container: &Container,
    field: &str,
    probe: &ApiProbe,
) -> Result<Probe, ModelError> {
    let at = format!("spec.containers[{index}].{field}");
    let err = |sub: &str, msg: String| ModelError::new(object, format!("{at}{sub}"), msg);
    let port = |sub: &str, p: &IntOrString| -> Result<u16, ModelError> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| err(sub, format!("{n}: must be between 1 and 65535"))),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .and_then(|cp| u16::try_from(cp.container_port).ok())
                .ok_or_else(|| {
                    err(
                        sub,
                        format!("{name:?}: no containerPort of this container has that name"),
                    )
                }),
        }
    };
    let mut actions = Vec::new();
    if let Some(h) = &probe.http_get {
        if let Some(s) = h.scheme.as_deref().filter(|s| *s != "HTTP") {
            return Err(err(
                ".httpGet.scheme",
                format!("{s:?}: the lab's prober speaks HTTP only"),
            ));
        }
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        if !path.starts_with('/') {
            return Err(err(".httpGet.path", format!("{path:?}: must start with /")));
        }
        actions.push(Action::Http {
            host: h.host.clone().filter(|h| !h.is_empty()),
            port: port(".httpGet.port", &h.port)?,
            path,
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect(),
        });
    }
    if let Some(t) = &probe.tcp_socket {
        actions.push(Action::Tcp {
            host: t.host.clone().filter(|h| !h.is_empty()),
            port: port(".tcpSocket.port", &t.port)?,
        });
    }
    if let Some(e) = &probe.exec {
        let command = e.command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err(err(".exec.command", "must name a command".into()));
        }
        actions.push(Action::Exec { command });
    }
    if probe.grpc.is_some() {
        return Err(err(
            ".grpc",
            "the lab's prober runs httpGet, tcpSocket and exec".into(),
        ));
    }
    let action = match actions.len() {
        1 => actions.pop().expect("one"),
        0 => {
            return Err(err(
                "",
                "must specify a handler type (httpGet, tcpSocket or exec)".into(),
            ))
        }
        _ => return Err(err("", "may not specify more than 1 handler type".into())),
    };
    let seconds = |sub: &str, v: Option<i32>, default: i32, min: i32| {
        let v = v.unwrap_or(default);
        if v < min {
            Err(err(sub, format!("{v}: must be at least {min}")))
        } else {
            Ok(v as u32)
        }
    };
    let success_threshold = seconds(".successThreshold", probe.success_threshold, 1, 1)?;
    if field == "livenessProbe" && success_threshold != 1 {
        return Err(err(
            ".successThreshold",
            format!("{success_threshold}: must be 1 for a liveness probe"),
        ));
    }
    let secs = |n: u32| Duration::from_secs(u64::from(n));
    Ok(Probe {
        action,
        initial_delay: secs(seconds(
            ".initialDelaySeconds",
            probe.initial_delay_seconds,
            0,
            0,
        )?),
        period: secs(seconds(".periodSeconds", probe.period_seconds, 10, 1)?),
        timeout: secs(seconds(".timeoutSeconds", probe.timeout_seconds, 1, 1)?),
        success_threshold,
        failure_threshold: seconds(".failureThreshold", probe.failure_threshold, 3, 1)?,
    })
}

/// Where an `exec` probe runs: the pod's namespace, hostname and resolv.conf.
pub struct ExecIn<'a> {
    pub netns: &'a netns::NetNs,
    pub hostname: &'a str,
    pub resolv_conf: Option<&'a std::path::Path>,
}

impl Probe {
    /// One run against a pod at `pod_ip`: `Ok` with what was seen, or `Err` saying why it failed.
    pub fn run(&self, pod_ip: IpAddr, exec: &ExecIn) -> Result<String, String> {
        match &self.action {
            Action::Tcp { host, port } => {
                let addr = target(host.as_deref(), pod_ip, *port)?;
                TcpStream::connect_timeout(&addr, self.timeout)
                    .map(|_| format!("connected to {addr}"))
                    .map_err(|e| format!("dial tcp {addr}: {e}"))
            }
            Action::Http {
                host,
                port,
                path,
                headers,
            } => {
                let addr = target(host.as_deref(), pod_ip, *port)?;
                let code = http_get(addr, path, headers, self.timeout)
                    .map_err(|e| format!("Get \"http://{addr}{path}\": {e}"))?;
                if (200..400).contains(&code) {
                    Ok(format!("HTTP {code}"))
                } else {
                    Err(format!("HTTP probe failed with statuscode: {code}"))
                }
            }
            Action::Exec { command } => run_exec(command, exec, self.timeout),
        }
    }
}

fn target(host: Option<&str>, pod_ip: IpAddr, port: u16) -> Result<SocketAddr, String> {
    let ip = match host {
        None => pod_ip,
        Some(h) => h
            .parse()
            .map_err(|_| format!("host {h:?}: the lab's prober takes an IP address"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// The status code of `GET path` (the whole exchange within `timeout`).
fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| "context deadline exceeded".to_string())
    };
    s.set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !has("user-agent") {
        req += &format!("User-Agent: {USER_AGENT}\r\n");
    }
    if !has("accept") {
        req += "Accept: */*\r\n";
    }
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "Connection: close\r\n\r\n";
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        s.set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("EOF before a status line".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("malformed status line {:?}", line.lines().next()))
}

/// Runs `command` in the pod; success is exit status 0 within `timeout` (else it is killed).
fn run_exec(command: &[String], at: &ExecIn, timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    crate::infra::enter(&mut cmd, at.netns, at.hostname, true, at.resolv_conf);
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", command[0]))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => {
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string()
                    + String::from_utf8_lossy(&out.stderr).trim();
                return if status.success() {
                    Ok(text)
                } else {
                    Err(format!(
                        "command {:?} exited with {}: {text}",
                        command.join(" "),
                        status.code().unwrap_or(-1)
                    ))
                };
            }
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "command {:?} timed out after {}s",
                    command.join(" "),
                    timeout.as_secs()
                ));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(probe: serde_json::Value) -> (Container, ApiProbe) {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "web", "ports": [{"name": "http", "containerPort": 8080}]
        }))
        .unwrap();
        (c, serde_json::from_value(probe).unwrap())
    }

    fn parsed(field: &str, probe: serde_json::Value) -> Result<Probe, ModelError> {
        let (c, p) = container(probe);
        parse("Pod default/web", 0, &c, field, &p)
    }

    #[test]
    fn defaults_and_named_ports_are_the_apis() {
        let p = parsed(
            "readinessProbe",
            serde_json::json!({"httpGet": {"port": "http"}}),
        )
        .unwrap();
        assert_eq!(
            p.action,
            Action::Http {
                host: None,
                port: 8080,
                path: "/".into(),
                headers: vec![]
            }
        );
        assert_eq!(p.period, Duration::from_secs(10));
        assert_eq!(p.timeout, Duration::from_secs(1));
        assert_eq!((p.success_threshold, p.failure_threshold), (1, 3));
        let t = parsed(
            "livenessProbe",
            serde_json::json!({"tcpSocket": {"port": 81}, "periodSeconds": 2, "initialDelaySeconds": 5}),
        )
        .unwrap();
        assert_eq!(
            t.action,
            Action::Tcp {
                host: None,
                port: 81
            }
        );
        assert_eq!(t.initial_delay, Duration::from_secs(5));
    }

    #[test]
    fn bad_probes_are_refused_naming_the_field() {
        let cases = [
            (
                serde_json::json!({}),
                "spec.containers[0].readinessProbe",
                "handler",
            ),
            (
                serde_json::json!({"tcpSocket": {"port": 80}, "exec": {"command": ["true"]}}),
                "spec.containers[0].readinessProbe",
                "more than 1",
            ),
            (
                serde_json::json!({"httpGet": {"port": "metrics"}}),
                "spec.containers[0].readinessProbe.httpGet.port",
                "\"metrics\"",
            ),
            (
                serde_json::json!({"tcpSocket": {"port": 0}}),
                "spec.containers[0].readinessProbe.tcpSocket.port",
                "between 1 and 65535",
            ),
            (
                serde_json::json!({"exec": {"command": []}}),
                "spec.containers[0].readinessProbe.exec.command",
                "must name",
            ),
            (
                serde_json::json!({"tcpSocket": {"port": 80}, "periodSeconds": 0}),
                "spec.containers[0].readinessProbe.periodSeconds",
                "at least 1",
            ),
        ];
        for (probe, field, says) in cases {
            let e = parsed("readinessProbe", probe.clone()).unwrap_err();
            assert_eq!(e.field, field, "{probe}");
            assert!(e.message.contains(says), "{probe}: {e}");
            assert_eq!(e.object, "Pod default/web");
        }
        let e = parsed(
            "livenessProbe",
            serde_json::json!({"tcpSocket": {"port": 80}, "successThreshold": 2}),
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].livenessProbe.successThreshold");
    }

    #[test]
    fn http_probes_read_the_status_line_and_tcp_probes_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for code in [200, 302, 500] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                write!(s, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").unwrap();
            }
            seen
        });
        let ns = netns::NetNs::current().unwrap();
        let at = ExecIn {
            netns: &ns,
            hostname: "web",
            resolv_conf: None,
        };
        let probe = |action| Probe {
            action,
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            success_threshold: 1,
            failure_threshold: 1,
        };
        let http = probe(Action::Http {
            host: None,
            port,
            path: "/healthz".into(),
            headers: vec![("X-Probe".into(), "yes".into())],
        });
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(http.run(lo, &at).unwrap(), "HTTP 200");
        assert_eq!(http.run(lo, &at).unwrap(), "HTTP 302");
        assert!(http.run(lo, &at).unwrap_err().contains("statuscode: 500"));
        let seen = server.join().unwrap();
        assert!(
            seen[0].starts_with("GET /healthz HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("User-Agent: kube-probe/"));
        assert!(seen[0].contains("X-Probe: yes"));
        // Nothing listens any more: both kinds fail, saying where they dialled.
        let tcp = probe(Action::Tcp { host: None, port });
        assert!(tcp.run(lo, &at).unwrap_err().contains("127.0.0.1"));
        assert!(http.run(lo, &at).is_err());
    }
}
