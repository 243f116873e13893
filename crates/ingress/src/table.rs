//! The route table: what every Ingress and HTTPRoute of this controller compiles to, and the
//! lookup that picks a rule for a request. A table is built whole and never changed: the proxy
//! swaps a new one in and requests in flight finish on the one they started with.
//!
//! Lookup, most specific first at each step: the listening port; the listener whose hostname
//! matches the request's host (a request is routed only by the routes of that listener, the
//! Gateway API's listener isolation; each Ingress host is a listener too); the
//! host pattern of the routes (exact, then the longest wildcard, then every host); then the
//! first match in precedence order ([`Precedence`]); else the listener's fallback (an Ingress
//! `defaultBackend`), else 404.

use crate::host::{normalize, HostIndex};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// A path match. `Prefix` is matched element by element on `/` (`/foo` matches `/foo`, `/foo/`
/// and `/foo/bar`, not `/foobar`) and its value is kept without a trailing `/`, which both APIs
/// ignore; `/` matches every path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

impl PathMatch {
    pub fn prefix(value: &str) -> PathMatch {
        let v = value.trim_end_matches('/');
        PathMatch::Prefix(if v.is_empty() { "/".into() } else { v.into() })
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(v) => v == path,
            PathMatch::Prefix(p) if p == "/" => true,
            PathMatch::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }

    fn len(&self) -> usize {
        match self {
            PathMatch::Exact(v) | PathMatch::Prefix(v) => v.len(),
        }
    }
}

/// Everything a rule's match tests (an Ingress path is a path alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub path: PathMatch,
    pub method: Option<Method>,
    /// Header names and exact values (names compare without case).
    pub headers: Vec<(HeaderName, String)>,
    /// Query parameter names and exact values (names compare with case).
    pub query: Vec<(String, String)>,
}

impl Match {
    pub fn path(path: PathMatch) -> Match {
        Match {
            path,
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        }
    }

    fn matches(&self, r: &RequestView) -> bool {
        self.path.matches(r.path)
            && self.method.as_ref().is_none_or(|m| m == r.method)
            && self.headers.iter().all(|(name, value)| {
                r.headers
                    .get(name)
                    .is_some_and(|v| v.as_bytes() == value.as_bytes())
            })
            && self.query.iter().all(|(name, value)| {
                query_value(r.query, name).is_some_and(|v| v == value.as_str())
            })
    }
}

/// The first value of `name` in a query string, percent-decoded.
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

/// Where a rule came from: named in logs, metrics and `explain`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    /// `Ingress` or `HTTPRoute`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// The rule's index in the object (an Ingress's `rules[i].http.paths[j]` counts as one).
    pub rule: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}/{} rule {}",
            self.kind, self.namespace, self.name, self.rule
        )
    }
}

/// A Service port a backend names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServicePort {
    Number(u16),
    Name(String),
}

/// Where a backend's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Service {
        namespace: String,
        name: String,
        port: ServicePort,
    },
    /// A reference that cannot be followed (missing, not permitted, a kind not supported): the
    /// requests that would go to it get a 500 naming why, as the Gateway API asks.
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub target: Target,
    pub weight: u32,
}

/// Headers set (replacing), added (appending) and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdit {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdit {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// A path rewrite or a redirect's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathChange {
    Full(String),
    /// The part the rule's `Prefix` matched is replaced.
    Prefix(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathChange>,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Forward {
        backends: Vec<Backend>,
        rewrite: Rewrite,
        timeout: Option<Duration>,
    },
    Redirect(Redirect),
}

/// A rule: what a matched request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub origin: Origin,
    pub request_headers: HeaderEdit,
    pub response_headers: HeaderEdit,
    pub action: Action,
}

/// The order matches are tried in, smallest first. The Gateway API's: an `Exact` path, then
/// the longest `Prefix`, then a method match, then the most header matches, then the most query
/// matches, then the oldest route, then the route first by namespace/name, then the first rule
/// and match in it. For an Ingress it is the same order its specification gives (longest
/// path, `Exact` over `Prefix` at equal length).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    exact: bool,
    path_len: Reverse<usize>,
    method: Reverse<bool>,
    headers: Reverse<usize>,
    query: Reverse<usize>,
    /// Creation timestamp (RFC 3339 sorts as time), namespace, name.
    route: (String, String, String),
    rule: usize,
    index: usize,
}

impl Precedence {
    pub fn new(m: &Match, created: &str, origin: &Origin, index: usize) -> Precedence {
        Precedence {
            exact: !matches!(m.path, PathMatch::Exact(_)),
            path_len: Reverse(m.path.len()),
            method: Reverse(m.method.is_some()),
            headers: Reverse(m.headers.len()),
            query: Reverse(m.query.len()),
            route: (
                created.to_string(),
                origin.namespace.clone(),
                origin.name.clone(),
            ),
            rule: origin.rule,
            index,
        }
    }
}

/// A match of a rule, placed by its precedence.
#[derive(Debug, Clone)]
pub struct Entry {
    pub precedence: Precedence,
    pub matcher: Match,
    pub rule: Arc<Rule>,
}

/// The routes of one listener.
#[derive(Debug, Clone, Default)]
pub struct Listener {
    pub hosts: HostIndex<Vec<Entry>>,
    /// What a request no rule matches gets instead of a 404 (an Ingress `defaultBackend`).
    pub fallback: Option<Arc<Rule>>,
}

/// The listeners of one port.
#[derive(Debug, Clone, Default)]
pub struct Port {
    pub listeners: HostIndex<Listener>,
}

/// The request as routing sees it.
pub struct RequestView<'a> {
    /// The host, normalized ([`normalize`]).
    pub host: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// The view of a request's head: its host from the URI's authority (HTTP/2) or `Host`.
    pub fn of<B>(req: &'a http::Request<B>, host: &'a mut String) -> RequestView<'a> {
        *host = normalize(
            req.uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
                .unwrap_or(""),
        );
        RequestView {
            host,
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        }
    }
}

/// What routing found for a request.
#[derive(Debug, Clone, Copy)]
pub enum Found<'t> {
    /// A rule matched; `matcher` is the match that did (a prefix rewrite needs it).
    Rule {
        rule: &'t Arc<Rule>,
        matcher: Option<&'t Match>,
    },
    /// No listener on the port takes the host, or no rule matched: 404.
    NotFound,
}

/// Every port's routes.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub ports: BTreeMap<u16, Port>,
}

impl Table {
    /// Sorts every host's entries by precedence: call once when the table is built.
    pub fn seal(&mut self) {
        for port in self.ports.values_mut() {
            for l in port.listeners.values_mut() {
                for entries in l.hosts.values_mut() {
                    entries.sort_by(|a, b| a.precedence.cmp(&b.precedence));
                }
            }
        }
    }

    pub fn route(&self, port: u16, r: &RequestView) -> Found<'_> {
        let Some(listener) = self
            .ports
            .get(&port)
            .and_then(|p| p.listeners.lookup(r.host))
        else {
            return Found::NotFound;
        };
        let hit = listener
            .hosts
            .lookup(r.host)
            .and_then(|entries| entries.iter().find(|e| e.matcher.matches(r)));
        match (hit, &listener.fallback) {
            (Some(e), _) => Found::Rule {
                rule: &e.rule,
                matcher: Some(&e.matcher),
            },
            (None, Some(rule)) => Found::Rule {
                rule,
                matcher: None,
            },
            (None, None) => Found::NotFound,
        }
    }

    /// How many matches the table holds.
    pub fn len(&self) -> usize {
        self.ports
            .values()
            .flat_map(|p| p.listeners.values())
            .flat_map(|l| l.hosts.values())
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Ingress specification's path matching table (concepts/services-networking/ingress,
    /// "Examples"): path type, rule paths, request path, whether it matches.
    #[test]
    fn the_ingress_path_table() {
        let p = PathMatch::prefix;
        let e = |s: &str| PathMatch::Exact(s.into());
        let cases: &[(PathMatch, &str, bool)] = &[
            (p("/"), "/anything/at/all", true),
            (e("/foo"), "/foo", true),
            (e("/foo"), "/bar", false),
            (e("/foo"), "/foo/", false),
            (e("/foo/"), "/foo", false),
            (p("/foo"), "/foo", true),
            (p("/foo"), "/foo/", true),
            (p("/foo/"), "/foo", true),
            (p("/foo/"), "/foo/", true),
            (p("/aaa/bb"), "/aaa/bbb", false),
            (p("/aaa/bbb"), "/aaa/bbb", true),
            (p("/aaa/bbb/"), "/aaa/bbb", true),
            (p("/aaa/bbb"), "/aaa/bbb/", true),
            (p("/aaa/bbb"), "/aaa/bbb/ccc", true),
            (p("/aaa/bbb"), "/aaa/bbbxyz", false),
            (p("/aaa"), "/ccc", false),
        ];
        for (m, path, want) in cases {
            assert_eq!(m.matches(path), *want, "{m:?} against {path}");
        }
    }
}
