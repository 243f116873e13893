//! The conformance suite's request → backend tables, routed through the compiled table.

use super::*;
use crate::table::{Found, RequestView};
use http::HeaderMap;
use serde_json::{json, Value};

const INFRA: &str = "gateway-conformance-infra";

fn obj<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn class() -> GatewayClass {
    obj(json!({"metadata": {"name": "flatnet"}, "spec": {"controllerName": CONTROLLER}}))
}

fn gateway(name: &str, listeners: Value) -> Gateway {
    obj(json!({"metadata": {"name": name, "namespace": INFRA},
               "spec": {"gatewayClassName": "flatnet", "listeners": listeners}}))
}

/// An HTTPRoute in `ns` whose rules name backends by Service name only (port 8080).
fn route(ns: &str, name: &str, parent: &str, hostnames: Value, rules: Value) -> HttpRoute {
    let mut rules = rules;
    for r in rules.as_array_mut().unwrap() {
        if let Some(b) = r.get_mut("backendRefs") {
            for b in b.as_array_mut().unwrap() {
                if b.is_string() {
                    *b = json!({"name": b.as_str().unwrap(), "port": 8080});
                }
            }
        }
    }
    obj(
        json!({"metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-01-01T00:00:00Z"},
               "spec": {"parentRefs": [{"name": parent, "namespace": INFRA}], "hostnames": hostnames, "rules": rules}}),
    )
}

struct World {
    gateways: Vec<Gateway>,
    routes: Vec<HttpRoute>,
    grants: Vec<ReferenceGrant>,
    namespaces: BTreeMap<String, Labels>,
    services: BTreeSet<(String, String)>,
    secrets: BTreeSet<(String, String)>,
}

impl World {
    fn new(gateways: Vec<Gateway>, routes: Vec<HttpRoute>) -> World {
        let services = ["infra-backend-v1", "infra-backend-v2", "infra-backend-v3"]
            .iter()
            .map(|s| (INFRA.to_string(), s.to_string()))
            .chain([("web-backend".to_string(), "web-backend".to_string())])
            .collect();
        World {
            gateways,
            routes,
            grants: Vec::new(),
            namespaces: BTreeMap::new(),
            services,
            secrets: BTreeSet::new(),
        }
    }

    fn compile(&self) -> (Table, Compiled) {
        let class = class();
        let gateways: Vec<&Gateway> = self.gateways.iter().collect();
        let routes: Vec<&HttpRoute> = self.routes.iter().collect();
        let grants: Vec<&ReferenceGrant> = self.grants.iter().collect();
        let inputs = Inputs {
            classes: &[&class],
            gateways: &gateways,
            routes: &routes,
            grants: &grants,
            namespaces: &self.namespaces,
            services: &self.services,
            tls_secrets: &self.secrets,
        };
        let mut t = Table::default();
        let c = compile(&inputs, &mut t);
        t.seal();
        (t, c)
    }
}

/// What a request gets: the backend Service's name, "404", "500: why" or "redirect".
fn at(t: &Table, host: &str, path: &str, headers: &[(&str, &str)]) -> String {
    at_method(t, &Method::GET, host, path, headers)
}

fn at_method(
    t: &Table,
    method: &Method,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut h = HeaderMap::new();
    for (n, v) in headers {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let (p, q) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    let host = crate::host::normalize(host);
    let r = RequestView {
        host: &host,
        method,
        path: p,
        query: q,
        headers: &h,
    };
    match t.route(80, &r) {
        Found::Rule { rule, .. } => match &rule.action {
            Action::Forward { backends, .. } => match backends.first().map(|b| &b.target) {
                Some(Target::Service { name, .. }) => name.clone(),
                Some(Target::Invalid(why)) => format!("500: {why}"),
                None => "500: no backends".into(),
            },
            Action::Redirect(_) => "redirect".into(),
        },
        Found::NotFound => "404".into(),
    }
}

fn http_listener(name: &str, hostname: Option<&str>) -> Value {
    let mut l = json!({"name": name, "port": 80, "protocol": "HTTP", "allowedRoutes": {"namespaces": {"from": "Same"}}});
    if let Some(h) = hostname {
        l["hostname"] = json!(h);
    }
    l
}

fn prefix(p: &str, backend: &str) -> Value {
    json!({"matches": [{"path": {"type": "PathPrefix", "value": p}}], "backendRefs": [backend]})
}

fn accepted(c: &Compiled, name: &str) -> (String, String) {
    let r = c
        .routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no status for {name}"));
    let a = r.parents[0]
        .1
        .iter()
        .find(|c| c.kind == "Accepted")
        .unwrap();
    (a.status.clone(), a.reason.clone())
}

/// HTTPRouteHostnameIntersection, every request of the conformance test.
#[test]
fn hostname_intersection() {
    let gw = gateway(
        "httproute-hostname-intersection",
        json!([
            http_listener("listener-1", Some("very.specific.com")),
            http_listener("listener-2", Some("*.wildcard.io")),
            http_listener("listener-3", Some("*.anotherwildcard.io"))
        ]),
    );
    let p = "httproute-hostname-intersection";
    let routes = vec![
        route(
            INFRA,
            "specific-host-matches-listener-specific-host",
            p,
            json!([
                "non.matching.com",
                "*.nonmatchingwildcard.io",
                "very.specific.com"
            ]),
            json!([prefix("/s1", "infra-backend-v1")]),
        ),
        route(
            INFRA,
            "specific-host-matches-listener-wildcard-host",
            p,
            json!([
                "non.matching.com",
                "wildcard.io",
                "foo.wildcard.io",
                "bar.wildcard.io",
                "foo.bar.wildcard.io"
            ]),
            json!([prefix("/s2", "infra-backend-v2")]),
        ),
        route(
            INFRA,
            "wildcard-host-matches-listener-specific-host",
            p,
            json!(["non.matching.com", "*.specific.com"]),
            json!([prefix("/s3", "infra-backend-v3")]),
        ),
        route(
            INFRA,
            "wildcard-host-matches-listener-wildcard-host",
            p,
            json!(["*.anotherwildcard.io"]),
            json!([prefix("/s4", "infra-backend-v1")]),
        ),
        route(
            INFRA,
            "no-intersecting-hosts",
            p,
            json!(["specific.but.wrong.com", "wildcard.io"]),
            json!([prefix("/s5", "infra-backend-v2")]),
        ),
    ];
    let (t, c) = World::new(vec![gw], routes).compile();
    let cases = [
        ("very.specific.com", "/s1", "infra-backend-v1"),
        ("very.specific.com:1234", "/s1", "infra-backend-v1"),
        ("non.matching.com", "/s1", "404"),
        ("foo.nonmatchingwildcard.io", "/s1", "404"),
        ("foo.wildcard.io", "/s1", "404"),
        ("very.specific.com", "/non-matching-prefix", "404"),
        ("foo.wildcard.io", "/s2", "infra-backend-v2"),
        ("bar.wildcard.io", "/s2", "infra-backend-v2"),
        ("foo.bar.wildcard.io", "/s2", "infra-backend-v2"),
        ("non.matching.com", "/s2", "404"),
        ("wildcard.io", "/s2", "404"),
        ("very.specific.com", "/s2", "404"),
        ("foo.wildcard.io", "/non-matching-prefix", "404"),
        ("very.specific.com", "/s3", "infra-backend-v3"),
        ("non.matching.com", "/s3", "404"),
        ("foo.specific.com", "/s3", "404"),
        ("foo.wildcard.io", "/s3", "404"),
        ("foo.anotherwildcard.io", "/s4", "infra-backend-v1"),
        ("bar.anotherwildcard.io", "/s4", "infra-backend-v1"),
        ("foo.bar.anotherwildcard.io", "/s4", "infra-backend-v1"),
        ("anotherwildcard.io", "/s4", "404"),
        ("foo.wildcard.io", "/s4", "404"),
        ("very.specific.com", "/s4", "404"),
        ("specific.but.wrong.com", "/s5", "404"),
        ("wildcard.io", "/s5", "404"),
    ];
    for (host, path, want) in cases {
        assert_eq!(at(&t, host, path, &[]), want, "{host}{path}");
    }
    assert_eq!(
        accepted(&c, "no-intersecting-hosts"),
        ("False".into(), "NoMatchingListenerHostname".into())
    );
    assert_eq!(
        accepted(&c, "wildcard-host-matches-listener-wildcard-host").0,
        "True"
    );
    let attached: Vec<usize> = c.gateways[0]
        .listeners
        .iter()
        .map(|l| l.attached_routes)
        .collect();
    assert_eq!(
        attached,
        [2, 1, 1],
        "AttachedRoutes counts accepted routes only"
    );
}

/// The specification's precedence: Exact path, longest prefix, method, most headers, most
/// query parameters, oldest route, namespace/name, rule order.
#[test]
fn match_precedence() {
    let gw = gateway("same-namespace", json!([http_listener("http", None)]));
    let rules = json!([
        prefix("/match", "v-prefix-short"),
        prefix("/match/prefix", "v-prefix-long"),
        {"matches": [{"path": {"type": "Exact", "value": "/match/prefix"}}], "backendRefs": ["v-exact"]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/m"}, "method": "POST"}], "backendRefs": ["v-method"]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/m"}, "headers": [{"name": "a", "value": "1"}]}], "backendRefs": ["v-one-header"]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/m"}, "headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}], "backendRefs": ["v-two-headers"]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/m"}, "queryParams": [{"name": "q", "value": "1"}]}], "backendRefs": ["v-query"]},
        prefix("/m", "v-first-rule"),
        prefix("/m", "v-second-rule"),
    ]);
    let mut w = World::new(
        vec![gw],
        vec![route(INFRA, "order", "same-namespace", json!([]), rules)],
    );
    for r in &mut w.routes {
        for rule in &mut r.spec.rules {
            for b in &mut rule.backend_refs {
                w.services.insert((INFRA.into(), b.name.clone()));
            }
        }
    }
    let (t, _) = w.compile();
    assert_eq!(at(&t, "x", "/match/prefix", &[]), "v-exact");
    assert_eq!(at(&t, "x", "/match/prefix/one", &[]), "v-prefix-long");
    assert_eq!(at(&t, "x", "/match/other", &[]), "v-prefix-short");
    assert_eq!(
        at_method(&t, &Method::POST, "x", "/m/x", &[("a", "1"), ("b", "2")]),
        "v-method"
    );
    assert_eq!(
        at(&t, "x", "/m/x", &[("a", "1"), ("b", "2")]),
        "v-two-headers"
    );
    assert_eq!(
        at(&t, "x", "/m/x", &[("A", "1")]),
        "v-one-header",
        "header names ignore case"
    );
    assert_eq!(
        at(&t, "x", "/m/x", &[("a", "1 ")]),
        "v-first-rule",
        "values are exact"
    );
    assert_eq!(at(&t, "x", "/m/x?q=1&q=2", &[]), "v-query");
    assert_eq!(
        at(&t, "x", "/m/x?Q=1", &[]),
        "v-first-rule",
        "query names keep case"
    );
    assert_eq!(at(&t, "x", "/mx", &[]), "404");
}

/// Across routes: equal matches go to the oldest route, then by namespace/name.
#[test]
fn matching_across_routes() {
    let gw = gateway("same-namespace", json!([http_listener("http", None)]));
    let mut newer = route(
        INFRA,
        "a-newer",
        "same-namespace",
        json!([]),
        json!([prefix("/", "infra-backend-v1")]),
    );
    newer.metadata.creation_timestamp =
        serde_json::from_value(json!("2026-01-02T00:00:00Z")).unwrap();
    let older = route(
        INFRA,
        "z-older",
        "same-namespace",
        json!([]),
        json!([prefix("/", "infra-backend-v2")]),
    );
    let same_age = route(
        INFRA,
        "y-same-age",
        "same-namespace",
        json!([]),
        json!([prefix("/", "infra-backend-v3")]),
    );
    let (t, _) = World::new(vec![gw], vec![newer, older, same_age]).compile();
    assert_eq!(
        at(&t, "x", "/", &[]),
        "infra-backend-v3",
        "oldest, then y before z"
    );
}

/// A listener takes a request from a less specific one (listener isolation): a route attached
/// to `*.example.com` with hostname `foo.example.com` does not serve it when listener
/// `foo.example.com` exists.
#[test]
fn listener_isolation() {
    let gw = gateway(
        "iso",
        json!([
            http_listener("wild", Some("*.example.com")),
            http_listener("foo", Some("foo.example.com"))
        ]),
    );
    let mut to_wild = route(
        INFRA,
        "to-wild",
        "iso",
        json!(["foo.example.com", "bar.example.com"]),
        json!([prefix("/", "infra-backend-v1")]),
    );
    to_wild.spec.parent_refs[0].section_name = Some("wild".into());
    let mut to_foo = route(
        INFRA,
        "to-foo",
        "iso",
        json!([]),
        json!([prefix("/foo-only", "infra-backend-v2")]),
    );
    to_foo.spec.parent_refs[0].section_name = Some("foo".into());
    let (t, c) = World::new(vec![gw], vec![to_wild, to_foo]).compile();
    assert_eq!(at(&t, "bar.example.com", "/", &[]), "infra-backend-v1");
    assert_eq!(
        at(&t, "foo.example.com", "/foo-only", &[]),
        "infra-backend-v2"
    );
    assert_eq!(at(&t, "foo.example.com", "/", &[]), "404");
    assert_eq!(accepted(&c, "to-wild").0, "True");
}

/// HTTPRouteCrossNamespace, HTTPRouteReferenceGrant and the invalid references: a backend in
/// another namespace needs a ReferenceGrant; a missing Service or a non-Service kind gives 500s
/// and ResolvedRefs False with the reason; listeners admit namespaces by `from`.
#[test]
fn namespaces_grants_and_invalid_references() {
    let gw = gateway(
        "gw",
        json!([{"name": "all", "port": 80, "protocol": "HTTP", "hostname": "all.example.com", "allowedRoutes": {"namespaces": {"from": "All"}}},
               {"name": "same", "port": 80, "protocol": "HTTP", "hostname": "same.example.com"},
               {"name": "sel", "port": 80, "protocol": "HTTP", "hostname": "sel.example.com",
                "allowedRoutes": {"namespaces": {"from": "Selector", "selector": {"matchLabels": {"gateway": "ok"}}}}}]),
    );
    let mut cross = route(
        "web-backend",
        "cross",
        "gw",
        json!(["all.example.com", "same.example.com", "sel.example.com"]),
        json!([prefix("/", "web-backend")]),
    );
    cross.metadata.namespace = Some("web-backend".into());
    let to_other = route(
        INFRA,
        "to-other",
        "gw",
        json!(["same.example.com"]),
        json!([{"backendRefs": [{"name": "web-backend", "namespace": "web-backend", "port": 8080}]}]),
    );
    let missing = route(
        INFRA,
        "missing",
        "gw",
        json!(["same.example.com"]),
        json!([{"matches": [{"path": {"value": "/missing"}}], "backendRefs": ["nonexistent"]}]),
    );
    let kind = route(
        INFRA,
        "kind",
        "gw",
        json!(["same.example.com"]),
        json!([{"matches": [{"path": {"value": "/kind"}}], "backendRefs": [{"name": "x", "kind": "Bucket", "group": "storage.example.com", "port": 1}]}]),
    );
    let mut w = World::new(vec![gw], vec![cross, to_other, missing, kind]);
    let (t, c) = w.compile();
    assert_eq!(
        at(&t, "all.example.com", "/", &[]),
        "web-backend",
        "from: All"
    );
    assert_eq!(
        at(&t, "sel.example.com", "/", &[]),
        "404",
        "namespace not labelled"
    );
    assert!(at(&t, "same.example.com", "/", &[])
        .starts_with("500: spec.rules[0].backendRefs[0]: no ReferenceGrant"));
    let refs = |c: &Compiled, name: &str| {
        let r = c.routes.iter().find(|r| r.name == name).unwrap();
        let rc = r.parents[0]
            .1
            .iter()
            .find(|c| c.kind == "ResolvedRefs")
            .unwrap();
        (rc.status.clone(), rc.reason.clone())
    };
    assert_eq!(
        refs(&c, "to-other"),
        ("False".into(), "RefNotPermitted".into())
    );
    assert_eq!(
        refs(&c, "missing"),
        ("False".into(), "BackendNotFound".into())
    );
    assert_eq!(refs(&c, "kind"), ("False".into(), "InvalidKind".into()));
    assert!(at(&t, "same.example.com", "/missing", &[]).starts_with("500"));

    w.namespaces.insert(
        "web-backend".into(),
        [("gateway".to_string(), "ok".to_string())].into(),
    );
    w.grants.push(obj(json!({"metadata": {"name": "g", "namespace": "web-backend"},
        "spec": {"from": [{"group": GROUP, "kind": "HTTPRoute", "namespace": INFRA}], "to": [{"group": "", "kind": "Service"}]}})));
    let (t, c) = w.compile();
    assert_eq!(
        at(&t, "sel.example.com", "/", &[]),
        "web-backend",
        "namespace labelled"
    );
    assert_eq!(
        at(&t, "same.example.com", "/", &[]),
        "web-backend",
        "granted"
    );
    assert_eq!(refs(&c, "to-other"), ("True".into(), "ResolvedRefs".into()));
}

#[test]
fn filters_weights_and_refusals() {
    let gw = gateway("gw", json!([http_listener("http", None)]));
    let r = route(
        INFRA,
        "f",
        "gw",
        json!([]),
        json!([
            {"matches": [{"path": {"value": "/split"}}], "backendRefs": [
                {"name": "infra-backend-v1", "port": 8080, "weight": 3}, {"name": "infra-backend-v2", "port": 8080}],
             "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-Set", "value": "s"}], "remove": ["x-gone"]}}],
             "timeouts": {"request": "1m30s"}},
            {"matches": [{"path": {"value": "/old"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "example.org", "statusCode": 301,
                          "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
        ]),
    );
    let (t, c) = World::new(vec![gw.clone()], vec![r]).compile();
    assert_eq!(accepted(&c, "f").0, "True");
    let headers = HeaderMap::new();
    let host = "x".to_string();
    let view = |path: &'static str| RequestView {
        host: &host,
        method: &Method::GET,
        path,
        query: None,
        headers: &headers,
    };
    let Found::Rule { rule, .. } = t.route(80, &view("/split/a")) else {
        panic!("no rule")
    };
    let Action::Forward {
        backends, timeout, ..
    } = &rule.action
    else {
        panic!("not forward")
    };
    assert_eq!(
        backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        [3, 1]
    );
    assert_eq!(*timeout, Some(Duration::from_secs(90)));
    let mut h = HeaderMap::new();
    h.insert("x-gone", HeaderValue::from_static("1"));
    rule.request_headers.apply(&mut h);
    assert_eq!(h.get("x-set").unwrap(), "s");
    assert!(h.get("x-gone").is_none());
    let Found::Rule { rule, .. } = t.route(80, &view("/old/page")) else {
        panic!("no rule")
    };
    assert_eq!(
        rule.action,
        Action::Redirect(Redirect {
            scheme: None,
            hostname: Some("example.org".into()),
            port: None,
            path: Some(PathChange::Prefix("/new".into())),
            status: 301,
        })
    );

    // A prefix rewrite on an Exact match, and a filter this controller does not run: refused.
    let bad = route(
        INFRA,
        "bad",
        "gw",
        json!([]),
        json!([
        {"matches": [{"path": {"type": "Exact", "value": "/e"}}], "backendRefs": ["infra-backend-v1"],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}]}]),
    );
    let mirror = route(
        INFRA,
        "mirror",
        "gw",
        json!([]),
        json!([
        {"backendRefs": ["infra-backend-v1"], "filters": [{"type": "RequestMirror"}]}]),
    );
    let (t, c) = World::new(vec![gw], vec![bad, mirror]).compile();
    assert_eq!(
        accepted(&c, "bad"),
        ("False".into(), "UnsupportedValue".into())
    );
    assert_eq!(
        accepted(&c, "mirror"),
        ("False".into(), "UnsupportedValue".into())
    );
    assert_eq!(
        at(&t, "x", "/e", &[]),
        "404",
        "a refused route serves nothing"
    );
}

#[test]
fn listeners_report_protocol_tls_and_conflicts() {
    let gw = gateway(
        "gw",
        json!([
            {"name": "https", "port": 443, "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "missing"}]}},
            {"name": "tcp", "port": 9000, "protocol": "TCP"},
            http_listener("a", Some("same.example.com")),
            http_listener("b", Some("same.example.com")),
            http_listener("ok", None),
        ]),
    );
    let (_, c) = World::new(vec![gw], vec![]).compile();
    let cond = |l: &str, kind: &str| {
        let ls = c.gateways[0]
            .listeners
            .iter()
            .find(|x| x.name == l)
            .unwrap();
        let c = ls.conditions.iter().find(|c| c.kind == kind).unwrap();
        (c.status.clone(), c.reason.clone())
    };
    assert_eq!(
        cond("https", "ResolvedRefs"),
        ("False".into(), "InvalidCertificateRef".into())
    );
    assert_eq!(
        cond("tcp", "Accepted"),
        ("False".into(), "UnsupportedProtocol".into())
    );
    assert_eq!(
        cond("a", "Conflicted"),
        ("True".into(), "HostnameConflict".into())
    );
    assert_eq!(
        cond("ok", "Programmed"),
        ("True".into(), "Programmed".into())
    );
    assert_eq!(
        c.gateways[0].conditions[1].status, "True",
        "one listener is enough to program it"
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("2s500ms"), Some(Duration::from_millis(2500)));
    assert_eq!(parse_duration("1.5s"), None);
    assert_eq!(parse_duration(""), None);
    assert_eq!(parse_duration("10"), None);
}

/// An Ingress and a Gateway on the same port and address: the Ingress's exact host is a
/// listener of its own (the Gateway's wider wildcard does not take it), its `defaultBackend`
/// serves its host's other paths and every host no listener takes, and the Gateway's
/// wildcard takes the hosts the Ingress does not name.
#[test]
fn ingresses_and_gateways_share_a_port() {
    let gw = gateway(
        "shared",
        json!([http_listener("wild", Some("*.example.com"))]),
    );
    let r = route(
        INFRA,
        "store",
        "shared",
        json!([]),
        json!([prefix("/", "infra-backend-v1")]),
    );
    let world = World::new(vec![gw], vec![r]);
    let (mut t, _) = world.compile();
    let class: k8s_openapi::api::networking::v1::IngressClass = obj(json!({
        "metadata": {"name": "flatnet"}, "spec": {"controller": CONTROLLER}}));
    let ing: k8s_openapi::api::networking::v1::Ingress = obj(json!({
        "metadata": {"name": "shop", "namespace": INFRA},
        "spec": {"ingressClassName": "flatnet",
            "defaultBackend": {"service": {"name": "infra-backend-v3", "port": {"number": 8080}}},
            "rules": [{"host": "shop.example.com", "http": {"paths": [
                {"path": "/shop", "pathType": "Prefix",
                 "backend": {"service": {"name": "infra-backend-v2", "port": {"number": 8080}}}}]}}]}}));
    crate::ingress::compile(
        [&ing],
        &crate::ingress::Classes::new([&class]),
        crate::ingress::Ports {
            http: 80,
            https: 443,
        },
        &mut t,
    );
    t.seal();
    assert_eq!(
        at(&t, "shop.example.com", "/shop/1", &[]),
        "infra-backend-v2"
    );
    assert_eq!(
        at(&t, "shop.example.com", "/other", &[]),
        "infra-backend-v3"
    );
    assert_eq!(at(&t, "store.example.com", "/", &[]), "infra-backend-v1");
    assert_eq!(at(&t, "elsewhere.test", "/", &[]), "infra-backend-v3");
}
