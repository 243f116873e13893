//! NetworkPolicy (`networking.k8s.io/v1`) for the pods of one node, in nftables.
//!
//! The semantics live in one pure function, [`engine::Cluster::decide`] (as
//! kube-network-policies' engine): a connection needs the source pod's egress and the
//! destination pod's ingress; a direction is open for a pod until a policy selects it for that
//! direction, then only what some rule of some selecting policy allows passes. The planner
//! ([`plan`]) compiles the same semantics into data, and the tracer checks the two agree.
//!
//! How it sits in the kernel (table `ip flatnet-policy`, see [`plan`] for the sets):
//! - a `forward` base chain at filter priority: after the service proxy's DNAT (a policy sees
//!   the endpoint's address and port) and before its masquerade at postrouting. Same-node pod
//!   traffic is bridged; the agent keeps `net.bridge.bridge-nf-call-iptables` on so bridged
//!   frames cross it too (as Flannel with kube-router or Calico requires). Traffic the node
//!   itself sends (the kubelet's probes) takes the output path and is never filtered, nor is
//!   traffic to the node's own addresses; hostNetwork pods are never selected.
//! - replies (`ct direction reply`) and related ICMP pass, packets conntrack finds invalid are
//!   dropped (as Calico does: they belong to no connection a rule allowed). A connection the rules
//!   allowed carries, in its `ct mark`, the *generation* of the rules that allowed it; its later
//!   packets pass on one lookup while that generation is current. Every change starts a new one,
//!   so each connection is checked again at its next packet, and one a change now denies is cut
//!   there (as kube-network-policies does; Calico lets it run): a TCP peer gets a reset, others
//!   an ICMP administratively-prohibited.
//! - per packet: a map lookup per end (`ingress-ids`/`egress-ids`: local pod address → the id of
//!   its group, the pods selected by the same policies, carried in the packet's mark) and at
//!   most four set lookups keyed by that id (`…-any`: peer address; `…-ports`: peer address,
//!   protocol, port; `…-protos`: peer address, protocol; `…-ranges`: address, protocol and port
//!   ranges). Nothing walks a rule per pod or per policy, and a change
//!   is elements of these sets and maps only: no rule, chain or jump element is ever added after
//!   the table is made, so no change makes the kernel re-validate the table.
//! - no window: while any policy exists, a local pod address the agent does not know yet
//!   (`guard` holds the node's pod CIDR, `known-pods` the pods the agent has planned) is refused,
//!   so a new pod a policy selects is isolated from its first packet. Those packets are dropped,
//!   not refused: a pod no policy selects loses only its first SYN (sent again a second later,
//!   by when the agent knows it) instead of its first connection. A new table starts with
//!   `guard` covering everything until the first load lands.

pub mod apply;
pub mod bench;
pub mod engine;
pub mod model;
pub mod plan;

pub use engine::{Cluster, Decision, Packet, Side};
pub use model::{Direction, PodFacts, Policy};
