//! Prometheus metrics of the DNS server (text format on `/metrics`), named after CoreDNS's.

use hickory_proto::rr::RecordType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub proto: &'static str,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub rcode: &'static str,
}

/// Query types counted without a label lookup (the rest go through the family).
const HOT_TYPES: [RecordType; 9] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::PTR,
    RecordType::TXT,
    RecordType::CNAME,
    RecordType::NS,
    RecordType::SOA,
    RecordType::ANY,
];
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "OTHER",
];
/// How a query came; indexes `PROTOS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp = 0,
    Tcp = 1,
}
const PROTOS: [&str; 2] = ["udp", "tcp"];

/// Handles on the families' common label sets, so counting a query is two atomic adds.
struct Hot {
    requests: [[Counter; HOT_TYPES.len()]; 2],
    responses: [Counter; RCODES.len()],
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub responses: Family<ResponseLabels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_entries: Gauge,
    pub upstream_seconds: Histogram,
    pub upstream_failures: Counter,
    pub zone_names: Gauge,
    /// The source's and the zone updates' metrics (`flatnet_source_*`, `flatnet_sync_*`).
    pub source: std::sync::Arc<state::SourceMetrics>,
    hot: Hot,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests: Family<RequestLabels, Counter> = Family::default();
        let responses: Family<ResponseLabels, Counter> = Family::default();
        let hot = Hot {
            requests: PROTOS.map(|proto| {
                HOT_TYPES.map(|t| {
                    requests.get_or_create_owned(&RequestLabels {
                        proto,
                        r#type: t.into(),
                    })
                })
            }),
            responses: RCODES.map(|rcode| responses.get_or_create_owned(&ResponseLabels { rcode })),
        };
        Metrics {
            requests,
            responses,
            hot,
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_entries: Gauge::default(),
            upstream_seconds: Histogram::new(exponential_buckets(0.00025, 2.0, 16)),
            upstream_failures: Counter::default(),
            zone_names: Gauge::default(),
            source: Default::default(),
        }
    }
}

impl Metrics {
    /// The registry `/metrics` encodes (metrics are shared handles, so this is cheap).
    pub fn registry(&self) -> Registry {
        let mut top = Registry::default();
        self.source.register(&mut top);
        let r = top.sub_registry_with_prefix("flatnet_dns");
        r.register(
            "requests",
            "Queries received, by transport and type",
            self.requests.clone(),
        );
        r.register(
            "responses",
            "Responses sent, by rcode",
            self.responses.clone(),
        );
        r.register(
            "cache_hits",
            "Forwarded questions answered from the cache",
            self.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Forwarded questions not in the cache",
            self.cache_misses.clone(),
        );
        r.register(
            "cache_entries",
            "Answers in the cache",
            self.cache_entries.clone(),
        );
        r.register(
            "upstream_request_duration_seconds",
            "Time for an upstream server to answer",
            self.upstream_seconds.clone(),
        );
        r.register(
            "upstream_failures",
            "Upstream attempts that failed",
            self.upstream_failures.clone(),
        );
        r.register(
            "zone_names",
            "Owner names in the cluster zone",
            self.zone_names.clone(),
        );
        top
    }

    /// Counts one query and its reply (`rcode`: the header's low four bits).
    pub fn count(&self, transport: Transport, qtype: RecordType, rcode: u8) {
        let proto = transport as usize;
        match HOT_TYPES.iter().position(|t| *t == qtype) {
            Some(i) => self.hot.requests[proto][i].inc(),
            None => self
                .requests
                .get_or_create(&RequestLabels {
                    proto: PROTOS[proto],
                    r#type: qtype.into(),
                })
                .inc(),
        };
        self.hot.responses[usize::from(rcode).min(RCODES.len() - 1)].inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}
