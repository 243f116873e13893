//! A CNI runtime in miniature, for testing and measuring plugins rather than running containers.
//!
//! [`exec`] runs one plugin binary with the spec's environment inside a chosen network namespace
//! (the "node"); [`conflist`] runs a network configuration list as libcni does (ADD in order with
//! `prevResult`, DEL in reverse, capabilities into `runtimeConfig`); [`conformance`] walks any
//! plugin through the spec's rules, since the spec has no suite of its own
//! (containernetworking/cni#540); [`bench`] times ADD/DEL of two plugins side by side.

pub mod bench;
pub mod cli;
pub mod conflist;
pub mod conformance;
pub mod exec;
