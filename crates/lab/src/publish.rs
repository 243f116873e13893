//! What the lab publishes where the agents, the DNS and ingress pods read (the API server's
//! part): Services with their allocations and EndpointSlices, Pods, Namespaces and policies,
//! the edge's objects; the load-balancer routes of the lab router; and, as external-dns would,
//! the served hostnames to the lab internet's DNS.

use crate::plan::NodePlan;
use crate::{dns, edge, infra, io, policies, services, write_atomic, Lab, State};
use cluster::manifests::namespaced;
use cluster::Manifests;
use infra::ns_name;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use netlink::LinkInfo;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

impl Lab {
    /// Checks Services as an agent will (errors name the Service and field) and fills in what
    /// the API server would; `s.allocations` is updated.
    pub(crate) fn checked_services(
        s: &mut State,
        services: &[Service],
    ) -> Result<Vec<Service>, String> {
        let filled = services::allocate(s, services)?;
        let cfg = proxy::Config {
            node: String::new(),
            node_ips: Vec::new(),
            cluster_cidr: s.spec.cluster_cidr,
            service_cidr: s.spec.service_cidr,
            // No node: its part of the table is not what is checked.
            pod_cidr: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 32).expect("a /32"),
            node_ports: services::NODE_PORTS,
        };
        proxy::plan(&cfg, &filled, &[]).map_err(|e| e.to_string())?;
        Ok(filled)
    }

    /// Writes the Namespaces and NetworkPolicies where the agents read them; whether any changed.
    pub(crate) fn publish_policies(&self, m: &Manifests) -> Result<bool, String> {
        let want: BTreeMap<PathBuf, String> = policies::objects(m)
            .into_iter()
            .map(|(f, text)| (self.dir.join("cluster").join(f), text))
            .collect();
        self.sync_files(&["cluster/namespaces", "cluster/networkpolicies"], &want)
    }

    /// Writes the Ingress, IngressClass, Secret and Gateway API objects where the ingress
    /// controller reads them; whether any changed.
    pub(crate) fn publish_edge(&self, m: &Manifests) -> Result<bool, String> {
        let want: BTreeMap<PathBuf, String> = edge::objects(m)
            .into_iter()
            .map(|(f, text)| (self.dir.join("cluster").join(f), text))
            .collect();
        let dirs = edge::object_dirs();
        self.sync_files(&dirs.iter().map(String::as_str).collect::<Vec<_>>(), &want)
    }

    /// The hosts file the lab internet's DNS serves.
    pub(crate) fn internet_hosts(&self) -> PathBuf {
        self.dir.join("internet/hosts")
    }

    /// Publishes the hostnames the ingress controller serves to the lab internet's DNS (see
    /// [`edge::hosts`]) and waits until it answers them.
    pub(crate) fn publish_hostnames(&self, m: &Manifests) -> Result<(), String> {
        let text = edge::hosts(m, &self.edge_status());
        let path = self.internet_hosts();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            write_atomic(&path, &text)?;
        }
        let want = state::file::text_mark(&text);
        let loaded = self.dir.join("status/internet-dns/internet.hosts");
        self.wait_for("the lab internet's DNS did not load the hostnames", || {
            Ok(
                if std::fs::read_to_string(&loaded).ok().as_deref() == Some(want.as_str()) {
                    Vec::new()
                } else {
                    vec!["internet-dns".to_string()]
                },
            )
        })
    }

    /// Makes the files of `dirs` exactly `want` (unchanged files are not rewritten, so the
    /// agents' file source sees only what changed); whether anything changed.
    pub(crate) fn sync_files(
        &self,
        dirs: &[&str],
        want: &BTreeMap<PathBuf, String>,
    ) -> Result<bool, String> {
        let mut changed = false;
        for d in dirs {
            let dir = self.dir.join(d);
            std::fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
            for e in std::fs::read_dir(&dir)
                .map_err(|e| io(dir.display(), e))?
                .flatten()
            {
                if !want.contains_key(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                    changed = true;
                }
            }
        }
        for (path, text) in want {
            if std::fs::read_to_string(path).ok().as_deref() != Some(text.as_str()) {
                write_atomic(path, text)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Writes the Services and their EndpointSlices where the agents read them.
    pub(crate) fn publish_services(
        &self,
        s: &mut State,
        services: &[Service],
    ) -> Result<(), String> {
        let filled = Lab::checked_services(s, services)?;
        let mut want: BTreeMap<PathBuf, String> = BTreeMap::new();
        for svc in &filled {
            let (ns, name) = namespaced(&svc.metadata);
            let file = format!("{ns}.{name}.json");
            want.insert(
                self.dir.join("cluster/services").join(&file),
                serde_json::to_string_pretty(svc).expect("json"),
            );
            if let Some(slice) = services::endpoint_slice(svc, &s.pods) {
                if slice.endpoints.as_ref().is_none_or(|e| e.is_empty()) {
                    // As kubectl would not stop you either: a warning, not an error.
                    eprintln!("warning: Service {ns}/{name}: spec.selector matches no pod");
                }
                want.insert(
                    self.dir.join("cluster/endpointslices").join(&file),
                    serde_json::to_string_pretty(&slice).expect("json"),
                );
            }
        }
        for (file, text) in dns::pod_objects(&s.pods) {
            want.insert(self.dir.join("cluster/pods").join(file), text);
        }
        self.sync_files(
            &["cluster/services", "cluster/endpointslices", "cluster/pods"],
            &want,
        )?;
        self.route_load_balancers(s, &filled)?;
        s.services = filled;
        self.save(s)
    }

    /// Sends each load-balancer IP from the lab router to one node, as MetalLB's L2 mode elects
    /// an announcing node: for `externalTrafficPolicy: Local`, a node with a ready endpoint.
    pub(crate) fn route_load_balancers(
        &self,
        s: &State,
        services: &[Service],
    ) -> Result<(), String> {
        let lab = self.name();
        let rt = infra::open_ns(&ns_name(&lab, "router"))?;
        let nl = infra::nl(&rt)?;
        let mut want: BTreeMap<Ipv4Addr, &NodePlan> = BTreeMap::new();
        for svc in services {
            let Some(ip) = svc.status.as_ref().and_then(|st| {
                st.load_balancer
                    .as_ref()?
                    .ingress
                    .as_ref()?
                    .first()?
                    .ip
                    .as_deref()?
                    .parse()
                    .ok()
            }) else {
                continue;
            };
            let local = svc
                .spec
                .as_ref()
                .and_then(|sp| sp.external_traffic_policy.as_deref())
                == Some("Local");
            let node = if local {
                services::ready_endpoints(svc, &s.pods)
                    .into_iter()
                    .filter_map(|(_, node)| node)
                    .min()
                    .and_then(|n| s.nodes.iter().find(|x| x.name == n))
            } else {
                s.nodes.first()
            };
            if let Some(n) = node {
                want.insert(ip, n);
            }
        }
        let pool = s.spec.load_balancer_pool;
        let mut batch = Vec::new();
        let existing: Vec<netlink::RouteSpec> = nl
            .routes(true)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| r.protocol == Some(routing::PROTOCOL) && r.dst.prefix_len() == 32)
            .filter(|r| matches!(r.dst.addr(), std::net::IpAddr::V4(a) if pool.contains(&a)))
            .collect();
        for r in &existing {
            let keep = match r.dst.addr() {
                std::net::IpAddr::V4(a) => want.get(&a).is_some_and(|n| r.gw == Some(n.ip.into())),
                _ => false,
            };
            if !keep {
                batch.push(netlink::Request::delete_route(r));
            }
        }
        for (ip, n) in &want {
            if existing
                .iter()
                .any(|r| r.dst.addr() == std::net::IpAddr::V4(*ip) && r.gw == Some(n.ip.into()))
            {
                continue;
            }
            let dev = nl
                .link_by_name(&format!("eth{}", n.subnet))
                .map_err(|e| e.to_string())?
                .ok_or("the router's underlay leg is missing")?
                .index();
            let mut r = netlink::RouteSpec::new(
                ipnet::IpNet::new((*ip).into(), 32).expect("/32"),
                Some(n.ip.into()),
                dev,
            );
            r.protocol = Some(routing::PROTOCOL);
            batch.push(netlink::Request::replace_route(&r));
        }
        nl.apply(batch).map(drop).map_err(|e| e.to_string())
    }
}
