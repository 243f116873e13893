//! `flatnet dns`: the cluster's DNS server. [`zone`] turns cluster state into the records of the
//! Kubernetes DNS specification (pure, unit-tested); [`answer`] turns one query into one
//! response (pure); [`forward`] asks upstream servers and caches; [`server`] is the I/O.

pub mod answer;
pub mod bench;
pub mod cli;
pub mod forward;
pub mod metrics;
pub mod rendered;
pub mod server;
pub mod udp;
pub mod zone;

use cluster::store::Kind;
use state::kube::Watch;

/// The kinds the DNS server reads (its RBAC follows from them: get, list, watch on each): Pods
/// for the `verified` pod names, as CoreDNS's `pods verified` watches them.
pub const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Pod];

/// What the DNS server watches: every object of [`KINDS`].
pub fn watches() -> Vec<Watch> {
    KINDS.into_iter().map(Watch::all).collect()
}
