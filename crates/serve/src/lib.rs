//! `flatnet serve`: a workload that needs nothing installed. Every answer names the pod, its node
//! and the client address the server saw, so a lab user (or a test) can tell at a glance which
//! backend answered and whether the source address survived the path (no NAT between pods,
//! the node's address after masquerade).
//!
//! - HTTP on `--http` (default 8080): any GET gets `pod=<name> node=<node> client=<ip:port>\n`
//!   (with ` forwarded-for=<X-Forwarded-For>` before the newline when a proxy sent one); a
//!   WebSocket upgrade (RFC 6455) is accepted and every message echoed;
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

/// The GUID RFC 6455 appends to a client's key.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
fn websocket_accept(key: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{WEBSOCKET_GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn http(conn: TcpStream, id: &Identity) -> std::io::Result<()> {
    let peer = conn.peer_addr()?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    let (mut forwarded_for, mut upgrade, mut key) = (None, false, None);
    // Read the request head; the body (if any) is ignored.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim().to_string();
            match name.trim().to_ascii_lowercase().as_str() {
                "x-forwarded-for" => forwarded_for = Some(value),
                "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
                "sec-websocket-key" => key = Some(value),
                _ => {}
            }
        }
    }
    let mut w = conn;
    if let (true, Some(key)) = (upgrade, key) {
        write!(
            w,
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
            websocket_accept(&key)
        )?;
        return websocket_echo(&mut reader, &mut w);
    }
    let mut body = id.line(peer);
    if let Some(f) = forwarded_for {
        body.insert_str(body.len() - 1, &format!(" forwarded-for={f}"));
    }
    write!(
        w,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Echoes WebSocket frames (unmasked, as a server sends them; a ping gets its pong) until the
/// client's close frame, which is echoed too.
fn websocket_echo(r: &mut impl Read, w: &mut impl Write) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        r.read_exact(&mut head)?;
        let opcode = head[0] & 0x0f;
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            len = u64::from_be_bytes(b);
        }
        if len > 1 << 20 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "WebSocket frame over 1 MiB",
            ));
        }
        let mut mask = [0u8; 4];
        if head[1] & 0x80 != 0 {
            r.read_exact(&mut mask)?;
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload)?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        let first = if opcode == 9 {
            (head[0] & 0xf0) | 10
        } else {
            head[0]
        };
        let mut out = vec![first];
        match len {
            0..=125 => out.push(len as u8),
            126..=0xffff => {
                out.push(126);
                out.extend((len as u16).to_be_bytes());
            }
            _ => {
                out.push(127);
                out.extend(len.to_be_bytes());
            }
        }
        out.extend(payload);
        w.write_all(&out)?;
        if opcode == 8 {
            return Ok(());
        }
    }
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
    fn websocket_handshake_and_echo_follow_rfc_6455() {
        // The RFC's own example key and accept value (section 1.3).
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let id = Arc::new(Identity {
            pod: "p".into(),
            node: "n".into(),
        });
        let h = TcpListener::bind("127.0.0.1:0").unwrap();
        let hp = h.local_addr().unwrap();
        std::thread::spawn(move || accept_loop(h, id, http));
        let mut c = TcpStream::connect(hp).unwrap();
        c.write_all(b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n").unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            r.read_line(&mut head).unwrap();
        }
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{head}"
        );
        // A masked text frame "hi" (RFC 6455 5.7's mask), then a ping.
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x81, 0x82];
        frame.extend(mask);
        frame.extend(b"hi".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame.extend([0x89, 0x80, 0, 0, 0, 0]);
        c.write_all(&frame).unwrap();
        let mut echo = [0u8; 6];
        r.read_exact(&mut echo).unwrap();
        assert_eq!(echo, [0x81, 2, b'h', b'i', 0x8a, 0]);
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
