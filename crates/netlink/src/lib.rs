//! A small synchronous rtnetlink client: messages from netlink-packet-route (built with
//! rtnetlink's builders), sent over a blocking netlink-sys socket.
//!
//! Why not rtnetlink's async `Handle`: a CNI call is a short, ordered script of kernel changes in
//! a process that lives for milliseconds. [`Netlink::apply`] sends a whole batch of changes in one
//! datagram (the kernel runs them in order and acks each), so the plugin pays one syscall pair per
//! namespace instead of a round trip per change through an async runtime, and needs no runtime.
//! A connection opened for another namespace stays bound to it, so the host and the pod side are
//! configured without moving the thread back and forth.

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoVeth, LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use rtnetlink::{
    AddressMessageBuilder, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    LinkVxlan, RouteMessageBuilder,
};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::net::IpAddr;

pub use netlink_packet_route;

/// A failed kernel operation: what was attempted and the errno the kernel gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlError {
    pub op: String,
    pub errno: Option<i32>,
    pub detail: String,
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.detail)
    }
}

impl std::error::Error for NlError {}

pub const EEXIST: i32 = 17;
pub const ENODEV: i32 = 19;
const ESRCH: i32 = 3;
const ENOENT: i32 = 2;
const EADDRNOTAVAIL: i32 = 99;

impl NlError {
    fn errno(op: String, errno: i32) -> NlError {
        NlError {
            op,
            errno: Some(errno),
            detail: std::io::Error::from_raw_os_error(errno).to_string(),
        }
    }

    fn io(op: impl Into<String>, e: std::io::Error) -> NlError {
        NlError {
            op: op.into(),
            errno: e.raw_os_error(),
            detail: e.to_string(),
        }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == Some(errno)
    }
}

pub type Result<T> = std::result::Result<T, NlError>;

/// One request to the kernel: the message, its netlink flags, what it does (for error messages)
/// and the errnos that mean "nothing to do" (already there on add, already gone on delete).
#[derive(Debug, Clone)]
pub struct Request {
    msg: RouteNetlinkMessage,
    flags: u16,
    op: String,
    fine: &'static [i32],
}

const CHANGE: u16 = NLM_F_REQUEST | NLM_F_ACK;
const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
const REPLACE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;

impl Request {
    /// Whether this request removes something (deletions go first in a reconcile batch).
    pub fn is_delete(&self) -> bool {
        matches!(
            self.msg,
            RouteNetlinkMessage::DelLink(_)
                | RouteNetlinkMessage::DelAddress(_)
                | RouteNetlinkMessage::DelRoute(_)
                | RouteNetlinkMessage::DelNeighbour(_)
        )
    }

    fn new(msg: RouteNetlinkMessage, flags: u16, op: String, fine: &'static [i32]) -> Request {
        Request {
            msg,
            flags,
            op,
            fine,
        }
    }

    fn link_change(msg: LinkMessage, op: String) -> Request {
        Request::new(RouteNetlinkMessage::NewLink(msg), CHANGE, op, &[])
    }

    /// A veth pair in one request; the peer may be born in another namespace, enslaved and up.
    fn create_veth(host: &VethEnd, peer: &VethEnd) -> Request {
        let end = |e: &VethEnd| {
            let mut b = LinkMessageBuilder::<LinkUnspec>::new()
                .name(e.name.clone())
                .address(e.mac.to_vec());
            if let Some(mtu) = e.mtu {
                b = b.mtu(mtu);
            }
            if let Some(fd) = e.netns_fd {
                b = b.setns_by_fd(fd);
            }
            if let Some(m) = e.master {
                b = b.controller(m);
            }
            if e.up {
                b = b.up();
            }
            b.build()
        };
        let peer_msg = end(peer);
        let host_msg = end(host);
        let mut msg = LinkVeth::new(&host.name, &peer.name).build();
        msg.header = host_msg.header;
        msg.attributes
            .retain(|a| !matches!(a, LinkAttribute::IfName(_)));
        msg.attributes.extend(host_msg.attributes);
        for a in msg.attributes.iter_mut() {
            if let LinkAttribute::LinkInfo(infos) = a {
                for i in infos.iter_mut() {
                    if let netlink_packet_route::link::LinkInfo::Data(d) = i {
                        *d = InfoData::Veth(InfoVeth::Peer(peer_msg.clone()));
                    }
                }
            }
        }
        Request::new(
            RouteNetlinkMessage::NewLink(msg),
            CREATE,
            format!("creating veth pair {} / {}", host.name, peer.name),
            &[],
        )
    }

    /// A bridge; one that already exists is fine (a concurrent ADD may have made it).
    pub fn create_bridge(name: &str, mtu: Option<u32>) -> Request {
        let mut b = LinkBridge::new(name);
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        Request::new(
            RouteNetlinkMessage::NewLink(b.build()),
            CREATE,
            format!("creating bridge {name}"),
            &[EEXIST],
        )
    }

    /// Sets the interface alias (the kernel ignores it at creation, so it is its own request).
    pub fn set_alias(index: u32, alias: &str) -> Request {
        let msg = LinkUnspec::new_with_index(index)
            .alias(alias.to_string())
            .build();
        Request::link_change(msg, format!("setting alias of link {index}"))
    }

    /// Takes a link out of service in one request: down, renamed (freeing its name at once) and
    /// re-tagged, ahead of a slow unregister.
    pub fn detach(index: u32, new_name: &str, alias: &str) -> Request {
        let msg = LinkUnspec::new_with_index(index)
            .down()
            .name(new_name.to_string())
            .alias(alias.to_string())
            .build();
        Request::link_change(msg, format!("detaching link {index}"))
    }

    pub fn set_up(index: u32, name: &str) -> Request {
        let msg = LinkUnspec::new_with_index(index).up().build();
        Request::link_change(msg, format!("bringing {name} up"))
    }

    pub fn set_promisc(index: u32, name: &str, on: bool) -> Request {
        let msg = LinkUnspec::new_with_index(index).promiscuous(on).build();
        Request::link_change(msg, format!("setting promisc on {name}"))
    }

    /// Bridge port flags of an enslaved link: hairpin (traffic may leave by the port it came in)
    /// and isolation (isolated ports only talk to non-isolated ones).
    pub fn set_bridge_port(index: u32, name: &str, hairpin: bool, isolated: bool) -> Request {
        let msg = LinkBridgePort::new(index)
            .hairpin(hairpin)
            .isolated(isolated)
            .build();
        Request::link_change(msg, format!("setting bridge port flags on {name}"))
    }

    /// Deletes a link; one already gone is not an error.
    pub fn delete_link(index: u32, name: &str) -> Request {
        let msg = LinkUnspec::new_with_index(index).build();
        Request::new(
            RouteNetlinkMessage::DelLink(msg),
            CHANGE,
            format!("deleting link {name}"),
            &[ENODEV],
        )
    }

    fn address_message(index: u32, addr: IpNet) -> AddressMessage {
        match addr.addr() {
            IpAddr::V4(a) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
                .index(index)
                .address(a, addr.prefix_len())
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                .index(index)
                .address(a, addr.prefix_len())
                .build(),
        }
    }

    /// Adds an address; `nodad` skips IPv6 duplicate address detection so the address works at
    /// once. An address already present is not an error.
    pub fn add_address(index: u32, addr: IpNet, nodad: bool) -> Request {
        let mut msg = Request::address_message(index, addr);
        if nodad && addr.addr().is_ipv6() {
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        Request::new(
            RouteNetlinkMessage::NewAddress(msg),
            CREATE,
            format!("adding address {addr}"),
            &[EEXIST],
        )
    }

    /// Removes an address; one already gone is not an error.
    pub fn delete_address(index: u32, addr: IpNet) -> Request {
        Request::new(
            RouteNetlinkMessage::DelAddress(Request::address_message(index, addr)),
            CHANGE,
            format!("deleting address {addr}"),
            &[EADDRNOTAVAIL],
        )
    }

    fn route(
        make: fn(RouteMessage) -> RouteNetlinkMessage,
        r: &RouteSpec,
        flags: u16,
        verb: &str,
        fine: &'static [i32],
    ) -> Request {
        Request::new(
            make(route_message(r)),
            flags,
            format!("{verb} route {}", describe(r)),
            fine,
        )
    }

    /// Adds a route; one already present is not an error.
    pub fn add_route(r: &RouteSpec) -> Request {
        Request::route(
            RouteNetlinkMessage::NewRoute,
            r,
            CREATE,
            "adding",
            &[EEXIST],
        )
    }

    /// Adds or replaces a route (same destination, table and metric).
    pub fn replace_route(r: &RouteSpec) -> Request {
        Request::route(RouteNetlinkMessage::NewRoute, r, REPLACE, "setting", &[])
    }

    /// A VXLAN device that does not learn: every remote is programmed (FDB + neighbour).
    pub fn create_vxlan(v: &VxlanSpec) -> Request {
        let msg = LinkVxlan::new(&v.name, v.vni)
            .local(v.local)
            .dev(v.dev)
            .port(v.port)
            .learning(false)
            .mtu(v.mtu)
            .address(v.mac.to_vec())
            .up()
            .build();
        Request::new(
            RouteNetlinkMessage::NewLink(msg),
            CREATE,
            format!("creating VXLAN device {}", v.name),
            &[],
        )
    }

    fn neighbour(
        family: AddressFamily,
        dev: u32,
        attrs: Vec<NeighbourAttribute>,
    ) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = dev;
        m.header.state = NeighbourState::Permanent;
        m.header.kind = RouteType::Unspec;
        m.attributes = attrs;
        m
    }

    fn neighbour_ip(ip: IpAddr) -> (AddressFamily, NeighbourAttribute) {
        match ip {
            IpAddr::V4(v4) => (
                AddressFamily::Inet,
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)),
            ),
            IpAddr::V6(v6) => (
                AddressFamily::Inet6,
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)),
            ),
        }
    }

    /// A permanent neighbour entry: `ip` is at `mac` on `dev`.
    pub fn replace_neighbour(dev: u32, ip: IpAddr, mac: [u8; 6]) -> Request {
        let (family, dst) = Request::neighbour_ip(ip);
        let m = Request::neighbour(
            family,
            dev,
            vec![dst, NeighbourAttribute::LinkLayerAddress(mac.to_vec())],
        );
        Request::new(
            RouteNetlinkMessage::NewNeighbour(m),
            REPLACE,
            format!("setting neighbour {ip}"),
            &[],
        )
    }

    pub fn delete_neighbour(dev: u32, ip: IpAddr) -> Request {
        let (family, dst) = Request::neighbour_ip(ip);
        let m = Request::neighbour(family, dev, vec![dst]);
        Request::new(
            RouteNetlinkMessage::DelNeighbour(m),
            CHANGE,
            format!("deleting neighbour {ip}"),
            &[ENOENT],
        )
    }

    /// A VXLAN device's forwarding entry (`bridge fdb … self permanent`).
    fn fdb_message(dev: u32, mac: [u8; 6], dst: IpAddr) -> NeighbourMessage {
        let (_, dst_attr) = Request::neighbour_ip(dst);
        let mut m = Request::neighbour(
            AddressFamily::Bridge,
            dev,
            vec![NeighbourAttribute::LinkLayerAddress(mac.to_vec()), dst_attr],
        );
        m.header.flags = NeighbourFlags::Own;
        m
    }

    /// A forwarding entry of a VXLAN device: frames for `mac` are sent to the VTEP at `dst`.
    pub fn replace_fdb(dev: u32, mac: [u8; 6], dst: IpAddr) -> Request {
        Request::new(
            RouteNetlinkMessage::NewNeighbour(Request::fdb_message(dev, mac, dst)),
            REPLACE,
            format!("setting FDB entry {} -> {dst}", format_mac(mac)),
            &[],
        )
    }

    pub fn delete_fdb(dev: u32, mac: [u8; 6], dst: IpAddr) -> Request {
        Request::new(
            RouteNetlinkMessage::DelNeighbour(Request::fdb_message(dev, mac, dst)),
            CHANGE,
            format!("deleting FDB entry {}", format_mac(mac)),
            &[ENOENT],
        )
    }

    /// Deletes a route; one already gone is not an error.
    pub fn delete_route(r: &RouteSpec) -> Request {
        Request::route(
            RouteNetlinkMessage::DelRoute,
            r,
            CHANGE,
            "deleting",
            &[ESRCH],
        )
    }
}

/// One rtnetlink connection, bound to the namespace it was opened in.
pub struct Netlink {
    socket: Socket,
    seq: Cell<u32>,
    buf: RefCell<Vec<u8>>,
}

/// Everything needed to create one end of a veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethEnd {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: Option<u32>,
    /// Namespace fd to create this end in (the pod side); `None` keeps it here.
    pub netns_fd: Option<i32>,
    /// Bridge to enslave this end to at creation.
    pub master: Option<u32>,
    pub up: bool,
}

/// A route as flatnet programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub dev: u32,
    pub scope_link: bool,
    /// The gateway is on the link even though no address says so (VXLAN: the remote's VTEP).
    pub onlink: bool,
    pub protocol: Option<u8>,
    pub table: Option<u32>,
    pub priority: Option<u32>,
    pub mtu: Option<u32>,
    pub adv_mss: Option<u32>,
}

impl RouteSpec {
    pub fn new(dst: IpNet, gw: Option<IpAddr>, dev: u32) -> RouteSpec {
        RouteSpec {
            dst,
            gw,
            dev,
            scope_link: false,
            onlink: false,
            protocol: None,
            table: None,
            priority: None,
            mtu: None,
            adv_mss: None,
        }
    }
}

/// A VXLAN device as flatnet programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// The underlay address packets leave from (the node IP).
    pub local: std::net::Ipv4Addr,
    /// The underlay device.
    pub dev: u32,
    pub port: u16,
    pub mtu: u32,
    pub mac: [u8; 6],
}

/// A neighbour or FDB entry as read back: the IP (neighbour) or VTEP (FDB) and the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
    pub permanent: bool,
}

/// Netlink messages are padded to 4 bytes.
fn aligned(len: usize) -> usize {
    (len + 3) & !3
}

type Replies = Result<Option<Vec<RouteNetlinkMessage>>>;

impl Netlink {
    /// Opens a connection in the calling thread's namespace.
    pub fn connect() -> std::io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Error acks without a copy of the request: less to copy back.
        let _ = socket.set_cap_ack(true);
        Ok(Netlink {
            socket,
            seq: Cell::new(0),
            buf: RefCell::new(Vec::new()),
        })
    }

    /// Opens a connection inside `ns`; the thread returns to its own namespace at once.
    pub fn connect_in(ns: &netns::NetNs) -> std::io::Result<Netlink> {
        ns.run(Netlink::connect)?
    }

    /// Sends every request in one datagram and collects each one's replies: `Ok(Some(msgs))` on
    /// success, `Ok(None)` for a tolerated errno, `Err` otherwise. The kernel handles the
    /// requests in order and goes on after a failed one.
    fn exchange(&self, reqs: Vec<Request>) -> Vec<Replies> {
        let n = reqs.len();
        let base = self.seq.get().wrapping_add(1);
        self.seq.set(base.wrapping_add(n as u32));
        let mut out: Vec<Replies> = (0..n).map(|_| Ok(Some(Vec::new()))).collect();
        let mut wire = Vec::new();
        let mut meta = Vec::with_capacity(n);
        for (i, r) in reqs.into_iter().enumerate() {
            let mut m = NetlinkMessage::from(r.msg);
            m.header.flags = r.flags;
            m.header.sequence_number = base.wrapping_add(i as u32);
            m.finalize();
            let start = wire.len();
            wire.resize(start + aligned(m.buffer_len()), 0);
            m.serialize(&mut wire[start..start + m.buffer_len()]);
            meta.push((r.op, r.fine));
        }
        if let Err(e) = self.socket.send(&wire, 0) {
            let e = NlError::io("sending to the kernel", e);
            return meta
                .into_iter()
                .map(|(op, _)| Err(NlError { op, ..e.clone() }))
                .collect();
        }
        let mut open = n;
        let mut buf = self.buf.borrow_mut();
        let mut finished = vec![false; n];
        while open > 0 {
            buf.clear();
            buf.reserve(1 << 16);
            let got = match self.socket.recv(&mut *buf, 0) {
                Ok(got) => got,
                Err(e) => {
                    let e = NlError::io("reading from the kernel", e);
                    for (i, (op, _)) in meta.iter().enumerate() {
                        if !finished[i] {
                            out[i] = Err(NlError {
                                op: op.clone(),
                                ..e.clone()
                            });
                        }
                    }
                    return out;
                }
            };
            let mut off = 0;
            while off + 16 <= got {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
                if len < 16 || off + len > got {
                    break;
                }
                let parsed =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len]);
                off += aligned(len);
                let Ok(msg) = parsed else { continue };
                let i = msg.header.sequence_number.wrapping_sub(base) as usize;
                if i >= n || finished[i] {
                    continue;
                }
                let done = match msg.payload {
                    NetlinkPayload::InnerMessage(m) => {
                        if let Ok(Some(v)) = &mut out[i] {
                            v.push(m);
                        }
                        false
                    }
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            let errno = -code.get();
                            let (op, fine) = &meta[i];
                            out[i] = if fine.contains(&errno) {
                                Ok(None)
                            } else {
                                Err(NlError::errno(op.clone(), errno))
                            };
                        }
                        true
                    }
                    NetlinkPayload::Done(_) => true,
                    _ => false,
                };
                if done {
                    finished[i] = true;
                    open -= 1;
                }
            }
        }
        out
    }

    /// Applies changes in one batch, in order. Returns, per change, whether it changed anything
    /// (`false` where the kernel said it was already so), or the first failure.
    pub fn apply(&self, reqs: Vec<Request>) -> Result<Vec<bool>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        self.exchange(reqs)
            .into_iter()
            .map(|r| r.map(|m| m.is_some()))
            .collect()
    }

    /// Applies one change; `Ok(false)` where it was already so.
    pub fn run(&self, req: Request) -> Result<bool> {
        Ok(self.apply(vec![req])?[0])
    }

    fn query(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: String,
        fine: &'static [i32],
    ) -> Result<Option<Vec<RouteNetlinkMessage>>> {
        self.exchange(vec![Request::new(msg, flags, op, fine)])
            .pop()
            .expect("one reply per request")
    }

    /// A dump request: every reply `pick` keeps.
    fn dump<T>(
        &self,
        msg: RouteNetlinkMessage,
        what: &str,
        pick: impl FnMut(RouteNetlinkMessage) -> Option<T>,
    ) -> Result<Vec<T>> {
        let replies = self.query(
            msg,
            NLM_F_REQUEST | NLM_F_DUMP,
            format!("listing {what}"),
            &[],
        )?;
        Ok(replies.into_iter().flatten().filter_map(pick).collect())
    }

    /// The link called `name`, or `None` if there is none. (Without its counters, which are a
    /// good part of what the kernel would otherwise fill in.)
    pub fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        let msg = LinkUnspec::new_with_name(name)
            .append_extra_attribute(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]))
            .build();
        let replies = self.query(
            RouteNetlinkMessage::GetLink(msg),
            CHANGE,
            format!("looking up link {name}"),
            &[ENODEV],
        )?;
        Ok(replies.into_iter().flatten().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        }))
    }

    pub fn links(&self) -> Result<Vec<LinkMessage>> {
        self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "links",
            |m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            },
        )
    }

    /// Creates a veth pair and returns its local end as the kernel reports it (index, and the
    /// peer's index as IFLA_LINK). Kernels since 6.3 echo the new link with the ack; older ones
    /// are asked.
    pub fn create_veth(&self, host: &VethEnd, peer: &VethEnd) -> Result<LinkMessage> {
        let mut req = Request::create_veth(host, peer);
        req.flags |= NLM_F_ECHO;
        let op = req.op.clone();
        let replies = self
            .exchange(vec![req])
            .pop()
            .expect("one reply per request")?;
        let echoed = replies.into_iter().flatten().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) if l.name() == Some(host.name.as_str()) => Some(l),
            _ => None,
        });
        match echoed {
            Some(l) => Ok(l),
            None => self.link_by_name(&host.name)?.ok_or_else(|| NlError {
                op,
                errno: None,
                detail: "the new link vanished".into(),
            }),
        }
    }

    /// Creates a bridge (up) unless one of that name exists; returns it and whether it is new.
    pub fn ensure_bridge(&self, name: &str, mtu: Option<u32>) -> Result<(LinkMessage, bool)> {
        if let Some(link) = self.link_by_name(name)? {
            return Ok((link, false));
        }
        let created = self.run(Request::create_bridge(name, mtu))?;
        let link = self.link_by_name(name)?.ok_or_else(|| NlError {
            op: format!("creating bridge {name}"),
            errno: None,
            detail: "bridge vanished right after creation".into(),
        })?;
        Ok((link, created))
    }

    /// Every address in the namespace, with the index of its link.
    pub fn all_addresses(&self) -> Result<Vec<(u32, IpNet)>> {
        self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            "addresses",
            |m| match m {
                RouteNetlinkMessage::NewAddress(a) => a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, a.header.prefix_len)
                        .ok()
                        .map(|n| (a.header.index, n)),
                    _ => None,
                }),
                _ => None,
            },
        )
    }

    /// The addresses of link `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        Ok(self
            .all_addresses()?
            .into_iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, a)| a)
            .collect())
    }

    /// Routes of one family in the main table, read back as specs.
    pub fn routes(&self, v4: bool) -> Result<Vec<RouteSpec>> {
        let filter = if v4 {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        };
        self.dump(
            RouteNetlinkMessage::GetRoute(filter),
            "routes",
            |m| match m {
                RouteNetlinkMessage::NewRoute(m) => route_spec(&m, v4),
                _ => None,
            },
        )
    }

    /// Neighbour entries (`bridge_fdb` false) or FDB entries (true) of device `dev`.
    pub fn neighbours(&self, dev: u32, bridge_fdb: bool) -> Result<Vec<Neighbour>> {
        let mut m = NeighbourMessage::default();
        m.header.family = if bridge_fdb {
            AddressFamily::Bridge
        } else {
            AddressFamily::Unspec
        };
        self.dump(
            RouteNetlinkMessage::GetNeighbour(m),
            "neighbours",
            |m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == dev => {
                    let mut ip = None;
                    let mut mac = None;
                    for a in &n.attributes {
                        match a {
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                                ip = Some(IpAddr::V4(*v4))
                            }
                            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                                ip = Some(IpAddr::V6(*v6))
                            }
                            // Bridge-family (FDB) dumps carry the VTEP address unparsed.
                            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                                ip = match b.len() {
                                    4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                                    16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                                    _ => None,
                                }
                            }
                            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                                mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]])
                            }
                            _ => {}
                        }
                    }
                    Some(Neighbour {
                        ip: ip?,
                        mac: mac?,
                        permanent: n.header.state == NeighbourState::Permanent,
                    })
                }
                _ => None,
            },
        )
    }
}

/// A dumped route as a [`RouteSpec`]; routes of other tables than main are skipped.
fn route_spec(m: &RouteMessage, v4: bool) -> Option<RouteSpec> {
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    let mut table = u32::from(m.header.table);
    let mut priority = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => gw = route_addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => priority = Some(*p),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let unspecified: IpAddr = if v4 {
        [0u8; 4].into()
    } else {
        [0u16; 8].into()
    };
    let net = IpNet::new(
        dst.unwrap_or(unspecified),
        m.header.destination_prefix_length,
    )
    .ok()?;
    let mut spec = RouteSpec::new(net, gw, oif.unwrap_or(0));
    spec.scope_link = m.header.scope == RouteScope::Link;
    spec.onlink = m.header.flags.contains(RouteFlags::Onlink);
    spec.protocol = Some(u8::from(m.header.protocol));
    spec.priority = priority;
    Some(spec)
}

fn route_addr(a: &netlink_packet_route::route::RouteAddress) -> Option<IpAddr> {
    use netlink_packet_route::route::RouteAddress;
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn describe(r: &RouteSpec) -> String {
    match r.gw {
        Some(gw) => format!("{} via {gw}", r.dst),
        None => format!("{} dev #{}", r.dst, r.dev),
    }
}

fn route_message(r: &RouteSpec) -> RouteMessage {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .expect("family-consistent destination")
        .output_interface(r.dev);
    if let Some(gw) = r.gw {
        b = b.gateway(gw).expect("gateway family matches destination");
    }
    if r.scope_link {
        b = b.scope(RouteScope::Link);
    }
    if let Some(p) = r.protocol {
        b = b.protocol(RouteProtocol::from(p));
    }
    if let Some(t) = r.table {
        b = b.table_id(t);
    }
    if let Some(p) = r.priority {
        b = b.priority(p);
    }
    let mut msg = b.build();
    if r.onlink {
        msg.header.flags |= RouteFlags::Onlink;
    }
    if msg.header.address_family == AddressFamily::Unspec {
        msg.header.address_family = if r.dst.addr().is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
    }
    let mut metrics = Vec::new();
    if let Some(m) = r.mtu {
        metrics.push(RouteMetric::Mtu(m));
    }
    if let Some(m) = r.adv_mss {
        metrics.push(RouteMetric::Advmss(m));
    }
    if !metrics.is_empty() {
        msg.attributes.push(RouteAttribute::Metrics(metrics));
    }
    msg
}

/// Helpers to read a link message.
pub trait LinkInfo {
    fn name(&self) -> Option<&str>;
    fn mac(&self) -> Option<[u8; 6]>;
    fn master(&self) -> Option<u32>;
    fn alias(&self) -> Option<&str>;
    fn mtu(&self) -> Option<u32>;
    fn is_up(&self) -> bool;
    fn index(&self) -> u32;
    /// A veth's peer index (IFLA_LINK), in the peer's namespace.
    fn peer_index(&self) -> Option<u32>;
}

impl LinkInfo for LinkMessage {
    fn name(&self) -> Option<&str> {
        self.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        })
    }
    fn mac(&self) -> Option<[u8; 6]> {
        self.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(m) if m.len() == 6 => Some([m[0], m[1], m[2], m[3], m[4], m[5]]),
            _ => None,
        })
    }
    fn master(&self) -> Option<u32> {
        self.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(m) => Some(*m),
            _ => None,
        })
    }
    fn alias(&self) -> Option<&str> {
        self.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfAlias(n) => Some(n.as_str()),
            _ => None,
        })
    }
    fn mtu(&self) -> Option<u32> {
        self.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    }
    fn is_up(&self) -> bool {
        self.header.flags.contains(LinkFlags::Up)
    }
    fn index(&self) -> u32 {
        self.header.index
    }
    fn peer_index(&self) -> Option<u32> {
        self.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        })
    }
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    parts.try_into().ok()
}
