//! `flatnet ingress`'s routing: Ingress and Gateway API objects compiled into one immutable
//! route table ([`table::Table`]), looked up per request. The proxy holds the table behind one
//! atomic pointer and swaps a new one in on a change, so requests in flight finish on the table
//! they started with.

pub mod bench;
pub mod daemon;
pub mod edge;
pub mod endpoints;
pub mod gateway;
pub mod host;
pub mod ingress;
mod meta;
pub mod table;
pub mod tls;
