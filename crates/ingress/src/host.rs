//! Host names as routing sees them: a request's host (from `Host` or the HTTP/2 authority) and
//! the patterns of Ingress rules, Gateway listeners and HTTPRoutes.
//!
//! The two APIs disagree on wildcards: an Ingress `*.example.com` matches exactly one label
//! (`a.example.com`, not `a.b.example.com`), a Gateway API one matches one or more.

use std::cmp::Ordering;

/// A request's host, lower-cased, without its port or a trailing dot (the port in `Host` is not
/// part of the match: Gateway API conformance sends `very.specific.com:1234`).
pub fn normalize(host: &str) -> String {
    let host = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// What a wildcard's `*` stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Star {
    /// Exactly one label (Ingress).
    OneLabel,
    /// One or more labels (Gateway API).
    Labels,
}

/// A host pattern: every host, one host, or a wildcard over a suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// `*.{suffix}`; `suffix` has no leading dot.
    Wildcard(String, Star),
}

impl HostPattern {
    /// Parses `host` (`""` is every host), lower-cased.
    pub fn parse(host: &str, star: Star) -> HostPattern {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() || host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            HostPattern::Wildcard(suffix.to_string(), star)
        } else {
            HostPattern::Exact(host)
        }
    }

    /// Whether the normalized `host` matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix, star) => {
                let Some(head) = host
                    .strip_suffix(suffix.as_str())
                    .and_then(|h| h.strip_suffix('.'))
                else {
                    return false;
                };
                !head.is_empty() && (*star == Star::Labels || !head.contains('.'))
            }
        }
    }

    /// More specific patterns first: exact hosts, then wildcards by the length of their suffix
    /// (the Gateway API's "characters in a matching hostname"), then every host.
    pub fn specificity(&self) -> (u8, usize) {
        match self {
            HostPattern::Exact(h) => (2, h.len()),
            HostPattern::Wildcard(s, _) => (1, s.len()),
            HostPattern::Any => (0, 0),
        }
    }

    /// The hosts both patterns match, as one pattern (the Gateway API's hostname intersection
    /// of a listener and a route, both with one-or-more-label wildcards), or `None`.
    pub fn intersect(&self, other: &HostPattern) -> Option<HostPattern> {
        use HostPattern::*;
        match (self, other) {
            (Any, x) | (x, Any) => Some(x.clone()),
            (Exact(a), Exact(b)) => (a == b).then(|| self.clone()),
            (Exact(h), w @ Wildcard(..)) | (w @ Wildcard(..), Exact(h)) => {
                w.matches(h).then(|| Exact(h.clone()))
            }
            (Wildcard(a, _), Wildcard(b, _)) => {
                // The longer suffix is inside the shorter one's, or they are disjoint.
                let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                (long == short || long.ends_with(&format!(".{short}")))
                    .then(|| Wildcard(long.clone(), Star::Labels))
            }
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s, _) => write!(f, "*.{s}"),
        }
    }
}

/// Values by host pattern, looked up most specific first: a hash lookup for exact hosts, then
/// the wildcards (longest suffix first), then the catch-all.
#[derive(Debug, Clone)]
pub struct HostIndex<T> {
    exact: std::collections::HashMap<String, T>,
    wildcards: Vec<(String, Star, T)>,
    any: Option<T>,
}

impl<T> Default for HostIndex<T> {
    fn default() -> Self {
        HostIndex {
            exact: Default::default(),
            wildcards: Vec::new(),
            any: None,
        }
    }
}

impl<T> HostIndex<T> {
    /// The value for `pattern`, made with `T::default()` when new.
    pub fn entry(&mut self, pattern: &HostPattern) -> &mut T
    where
        T: Default,
    {
        match pattern {
            HostPattern::Any => self.any.get_or_insert_with(T::default),
            HostPattern::Exact(h) => self.exact.entry(h.clone()).or_default(),
            HostPattern::Wildcard(s, star) => {
                let i = match self
                    .wildcards
                    .iter()
                    .position(|(x, st, _)| x == s && st == star)
                {
                    Some(i) => i,
                    None => {
                        self.wildcards.push((s.clone(), *star, T::default()));
                        // Longest suffix first; one-label wildcards before wider ones.
                        self.wildcards
                            .sort_by(|a, b| match b.0.len().cmp(&a.0.len()) {
                                Ordering::Equal => a.1.cmp(&b.1),
                                o => o,
                            });
                        self.wildcards
                            .iter()
                            .position(|(x, st, _)| x == s && st == star)
                            .expect("just inserted")
                    }
                };
                &mut self.wildcards[i].2
            }
        }
    }

    /// The most specific value whose pattern matches the normalized `host`.
    pub fn lookup(&self, host: &str) -> Option<&T> {
        if let Some(v) = self.exact.get(host) {
            return Some(v);
        }
        self.wildcards
            .iter()
            .find(|(s, star, _)| HostPattern::Wildcard(s.clone(), *star).matches(host))
            .map(|(_, _, v)| v)
            .or(self.any.as_ref())
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.exact
            .values()
            .chain(self.wildcards.iter().map(|(_, _, v)| v))
            .chain(self.any.iter())
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.exact
            .values_mut()
            .chain(self.wildcards.iter_mut().map(|(_, _, v)| v))
            .chain(self.any.iter_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_hosts_lose_port_case_and_trailing_dot() {
        assert_eq!(normalize("Very.Specific.com:1234"), "very.specific.com");
        assert_eq!(normalize("shop.example.com."), "shop.example.com");
        assert_eq!(normalize("[fd00::1]:8080"), "[fd00::1]");
        assert_eq!(normalize("10.0.0.1"), "10.0.0.1");
    }

    /// The Ingress specification's wildcard table: `*.foo.com` matches `bar.foo.com`, not
    /// `baz.bar.foo.com` (one label) nor `foo.com` (no label).
    #[test]
    fn ingress_wildcards_match_exactly_one_label() {
        let p = HostPattern::parse("*.foo.com", Star::OneLabel);
        assert!(p.matches("bar.foo.com"));
        assert!(!p.matches("baz.bar.foo.com"));
        assert!(!p.matches("foo.com"));
        assert!(!p.matches("barfoo.com"));
        assert!(HostPattern::parse("bar.foo.com", Star::OneLabel).matches("bar.foo.com"));
        assert!(!HostPattern::parse("bar.foo.com", Star::OneLabel).matches("baz.foo.com"));
    }

    /// HTTPRouteHostnameIntersection's listeners: `*.wildcard.io` takes `foo.bar.wildcard.io`.
    #[test]
    fn gateway_wildcards_match_one_or_more_labels() {
        let p = HostPattern::parse("*.wildcard.io", Star::Labels);
        assert!(p.matches("foo.wildcard.io"));
        assert!(p.matches("foo.bar.wildcard.io"));
        assert!(!p.matches("wildcard.io"));
    }

    #[test]
    fn listener_and_route_hostnames_intersect_as_the_specification_says() {
        let g = |s: &str| HostPattern::parse(s, Star::Labels);
        let cases = [
            (
                "very.specific.com",
                "very.specific.com",
                Some("very.specific.com"),
            ),
            (
                "very.specific.com",
                "*.specific.com",
                Some("very.specific.com"),
            ),
            (
                "*.wildcard.io",
                "foo.bar.wildcard.io",
                Some("foo.bar.wildcard.io"),
            ),
            ("*.wildcard.io", "wildcard.io", None),
            (
                "*.anotherwildcard.io",
                "*.anotherwildcard.io",
                Some("*.anotherwildcard.io"),
            ),
            (
                "*.example.com",
                "*.foo.example.com",
                Some("*.foo.example.com"),
            ),
            ("*.example.com", "*.example.org", None),
            ("", "*.example.org", Some("*.example.org")),
            ("specific.but.wrong.com", "very.specific.com", None),
        ];
        for (listener, route, want) in cases {
            let got = g(listener).intersect(&g(route));
            assert_eq!(got, want.map(g), "{listener} ∩ {route}");
            assert_eq!(
                g(route).intersect(&g(listener)),
                want.map(g),
                "{route} ∩ {listener}"
            );
        }
    }

    #[test]
    fn the_index_answers_the_most_specific_pattern() {
        let mut idx: HostIndex<Vec<&str>> = HostIndex::default();
        for (p, v) in [
            ("", "any"),
            ("*.example.com", "wide"),
            ("*.foo.example.com", "narrow"),
            ("a.foo.example.com", "exact"),
        ] {
            idx.entry(&HostPattern::parse(p, Star::Labels)).push(v);
        }
        let at = |h: &str| idx.lookup(h).map(|v| v[0]);
        assert_eq!(at("a.foo.example.com"), Some("exact"));
        assert_eq!(at("b.foo.example.com"), Some("narrow"));
        assert_eq!(at("b.example.com"), Some("wide"));
        assert_eq!(at("other.org"), Some("any"));
    }
}
