//! Address ranges and the round-robin walk over a range set. Pure.

use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One `{subnet, rangeStart, rangeEnd, gateway}` entry, defaults filled in and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: Option<IpAddr>,
}

/// Addresses as integers, so that v4 and v6 share one walk.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

impl Range {
    /// Fills host-local's defaults: start after the network address, end before the v4
    /// broadcast (or at the last v6 address), gateway at the first address.
    pub fn new(
        subnet: IpNet,
        start: Option<IpAddr>,
        end: Option<IpAddr>,
        gateway: Option<IpAddr>,
    ) -> Result<Range, String> {
        if subnet.network() != subnet.addr() {
            return Err(format!(
                "subnet {subnet} has host bits set; did you mean {}?",
                subnet.trunc()
            ));
        }
        let v4 = subnet.addr().is_ipv4();
        let host_bits = subnet.max_prefix_len() - subnet.prefix_len();
        if host_bits < 2 {
            return Err(format!(
                "subnet {subnet} is too small: it needs at least 2 host bits (a /30 or /126)"
            ));
        }
        let first = to_u128(subnet.network()) + 1;
        let last = to_u128(subnet.broadcast()) - u128::from(v4);
        let start = start.unwrap_or(from_u128(first, v4));
        let end = end.unwrap_or(from_u128(last, v4));
        for (name, ip) in [("rangeStart", start), ("rangeEnd", end)] {
            let n = to_u128(ip);
            if !subnet.contains(&ip) || n < first || n > last {
                return Err(format!(
                    "{name} {ip} is outside the usable addresses of subnet {subnet} ({} - {})",
                    from_u128(first, v4),
                    from_u128(last, v4)
                ));
            }
        }
        if to_u128(start) > to_u128(end) {
            return Err(format!("rangeStart {start} is after rangeEnd {end}"));
        }
        let gateway = Some(gateway.unwrap_or(from_u128(first, v4)));
        if let Some(gw) = gateway {
            if !subnet.contains(&gw) {
                return Err(format!("gateway {gw} is outside subnet {subnet}"));
            }
        }
        Ok(Range {
            subnet,
            start,
            end,
            gateway,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let n = to_u128(ip);
        ip.is_ipv4() == self.subnet.addr().is_ipv4()
            && n >= to_u128(self.start)
            && n <= to_u128(self.end)
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.subnet.addr().is_ipv4() == other.subnet.addr().is_ipv4()
            && to_u128(self.start) <= to_u128(other.end)
            && to_u128(other.start) <= to_u128(self.end)
    }
}

/// Ranges that together yield one address per attachment; all of one family, none overlapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet(pub Vec<Range>);

impl RangeSet {
    pub fn new(ranges: Vec<Range>) -> Result<RangeSet, String> {
        let Some(first) = ranges.first() else {
            return Err("a range set must hold at least one range".into());
        };
        let v4 = first.subnet.addr().is_ipv4();
        for (i, r) in ranges.iter().enumerate() {
            if r.subnet.addr().is_ipv4() != v4 {
                return Err(format!(
                    "range {} ({}) mixes IPv4 and IPv6 in one range set",
                    i, r.subnet
                ));
            }
            if let Some(o) = ranges[..i].iter().find(|o| o.overlaps(r)) {
                return Err(format!("ranges {} and {} overlap", o.subnet, r.subnet));
            }
        }
        Ok(RangeSet(ranges))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.range_of(ip).is_some()
    }

    pub fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.0.iter().find(|r| r.contains(ip))
    }

    pub fn overlaps(&self, other: &RangeSet) -> bool {
        self.0.iter().any(|a| other.0.iter().any(|b| a.overlaps(b)))
    }

    /// Every candidate address once, starting after `last` (where it left off) and wrapping
    /// around through all ranges; gateways are skipped.
    pub fn iter_from(&self, last: Option<IpAddr>) -> impl Iterator<Item = (IpAddr, &Range)> + '_ {
        let n = self.0.len();
        let (start_range, start_at) =
            match last.and_then(|ip| self.0.iter().position(|r| r.contains(ip)).map(|i| (i, ip))) {
                Some((i, ip)) => (i, Some(to_u128(ip) + 1)),
                None => (0, None),
            };
        // Walk: the rest of the starting range, the other ranges, then the head of the starting range.
        let order = (0..=n).map(move |k| (start_range + k) % n);
        order.enumerate().flat_map(move |(k, i)| {
            let r = &self.0[i];
            let v4 = r.subnet.addr().is_ipv4();
            let (lo, hi) = (to_u128(r.start), to_u128(r.end));
            let (from, to) = match (k, start_at) {
                (0, Some(s)) => (s, hi),
                (0, None) => (lo, hi),
                (k, Some(s)) if k == n => (lo, s.saturating_sub(1).min(hi)),
                (k, _) if k == n => (1, 0), // whole ranges already walked
                _ => (lo, hi),
            };
            let (from, to) = if from > to { (1, 0) } else { (from, to) };
            (from..=to)
                .map(move |v| from_u128(v, v4))
                .filter(move |ip| Some(*ip) != r.gateway)
                .map(move |ip| (ip, r))
        })
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| format!("{}-{}", r.start, r.end))
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn r(subnet: &str) -> Range {
        Range::new(subnet.parse().unwrap(), None, None, None).unwrap()
    }

    #[test]
    fn defaults_match_host_local() {
        let x = r("10.1.2.0/24");
        assert_eq!(
            (x.start, x.end, x.gateway),
            (ip("10.1.2.1"), ip("10.1.2.254"), Some(ip("10.1.2.1")))
        );
        let y = r("fd00::/120");
        assert_eq!((y.start, y.end), (ip("fd00::1"), ip("fd00::ff")));
    }

    #[test]
    fn rejects_bad_ranges() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(Range::new(net("10.1.2.3/24"), None, None, None)
            .unwrap_err()
            .contains("host bits"));
        assert!(Range::new(net("10.1.2.0/31"), None, None, None)
            .unwrap_err()
            .contains("too small"));
        assert!(
            Range::new(net("10.1.2.0/24"), Some(ip("10.1.3.1")), None, None)
                .unwrap_err()
                .contains("rangeStart")
        );
        assert!(Range::new(
            net("10.1.2.0/24"),
            Some(ip("10.1.2.9")),
            Some(ip("10.1.2.5")),
            None
        )
        .unwrap_err()
        .contains("after"));
        assert!(
            Range::new(net("10.1.2.0/24"), None, None, Some(ip("10.9.9.9")))
                .unwrap_err()
                .contains("gateway")
        );
        assert!(RangeSet::new(vec![r("10.0.0.0/24"), r("fd00::/64")])
            .unwrap_err()
            .contains("mixes"));
        assert!(RangeSet::new(vec![r("10.0.0.0/16"), r("10.0.1.0/24")])
            .unwrap_err()
            .contains("overlap"));
    }

    #[test]
    fn walks_round_robin_from_last_and_skips_gateway() {
        let set = RangeSet::new(vec![r("10.0.0.0/29"), r("10.0.1.0/29")]).unwrap();
        let first: Vec<IpAddr> = set.iter_from(None).map(|(ip, _)| ip).take(3).collect();
        assert_eq!(first, vec![ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")]);
        let after: Vec<IpAddr> = set
            .iter_from(Some(ip("10.0.0.6")))
            .map(|(ip, _)| ip)
            .collect();
        assert_eq!(after[0], ip("10.0.1.2"));
        assert_eq!(*after.last().unwrap(), ip("10.0.0.6"));
        assert_eq!(after.len(), 10, "every candidate exactly once: {after:?}");
    }

    proptest! {
        #[test]
        fn every_candidate_once(prefix in 26u8..30, ranges in 1usize..4, last_off in 0u32..200) {
            let set = RangeSet::new((0..ranges).map(|i| r(&format!("10.{i}.0.0/{prefix}"))).collect()).unwrap();
            let all: Vec<IpAddr> = set.iter_from(None).map(|(ip, _)| ip).collect();
            let last = all.get(last_off as usize % all.len()).copied();
            let mut walked: Vec<IpAddr> = set.iter_from(last).map(|(ip, _)| ip).collect();
            prop_assert_eq!(walked.len(), all.len());
            prop_assert_eq!(walked.last().copied(), last);
            walked.sort();
            let mut sorted = all.clone();
            sorted.sort();
            prop_assert_eq!(walked, sorted);
        }
    }
}
