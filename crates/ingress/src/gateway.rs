//! Gateway API (GatewayClass, Gateway, HTTPRoute, ReferenceGrant) → routes and the status
//! conditions the specification asks for.
//!
//! Every Gateway of a class whose `controllerName` is [`CONTROLLER`] is served on the
//! controller's address. A listener keeps the routes attached to it, under its own hostname, so
//! a request is routed only by the routes of the most specific listener matching its host
//! (listener isolation). A route attaches to the listeners its `parentRefs` name (by
//! `sectionName` and `port`) that allow its namespace and kind and whose hostname intersects
//! one of its own; each rule is served for each intersection.

use crate::host::{HostPattern, Star};
use crate::ingress::{TlsBinding, CONTROLLER};
use crate::meta::{created, name_of, ns_of};
use crate::table::{
    Action, Backend, Entry, HeaderEdit, Match, Origin, PathChange, PathMatch, Precedence, Redirect,
    Rewrite, Rule, ServicePort, Table, Target,
};
use cluster::gateway::*;
use cluster::selector::{Labels, Selector};
use http::{HeaderName, HeaderValue, Method};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// What the Gateway API objects are compiled against.
pub struct Inputs<'a> {
    pub classes: &'a [&'a GatewayClass],
    pub gateways: &'a [&'a Gateway],
    pub routes: &'a [&'a HttpRoute],
    pub grants: &'a [&'a ReferenceGrant],
    /// Namespace labels, for `allowedRoutes.namespaces.from: Selector`.
    pub namespaces: &'a BTreeMap<String, Labels>,
    /// Services that exist (namespace, name).
    pub services: &'a BTreeSet<(String, String)>,
    /// Secrets of type `kubernetes.io/tls` that exist (namespace, name).
    pub tls_secrets: &'a BTreeSet<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    pub name: String,
    pub attached_routes: usize,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayStatus {
    pub namespace: String,
    pub name: String,
    pub conditions: Vec<Condition>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStatus {
    pub namespace: String,
    pub name: String,
    /// Per parentRef this controller handles: its conditions.
    pub parents: Vec<(ParentRef, Vec<Condition>)>,
}

/// The statuses and TLS bindings the Gateway API objects give.
#[derive(Debug, Default)]
pub struct Compiled {
    pub classes: Vec<(String, Vec<Condition>)>,
    pub gateways: Vec<GatewayStatus>,
    pub routes: Vec<RouteStatus>,
    pub tls: Vec<TlsBinding>,
}

impl Inputs<'_> {
    /// Whether a ReferenceGrant in `to_ns` lets a `from_kind` of `from_ns` refer to the
    /// `to_kind` named `to_name` (group "" is the core group).
    fn granted(&self, from: (&str, &str, &str), to: (&str, &str, &str, &str)) -> bool {
        let (from_group, from_kind, from_ns) = from;
        let (to_group, to_kind, to_ns, to_name) = to;
        from_ns == to_ns
            || self.grants.iter().any(|g| {
                ns_of(&g.metadata) == to_ns
                    && g.spec.from.iter().any(|f| {
                        f.group == from_group && f.kind == from_kind && f.namespace == from_ns
                    })
                    && g.spec.to.iter().any(|t| {
                        t.group == to_group
                            && t.kind == to_kind
                            && t.name.as_deref().is_none_or(|n| n == to_name)
                    })
            })
    }
}

/// A listener as compiled: what routes it admits, where its routes go.
struct Served<'a> {
    gateway: &'a Gateway,
    listener: &'a Listener,
    hostname: HostPattern,
    /// Programmed: valid, its references resolved, not in conflict.
    ok: bool,
    namespaces: Admit,
    kinds_ok: bool,
    attached: usize,
}

enum Admit {
    Same,
    All,
    Selector(Selector),
    None,
}

/// Adds the routes of this controller's Gateways to `table`.
pub fn compile(inputs: &Inputs, table: &mut Table) -> Compiled {
    let mut out = Compiled::default();
    let ours: BTreeSet<&str> = inputs
        .classes
        .iter()
        .filter(|c| c.spec.controller_name == CONTROLLER)
        .map(|c| name_of(&c.metadata))
        .collect();
    for c in &ours {
        out.classes.push((
            c.to_string(),
            vec![Condition::new("Accepted", true, "Accepted", "")],
        ));
    }
    let mut served: Vec<Served> = Vec::new();
    let mut gateway_conditions: Vec<(&Gateway, usize, Vec<ListenerStatus>)> = Vec::new();
    for gw in inputs
        .gateways
        .iter()
        .filter(|g| ours.contains(g.spec.gateway_class_name.as_str()))
    {
        let first = served.len();
        let mut statuses = Vec::new();
        for l in &gw.spec.listeners {
            let (s, conditions) = listener(inputs, gw, l);
            statuses.push(ListenerStatus {
                name: l.name.clone(),
                attached_routes: 0,
                conditions,
            });
            served.push(s);
        }
        // Listeners of one Gateway on one port with one hostname conflict: none is served.
        for i in first..served.len() {
            let clash = (first..served.len()).any(|j| {
                j != i
                    && served[j].listener.port == served[i].listener.port
                    && served[j].hostname == served[i].hostname
            });
            if clash {
                served[i].ok = false;
                let c = &mut statuses[i - first].conditions;
                c.retain(|c| c.kind != "Programmed" && c.kind != "Conflicted");
                c.push(Condition::new(
                    "Conflicted",
                    true,
                    "HostnameConflict",
                    "another listener has the same port and hostname",
                ));
                c.push(Condition::new(
                    "Programmed",
                    false,
                    "Invalid",
                    "in conflict",
                ));
            }
        }
        gateway_conditions.push((gw, first, statuses));
    }

    for route in inputs.routes {
        let rns = ns_of(&route.metadata);
        let mut parents = Vec::new();
        let mut rules: Option<RouteRules> = None;
        for p in &route.spec.parent_refs {
            if p.group.as_deref().unwrap_or(GROUP) != GROUP
                || p.kind.as_deref().unwrap_or("Gateway") != "Gateway"
            {
                continue;
            }
            let gns = p.namespace.as_deref().unwrap_or(rns);
            let candidates: Vec<usize> = (0..served.len())
                .filter(|&i| {
                    let s = &served[i];
                    ns_of(&s.gateway.metadata) == gns
                        && name_of(&s.gateway.metadata) == p.name
                        && p.section_name
                            .as_ref()
                            .is_none_or(|n| *n == s.listener.name)
                        && p.port.is_none_or(|port| port == s.listener.port)
                })
                .collect();
            let gateway_is_ours = inputs.gateways.iter().any(|g| {
                ns_of(&g.metadata) == gns
                    && name_of(&g.metadata) == p.name
                    && ours.contains(g.spec.gateway_class_name.as_str())
            });
            if !gateway_is_ours {
                continue;
            }
            let compiled = rules.get_or_insert_with(|| compile_rules(inputs, route));
            let mut conditions = Vec::new();
            if candidates.is_empty() {
                conditions.push(Condition::new(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    "no listener of the Gateway has that sectionName and port",
                ));
            } else {
                let admitted: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| served[i].ok && served[i].admits(rns, inputs.namespaces))
                    .collect();
                let placed: Vec<(usize, Vec<HostPattern>)> = admitted
                    .iter()
                    .filter_map(|&i| {
                        let hosts = intersections(&served[i].hostname, &route.spec.hostnames);
                        (!hosts.is_empty()).then_some((i, hosts))
                    })
                    .collect();
                match (&compiled, placed.is_empty()) {
                    (Err(c), _) => conditions.push(c.clone()),
                    (Ok(_), true) => conditions.push(if admitted.is_empty() {
                        Condition::new(
                            "Accepted",
                            false,
                            "NotAllowedByListeners",
                            "no listener it names allows routes of this namespace and kind",
                        )
                    } else {
                        Condition::new(
                            "Accepted",
                            false,
                            "NoMatchingListenerHostname",
                            "no hostname of the route intersects a listener's",
                        )
                    }),
                    (Ok((crules, refs)), false) => {
                        conditions.push(Condition::new("Accepted", true, "Accepted", ""));
                        conditions.push(refs.clone().unwrap_or_else(|| {
                            Condition::new("ResolvedRefs", true, "ResolvedRefs", "")
                        }));
                        let created = created(&route.metadata);
                        for (i, hosts) in placed {
                            served[i].attached += 1;
                            let s = &served[i];
                            let l = table
                                .ports
                                .entry(s.listener.port)
                                .or_default()
                                .listeners
                                .entry(&s.hostname);
                            for h in &hosts {
                                let entries = l.hosts.entry(h);
                                for r in crules {
                                    for (k, m) in r.matches.iter().enumerate() {
                                        entries.push(Entry {
                                            precedence: Precedence::new(
                                                m,
                                                &created,
                                                &r.rule.origin,
                                                k,
                                            ),
                                            matcher: m.clone(),
                                            rule: r.rule.clone(),
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
            }
            parents.push((p.clone(), conditions));
        }
        if !parents.is_empty() {
            out.routes.push(RouteStatus {
                namespace: rns.to_string(),
                name: name_of(&route.metadata).to_string(),
                parents,
            });
        }
    }

    for (gw, first, mut statuses) in gateway_conditions {
        for (k, st) in statuses.iter_mut().enumerate() {
            st.attached_routes = served[first + k].attached;
            let s = &served[first + k];
            if s.ok {
                if let Some(tls) = &s.listener.tls {
                    for r in &tls.certificate_refs {
                        out.tls.push(TlsBinding {
                            hosts: vec![s.hostname.clone()],
                            namespace: r
                                .namespace
                                .clone()
                                .unwrap_or_else(|| ns_of(&gw.metadata).to_string()),
                            secret: r.name.clone(),
                            origin: format!(
                                "Gateway {}/{} listener {}",
                                ns_of(&gw.metadata),
                                name_of(&gw.metadata),
                                s.listener.name
                            ),
                        });
                    }
                }
            }
        }
        let any_ok =
            statuses.is_empty() || served[first..first + statuses.len()].iter().any(|s| s.ok);
        out.gateways.push(GatewayStatus {
            namespace: ns_of(&gw.metadata).to_string(),
            name: name_of(&gw.metadata).to_string(),
            conditions: vec![
                Condition::new("Accepted", true, "Accepted", ""),
                if any_ok {
                    Condition::new("Programmed", true, "Programmed", "")
                } else {
                    Condition::new("Programmed", false, "Invalid", "no listener is valid")
                },
            ],
            listeners: statuses,
        });
    }
    out
}

impl Served<'_> {
    fn admits(&self, route_ns: &str, namespaces: &BTreeMap<String, Labels>) -> bool {
        self.kinds_ok
            && match &self.namespaces {
                Admit::Same => ns_of(&self.gateway.metadata) == route_ns,
                Admit::All => true,
                Admit::Selector(s) => namespaces.get(route_ns).is_some_and(|l| s.matches(l)),
                Admit::None => false,
            }
    }
}

/// A listener's checks: protocol, TLS references, allowed routes.
fn listener<'a>(inputs: &Inputs, gw: &'a Gateway, l: &'a Listener) -> (Served<'a>, Vec<Condition>) {
    let gns = ns_of(&gw.metadata);
    let mut accepted = Condition::new("Accepted", true, "Accepted", "");
    let mut refs = Condition::new("ResolvedRefs", true, "ResolvedRefs", "");
    match l.protocol.as_str() {
        "HTTP" => {}
        "HTTPS" => {
            let tls = l.tls.clone().unwrap_or_default();
            if tls.mode.as_deref().unwrap_or("Terminate") != "Terminate" {
                accepted = Condition::new(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    "tls.mode Passthrough needs a TLSRoute, which this controller does not serve",
                );
            } else if tls.certificate_refs.is_empty() {
                refs = Condition::new(
                    "ResolvedRefs",
                    false,
                    "InvalidCertificateRef",
                    "an HTTPS listener needs tls.certificateRefs",
                );
            }
            for (i, r) in tls.certificate_refs.iter().enumerate() {
                let ns = r.namespace.as_deref().unwrap_or(gns);
                let field = format!("tls.certificateRefs[{i}]");
                if !r.group.as_deref().unwrap_or("").is_empty()
                    || r.kind.as_deref().unwrap_or("Secret") != "Secret"
                {
                    refs = Condition::new(
                        "ResolvedRefs",
                        false,
                        "InvalidCertificateRef",
                        format!("{field}: only core Secrets are supported"),
                    );
                } else if !inputs.granted((GROUP, "Gateway", gns), ("", "Secret", ns, &r.name)) {
                    refs = Condition::new("ResolvedRefs", false, "RefNotPermitted", format!("{field}: no ReferenceGrant in {ns} lets Gateways of {gns} use Secret {}", r.name));
                } else if !inputs
                    .tls_secrets
                    .contains(&(ns.to_string(), r.name.clone()))
                {
                    refs = Condition::new("ResolvedRefs", false, "InvalidCertificateRef", format!("{field}: Secret {ns}/{} does not exist or is not of type kubernetes.io/tls", r.name));
                }
            }
        }
        other => {
            accepted = Condition::new(
                "Accepted",
                false,
                "UnsupportedProtocol",
                format!("protocol {other:?}: this controller serves HTTP and HTTPS"),
            );
        }
    }
    let allowed = l.allowed_routes.clone().unwrap_or_default();
    let from = allowed.namespaces.clone().unwrap_or_default();
    let namespaces = match from.from.as_deref().unwrap_or("Same") {
        "Same" => Admit::Same,
        "All" => Admit::All,
        "Selector" => match from
            .selector
            .as_ref()
            .map(|s| Selector::parse(s, "listener", "allowedRoutes.namespaces.selector"))
        {
            Some(Ok(s)) => Admit::Selector(s),
            _ => Admit::None,
        },
        _ => Admit::None,
    };
    let kinds_ok = allowed.kinds.as_ref().is_none_or(|ks| {
        ks.iter()
            .any(|k| k.kind == "HTTPRoute" && k.group.as_deref().unwrap_or(GROUP) == GROUP)
    });
    if !kinds_ok {
        refs = Condition::new(
            "ResolvedRefs",
            false,
            "InvalidRouteKinds",
            "allowedRoutes.kinds names no kind this controller serves (HTTPRoute)",
        );
    }
    let ok = accepted.status == "True" && refs.status == "True";
    let programmed = if ok {
        Condition::new("Programmed", true, "Programmed", "")
    } else {
        Condition::new("Programmed", false, "Invalid", "")
    };
    let served = Served {
        gateway: gw,
        listener: l,
        hostname: HostPattern::parse(l.hostname.as_deref().unwrap_or(""), Star::Labels),
        ok,
        namespaces,
        kinds_ok,
        attached: 0,
    };
    (
        served,
        vec![
            accepted,
            refs,
            programmed,
            Condition::new("Conflicted", false, "NoConflicts", ""),
        ],
    )
}

/// A route's hostnames intersected with a listener's (none: the listener's own).
fn intersections(listener: &HostPattern, hostnames: &[String]) -> Vec<HostPattern> {
    if hostnames.is_empty() {
        return vec![listener.clone()];
    }
    let mut out: Vec<HostPattern> = hostnames
        .iter()
        .filter_map(|h| listener.intersect(&HostPattern::parse(h, Star::Labels)))
        .collect();
    out.dedup();
    out
}

/// A route's rules with its ResolvedRefs problem, or the condition refusing it.
type RouteRules = Result<(Vec<CompiledRule>, Option<Condition>), Condition>;

struct CompiledRule {
    matches: Vec<Match>,
    rule: Arc<Rule>,
}

/// A route's rules, or the Accepted=False condition that refuses it; with the ResolvedRefs
/// condition when a backend cannot be followed.
fn compile_rules(inputs: &Inputs, route: &HttpRoute) -> RouteRules {
    let rns = ns_of(&route.metadata);
    let bad = |field: String, why: String| {
        Condition::new(
            "Accepted",
            false,
            "UnsupportedValue",
            format!("{field}: {why}"),
        )
    };
    let mut out = Vec::new();
    let mut refs: Option<Condition> = None;
    for (i, r) in route.spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let mut matches = Vec::new();
        let defaults = [HttpRouteMatch::default()];
        let given = if r.matches.is_empty() {
            &defaults[..]
        } else {
            &r.matches[..]
        };
        for (j, m) in given.iter().enumerate() {
            let f = format!("{field}.matches[{j}]");
            let p = m.path.clone().unwrap_or_default();
            let value = p.value.as_deref().unwrap_or("/");
            if !value.starts_with('/') {
                return Err(bad(
                    format!("{f}.path.value"),
                    format!("{value:?} must start with \"/\""),
                ));
            }
            let path = match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => PathMatch::Exact(value.to_string()),
                "PathPrefix" => PathMatch::prefix(value),
                other => {
                    return Err(bad(
                        format!("{f}.path.type"),
                        format!("{other} is not supported (Exact, PathPrefix)"),
                    ))
                }
            };
            let mut headers: Vec<(HeaderName, String)> = Vec::new();
            for (k, h) in m.headers.iter().enumerate() {
                if h.kind.as_deref().unwrap_or("Exact") != "Exact" {
                    return Err(bad(
                        format!("{f}.headers[{k}].type"),
                        "only Exact is supported".into(),
                    ));
                }
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|e| bad(format!("{f}.headers[{k}].name"), e.to_string()))?;
                // Only the first of equal names counts.
                if !headers.iter().any(|(n, _)| *n == name) {
                    headers.push((name, h.value.clone()));
                }
            }
            let mut query: Vec<(String, String)> = Vec::new();
            for (k, q) in m.query_params.iter().enumerate() {
                if q.kind.as_deref().unwrap_or("Exact") != "Exact" {
                    return Err(bad(
                        format!("{f}.queryParams[{k}].type"),
                        "only Exact is supported".into(),
                    ));
                }
                if !query.iter().any(|(n, _)| *n == q.name) {
                    query.push((q.name.clone(), q.value.clone()));
                }
            }
            let method = match &m.method {
                Some(s) => Some(
                    Method::from_bytes(s.as_bytes())
                        .map_err(|e| bad(format!("{f}.method"), e.to_string()))?,
                ),
                None => None,
            };
            matches.push(Match {
                path,
                method,
                headers,
                query,
            });
        }
        let mut request_headers = HeaderEdit::default();
        let mut response_headers = HeaderEdit::default();
        let mut redirect = None;
        let mut rewrite = Rewrite::default();
        for (k, flt) in r.filters.iter().enumerate() {
            let f = format!("{field}.filters[{k}]");
            let prefix_only = |pm: &Option<PathModifier>| -> Result<Option<PathChange>, Condition> {
                let Some(pm) = pm else { return Ok(None) };
                match pm.kind.as_str() {
                    "ReplaceFullPath" => Ok(Some(PathChange::Full(
                        pm.replace_full_path.clone().unwrap_or_else(|| "/".into()),
                    ))),
                    "ReplacePrefixMatch"
                        if matches
                            .iter()
                            .all(|m| matches!(m.path, PathMatch::Prefix(_))) =>
                    {
                        Ok(Some(PathChange::Prefix(
                            pm.replace_prefix_match
                                .clone()
                                .unwrap_or_else(|| "/".into()),
                        )))
                    }
                    "ReplacePrefixMatch" => Err(bad(
                        format!("{f}.path"),
                        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix"
                            .into(),
                    )),
                    other => Err(bad(
                        format!("{f}.path.type"),
                        format!("{other} is not ReplaceFullPath or ReplacePrefixMatch"),
                    )),
                }
            };
            match flt.kind.as_str() {
                "RequestHeaderModifier" => request_headers = header_edit(flt.request_header_modifier.as_ref(), &f).map_err(|e| bad(f.clone(), e))?,
                "ResponseHeaderModifier" => response_headers = header_edit(flt.response_header_modifier.as_ref(), &f).map_err(|e| bad(f.clone(), e))?,
                "RequestRedirect" => {
                    let rr = flt.request_redirect.clone().unwrap_or_default();
                    redirect = Some(Redirect {
                        scheme: rr.scheme.clone(),
                        hostname: rr.hostname.clone(),
                        port: rr.port,
                        path: prefix_only(&rr.path)?,
                        status: rr.status_code.unwrap_or(302),
                    });
                }
                "URLRewrite" => {
                    let u = flt.url_rewrite.clone().unwrap_or_default();
                    rewrite = Rewrite { hostname: u.hostname.clone(), path: prefix_only(&u.path)? };
                }
                other => return Err(bad(format!("{f}.type"), format!("{other} is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite)"))),
            }
        }
        let mut backends = Vec::new();
        for (k, b) in r.backend_refs.iter().enumerate() {
            let f = format!("{field}.backendRefs[{k}]");
            let ns = b.namespace.as_deref().unwrap_or(rns);
            let (group, kind) = (
                b.group.as_deref().unwrap_or(""),
                b.kind.as_deref().unwrap_or("Service"),
            );
            let problem = if !group.is_empty() || kind != "Service" {
                Some((
                    "InvalidKind",
                    format!("{f}: {kind} of group {group:?} is not a Service"),
                ))
            } else if !inputs.granted((GROUP, "HTTPRoute", rns), ("", "Service", ns, &b.name)) {
                Some((
                    "RefNotPermitted",
                    format!(
                        "{f}: no ReferenceGrant in {ns} lets HTTPRoutes of {rns} use Service {}",
                        b.name
                    ),
                ))
            } else if !inputs.services.contains(&(ns.to_string(), b.name.clone())) {
                Some((
                    "BackendNotFound",
                    format!("{f}: Service {ns}/{} does not exist", b.name),
                ))
            } else if b.port.is_none() {
                Some((
                    "BackendNotFound",
                    format!("{f}.port: a Service backend needs a port"),
                ))
            } else {
                None
            };
            let target = match problem {
                Some((reason, message)) => {
                    refs.get_or_insert_with(|| {
                        Condition::new("ResolvedRefs", false, reason, message.clone())
                    });
                    Target::Invalid(message)
                }
                None => Target::Service {
                    namespace: ns.to_string(),
                    name: b.name.clone(),
                    port: ServicePort::Number(b.port.unwrap_or(0)),
                },
            };
            backends.push(Backend {
                target,
                weight: b.weight.unwrap_or(1),
            });
        }
        let timeout = match r.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
            None => None,
            Some(t) => Some(parse_duration(t).ok_or_else(|| {
                bad(
                    format!("{field}.timeouts.request"),
                    format!("{t:?} is not a duration like 10s, 500ms or 1h30m"),
                )
            })?),
        };
        let action = match redirect {
            Some(r) => Action::Redirect(r),
            None => Action::Forward {
                backends,
                rewrite,
                timeout,
            },
        };
        out.push(CompiledRule {
            matches,
            rule: Arc::new(Rule {
                origin: Origin {
                    kind: "HTTPRoute",
                    namespace: rns.to_string(),
                    name: name_of(&route.metadata).to_string(),
                    rule: i,
                },
                request_headers,
                response_headers,
                action,
            }),
        });
    }
    Ok((out, refs))
}

fn header_edit(m: Option<&HeaderModifier>, field: &str) -> Result<HeaderEdit, String> {
    let Some(m) = m else {
        return Ok(HeaderEdit::default());
    };
    let pair = |p: &HeaderValuePair| -> Result<(HeaderName, HeaderValue), String> {
        Ok((
            HeaderName::from_bytes(p.name.as_bytes())
                .map_err(|e| format!("{field}: header {:?}: {e}", p.name))?,
            HeaderValue::from_str(&p.value)
                .map_err(|e| format!("{field}: value of {:?}: {e}", p.name))?,
        ))
    };
    Ok(HeaderEdit {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|e| format!("{field}: header {n:?}: {e}"))
            })
            .collect::<Result<_, _>>()?,
    })
}

/// A Gateway API duration (GEP-2257): numbers with units h, m, s, ms, e.g. `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.bytes().next()? {
                b'h' => (Duration::from_secs(3600), 1),
                b'm' => (Duration::from_secs(60), 1),
                b's' => (Duration::from_secs(1), 1),
                _ => return None,
            }
        };
        total += unit * u32::try_from(n).ok()?;
        rest = &rest[len..];
    }
    Some(total)
}

#[cfg(test)]
#[path = "gateway_tests.rs"]
mod tests;
