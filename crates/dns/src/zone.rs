//! The cluster zone: Services, EndpointSlices and Pods → the records of the Kubernetes DNS
//! specification (kubernetes/dns `docs/specification.md`, schema 1.0.1), answered from memory.
//!
//! Design: each Service contributes its own records (from its EndpointSlices), each Pod its
//! addresses; a change re-computes the contributions of the objects it touches, takes the old
//! ones out and puts the new ones in ([`LiveZone`]), so an update costs what changed, whatever
//! the cluster's size. The maps are persistent (imbl: shared structure), so the copy the
//! server swaps in after each update costs nothing, and a query is still one hash lookup. What
//! the zone holds, per object:
//! - ClusterIP Service: `A`/`AAAA` `<svc>.<ns>.svc.<zone>`, one `SRV`
//!   `_<port>._<proto>.<svc>.<ns>.svc.<zone>` per named port, a `PTR` per ClusterIP;
//! - headless Service: one `A`/`AAAA` per ready endpoint (or every endpoint with
//!   `publishNotReadyAddresses`), `<hostname>.<svc>.<ns>.svc.<zone>` per endpoint (the endpoint's
//!   `hostname`, else its address with dashes, as CoreDNS names them), `SRV` per endpoint × named
//!   port aimed at that name, a `PTR` for endpoints with a hostname; none at all (NXDOMAIN) when
//!   no endpoint is ready;
//! - ExternalName Service: a `CNAME` to the external name (the server follows it);
//! - the zone apex: `SOA`, `NS ns.dns.<zone>` (its `A` is the `kube-system/kube-dns` ClusterIP),
//!   `dns-version.<zone>` `TXT "1.0.1"`.
//!
//! Pod names `a-b-c-d.<ns>.pod.<zone>` are not stored but parsed on query: `insecure` answers
//! any well-formed one, `verified` (the default) only when a pod of that namespace has that IP,
//! `disabled` none. Every ancestor of a stored name inside the zone exists (an empty
//! non-terminal: NOERROR without data); any other name in the zone is NXDOMAIN. Matching
//! ignores case; owner names in answers keep the query's spelling. No wildcards (the
//! specification has none). Reverse names the zone does not hold are not ours: they are
//! forwarded, as CoreDNS's `fallthrough in-addr.arpa ip6.arpa`.

use cluster::manifests::namespaced;
use cluster::slim::EndpointSlice;
use cluster::store::{slice_service, Change, Key, Kind, Resource, Store, Update};
use cluster::ClusterState;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Pod, Service};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The schema version `dns-version.<zone>` announces.
pub const SCHEMA_VERSION: &str = "1.0.1";

/// Which `a-b-c-d.<ns>.pod.<zone>` names are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PodMode {
    Disabled,
    Insecure,
    Verified,
}

#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// The cluster domain, e.g. `cluster.local`.
    pub domain: String,
    /// TTL of every record, and of negative answers (the SOA minimum).
    pub ttl: u32,
    pub pods: PodMode,
    /// Fixed address records (a lab's "internet" zone, or names a cluster wants pinned).
    pub records: Vec<(String, IpAddr)>,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig {
            domain: "cluster.local".into(),
            ttl: 30,
            pods: PodMode::Verified,
            records: Vec::new(),
        }
    }
}

/// What the zone says about one question.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Records (owner: the query's name) and additional records (SRV targets' addresses).
    Records(Vec<Record>, Vec<Record>),
    /// The name exists without records of this type.
    NoData,
    NxDomain,
    /// Not in the zone: a question for the upstream servers.
    Outside,
}

/// The zone, ready to answer.
#[derive(Debug, Clone)]
pub struct Zone {
    ttl: u32,
    pods: PodMode,
    /// `cluster.local.`
    apex: String,
    apex_name: Name,
    /// Owner name → its records: a multiset, each contribution added once and taken out once.
    records: imbl::HashMap<String, Vec<RData>>,
    /// Ancestors of stored names inside the zone, and how many stored names are below each.
    non_terminals: imbl::HashMap<String, u32>,
    /// (namespace, address) of pods, and how many pods hold it.
    pod_ips: imbl::HashMap<(String, IpAddr), u32>,
    serial: u32,
    soa: Record,
}

/// A lower-case absolute name as the zone keys it (`a.b.` form).
pub fn key(name: &Name) -> String {
    let mut k = name.to_lowercase().to_ascii();
    if !k.ends_with('.') {
        k.push('.');
    }
    k
}

fn name(text: &str) -> Name {
    // Every name built here comes from validated object names and the configured domain.
    Name::from_str(text).unwrap_or_else(|_| Name::root())
}

/// `d.c.b.a.in-addr.arpa.` / nibbles `….ip6.arpa.`
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa."
        }
    }
}

/// An address as a DNS label: dots (or colons) become dashes.
pub fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(a) => RData::A(A(a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(a)),
    }
}

fn is_headless(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(&spec.cluster_ip)
        .filter_map(|s| s.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// One object's records: (lower-case owner, data), without repeats.
type Records = Vec<(String, RData)>;

/// Collects one Service's records.
struct Builder {
    apex: String,
    records: Records,
}

impl Builder {
    fn add(&mut self, owner: &str, data: RData) {
        let entry = (owner.to_ascii_lowercase(), data);
        if !self.records.contains(&entry) {
            self.records.push(entry);
        }
    }
}

/// The records of one Service, from its own EndpointSlices.
fn service_records(apex: &str, svc: &Service, slices: &[&EndpointSlice]) -> Records {
    let (ns, svc_name) = namespaced(&svc.metadata);
    let mut b = Builder {
        apex: apex.to_string(),
        records: Vec::new(),
    };
    b.service(svc, &ns, &svc_name, slices);
    if ns == "kube-system" && svc_name == "kube-dns" {
        if let Some(ip) = cluster_ips(svc).into_iter().next() {
            b.add(&format!("ns.dns.{apex}"), address(ip));
        }
    }
    b.records
}

/// The (namespace, address) pairs of a pod.
fn pod_addresses(p: &Pod) -> Vec<(String, IpAddr)> {
    let (ns, _) = namespaced(&p.metadata);
    let status = p.status.as_ref();
    let mut out: Vec<(String, IpAddr)> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|i| i.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()))
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .map(|ip| (ns.clone(), ip))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The zone's SOA record.
fn soa(apex: &str, ttl: u32, serial: u32) -> Record {
    Record::from_rdata(
        name(apex),
        ttl,
        RData::SOA(SOA::new(
            name(&format!("ns.dns.{apex}")),
            name(&format!("hostmaster.{apex}")),
            serial,
            7200,
            1800,
            86400,
            ttl,
        )),
    )
}

/// Adds `by` to a count (removing it at zero).
fn count<K: std::hash::Hash + Eq + Clone>(map: &mut imbl::HashMap<K, u32>, k: K, by: i64) {
    let n = map.get(&k).copied().unwrap_or(0) as i64 + by;
    if n > 0 {
        map.insert(k, n as u32);
    } else {
        map.remove(&k);
    }
}

impl Zone {
    /// A zone holding only its apex records and the configured fixed records.
    pub fn new(cfg: &ZoneConfig) -> Zone {
        let apex = format!("{}.", cfg.domain.trim_end_matches('.').to_ascii_lowercase());
        let apex_name = name(&apex);
        let mut z = Zone {
            ttl: cfg.ttl,
            pods: cfg.pods,
            soa: soa(&apex, cfg.ttl, 1),
            apex_name,
            records: imbl::HashMap::new(),
            non_terminals: imbl::HashMap::new(),
            pod_ips: imbl::HashMap::new(),
            serial: 1,
            apex,
        };
        let apex = z.apex.clone();
        z.non_terminals.insert(format!("svc.{apex}"), 1);
        if cfg.pods != PodMode::Disabled {
            z.non_terminals.insert(format!("pod.{apex}"), 1);
        }
        for (owner, ip) in &cfg.records {
            z.add(&format!("{}.", owner.trim_end_matches('.')), address(*ip));
        }
        z.add(
            &format!("dns-version.{apex}"),
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])),
        );
        z.add(&apex, RData::NS(NS(name(&format!("ns.dns.{apex}")))));
        z
    }

    /// Builds the zone from a snapshot of cluster state.
    pub fn build(cfg: &ZoneConfig, state: &ClusterState) -> Zone {
        LiveZone::new(cfg, &store_of(state)).zone()
    }

    /// The names strictly between `owner` and the apex.
    fn parents<'a>(&self, owner: &'a str) -> Vec<&'a str> {
        let mut out = Vec::new();
        if !owner.ends_with(&self.apex) {
            return out;
        }
        let mut rest = owner;
        while let Some((_, parent)) = rest.split_once('.') {
            if parent.len() <= self.apex.len() {
                break;
            }
            out.push(parent);
            rest = parent;
        }
        out
    }

    fn add(&mut self, owner: &str, data: RData) {
        let mut v = self.records.get(owner).cloned().unwrap_or_default();
        if v.is_empty() {
            for p in self.parents(owner) {
                count(&mut self.non_terminals, p.to_string(), 1);
            }
        }
        v.push(data);
        self.records.insert(owner.to_string(), v);
    }

    fn remove(&mut self, owner: &str, data: &RData) {
        let Some(mut v) = self.records.get(owner).cloned() else {
            return;
        };
        if let Some(i) = v.iter().position(|d| d == data) {
            v.remove(i);
        }
        if v.is_empty() {
            self.records.remove(owner);
            for p in self.parents(owner) {
                count(&mut self.non_terminals, p.to_string(), -1);
            }
        } else {
            self.records.insert(owner.to_string(), v);
        }
    }

    /// Replaces one object's records `old` with `new`.
    fn replace(&mut self, old: &Records, new: &Records) {
        for (owner, data) in old.iter().filter(|r| !new.contains(r)) {
            self.remove(owner, data);
        }
        for (owner, data) in new.iter().filter(|r| !old.contains(r)) {
            self.add(owner, data.clone());
        }
    }

    fn pod_ip(&mut self, (ns, ip): &(String, IpAddr), by: i64) {
        count(&mut self.pod_ips, (ns.clone(), *ip), by);
        count(
            &mut self.non_terminals,
            format!("{ns}.pod.{}", self.apex),
            by,
        );
    }

    /// A new SOA serial: secondaries and caches can tell this version of the zone.
    fn bump_serial(&mut self) {
        self.serial = self.serial.wrapping_add(1);
        self.soa = soa(&self.apex, self.ttl, self.serial);
    }

    /// The zone's SOA (for negative answers' authority section).
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// The apex, e.g. `cluster.local.`
    pub fn apex(&self) -> &Name {
        &self.apex_name
    }

    /// Owner names held (for sizing and tests).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn inside(&self, k: &str) -> bool {
        k == self.apex || (k.ends_with(&self.apex) && k[..k.len() - self.apex.len()].ends_with('.'))
    }

    /// Answers `qtype` for `qname`.
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Answer {
        let k = key(qname);
        let inside = self.inside(&k);
        if k == self.apex && qtype == RecordType::SOA {
            let mut soa = self.soa.clone();
            soa.name = qname.clone();
            return Answer::Records(vec![soa], Vec::new());
        }
        if let Some(data) = self.records.get(&k) {
            return self.answer(qname, qtype, data);
        }
        if !inside {
            return Answer::Outside;
        }
        if let Some(ip) = self.pod_address(&k) {
            return match qtype {
                RecordType::A | RecordType::AAAA | RecordType::ANY => {
                    let data = [address(ip)];
                    self.answer(qname, qtype, &data)
                }
                _ => Answer::NoData,
            };
        }
        if self.non_terminals.contains_key(&k) {
            Answer::NoData
        } else {
            Answer::NxDomain
        }
    }

    fn answer(&self, qname: &Name, qtype: RecordType, data: &[RData]) -> Answer {
        let rr = |d: &RData| Record::from_rdata(qname.clone(), self.ttl, d.clone());
        if let Some(c) = data.iter().find(|d| matches!(d, RData::CNAME(_))) {
            if qtype != RecordType::CNAME {
                return Answer::Records(vec![rr(c)], Vec::new());
            }
        }
        let answers: Vec<Record> = data
            .iter()
            .filter(|d| qtype == RecordType::ANY || d.record_type() == qtype)
            .map(rr)
            .collect();
        if answers.is_empty() {
            return Answer::NoData;
        }
        // SRV targets' addresses, as CoreDNS adds them.
        let mut extra = Vec::new();
        for a in &answers {
            if let RData::SRV(srv) = &a.data {
                for d in self.records.get(&key(&srv.target)).into_iter().flatten() {
                    if matches!(d, RData::A(_) | RData::AAAA(_)) {
                        extra.push(Record::from_rdata(srv.target.clone(), self.ttl, d.clone()));
                    }
                }
            }
        }
        Answer::Records(answers, extra)
    }

    /// The address of a pod name `a-b-c-d.<ns>.pod.<zone>` this zone answers (per its mode).
    fn pod_address(&self, k: &str) -> Option<IpAddr> {
        if self.pods == PodMode::Disabled {
            return None;
        }
        let rest = k.strip_suffix(&self.apex)?.strip_suffix(".pod.")?;
        let (label, ns) = rest.split_once('.')?;
        if ns.contains('.') {
            return None;
        }
        let ip = label
            .replace('-', ".")
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .or_else(|_| label.replace('-', ":").parse::<Ipv6Addr>().map(IpAddr::V6))
            .ok()?;
        match self.pods {
            PodMode::Verified => self
                .pod_ips
                .contains_key(&(ns.to_string(), ip))
                .then_some(ip),
            _ => Some(ip),
        }
    }
}

impl Builder {
    fn service(&mut self, svc: &Service, ns: &str, svc_name: &str, slices: &[&EndpointSlice]) {
        let Some(spec) = svc.spec.as_ref() else {
            return;
        };
        let base = format!("{svc_name}.{ns}.svc.{}", self.apex);
        if spec.type_.as_deref() == Some("ExternalName") {
            if let Some(ext) = spec.external_name.as_deref().filter(|e| !e.is_empty()) {
                let target = format!("{}.", ext.trim_end_matches('.'));
                self.add(&base, RData::CNAME(CNAME(name(&target))));
            }
            return;
        }
        if is_headless(svc) {
            self.headless(
                spec.publish_not_ready_addresses == Some(true),
                &base,
                slices,
            );
            return;
        }
        let ips = cluster_ips(svc);
        if ips.is_empty() {
            return; // not allocated yet
        }
        for ip in &ips {
            self.add(&base, address(*ip));
            self.add(&reverse_name(*ip), RData::PTR(PTR(name(&base))));
        }
        for p in spec.ports.iter().flatten() {
            let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            self.add(
                &format!("_{pn}._{proto}.{base}"),
                RData::SRV(SRV::new(0, 100, port, name(&base))),
            );
        }
    }

    fn headless(&mut self, not_ready_too: bool, base: &str, slices: &[&EndpointSlice]) {
        // (address, hostname given?, hostname) of each published endpoint.
        let mut eps: Vec<(IpAddr, bool, String)> = Vec::new();
        for s in slices {
            for e in s.endpoints.iter().flatten() {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready && !not_ready_too {
                    continue;
                }
                for a in &e.addresses {
                    let Ok(ip) = a.parse::<IpAddr>() else {
                        continue;
                    };
                    match &e.hostname {
                        Some(h) if !h.is_empty() => eps.push((ip, true, h.to_string())),
                        _ => eps.push((ip, false, dashed(ip))),
                    }
                }
            }
        }
        eps.sort();
        eps.dedup();
        let weight = (100 / eps.len().max(1)).max(1) as u16;
        for (ip, named, host) in &eps {
            let fqdn = format!("{host}.{base}");
            self.add(base, address(*ip));
            self.add(&fqdn, address(*ip));
            if *named {
                self.add(&reverse_name(*ip), RData::PTR(PTR(name(&fqdn))));
            }
            for s in slices {
                for p in s.ports.iter().flatten() {
                    let (Some(pn), Some(port)) = (p.name.as_deref(), p.port) else {
                        continue;
                    };
                    let Ok(port) = u16::try_from(port) else {
                        continue;
                    };
                    if pn.is_empty() {
                        continue;
                    }
                    let proto = p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase();
                    self.add(
                        &format!("_{pn}._{proto}.{base}"),
                        RData::SRV(SRV::new(0, weight, port, name(&fqdn))),
                    );
                }
            }
        }
    }
}

/// The zone kept in step with the store: each Service's and Pod's contribution is remembered,
/// so a change replaces only the contributions of the objects it touches.
pub struct LiveZone {
    zone: Zone,
    services: HashMap<Key, Records>,
    pods: HashMap<Key, Vec<(String, IpAddr)>>,
}

impl LiveZone {
    /// The zone of everything `store` holds.
    pub fn new(cfg: &ZoneConfig, store: &Store) -> LiveZone {
        let mut z = LiveZone {
            zone: Zone::new(cfg),
            services: HashMap::new(),
            pods: HashMap::new(),
        };
        let services: Vec<Key> = store
            .list::<Service>()
            .map(|s| namespaced(&s.metadata))
            .collect();
        for k in services {
            z.service(store, k);
        }
        let pods: Vec<Key> = store
            .list::<Pod>()
            .map(|p| namespaced(&p.metadata))
            .collect();
        for k in pods {
            z.pod(store, k);
        }
        z
    }

    /// A copy to answer from (constant time: the maps share their structure).
    pub fn zone(&self) -> Zone {
        self.zone.clone()
    }

    /// Re-computes what `changes` touch; returns whether the zone changed.
    pub fn apply(&mut self, store: &Store, changes: &[Change]) -> bool {
        let mut services = BTreeSet::new();
        let mut pods = BTreeSet::new();
        for c in changes {
            match c.kind {
                Kind::Service => {
                    services.insert(c.key.clone());
                }
                Kind::EndpointSlice => {
                    let owner = |o: Option<&EndpointSlice>| o.and_then(slice_service);
                    services.extend(owner(c.old_as()));
                    services.extend(owner(c.new_as()));
                }
                Kind::Pod => {
                    pods.insert(c.key.clone());
                }
                _ => {}
            }
        }
        let mut changed = false;
        for k in services {
            changed |= self.service(store, k);
        }
        for k in pods {
            changed |= self.pod(store, k);
        }
        if changed {
            self.zone.bump_serial();
        }
        changed
    }

    fn service(&mut self, store: &Store, k: Key) -> bool {
        let new = store
            .get::<Service>(&k.0, &k.1)
            .map(|svc| service_records(&self.zone.apex, svc, &store.slices_of(&k)))
            .unwrap_or_default();
        let old = self.services.remove(&k).unwrap_or_default();
        self.zone.replace(&old, &new);
        let changed = old != new;
        if !new.is_empty() {
            self.services.insert(k, new);
        }
        changed
    }

    fn pod(&mut self, store: &Store, k: Key) -> bool {
        let new = store
            .get::<Pod>(&k.0, &k.1)
            .map(pod_addresses)
            .unwrap_or_default();
        let old = self.pods.remove(&k).unwrap_or_default();
        for a in old.iter().filter(|a| !new.contains(a)) {
            self.zone.pod_ip(a, -1);
        }
        for a in new.iter().filter(|a| !old.contains(a)) {
            self.zone.pod_ip(a, 1);
        }
        let changed = old != new;
        if !new.is_empty() {
            self.pods.insert(k, new);
        }
        changed
    }
}

/// A store holding a snapshot's Services, EndpointSlices and Pods.
fn store_of(state: &ClusterState) -> Store {
    let mut store = Store::new();
    let objects = (state.services.iter().cloned().map(Resource::into_object))
        .chain(
            state
                .endpoint_slices
                .iter()
                .cloned()
                .map(Resource::into_object),
        )
        .chain(state.pods.iter().cloned().map(Resource::into_object));
    store.apply(objects.map(Update::apply));
    store
}

/// The address records of a hosts file (`/etc/hosts` format, as CoreDNS's `hosts` plugin reads
/// it: `IP NAME [ALIAS…]`, `#` comments), and a message for each line that is not one, naming
/// the line and what would be valid.
pub fn parse_hosts(text: &str) -> (Vec<(String, IpAddr)>, Vec<String>) {
    let mut records = Vec::new();
    let mut problems = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(ip) = fields.next() else { continue };
        let Ok(ip) = ip.parse::<IpAddr>() else {
            problems.push(format!(
                "hosts line {}: {ip:?} is not an IP address (expected `IP NAME [ALIAS…]`)",
                i + 1
            ));
            continue;
        };
        let names: Vec<&str> = fields.collect();
        if names.is_empty() {
            problems.push(format!("hosts line {}: {ip} names no host", i + 1));
        }
        for n in names {
            match Name::from_ascii(n) {
                Ok(_) => records.push((n.to_ascii_lowercase(), ip)),
                Err(e) => problems.push(format!("hosts line {}: {n:?}: {e}", i + 1)),
            }
        }
    }
    (records, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::Object;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn slice(
        ns: &str,
        svc: &str,
        eps: serde_json::Value,
        ports: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "addressType": "IPv4",
            "metadata": {"name": format!("{svc}-x"), "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "endpoints": eps, "ports": ports}))
        .unwrap()
    }

    fn state() -> ClusterState {
        ClusterState {
            services: vec![
                svc(json!({"metadata": {"name": "web", "namespace": "shop"},
                    "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}, {"port": 81}, {"name": "dns", "port": 53, "protocol": "UDP"}]}})),
                svc(json!({"metadata": {"name": "db", "namespace": "shop"},
                    "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}})),
                svc(json!({"metadata": {"name": "empty", "namespace": "shop"},
                    "spec": {"clusterIP": "None"}})),
                svc(json!({"metadata": {"name": "ext", "namespace": "shop"},
                    "spec": {"type": "ExternalName", "externalName": "example.com"}})),
                svc(
                    json!({"metadata": {"name": "kube-dns", "namespace": "kube-system"},
                    "spec": {"clusterIP": "10.96.0.10"}}),
                ),
            ],
            endpoint_slices: vec![
                slice(
                    "shop",
                    "db",
                    json!([
                    {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                    {"addresses": ["10.244.2.6"], "conditions": {"ready": true}},
                    {"addresses": ["10.244.2.7"], "conditions": {"ready": false}}]),
                    json!([{"name": "pg", "port": 5432, "protocol": "TCP"}]),
                ),
                slice(
                    "shop",
                    "empty",
                    json!([{"addresses": ["10.244.2.9"], "conditions": {"ready": false}}]),
                    json!([]),
                ),
            ],
            pods: vec![serde_json::from_value(
                json!({"metadata": {"name": "p", "namespace": "shop"},
                "status": {"podIP": "10.244.1.5"}}),
            )
            .unwrap()],
            nodes: Vec::new(),
        }
    }

    fn zone(mode: PodMode) -> Zone {
        Zone::build(
            &ZoneConfig {
                pods: mode,
                ..ZoneConfig::default()
            },
            &state(),
        )
    }

    fn data(a: Answer) -> Vec<String> {
        match a {
            Answer::Records(r, _) => {
                let mut v: Vec<String> = r.iter().map(|r| r.data.to_string()).collect();
                v.sort();
                v
            }
            other => panic!("expected records, got {other:?}"),
        }
    }

    fn q(z: &Zone, n: &str, t: RecordType) -> Answer {
        z.lookup(&Name::from_ascii(n).unwrap(), t)
    }

    #[test]
    fn cluster_ip_services_have_a_srv_and_ptr() {
        let z = zone(PodMode::Verified);
        assert_eq!(
            data(q(&z, "web.shop.svc.cluster.local.", RecordType::A)),
            ["10.96.0.20"]
        );
        assert_eq!(
            data(q(&z, "WEB.Shop.svc.CLUSTER.local.", RecordType::A)),
            ["10.96.0.20"],
            "case-insensitive"
        );
        assert_eq!(
            data(q(
                &z,
                "_http._tcp.web.shop.svc.cluster.local.",
                RecordType::SRV
            )),
            ["0 100 80 web.shop.svc.cluster.local."]
        );
        assert_eq!(
            data(q(
                &z,
                "_dns._udp.web.shop.svc.cluster.local.",
                RecordType::SRV
            )),
            ["0 100 53 web.shop.svc.cluster.local."]
        );
        assert_eq!(
            data(q(&z, "20.0.96.10.in-addr.arpa.", RecordType::PTR)),
            ["web.shop.svc.cluster.local."]
        );
        // Exists, other type; unnamed port has no SRV; a wrong protocol neither.
        assert_eq!(
            q(&z, "web.shop.svc.cluster.local.", RecordType::AAAA),
            Answer::NoData
        );
        assert_eq!(
            q(
                &z,
                "_http._udp.web.shop.svc.cluster.local.",
                RecordType::SRV
            ),
            Answer::NxDomain
        );
        assert_eq!(
            q(&z, "nope.shop.svc.cluster.local.", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(
            q(&z, "shop.svc.cluster.local.", RecordType::A),
            Answer::NoData
        );
        assert_eq!(q(&z, "svc.cluster.local.", RecordType::A), Answer::NoData);
    }

    #[test]
    fn headless_services_list_ready_endpoints() {
        let z = zone(PodMode::Verified);
        assert_eq!(
            data(q(&z, "db.shop.svc.cluster.local.", RecordType::A)),
            ["10.244.1.5", "10.244.2.6"]
        );
        assert_eq!(
            data(q(&z, "db-0.db.shop.svc.cluster.local.", RecordType::A)),
            ["10.244.1.5"]
        );
        assert_eq!(
            data(q(
                &z,
                "10-244-2-6.db.shop.svc.cluster.local.",
                RecordType::A
            )),
            ["10.244.2.6"]
        );
        assert_eq!(
            data(q(
                &z,
                "_pg._tcp.db.shop.svc.cluster.local.",
                RecordType::SRV
            )),
            [
                "0 50 5432 10-244-2-6.db.shop.svc.cluster.local.",
                "0 50 5432 db-0.db.shop.svc.cluster.local."
            ]
        );
        let Answer::Records(_, extra) =
            q(&z, "_pg._tcp.db.shop.svc.cluster.local.", RecordType::SRV)
        else {
            panic!()
        };
        assert_eq!(
            extra.len(),
            2,
            "SRV targets' addresses in the additional section"
        );
        assert_eq!(
            data(q(&z, "5.1.244.10.in-addr.arpa.", RecordType::PTR)),
            ["db-0.db.shop.svc.cluster.local."]
        );
        assert_eq!(
            q(&z, "6.2.244.10.in-addr.arpa.", RecordType::PTR),
            Answer::Outside
        );
        assert_eq!(
            q(&z, "empty.shop.svc.cluster.local.", RecordType::A),
            Answer::NxDomain
        );
    }

    #[test]
    fn publish_not_ready_addresses_publishes_them() {
        let mut st = state();
        st.services[2]
            .spec
            .as_mut()
            .unwrap()
            .publish_not_ready_addresses = Some(true);
        let z = Zone::build(&ZoneConfig::default(), &st);
        assert_eq!(
            data(q(&z, "empty.shop.svc.cluster.local.", RecordType::A)),
            ["10.244.2.9"]
        );
    }

    #[test]
    fn external_name_is_a_cname_for_every_type() {
        let z = zone(PodMode::Verified);
        for t in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::CNAME,
            RecordType::TXT,
        ] {
            assert_eq!(
                data(q(&z, "ext.shop.svc.cluster.local.", t)),
                ["example.com."]
            );
        }
    }

    #[test]
    fn pods_by_mode() {
        let n = "10-244-1-5.shop.pod.cluster.local.";
        assert_eq!(
            data(q(&zone(PodMode::Verified), n, RecordType::A)),
            ["10.244.1.5"]
        );
        assert_eq!(
            q(
                &zone(PodMode::Verified),
                "10-244-1-9.shop.pod.cluster.local.",
                RecordType::A
            ),
            Answer::NxDomain
        );
        assert_eq!(
            q(
                &zone(PodMode::Verified),
                "10-244-1-5.other.pod.cluster.local.",
                RecordType::A
            ),
            Answer::NxDomain,
            "verified: the pod's own namespace only"
        );
        assert_eq!(
            data(q(
                &zone(PodMode::Insecure),
                "10-244-1-9.x.pod.cluster.local.",
                RecordType::A
            )),
            ["10.244.1.9"]
        );
        assert_eq!(
            q(&zone(PodMode::Disabled), n, RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(
            q(&zone(PodMode::Verified), n, RecordType::TXT),
            Answer::NoData
        );
        assert_eq!(
            q(
                &zone(PodMode::Insecure),
                "not-an-ip.x.pod.cluster.local.",
                RecordType::A
            ),
            Answer::NxDomain
        );
    }

    #[test]
    fn apex_records_and_outside_names() {
        let z = zone(PodMode::Verified);
        assert_eq!(
            data(q(&z, "dns-version.cluster.local.", RecordType::TXT)),
            ["1.0.1"]
        );
        assert_eq!(
            data(q(&z, "cluster.local.", RecordType::NS)),
            ["ns.dns.cluster.local."]
        );
        assert_eq!(
            data(q(&z, "ns.dns.cluster.local.", RecordType::A)),
            ["10.96.0.10"]
        );
        assert!(matches!(
            q(&z, "cluster.local.", RecordType::SOA),
            Answer::Records(..)
        ));
        assert_eq!(q(&z, "example.com.", RecordType::A), Answer::Outside);
        assert_eq!(q(&z, "notcluster.local.", RecordType::A), Answer::Outside);
    }

    /// Everything a zone holds, in a comparable form.
    fn contents(z: &Zone) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut records: Vec<String> = z
            .records
            .iter()
            .flat_map(|(o, v)| v.iter().map(move |d| format!("{o} {d}")))
            .collect();
        records.sort();
        let mut nts: Vec<String> = z
            .non_terminals
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        nts.sort();
        let mut pods: Vec<String> = z
            .pod_ips
            .keys()
            .map(|(ns, ip)| format!("{ns} {ip}"))
            .collect();
        pods.sort();
        (records, nts, pods)
    }

    #[test]
    fn an_updated_zone_equals_the_zone_built_from_scratch() {
        let cfg = ZoneConfig::default();
        let st = state();
        let mut store = store_of(&st);
        let mut live = LiveZone::new(&cfg, &store);
        let serial = live.zone().serial;
        let steps: Vec<Vec<Update>> = vec![
            // A Service goes; a slice moves to another Service; a pod changes its address.
            vec![Update::Delete(Kind::Service, ("shop".into(), "web".into()))],
            vec![Update::apply(
                slice(
                    "shop",
                    "empty",
                    json!([{"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}}]),
                    json!([{"name": "pg", "port": 5432}]),
                )
                .into_object(),
            )],
            vec![
                Update::apply(Object::Pod(
                    serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "shop"},
                        "status": {"podIP": "10.244.9.9"}}))
                    .unwrap(),
                )),
                Update::apply(
                    svc(json!({"metadata": {"name": "web", "namespace": "other"},
                    "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}}))
                    .into_object(),
                ),
            ],
            vec![Update::Delete(
                Kind::EndpointSlice,
                ("shop".into(), "db-x".into()),
            )],
            vec![Update::Delete(Kind::Pod, ("shop".into(), "p".into()))],
        ];
        for step in steps {
            let changes = store.apply(step);
            assert!(live.apply(&store, &changes));
            let fresh = LiveZone::new(&cfg, &store).zone();
            assert_eq!(contents(&live.zone()), contents(&fresh));
        }
        assert!(live.zone().serial > serial, "each update is a new serial");
        // A change that touches no record leaves the zone and its serial alone.
        let changes = store.apply([Update::apply(Object::Node(
            serde_json::from_value(json!({"metadata": {"name": "n"}})).unwrap(),
        ))]);
        let before = live.zone().serial;
        assert!(!live.apply(&store, &changes));
        assert_eq!(live.zone().serial, before);
    }

    #[test]
    fn hosts_files_are_read_as_corednss_hosts_plugin_reads_them() {
        let (records, problems) = parse_hosts(
            "# the lab's ingress\n203.0.113.100 shop.example.com Video.example.com # both\n\nnot-an-ip x\n10.0.0.1\n",
        );
        let ip: IpAddr = "203.0.113.100".parse().unwrap();
        assert_eq!(
            records,
            vec![
                ("shop.example.com".to_string(), ip),
                ("video.example.com".to_string(), ip)
            ]
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("hosts line 4:"), "{problems:?}");
        assert!(problems[1].contains("names no host"), "{problems:?}");
        let z = Zone::new(&ZoneConfig {
            records,
            ..ZoneConfig::default()
        });
        let q: Name = "VIDEO.example.com.".parse().unwrap();
        assert!(matches!(z.lookup(&q, RecordType::A), Answer::Records(a, _) if a.len() == 1));
    }
}
