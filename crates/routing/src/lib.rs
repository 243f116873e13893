//! Node routing: every node reaches every other node's pod CIDR. [`plan`] is the pure planner
//! (its module doc explains the backends), [`apply`] the thin applier.

pub mod apply;
pub mod plan;

pub use apply::{apply, teardown, Changes};
pub use plan::{cni_conflist, plan, vtep_mac, Config, Me, Plan, PROTOCOL};
