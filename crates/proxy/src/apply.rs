//! The applier: turns a [`Diff`] into nf_tables netlink batches, natively — no process spawned
//! and the table never listed back in the steady state. A diff that fits one batch is one
//! atomic transaction. A larger one (a cold start) goes in several, ordered so every state in
//! between is whole: sets and chains first (nothing refers to them yet), then every map element
//! at once (the switch-over; in steps of [`ELEMENT_STEP`] when nothing is deleted, endpoints
//! before the frontends that read them), then the removals. (Through `nft -f`, 4k Services × 10 endpoints
//! took 33 s in one transaction, most of it in the kernel binding one anonymous `numgen` map per
//! Service; the planner now picks endpoints with plain rules, and this path spawns nothing.)
//!
//! [`Applier::adopt`] reads what a previous run left — chain and set names, map elements — so a
//! restarted agent sends only what differs, and connections keep working throughout.

use crate::model::Proto;
use crate::plan::pools_read_by;
use crate::ruleset::{
    chain_rank, comment_cluster_cidr, fixed_object_count, keyed_by_ip, ledger_index, random_arms,
    seal, unseal, Backend, Diff, Key, Pool, Rule, Ruleset, AFFINITY, COUNTED, ENDPOINT_MAPS,
    HAIRPIN, IP_MAPS, LEDGER, MASQUERADE_CHAIN, PORT_MAPS, TABLE, TABLE_NAME,
};
use ipnet::Ipv4Net;
use nft::netlink::{reg32, Batch, Conn, Data, Element, Expr, Verdict, FAMILY_IPV4, REG_1, REG_2};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

/// Messages per transaction when a diff has to be split.
const CHUNK: usize = 20_000;
/// Elements per transaction when a large diff only adds them.
const ELEMENT_STEP: usize = 65_536;

/// A map key as the kernel stores a concatenation: each field padded to 4 bytes.
fn key_bytes(k: &Key) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    let (proto, port) = match k {
        Key::Ip((ip, proto, port)) => {
            b.extend_from_slice(&ip.octets());
            (*proto, *port)
        }
        Key::Port((proto, port)) => (*proto, *port),
    };
    b.extend_from_slice(&[proto.number(), 0, 0, 0]);
    b.extend_from_slice(&port.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b
}

fn key_from_bytes(b: &[u8]) -> Option<Key> {
    let proto = Proto::from_number;
    match b.len() {
        12 => Some(Key::Ip((
            Ipv4Addr::new(b[0], b[1], b[2], b[3]),
            proto(b[4])?,
            u16::from_be_bytes([b[8], b[9]]),
        ))),
        8 => Some(Key::Port((proto(b[0])?, u16::from_be_bytes([b[4], b[5]])))),
        _ => None,
    }
}

/// An endpoint-map key: the frontend, then the index as `numgen` writes it (host order).
fn endpoint_key(k: &Key, i: u32) -> Vec<u8> {
    let mut b = key_bytes(k);
    b.extend_from_slice(&i.to_ne_bytes());
    b
}

/// An endpoint as a data-map value: `ip daddr . th dport`, each field padded to 4 bytes.
fn backend_bytes((ip, port): &Backend) -> Vec<u8> {
    let mut b = ip.octets().to_vec();
    b.extend_from_slice(&port.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b
}

fn backend_of(data: &Data) -> Option<Backend> {
    let Data::Value(b) = data else { return None };
    let b: [u8; 8] = b.as_slice().try_into().ok()?;
    Some((
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    ))
}

/// An endpoint-map key's frontend and index.
fn endpoint_key_from_bytes(b: &[u8]) -> Option<(Key, u32)> {
    let (frontend, i) = b.split_at_checked(b.len().checked_sub(4)?)?;
    Some((key_from_bytes(frontend)?, word(i)?))
}

/// A 32-bit word in host order (a `mark`, a `numgen` index).
fn word(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.try_into().ok()?))
}

/// Marks the pools of `map` read whole whose element 0 does not carry their seal (`seals`: the
/// comment it carries, by frontend).
fn note_unsealed(held: &mut Ruleset, map: &'static str, seals: &HashMap<Key, String>) {
    for (key, seal_text) in seals {
        if held.endpoints.get(&(map, *key)).map(seal).as_ref() != Some(seal_text) {
            held.unsealed.insert((map, *key));
        }
    }
}

/// A `hairpin` element: `a . a`.
fn hairpin_key(ip: &Ipv4Addr) -> Vec<u8> {
    [ip.octets(), ip.octets()].concat()
}

/// `ip saddr NET` (or `!=`), encoded the way nft does: whole bytes when the prefix allows.
fn saddr(net: &Ipv4Net, eq: bool) -> Vec<Expr> {
    let bits = net.prefix_len();
    let octets = net.network().octets();
    let whole = bits.is_multiple_of(8);
    let len = if whole { u32::from(bits / 8) } else { 4 };
    let mut e = vec![Expr::Payload {
        base: 1,
        offset: 12,
        len,
        dreg: REG_1,
    }];
    if !whole {
        e.push(Expr::Bitwise {
            reg: REG_1,
            mask: net.netmask().octets().to_vec(),
            xor: vec![0; 4],
        });
    }
    e.push(Expr::Cmp {
        sreg: REG_1,
        eq,
        data: octets[..len as usize].to_vec(),
    });
    e
}

fn load_saddr() -> Expr {
    Expr::Payload {
        base: 1,
        offset: 12,
        len: 4,
        dreg: REG_1,
    }
}

fn add_rule(b: &mut Batch, chain: &str, rule: &Rule) {
    let then = |mut e: Vec<Expr>, v: Verdict| {
        e.push(Expr::Verdict(v));
        e
    };
    let jump_masq = || Verdict::Jump(MASQUERADE_CHAIN.into());
    let exprs = match rule {
        Rule::MasqUnlessFrom(net) => then(saddr(net, false), jump_masq()),
        Rule::Masq => vec![Expr::Verdict(jump_masq())],
        Rule::GotoIfFrom(net, c) => then(saddr(net, true), Verdict::Goto(c.clone())),
        Rule::ReturnIfFrom(net) => then(saddr(net, true), Verdict::Return),
        Rule::Sticky(set, c) => vec![
            load_saddr(),
            Expr::Lookup {
                set: set.clone(),
                sreg: REG_1,
                dreg: None,
            },
            Expr::Verdict(Verdict::Goto(c.clone())),
        ],
        Rule::Remember(set, _) => vec![
            load_saddr(),
            Expr::Update {
                set: set.clone(),
                sreg: REG_1,
            },
        ],
        Rule::Random(chains) if !chains.is_empty() => {
            for (modulus, target) in random_arms(chains) {
                let mut e = Vec::new();
                if let Some(m) = modulus {
                    e.push(Expr::Random {
                        modulus: m,
                        dreg: REG_1,
                    });
                    e.push(Expr::Cmp {
                        sreg: REG_1,
                        eq: true,
                        data: 0u32.to_ne_bytes().to_vec(),
                    });
                }
                e.push(Expr::Verdict(Verdict::Goto(target.clone())));
                b.add_rule(chain, &e);
            }
            return;
        }
        Rule::Random(_) | Rule::Pick(_, 0) | Rule::Drop => vec![Expr::Verdict(Verdict::Drop)],
        Rule::Pick(map, n) => {
            // The frontend's fields and the index, in consecutive registers (as nft loads a
            // concatenation), looked up in the map; its `address . port` feeds the DNAT.
            let mut e = Vec::new();
            let mut next = 0;
            if keyed_by_ip(map) {
                e.push(Expr::Payload {
                    base: 1,
                    offset: 16,
                    len: 4,
                    dreg: REG_1,
                });
                next = 1;
            }
            let reg = |i: u32| if i == 0 { REG_1 } else { reg32(i) };
            e.push(Expr::Meta {
                key: 16, // l4proto
                dreg: reg(next),
            });
            e.push(Expr::Payload {
                base: 2,
                offset: 2,
                len: 2,
                dreg: reg(next + 1),
            });
            e.push(Expr::Random {
                modulus: *n,
                dreg: reg(next + 2),
            });
            e.push(Expr::Lookup {
                set: map.to_string(),
                sreg: REG_1,
                dreg: Some(REG_1),
            });
            e.push(Expr::Dnat {
                addr: REG_1,
                port: reg32(1),
                flags: 0,
            });
            e
        }
        Rule::Goto(c) => vec![Expr::Verdict(Verdict::Goto(c.clone()))],
        Rule::Dnat(ip, port, proto) => vec![
            Expr::Meta {
                key: 16, // l4proto
                dreg: REG_1,
            },
            Expr::Cmp {
                sreg: REG_1,
                eq: true,
                data: vec![proto.number()],
            },
            Expr::Immediate {
                dreg: REG_1,
                data: ip.octets().to_vec(),
            },
            Expr::Immediate {
                dreg: REG_2,
                data: port.to_be_bytes().to_vec(),
            },
            // NF_NAT_RANGE_PROTO_SPECIFIED, as nft sends for `dnat to a:p`.
            Expr::Dnat {
                addr: REG_1,
                port: REG_2,
                flags: 2,
            },
        ],
    };
    b.add_rule(chain, &exprs);
}

/// Sends diffs to the kernel of the calling thread's network namespace.
pub struct Applier {
    conn: Conn,
    /// The element count of each [`COUNTED`] set as of the last commit: what the ledger says.
    counts: [u32; COUNTED.len()],
    /// What the batch being built adds to them.
    pending: [i64; COUNTED.len()],
    /// The sets the last adoption had to list whole: their elements disagreed with the ledger.
    pub listed: Vec<&'static str>,
}

impl Applier {
    pub fn new() -> Result<Applier, String> {
        Ok(Applier {
            conn: Conn::open().map_err(|e| format!("a netfilter netlink socket: {e}"))?,
            counts: [0; COUNTED.len()],
            pending: [0; COUNTED.len()],
            listed: Vec::new(),
        })
    }

    /// Time spent in exchanges with the kernel so far (see [`Conn::waited`]).
    pub fn kernel_time(&self) -> std::time::Duration {
        self.conn.waited()
    }

    fn batch(&self) -> Batch {
        Batch::new(FAMILY_IPV4, TABLE_NAME)
    }

    /// What the kernel holds now, by name (chains without their rules: names say what they
    /// hold), as far as it matters for reaching `want` (a table as disjoint fragments). A missing table, or one whose fixed part
    /// another version wrote, is created afresh — the only time the table is replaced whole.
    ///
    /// The map elements are listed; chains and sets are asked for by name: those `want` has and
    /// those the maps point at. When that accounts for every object the kernel counts in the
    /// table (the usual restart), nothing else is read; otherwise (chains of Services that went
    /// while no agent ran) every chain and set is listed. Listing is what a restart at scale
    /// pays for: each round of a dump walks the table's chain list from its start again.
    pub fn adopt(&mut self, want: &[&Ruleset]) -> Result<Ruleset, String> {
        let info = self
            .conn
            .table_info(FAMILY_IPV4, TABLE_NAME)
            .map_err(|e| format!("reading {TABLE}: {e}"))?;
        self.counts = [0; COUNTED.len()];
        self.pending = [0; COUNTED.len()];
        self.listed.clear();
        // A table written for another cluster CIDR than the plan's is replaced (a plan without
        // the node's part takes the table's).
        let wanted = want.iter().find_map(|f| f.cluster_cidr);
        let found = info.and_then(|(c, objects)| Some((comment_cluster_cidr(&c)?, objects)));
        let Some((cluster_cidr, objects)) = found.filter(|(c, _)| wanted.is_none() || *c == wanted)
        else {
            let empty = Ruleset {
                cluster_cidr: wanted,
                ..Ruleset::default()
            };
            nft::apply(&empty.render()).map_err(|e| e.to_string())?;
            return Ok(empty);
        };
        for e in self.conn.elements(FAMILY_IPV4, TABLE_NAME, LEDGER)? {
            let (Some(i), Data::Value(n)) = (word(&e.key), &e.data) else {
                continue;
            };
            if let (Some(slot), Some(n)) = (self.counts.get_mut(i as usize), word(n)) {
                *slot = n;
            }
        }
        let mut held = Ruleset {
            cluster_cidr,
            ..Ruleset::default()
        };
        for map in IP_MAPS.iter().chain(&PORT_MAPS) {
            let keys: Vec<Vec<u8>> = (want.iter())
                .flat_map(|f| f.verdict_elements(map))
                .map(|(k, _)| key_bytes(&k))
                .collect();
            for e in self.read_set(map, &keys)? {
                let (Some(key), Data::Verdict(Verdict::Goto(chain))) =
                    (key_from_bytes(&e.key), e.data)
                else {
                    continue;
                };
                match (*map, key) {
                    ("service-ips", Key::Ip(k)) => {
                        held.service_ips.insert(k, chain);
                    }
                    ("firewall-ips", Key::Ip(k)) => {
                        held.firewall.insert(k, chain);
                    }
                    ("no-endpoint-services", Key::Ip(k)) => {
                        held.no_endpoints.insert(k);
                    }
                    ("service-nodeports", Key::Port(k)) => {
                        held.node_ports.insert(k, chain);
                    }
                    ("no-endpoint-nodeports", Key::Port(k)) => {
                        held.no_endpoint_node_ports.insert(k);
                    }
                    _ => {}
                }
            }
        }
        self.adopt_pools(&mut held, want)?;
        let pins: Vec<Vec<u8>> = (want.iter())
            .flat_map(|f| f.hairpin.iter().map(hairpin_key))
            .collect();
        for e in self.read_set(HAIRPIN, &pins)? {
            if let Ok(b) = <[u8; 8]>::try_from(e.key.as_slice()) {
                held.hairpin.insert(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            }
        }
        let mut chains: BTreeSet<&str> = want
            .iter()
            .flat_map(|f| f.chains.keys().chain(&f.shared))
            .map(String::as_str)
            .collect();
        chains.extend(
            held.service_ips
                .values()
                .chain(held.firewall.values())
                .chain(held.node_ports.values())
                .map(String::as_str),
        );
        let chains: Vec<&str> = chains.into_iter().collect();
        let sets: Vec<&str> = want
            .iter()
            .flat_map(|f| f.sets.keys())
            .map(String::as_str)
            .collect();
        let found_chains = self
            .conn
            .existing(FAMILY_IPV4, TABLE_NAME, false, &chains)?;
        let found_sets = self.conn.existing(FAMILY_IPV4, TABLE_NAME, true, &sets)?;
        if fixed_object_count() + found_chains.len() + found_sets.len() == objects as usize {
            held.chains = found_chains.into_iter().map(|c| (c, Vec::new())).collect();
            held.sets = found_sets.into_iter().map(|s| (s, 0)).collect();
            return Ok(held);
        }
        for (name, comment) in self.conn.chains(FAMILY_IPV4, TABLE_NAME)? {
            if chain_rank(&name).is_some() {
                if !comment.is_empty() {
                    held.comments.insert(name.clone(), comment);
                }
                held.chains.insert(name, Vec::new());
            }
        }
        for set in self.conn.sets(FAMILY_IPV4, TABLE_NAME)? {
            if set
                .split_once('_')
                .is_some_and(|(kind, _)| kind == AFFINITY)
            {
                held.sets.insert(set, 0);
            }
        }
        Ok(held)
    }

    /// Reads the endpoint pools of the frontends `held` has. A dump of a set walks it from its
    /// start again for every message (quadratic), so elements are asked for by key: the
    /// frontends the maps hold and the counts their chains read say which exist (every
    /// transaction keeps the two in step). Element 0 comes first: where its [`seal`] vouches
    /// for the pool planned in `want`, the pool is known and the rest is not asked for.
    fn adopt_pools(&mut self, held: &mut Ruleset, want: &[&Ruleset]) -> Result<(), String> {
        let planned: HashMap<(&'static str, Key), &Pool> = want
            .iter()
            .flat_map(|f| f.endpoints.iter().map(|(k, p)| (*k, p)))
            .collect();
        let mut pools: BTreeMap<&'static str, Vec<(Key, u32)>> = BTreeMap::new();
        let frontends = held.service_ips.iter().map(|(k, c)| (Key::Ip(*k), c));
        let frontends = frontends.chain(held.node_ports.iter().map(|(k, c)| (Key::Port(*k), c)));
        for (key, chain) in frontends {
            for (map, n) in pools_read_by(chain) {
                pools.entry(map).or_default().push((key, n));
            }
        }
        for (map, pools) in pools {
            let firsts: Vec<Vec<u8>> = pools.iter().map(|(k, _)| endpoint_key(k, 0)).collect();
            let firsts = self
                .conn
                .get_elements(FAMILY_IPV4, TABLE_NAME, map, &firsts)?;
            let mut rest: Vec<(Key, u32)> = Vec::new();
            let mut seals: HashMap<Key, String> = HashMap::new();
            for ((key, n), first) in pools.into_iter().zip(firsts) {
                let Some(first) = first else { continue };
                let seal_text = first.comment.unwrap_or_default();
                let vouched = planned
                    .get(&(map, key))
                    .filter(|p| p.len() == n as usize)
                    .and_then(|p| unseal(&seal_text, p));
                if let Some(pool) = vouched {
                    held.endpoints.insert((map, key), pool);
                    continue;
                }
                if let Some(b) = backend_of(&first.data) {
                    held.endpoints.entry((map, key)).or_default().insert(0, b);
                }
                seals.insert(key, seal_text);
                rest.extend((1..n).map(|i| (key, i)));
            }
            let bytes: Vec<Vec<u8>> = rest.iter().map(|(k, i)| endpoint_key(k, *i)).collect();
            let got = self
                .conn
                .get_elements(FAMILY_IPV4, TABLE_NAME, map, &bytes)?;
            for ((key, i), e) in rest.into_iter().zip(got) {
                if let Some(b) = e.and_then(|e| backend_of(&e.data)) {
                    held.endpoints.entry((map, key)).or_default().insert(i, b);
                }
            }
            note_unsealed(held, map, &seals);
        }
        for map in ENDPOINT_MAPS {
            let found: usize = (held.endpoints.iter())
                .filter(|((m, _), _)| *m == map)
                .map(|(_, p)| p.len())
                .sum();
            if found as u64 != self.count_of(map) {
                self.list_pools(held, map)?;
            }
        }
        Ok(())
    }

    /// Reads endpoint map `map` whole (it holds elements no frontend accounts for).
    fn list_pools(&mut self, held: &mut Ruleset, map: &'static str) -> Result<(), String> {
        self.listed.push(map);
        held.endpoints.retain(|(m, _), _| *m != map);
        held.unsealed.retain(|(m, _)| *m != map);
        let mut seals: HashMap<Key, String> = HashMap::new();
        for e in self.conn.elements(FAMILY_IPV4, TABLE_NAME, map)? {
            let (Some((key, i)), Some(b)) = (endpoint_key_from_bytes(&e.key), backend_of(&e.data))
            else {
                continue;
            };
            held.endpoints.entry((map, key)).or_default().insert(i, b);
            if i == 0 {
                seals.insert(key, e.comment.unwrap_or_default());
            }
        }
        // A pool without element 0 carries no seal at all.
        for (_, key) in held.endpoints.keys().filter(|(m, _)| *m == map) {
            seals.entry(*key).or_default();
        }
        note_unsealed(held, map, &seals);
        Ok(())
    }

    /// How many elements the ledger says `set` holds.
    fn count_of(&self, set: &str) -> u64 {
        ledger_index(set).map_or(0, |i| self.counts[i] as u64)
    }

    /// The elements of counted `set`: asked for by `keys` (those expected); when as many are
    /// found as the ledger counts, there are no others, else the set is listed.
    fn read_set(&mut self, set: &'static str, keys: &[Vec<u8>]) -> Result<Vec<Element>, String> {
        let found: Vec<Element> = (self.conn)
            .get_elements(FAMILY_IPV4, TABLE_NAME, set, keys)?
            .into_iter()
            .flatten()
            .collect();
        if found.len() as u64 == self.count_of(set) {
            return Ok(found);
        }
        self.listed.push(set);
        self.conn.elements(FAMILY_IPV4, TABLE_NAME, set)
    }

    /// Adds elements to `set`, encoded as they come (a cold start's are never all held at once).
    fn add_elements<E: std::borrow::Borrow<Element>>(
        &mut self,
        b: &mut Batch,
        set: &str,
        elements: impl ExactSizeIterator<Item = E>,
    ) {
        self.tally(set, elements.len() as i64);
        b.add_elements(set, elements);
    }

    fn delete_elements(&mut self, b: &mut Batch, set: &str, keys: &[Vec<u8>]) {
        self.tally(set, -(keys.len() as i64));
        b.delete_elements(set, keys);
    }

    fn tally(&mut self, set: &str, n: i64) {
        if let Some(i) = ledger_index(set) {
            self.pending[i] += n;
        }
    }

    /// Commits `b` with the ledger's new counts in the same transaction.
    fn commit(&mut self, mut b: Batch) -> Result<(), String> {
        let mut counts = self.counts;
        for (i, delta) in self.pending.iter().enumerate() {
            if *delta == 0 {
                continue;
            }
            let key = (i as u32).to_ne_bytes().to_vec();
            if counts[i] > 0 {
                b.delete_elements(LEDGER, std::slice::from_ref(&key));
            }
            counts[i] = (counts[i] as i64 + delta).max(0) as u32;
            if counts[i] > 0 {
                b.add_elements(
                    LEDGER,
                    &[Element {
                        comment: Some(COUNTED[i].to_string()),
                        ..Element::new(key, Data::Value(counts[i].to_ne_bytes().to_vec()))
                    }],
                );
            }
        }
        self.pending = [0; COUNTED.len()];
        self.conn.commit(b)?;
        self.counts = counts;
        Ok(())
    }

    /// Sends `diff`: one transaction when it is small enough, else in whole steps (module doc).
    pub fn apply(&mut self, diff: &Diff) -> Result<(), String> {
        let mut b = self.batch();
        let chunked = diff.size() > CHUNK;
        for (set, timeout) in &diff.new_sets {
            b.add_timeout_set(set, *timeout);
        }
        for (name, _, comment) in &diff.new_chains {
            b.add_chain(name, comment.as_deref());
            self.flush_if_full(&mut b, chunked)?;
        }
        for (name, rules, _) in &diff.new_chains {
            for r in rules {
                add_rule(&mut b, name, r);
            }
            self.flush_if_full(&mut b, chunked)?;
        }
        if chunked {
            self.commit(std::mem::replace(&mut b, self.batch()))?;
        }
        // A large diff that only adds (a cold start) has no switch-over to keep whole: its
        // elements go in steps (endpoints before the frontends that read them), so no batch
        // holds them all.
        let stepwise = chunked && diff.adds_only();
        for (map, delete, add) in &diff.endpoints {
            let keys: Vec<Vec<u8>> = delete.iter().map(|(k, i)| endpoint_key(k, *i)).collect();
            self.delete_elements(&mut b, map, &keys);
            for part in add.chunks(ELEMENT_STEP) {
                let elements = part.iter().map(|(k, i, e, seal)| Element {
                    comment: seal.clone(),
                    ..Element::new(endpoint_key(k, *i), Data::Value(backend_bytes(e)))
                });
                self.add_elements(&mut b, map, elements);
                self.step(&mut b, stepwise)?;
            }
        }
        let (unpin, pin) = &diff.hairpin;
        let unpin: Vec<_> = unpin.iter().map(hairpin_key).collect();
        self.delete_elements(&mut b, HAIRPIN, &unpin);
        let pin = pin.iter().map(|a| Element::new(hairpin_key(a), Data::None));
        self.add_elements(&mut b, HAIRPIN, pin);
        for (map, delete, add) in &diff.maps {
            let keys: Vec<Vec<u8>> = delete.iter().map(key_bytes).collect();
            self.delete_elements(&mut b, map, &keys);
            for part in add.chunks(ELEMENT_STEP) {
                let elements = (part.iter()).map(|(k, c)| {
                    Element::new(key_bytes(k), Data::Verdict(Verdict::Goto(c.clone())))
                });
                self.add_elements(&mut b, map, elements);
                self.step(&mut b, stepwise)?;
            }
        }
        if chunked {
            // The switch-over is one transaction whatever its size.
            self.commit(std::mem::replace(&mut b, self.batch()))?;
        }
        // A chain can go only once nothing refers to it: referrers first.
        let mut gone: Vec<&String> = diff.gone_chains.iter().collect();
        gone.sort_by_key(|n| chain_rank(n));
        for name in gone {
            b.delete_chain(name);
            self.flush_if_full(&mut b, chunked)?;
        }
        for set in &diff.gone_sets {
            b.delete_set(set);
        }
        self.commit(b)
    }

    /// Commits what `b` holds when a diff goes in steps.
    fn step(&mut self, b: &mut Batch, stepwise: bool) -> Result<(), String> {
        if stepwise && !b.is_empty() {
            self.commit(std::mem::replace(b, self.batch()))?;
        }
        Ok(())
    }

    fn flush_if_full(&mut self, b: &mut Batch, chunked: bool) -> Result<(), String> {
        if chunked && b.len() as usize >= CHUNK {
            self.commit(std::mem::replace(b, self.batch()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_survive_the_kernel_encoding() {
        let keys = [
            Key::Ip(("10.96.0.10".parse().unwrap(), Proto::Udp, 53)),
            Key::Port((Proto::Sctp, 30_123)),
        ];
        for k in keys {
            assert_eq!(key_from_bytes(&key_bytes(&k)), Some(k), "{k:?}");
        }
        // What nft itself sends for `10.96.0.10 . tcp . 80` (nft --debug=netlink).
        assert_eq!(
            key_bytes(&Key::Ip(("10.96.0.10".parse().unwrap(), Proto::Tcp, 80))),
            [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0]
        );
    }

    #[test]
    fn prefixes_match_whole_bytes_when_they_can() {
        let e = saddr(&"10.244.0.0/16".parse().unwrap(), true);
        assert_eq!(e.len(), 2);
        let e = saddr(&"10.128.0.0/9".parse().unwrap(), false);
        assert!(matches!(&e[1], Expr::Bitwise { mask, .. } if mask == &[255, 128, 0, 0]));
        assert!(matches!(&e[2], Expr::Cmp { eq: false, data, .. } if data == &[10, 128, 0, 0]));
    }
}
