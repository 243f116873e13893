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
