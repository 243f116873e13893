//! The service proxy: what kube-proxy does, as one nftables table per node. [`plan`] is the pure
//! planner (its module doc has the design), [`ruleset`] the table it plans and how one turns
//! into another, [`trace`] walks packets through a plan.

pub mod apply;
pub mod bench;
pub mod model;
pub mod plan;
pub mod ruleset;
pub mod sync;
pub mod trace;

pub use apply::Applier;
pub use model::{Config, Proto};
pub use plan::plan;
pub use ruleset::Ruleset;
pub use sync::{Proxy, Report};
pub use trace::{destinations, explain, parse_target, trace, Hop, Packet, Verdict};
