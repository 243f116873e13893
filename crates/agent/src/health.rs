//! `healthCheckNodePort` answers for `externalTrafficPolicy: Local` Services: an external load
//! balancer asks each node over HTTP and sends traffic only to nodes answering 200 (this node
//! has local endpoints) rather than 503 (it has none), as kube-proxy's health server does.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Local endpoint counts by port; -1 once the port is no longer a health check (503 from then).
#[derive(Default)]
pub struct HealthChecks {
    ports: BTreeMap<u16, Arc<AtomicI64>>,
}

fn serve(listener: TcpListener, count: Arc<AtomicI64>) {
    for mut conn in listener.incoming().flatten() {
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let n = count.load(Ordering::Relaxed);
        let (status, body) = if n > 0 {
            (
                "200 OK",
                format!("{{\"localEndpoints\": {n}, \"serviceProxyHealthy\": true}}\n"),
            )
        } else {
            (
                "503 Service Unavailable",
                format!(
                    "{{\"localEndpoints\": {}, \"serviceProxyHealthy\": true}}\n",
                    n.max(0)
                ),
            )
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

impl HealthChecks {
    /// Makes the served ports and counts match `want` (port → local endpoints); returns ports
    /// that could not be bound.
    pub fn update(
        &mut self,
        want: &BTreeMap<u16, usize>,
        bind: impl Fn(u16) -> SocketAddr,
    ) -> Vec<(u16, String)> {
        let mut failed = Vec::new();
        for (port, count) in &self.ports {
            if !want.contains_key(port) {
                count.store(-1, Ordering::Relaxed);
            }
        }
        for (port, n) in want {
            if let Some(c) = self.ports.get(port) {
                c.store(*n as i64, Ordering::Relaxed);
                continue;
            }
            match TcpListener::bind(bind(*port)) {
                Ok(l) => {
                    let c = Arc::new(AtomicI64::new(*n as i64));
                    let c2 = c.clone();
                    std::thread::spawn(move || serve(l, c2));
                    self.ports.insert(*port, c);
                }
                Err(e) => failed.push((*port, e.to_string())),
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    fn get(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_200_with_local_endpoints_and_503_without() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut h = HealthChecks::default();
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        assert!(h.update(&BTreeMap::from([(port, 2)]), at).is_empty());
        assert!(get(port).starts_with("HTTP/1.1 200"), "{}", get(port));
        assert!(get(port).contains("\"localEndpoints\": 2"));
        h.update(&BTreeMap::from([(port, 0)]), at);
        assert!(get(port).starts_with("HTTP/1.1 503"));
        h.update(&BTreeMap::new(), at);
        assert!(get(port).starts_with("HTTP/1.1 503"));
    }
}
