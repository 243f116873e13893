//! The applier: makes table `ip flatnet-policy` hold a plan's elements, natively over netlink.
//! The table's fixed part is made once by `nft -f` ([`crate::plan::skeleton`]); after that
//! every change is elements only, sent as one transaction of deletions then additions.

use crate::plan::{skeleton, Allow, Entry, SETS, TABLE_NAME, VERSION};
use nft::netlink::{Batch, Conn, Data, Element, FAMILY_IPV4};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Where bridged frames are handed to the IPv4 hooks, in the calling thread's network namespace.
const BRIDGE_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Makes bridged frames between pods of this node cross the `forward` hook (what Flannel with
/// kube-router or Calico asks of a node): policies could not see them otherwise. The setting is
/// per network namespace; it only exists once `br_netfilter` is loaded.
pub fn ensure_bridge_filtering() -> Result<(), String> {
    match std::fs::read_to_string(BRIDGE_NF) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => std::fs::write(BRIDGE_NF, "1").map_err(|e| format!("{BRIDGE_NF}: {e}")),
        Err(_) => Err(format!(
            "{BRIDGE_NF} is missing: load br_netfilter (modprobe br_netfilter) so that policies see traffic between pods of one node"
        )),
    }
}

fn mark(id: u32) -> [u8; 4] {
    id.to_ne_bytes()
}

/// A `mark . ipv4_addr . inet_proto . inet_service` key. In a set of ranges the mark is in
/// network order: nft converts the looked-up `meta mark` to it there, so ranges compare as
/// numbers (and `nft list` prints them so).
fn addr_key(id: [u8; 4], a: Ipv4Addr, proto: u8, port: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&id);
    k.extend_from_slice(&a.octets());
    k.extend_from_slice(&[proto, 0, 0, 0]);
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

/// The element an entry is in the kernel's encoding (each concatenated field padded to 4
/// bytes; marks in host order, addresses and ports in network order).
pub fn element(e: &Entry) -> Element {
    match e {
        Entry::Guard(net) => {
            let mut lo = net.network().octets().to_vec();
            lo.extend_from_slice(&[0, 0, 0, 0]);
            let mut hi = net.broadcast().octets().to_vec();
            hi.extend_from_slice(&[255, 255, 255, 255]);
            Element::range(lo, hi)
        }
        Entry::Known(ip) => Element::new(ip.octets().to_vec(), Data::None),
        // `ct mark . meta protocol` (the protocol is IPv4's ethertype, in network order).
        Entry::Current(g) => {
            let mut k = mark(*g).to_vec();
            k.extend_from_slice(&[0x08, 0x00, 0, 0]);
            Element::new(k, Data::None)
        }
        Entry::Stamp(g) => Element::new(vec![0x08, 0x00], Data::Value(mark(*g).to_vec())),
        Entry::Id(_, ip, id) => Element::new(ip.octets().to_vec(), Data::Value(mark(*id).to_vec())),
        Entry::Allow(_, id, Allow::Any(ip)) => {
            let mut k = mark(*id).to_vec();
            k.extend_from_slice(&ip.octets());
            Element::new(k, Data::None)
        }
        Entry::Allow(_, id, Allow::Proto(ip, proto)) => {
            let mut k = mark(*id).to_vec();
            k.extend_from_slice(&ip.octets());
            k.extend_from_slice(&[*proto, 0, 0, 0]);
            Element::new(k, Data::None)
        }
        Entry::Allow(_, id, Allow::Port(ip, proto, port)) => {
            Element::new(addr_key(mark(*id), *ip, *proto, *port), Data::None)
        }
        Entry::Allow(_, id, Allow::Range { addr, proto, port }) => Element::range(
            addr_key(id.to_be_bytes(), addr.0, proto.0, port.0),
            addr_key(id.to_be_bytes(), addr.1, proto.1, port.1),
        ),
    }
}

pub struct Applier {
    conn: Conn,
}

impl Applier {
    pub fn new() -> Result<Applier, String> {
        Ok(Applier {
            conn: Conn::open().map_err(|e| format!("nf_tables netlink: {e}"))?,
        })
    }

    /// Makes the table hold exactly `entries`: creates it (closed, see [`skeleton`]) when it is
    /// missing or another version made it, then empties every set and adds `entries`, in one
    /// transaction, so a restarted agent never opens a window.
    pub fn load(&mut self, entries: &BTreeSet<Entry>) -> Result<(), String> {
        let info = self
            .conn
            .table_info(FAMILY_IPV4, TABLE_NAME)
            .map_err(|e| format!("reading ip {TABLE_NAME}: {e}"))?;
        if info.is_none_or(|(comment, _)| comment != VERSION) {
            let script = format!(
                "table ip {TABLE_NAME}\ndelete table ip {TABLE_NAME}\n{}",
                skeleton()
            );
            nft::apply(&script).map_err(|e| e.to_string())?;
        }
        let mut b = Batch::new(FAMILY_IPV4, TABLE_NAME);
        for (set, ..) in SETS {
            b.flush_set(set);
        }
        for (set, ..) in SETS {
            let elements = entries.iter().filter(|e| e.set() == set).map(element);
            b.add_elements(set, elements);
        }
        self.conn.commit(b)
    }

    /// Sends a planner's changes (deletions first) in one transaction.
    pub fn apply(&mut self, changes: &[(Entry, bool)]) -> Result<(), String> {
        if changes.is_empty() {
            return Ok(());
        }
        // Deletions before additions (a pod moving between groups changes its id in place);
        // each set's elements in as few messages as fit.
        let mut by_set: BTreeMap<(bool, &str), Vec<Element>> = BTreeMap::new();
        for (e, add) in changes {
            by_set.entry((*add, e.set())).or_default().push(element(e));
        }
        let mut b = Batch::new(FAMILY_IPV4, TABLE_NAME);
        for ((add, set), elements) in &by_set {
            if *add {
                b.add_elements(set, elements);
            } else {
                b.remove_elements(set, elements);
            }
        }
        self.conn.commit(b)
    }
}
