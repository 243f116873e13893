//! Ingress (`networking.k8s.io/v1`) → routes.
//!
//! Which Ingresses are this controller's ([`Classes::claims`]): `spec.ingressClassName` naming
//! an IngressClass whose `spec.controller` is [`CONTROLLER`]; else the legacy
//! `kubernetes.io/ingress.class` annotation naming such a class (or `flatnet`); else, with no
//! class at all, when such a class carries `ingressclass.kubernetes.io/is-default-class: "true"`.
//!
//! Every rule is served on the HTTP and the HTTPS port, each host as a listener of its own (so a
//! Gateway's wildcard listener on the same port does not take an Ingress's exact host); hosts
//! are exact or `*.` plus a suffix matching exactly one label; a `defaultBackend` serves what no
//! rule of the Ingress's hosts matches, and every host no listener takes; `ImplementationSpecific` paths
//! are prefixes. Across Ingresses, equal matches go to the oldest (then namespace/name), and so
//! does the `defaultBackend`. A rule that cannot be served is left out and reported naming the
//! object and field; the rest of the Ingress is served.

use crate::host::{HostPattern, Star};
use crate::meta::{created, name_of, ns_of};
use crate::table::{
    Action, Backend, Entry, HeaderEdit, Match, Origin, PathMatch, Precedence, Rewrite, Rule,
    ServicePort, Table, Target,
};
use cluster::{is_dns_label, ModelError};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use std::sync::Arc;

/// This controller's name in IngressClass `spec.controller` and GatewayClass
/// `spec.controllerName`.
pub const CONTROLLER: &str = "flatnet.dev/ingress";
const DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";
const LEGACY_CLASS: &str = "kubernetes.io/ingress.class";

/// The IngressClasses of this controller.
pub struct Classes {
    names: Vec<String>,
    default: bool,
}

impl Classes {
    pub fn new<'a>(classes: impl IntoIterator<Item = &'a IngressClass>) -> Classes {
        let ours: Vec<&IngressClass> = classes
            .into_iter()
            .filter(|c| c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER))
            .collect();
        Classes {
            names: ours
                .iter()
                .filter_map(|c| c.metadata.name.clone())
                .collect(),
            default: ours.iter().any(|c| {
                c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS))
                    .is_some_and(|v| v == "true")
            }),
        }
    }

    pub fn claims(&self, ing: &Ingress) -> bool {
        if let Some(class) = ing
            .spec
            .as_ref()
            .and_then(|s| s.ingress_class_name.as_ref())
        {
            return self.names.contains(class);
        }
        let legacy = ing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LEGACY_CLASS));
        match legacy {
            Some(class) => class == "flatnet" || self.names.contains(class),
            None => self.default,
        }
    }
}

/// The ports Ingresses are served on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: u16,
    pub https: u16,
}

/// A TLS certificate an Ingress asks for: hosts it serves (none: every host of the Ingress's
/// rules, as the API defines) from Secret `namespace/secret`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsBinding {
    pub hosts: Vec<HostPattern>,
    pub namespace: String,
    pub secret: String,
    pub origin: String,
}

fn object(ing: &Ingress) -> String {
    format!(
        "Ingress {}/{}",
        ns_of(&ing.metadata),
        name_of(&ing.metadata)
    )
}

/// A backend as a target (a `resource` backend is not supported: its requests get a 500).
fn target(ns: &str, b: &IngressBackend, obj: &str, field: &str) -> Result<Target, ModelError> {
    if let Some(r) = &b.resource {
        return Ok(Target::Invalid(format!(
            "{obj}: {field}.resource ({}) is not supported; use a service backend",
            r.kind
        )));
    }
    let svc = b
        .service
        .as_ref()
        .ok_or_else(|| ModelError::new(obj, field, "needs service (or resource)"))?;
    let port = svc
        .port
        .as_ref()
        .ok_or_else(|| ModelError::new(obj, format!("{field}.service.port"), "is required"))?;
    let port = match (&port.name, port.number) {
        (Some(name), None) if !name.is_empty() => ServicePort::Name(name.clone()),
        (None, Some(n)) if (1..=65535).contains(&n) => ServicePort::Number(n as u16),
        _ => {
            return Err(ModelError::new(
                obj,
                format!("{field}.service.port"),
                "needs exactly one of name or number (1-65535)",
            ))
        }
    };
    Ok(Target::Service {
        namespace: ns.to_string(),
        name: svc.name.clone(),
        port,
    })
}

fn forward(origin: Origin, target: Target) -> Arc<Rule> {
    Arc::new(Rule {
        origin,
        request_headers: HeaderEdit::default(),
        response_headers: HeaderEdit::default(),
        action: Action::Forward {
            backends: vec![Backend { target, weight: 1 }],
            rewrite: Rewrite::default(),
            timeout: None,
        },
    })
}

/// A rule's host, checked as the API server checks it (a DNS name, `*` only as the whole first
/// label, no IP address).
fn host(h: &str, obj: &str, field: &str) -> Result<HostPattern, ModelError> {
    let bare = h.strip_prefix("*.").unwrap_or(h);
    let valid = !bare.is_empty()
        && bare.parse::<std::net::IpAddr>().is_err()
        && bare.split('.').all(is_dns_label);
    if !valid {
        return Err(ModelError::new(
            obj,
            field,
            format!("{h:?} is not a valid host: a lower-case DNS name, optionally starting with \"*.\", not an IP address"),
        ));
    }
    Ok(HostPattern::parse(h, Star::OneLabel))
}

/// What the Ingresses give: their routes in `table`, their TLS bindings, their problems.
#[derive(Debug, Default)]
pub struct Compiled {
    pub tls: Vec<TlsBinding>,
    pub problems: Vec<ModelError>,
    /// The Ingresses served (namespace, name): their status gets the controller's address.
    pub claimed: Vec<(String, String)>,
}

/// Adds the routes of the Ingresses `classes` claims to `table`.
pub fn compile<'a>(
    ingresses: impl IntoIterator<Item = &'a Ingress>,
    classes: &Classes,
    ports: Ports,
    table: &mut Table,
) -> Compiled {
    let mut out = Compiled::default();
    let mut ours: Vec<&Ingress> = ingresses
        .into_iter()
        .filter(|i| classes.claims(i))
        .collect();
    // Oldest first: it keeps the default backend and wins equal matches.
    ours.sort_by_key(|i| {
        (
            created(&i.metadata),
            i.metadata.namespace.clone(),
            i.metadata.name.clone(),
        )
    });
    for ing in ours {
        let obj = object(ing);
        let ns = ns_of(&ing.metadata);
        let name = name_of(&ing.metadata);
        out.claimed.push((ns.to_string(), name.to_string()));
        let Some(spec) = &ing.spec else { continue };
        let origin = |rule: usize| Origin {
            kind: "Ingress",
            namespace: ns.to_string(),
            name: name.to_string(),
            rule,
        };
        let mut rules: Vec<(HostPattern, Match, Arc<Rule>)> = Vec::new();
        let mut index = 0;
        for (i, r) in spec.rules.iter().flatten().enumerate() {
            let h = match r.host.as_deref() {
                None | Some("") => HostPattern::Any,
                Some(h) => match host(h, &obj, &format!("spec.rules[{i}].host")) {
                    Ok(h) => h,
                    Err(e) => {
                        out.problems.push(e);
                        continue;
                    }
                },
            };
            for (j, p) in r.http.iter().flat_map(|h| &h.paths).enumerate() {
                let field = format!("spec.rules[{i}].http.paths[{j}]");
                let path = p.path.as_deref().unwrap_or("/");
                let m = match p.path_type.as_str() {
                    "Exact" | "Prefix" | "ImplementationSpecific" if !path.starts_with('/') => {
                        Err(ModelError::new(
                            &obj,
                            format!("{field}.path"),
                            format!("{path:?} must be an absolute path (start with \"/\")"),
                        ))
                    }
                    "Exact" => Ok(PathMatch::Exact(path.to_string())),
                    "Prefix" | "ImplementationSpecific" => Ok(PathMatch::prefix(path)),
                    other => Err(ModelError::new(
                        &obj,
                        format!("{field}.pathType"),
                        format!("{other:?} is not one of Exact, Prefix, ImplementationSpecific"),
                    )),
                };
                let t = target(ns, &p.backend, &obj, &format!("{field}.backend"));
                match (m, t) {
                    (Ok(m), Ok(t)) => {
                        rules.push((h.clone(), Match::path(m), forward(origin(index), t)));
                    }
                    (Err(e), _) | (_, Err(e)) => out.problems.push(e),
                }
                index += 1;
            }
        }
        let fallback = match spec.default_backend.as_ref().map(|b| {
            target(ns, b, &obj, "spec.defaultBackend").map(|t| forward(origin(usize::MAX), t))
        }) {
            Some(Ok(rule)) => Some(rule),
            Some(Err(e)) => {
                out.problems.push(e);
                None
            }
            None => None,
        };
        let created = created(&ing.metadata);
        for port in [ports.http, ports.https] {
            let listeners = &mut table.ports.entry(port).or_default().listeners;
            // Each host is a listener of its own (a Gateway listener for a wider wildcard on
            // the same port does not take it); the fallback serves every host of the Ingress.
            let mut touched = vec![HostPattern::Any];
            for (k, (h, m, rule)) in rules.iter().enumerate() {
                listeners.entry(h).hosts.entry(h).push(Entry {
                    precedence: Precedence::new(m, &created, &rule.origin, k),
                    matcher: m.clone(),
                    rule: rule.clone(),
                });
                if !touched.contains(h) {
                    touched.push(h.clone());
                }
            }
            for h in &touched {
                let listener = listeners.entry(h);
                if listener.fallback.is_none() {
                    listener.fallback = fallback.clone();
                }
            }
        }
        for (i, t) in spec.tls.iter().flatten().enumerate() {
            let Some(secret) = t.secret_name.clone().filter(|s| !s.is_empty()) else {
                continue; // no secret: the default certificate (as the API leaves to us)
            };
            let mut hosts = Vec::new();
            for (k, h) in t.hosts.iter().flatten().enumerate() {
                match host(h, &obj, &format!("spec.tls[{i}].hosts[{k}]")) {
                    Ok(h) => hosts.push(h),
                    Err(e) => out.problems.push(e),
                }
            }
            if t.hosts.as_ref().is_none_or(|h| h.is_empty()) {
                hosts = rules.iter().map(|(h, ..)| h.clone()).collect();
                hosts.dedup();
            }
            out.tls.push(TlsBinding {
                hosts,
                namespace: ns.to_string(),
                secret,
                origin: format!("{obj} spec.tls[{i}]"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Found, RequestView};
    use http::{HeaderMap, Method};
    use serde_json::json;

    fn ingress(name: &str, spec: serde_json::Value) -> Ingress {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "creationTimestamp": format!("2026-01-01T00:00:0{}Z", name.len() % 10)},
            "spec": spec
        }))
        .unwrap()
    }

    fn class(name: &str, controller: &str, default: bool) -> IngressClass {
        let mut c: IngressClass = serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"controller": controller}}),
        )
        .unwrap();
        if default {
            c.metadata.annotations = Some([(DEFAULT_CLASS.to_string(), "true".to_string())].into());
        }
        c
    }

    const PORTS: Ports = Ports {
        http: 80,
        https: 443,
    };

    fn build(ings: &[Ingress]) -> (Table, Compiled) {
        let classes = Classes::new(&[class("flatnet", CONTROLLER, true)]);
        let mut t = Table::default();
        let c = compile(ings, &classes, PORTS, &mut t);
        t.seal();
        (t, c)
    }

    /// The backend `host` + `path` reaches on port 80: the Service name, or "404".
    fn at(t: &Table, host: &str, path: &str) -> String {
        let headers = HeaderMap::new();
        let (p, q) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        let r = RequestView {
            host,
            method: &Method::GET,
            path: p,
            query: q,
            headers: &headers,
        };
        match t.route(80, &r) {
            Found::Rule { rule, .. } => match &rule.action {
                Action::Forward { backends, .. } => match &backends[0].target {
                    Target::Service { name, .. } => name.clone(),
                    Target::Invalid(why) => format!("invalid: {why}"),
                },
                Action::Redirect(_) => "redirect".into(),
            },
            Found::NotFound => "404".into(),
        }
    }

    fn path(p: &str, kind: &str, svc: &str) -> serde_json::Value {
        json!({"path": p, "pathType": kind, "backend": {"service": {"name": svc, "port": {"number": 80}}}})
    }

    /// The seeds' example: `/shop` and `/watch` on one host, a default backend, SNI by host.
    #[test]
    fn hosts_paths_and_the_default_backend() {
        let (t, c) = build(&[ingress(
            "store",
            json!({
                "defaultBackend": {"service": {"name": "fallback", "port": {"name": "http"}}},
                "tls": [{"hosts": ["myonlinestore.com"], "secretName": "store-tls"}],
                "rules": [
                    {"host": "myonlinestore.com", "http": {"paths": [
                        path("/shop", "Prefix", "shop-service"),
                        path("/watch", "ImplementationSpecific", "video-service")]}},
                    {"host": "*.foo.com", "http": {"paths": [path("/", "Prefix", "wild")]}},
                    {"http": {"paths": [path("/any", "Exact", "hostless")]}}
                ]
            }),
        )]);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(at(&t, "myonlinestore.com", "/shop/cart"), "shop-service");
        assert_eq!(at(&t, "myonlinestore.com", "/watch"), "video-service");
        assert_eq!(at(&t, "myonlinestore.com", "/shopping"), "fallback");
        assert_eq!(at(&t, "bar.foo.com", "/x"), "wild");
        assert_eq!(
            at(&t, "baz.bar.foo.com", "/x"),
            "fallback",
            "one label only"
        );
        assert_eq!(at(&t, "other.org", "/any"), "hostless");
        assert_eq!(at(&t, "other.org", "/any/more"), "fallback");
        assert_eq!(c.tls.len(), 1);
        assert_eq!(
            c.tls[0].hosts,
            vec![HostPattern::Exact("myonlinestore.com".into())]
        );
    }

    /// The specification's multi-path rows: longest prefix wins, `Exact` beats `Prefix`, and
    /// with no default backend an unmatched path is a 404.
    #[test]
    fn longest_path_then_exact_over_prefix() {
        let (t, _) = build(&[ingress(
            "paths",
            json!({"rules": [{"http": {"paths": [
                path("/", "Prefix", "root"),
                path("/aaa", "Prefix", "aaa"),
                path("/aaa/bbb", "Prefix", "bbb"),
                path("/foo", "Prefix", "foo-prefix"),
                path("/foo", "Exact", "foo-exact")]}}]}),
        )]);
        assert_eq!(at(&t, "x", "/aaa/ccc"), "aaa");
        assert_eq!(at(&t, "x", "/aaa/bbb"), "bbb");
        assert_eq!(at(&t, "x", "/ccc"), "root");
        assert_eq!(at(&t, "x", "/foo"), "foo-exact");
        assert_eq!(at(&t, "x", "/foo/"), "foo-prefix");
        let (t, _) = build(&[ingress(
            "nodefault",
            json!({"rules": [{"http": {"paths": [path("/aaa", "Prefix", "aaa")]}}]}),
        )]);
        assert_eq!(at(&t, "x", "/ccc"), "404");
    }

    #[test]
    fn the_oldest_ingress_wins_equal_matches_and_keeps_the_default() {
        // "a" is created at :01, "bbb" at :03.
        let newer = ingress(
            "bbb",
            json!({"defaultBackend": {"service": {"name": "newer-default", "port": {"number": 80}}},
                   "rules": [{"host": "h", "http": {"paths": [path("/p", "Prefix", "newer")]}}]}),
        );
        let older = ingress(
            "a",
            json!({"defaultBackend": {"service": {"name": "older-default", "port": {"number": 80}}},
                   "rules": [{"host": "h", "http": {"paths": [path("/p", "Prefix", "older")]}}]}),
        );
        let (t, _) = build(&[newer, older]);
        assert_eq!(at(&t, "h", "/p"), "older");
        assert_eq!(at(&t, "h", "/q"), "older-default");
    }

    #[test]
    fn classes_by_name_annotation_and_default() {
        let ours = class("flatnet", CONTROLLER, false);
        let theirs = class("nginx", "k8s.io/ingress-nginx", true);
        let with = |spec: serde_json::Value, legacy: Option<&str>| {
            let mut i = ingress("i", spec);
            if let Some(c) = legacy {
                i.metadata.annotations = Some([(LEGACY_CLASS.to_string(), c.to_string())].into());
            }
            i
        };
        let classes = Classes::new([&ours, &theirs]);
        assert!(classes.claims(&with(json!({"ingressClassName": "flatnet"}), None)));
        assert!(!classes.claims(&with(json!({"ingressClassName": "nginx"}), None)));
        assert!(!classes.claims(&with(json!({"ingressClassName": "missing"}), None)));
        assert!(classes.claims(&with(json!({}), Some("flatnet"))));
        assert!(!classes.claims(&with(json!({}), Some("nginx"))));
        assert!(
            !classes.claims(&with(json!({}), None)),
            "the default is nginx's"
        );
        let default_ours = Classes::new([&class("edge", CONTROLLER, true), &theirs]);
        assert!(default_ours.claims(&with(json!({}), None)));
        assert!(default_ours.claims(&with(json!({}), Some("edge"))));
    }

    #[test]
    fn bad_rules_are_reported_by_field_and_the_rest_served() {
        let (t, c) = build(&[ingress(
            "bad",
            json!({"rules": [
                {"host": "10.0.0.1", "http": {"paths": [path("/", "Prefix", "ip")]}},
                {"host": "a.*.com", "http": {"paths": [path("/", "Prefix", "mid-star")]}},
                {"host": "ok.com", "http": {"paths": [
                    path("relative", "Prefix", "rel"),
                    path("/r", "Regex", "regex"),
                    {"path": "/noport", "pathType": "Prefix", "backend": {"service": {"name": "s"}}},
                    path("/good", "Prefix", "good")]}}
            ]}),
        )]);
        let fields: Vec<&str> = c.problems.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.rules[0].host",
                "spec.rules[1].host",
                "spec.rules[2].http.paths[0].path",
                "spec.rules[2].http.paths[1].pathType",
                "spec.rules[2].http.paths[2].backend.service.port"
            ]
        );
        assert!(c.problems.iter().all(|e| e.object == "Ingress shop/bad"));
        assert_eq!(at(&t, "ok.com", "/good"), "good");
        assert_eq!(at(&t, "ok.com", "/r"), "404");
    }
}
