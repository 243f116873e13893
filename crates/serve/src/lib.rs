//! `flatnet serve`: a workload that needs nothing installed. Every answer names the pod, its node
//! and the client address the server saw, so a lab user (or a test) can tell at a glance which
//! backend answered and whether the source address survived the path (no NAT between pods,
//! the node's address after masquerade).
//!
//! - HTTP on `--http` (default 8080): any GET gets `pod=<name> node=<node> client=<ip:port>\n`;
//! - TCP on `--tcp` (default 9000): that line on connect, then every line sent is echoed;
//! - UDP on `--udp` (default 9000): each datagram is answered with that line and its payload.
//!
//! One thread per listener and per connection: lab traffic, not a benchmark target.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Identity {
    pub pod: String,
    pub node: String,
}

impl Identity {
    /// From `POD_NAME` / `NODE_NAME` (the lab sets them, as the downward API would), else the
    /// hostname.
    pub fn from_env() -> Identity {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Identity {
            pod: std::env::var("POD_NAME").unwrap_or_else(|_| host.clone()),
            node: std::env::var("NODE_NAME").unwrap_or(host),
        }
    }

    pub fn line(&self, client: SocketAddr) -> String {
        format!(
            "pod={} node={} client={}\n",
            self.pod,
            self.node,
            unmap(client)
        )
    }
}

/// IPv4 clients of a dual-stack socket show as `::ffff:a.b.c.d`; print them as IPv4.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
}

fn http(conn: TcpStream, id: &Identity) -> std::io::Result<()> {
    let peer = conn.peer_addr()?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    // Read the request head; the body (if any) is ignored.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let body = id.line(peer);
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn tcp_echo(mut conn: TcpStream, id: &Identity) -> std::io::Result<()> {
    let peer = conn.peer_addr()?;
    conn.write_all(id.line(peer).as_bytes())?;
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

fn accept_loop(
    l: TcpListener,
    id: Arc<Identity>,
    handler: fn(TcpStream, &Identity) -> std::io::Result<()>,
) {
    for conn in l.incoming().flatten() {
        let id = id.clone();
        std::thread::spawn(move || handler(conn, &id));
    }
}

/// Serves until killed.
pub fn run(http_port: u16, tcp_port: u16, udp_port: u16, id: Identity) -> std::io::Result<()> {
    let id = Arc::new(id);
    let h = TcpListener::bind(any(http_port))?;
    let t = TcpListener::bind(any(tcp_port))?;
    let u = UdpSocket::bind(any(udp_port))?;
    let (a, b) = (id.clone(), id.clone());
    std::thread::spawn(move || accept_loop(h, a, http));
    std::thread::spawn(move || accept_loop(t, b, tcp_echo));
    Err(udp_loop(&u, &id))
}

/// Answers each datagram with the identity line and the payload; returns why the socket failed.
fn udp_loop(u: &UdpSocket, id: &Identity) -> std::io::Error {
    let mut buf = [0u8; 65536];
    loop {
        match u.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let mut reply = id.line(peer).into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = u.send_to(&reply, peer);
            }
            Err(e) => return e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_pod_node_and_client() {
        let id = Identity {
            pod: "web-1".into(),
            node: "node-2".into(),
        };
        let l = id.line("[::ffff:10.244.1.5]:4242".parse().unwrap());
        assert_eq!(l, "pod=web-1 node=node-2 client=10.244.1.5:4242\n");
    }

    #[test]
    fn udp_echo_names_the_client() {
        let srv = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = srv.local_addr().unwrap();
        let id = Identity {
            pod: "p".into(),
            node: "n".into(),
        };
        std::thread::spawn(move || udp_loop(&srv, &id));
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        c.send_to(b"ping", addr).unwrap();
        let mut buf = [0u8; 256];
        let n = c.recv(&mut buf).unwrap();
        let got = String::from_utf8_lossy(&buf[..n]).to_string();
        assert_eq!(
            got,
            format!("pod=p node=n client={}\nping", c.local_addr().unwrap())
        );
    }

    #[test]
    fn http_and_tcp_echo_over_loopback() {
        let id = Arc::new(Identity {
            pod: "p".into(),
            node: "n".into(),
        });
        let h = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let (hp, tp) = (h.local_addr().unwrap(), t.local_addr().unwrap());
        let (a, b) = (id.clone(), id.clone());
        std::thread::spawn(move || accept_loop(h, a, http));
        std::thread::spawn(move || accept_loop(t, b, tcp_echo));
        let mut c = TcpStream::connect(hp).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(
            resp.ends_with(&format!(
                "pod=p node=n client={}\n",
                c.local_addr().unwrap()
            )),
            "{resp}"
        );
        let mut e = TcpStream::connect(tp).unwrap();
        let mut r = BufReader::new(e.try_clone().unwrap());
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        assert!(first.starts_with("pod=p node=n"), "{first}");
        e.write_all(b"ping\n").unwrap();
        let mut echo = String::new();
        r.read_line(&mut echo).unwrap();
        assert_eq!(echo, "ping\n");
    }
}

/// `flatnet serve`'s command line.
#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value_t = 8080)]
    pub http: u16,
    #[arg(long, default_value_t = 9000)]
    pub tcp: u16,
    #[arg(long, default_value_t = 9000)]
    pub udp: u16,
}

pub fn main(a: ServeArgs) -> std::process::ExitCode {
    match run(a.http, a.tcp, a.udp, Identity::from_env()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: serve: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
