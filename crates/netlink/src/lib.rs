//! A small rtnetlink client: one connection per namespace, one request per kernel change.
//!
//! Each helper is a single netlink round trip (no `ip` processes, no sysfs), which keeps a CNI ADD
//! to a handful of syscalls. Connections opened for another namespace stay bound to it, so the
//! plugin configures the host and the pod side without moving its thread back and forth.

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};
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

impl NlError {
    fn new(op: impl Into<String>, e: rtnetlink::Error) -> NlError {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
            _ => None,
        };
        let detail = match errno {
            Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
            None => e.to_string(),
        };
        NlError {
            op: op.into(),
            errno,
            detail,
        }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == Some(errno)
    }
}

pub type Result<T> = std::result::Result<T, NlError>;

/// A request's outcome, where the listed errnos mean "nothing to do" (already there on add,
/// already gone on delete or lookup): `Ok(None)` for those, `Ok(Some(value))` on success.
fn tolerate<T>(
    r: std::result::Result<T, rtnetlink::Error>,
    op: impl FnOnce() -> String,
    fine: &[i32],
) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let e = NlError::new(op(), e);
            if fine.iter().any(|&n| e.is(n)) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// One rtnetlink connection, bound to the namespace it was opened in.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
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
            protocol: None,
            table: None,
            priority: None,
            mtu: None,
            adv_mss: None,
        }
    }
}

impl Netlink {
    /// Opens a connection in the calling thread's namespace; needs a tokio runtime.
    pub fn connect() -> std::io::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// Opens a connection inside `ns`; the thread returns to its own namespace at once.
    pub fn connect_in(ns: &netns::NetNs) -> std::io::Result<Netlink> {
        let (conn, handle, _) = ns.run(rtnetlink::new_connection)??;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The link called `name`, or `None` if there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut req = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        tolerate(
            req.try_next().await,
            || format!("looking up link {name}"),
            &[ENODEV],
        )
        .map(Option::flatten)
    }

    pub async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::new("listing links", e))
    }

    /// Creates a bridge (up) unless one of that name exists; returns it either way. A concurrent
    /// creator winning the race is fine.
    pub async fn ensure_bridge(&self, name: &str, mtu: Option<u32>) -> Result<(LinkMessage, bool)> {
        if let Some(link) = self.link_by_name(name).await? {
            return Ok((link, false));
        }
        let mut b = LinkBridge::new(name);
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        let added = self.handle.link().add(b.build()).execute().await;
        let created = tolerate(added, || format!("creating bridge {name}"), &[EEXIST])?.is_some();
        let link = self.link_by_name(name).await?.ok_or_else(|| NlError {
            op: format!("creating bridge {name}"),
            errno: None,
            detail: "bridge vanished right after creation".into(),
        })?;
        Ok((link, created))
    }

    /// Creates a veth pair in one request; the peer may be born in another namespace.
    pub async fn create_veth(&self, host: &VethEnd, peer: &VethEnd) -> Result<()> {
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
            b
        };
        let peer_msg = end(peer).build();
        let mut msg = LinkVeth::new(&host.name, &peer.name).build();
        let host_msg = end(host).build();
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
        self.handle.link().add(msg).execute().await.map_err(|e| {
            NlError::new(
                format!("creating veth pair {} / {}", host.name, peer.name),
                e,
            )
        })
    }

    /// Applies a change to an existing link (`ip link set`).
    async fn change(&self, msg: LinkMessage, op: impl FnOnce() -> String) -> Result<()> {
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| NlError::new(op(), e))
    }

    /// Sets the interface alias (the kernel ignores it at creation, so it is its own request).
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .alias(alias.to_string())
            .build();
        self.change(msg, || format!("setting alias of link {index}"))
            .await
    }

    /// Takes a link out of service in one request: down, renamed (freeing its name at once) and
    /// re-tagged, ahead of a slow unregister.
    pub async fn detach(&self, index: u32, new_name: &str, alias: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .down()
            .name(new_name.to_string())
            .alias(alias.to_string())
            .build();
        self.change(msg, || format!("detaching link {index}")).await
    }

    pub async fn set_up(&self, index: u32, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.change(msg, || format!("bringing {name} up")).await
    }

    pub async fn set_promisc(&self, index: u32, name: &str, on: bool) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).promiscuous(on).build();
        self.change(msg, || format!("setting promisc on {name}"))
            .await
    }

    /// Bridge port flags of an enslaved link: hairpin (traffic may leave by the port it came in)
    /// and isolation (isolated ports only talk to non-isolated ones).
    pub async fn set_bridge_port(
        &self,
        index: u32,
        name: &str,
        hairpin: bool,
        isolated: bool,
    ) -> Result<()> {
        let msg = LinkBridgePort::new(index)
            .hairpin(hairpin)
            .isolated(isolated)
            .build();
        self.change(msg, || format!("setting bridge port flags on {name}"))
            .await
    }

    /// Deletes a link; one already gone is not an error.
    pub async fn delete_link(&self, index: u32, name: &str) -> Result<()> {
        let deleted = self.handle.link().del(index).execute().await;
        tolerate(deleted, || format!("deleting link {name}"), &[ENODEV]).map(drop)
    }

    /// Adds an address; `nodad` skips IPv6 duplicate address detection so the address works at once.
    /// An address already present is not an error.
    pub async fn add_address(&self, index: u32, addr: IpNet, nodad: bool) -> Result<()> {
        let mut req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        if nodad && addr.addr().is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        tolerate(
            req.execute().await,
            || format!("adding address {addr}"),
            &[EEXIST],
        )
        .map(drop)
    }

    pub async fn delete_address(&self, index: u32, addr: IpNet) -> Result<()> {
        let mut req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len());
        let msg = std::mem::take(req.message_mut());
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| NlError::new(format!("deleting address {addr}"), e))
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::new("listing addresses", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds a route; one already present is not an error.
    pub async fn add_route(&self, r: &RouteSpec) -> Result<()> {
        let added = self.handle.route().add(route_message(r)).execute().await;
        tolerate(added, || format!("adding route {}", describe(r)), &[EEXIST]).map(drop)
    }

    /// Routes of one family in the main table, as (dst, gateway, output interface).
    pub async fn routes(&self, v4: bool) -> Result<Vec<(IpNet, Option<IpAddr>, Option<u32>)>> {
        let filter = if v4 {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        };
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::new("listing routes", e))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let mut dst = None;
                let mut gw = None;
                let mut oif = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(d) => dst = route_addr(d),
                        RouteAttribute::Gateway(g) => gw = route_addr(g),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
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
                Some((net, gw, oif))
            })
            .collect())
    }
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
