//! The CNI specification (1.1.0, with 0.3.x/0.4.0/1.0.0 results for older runtimes) as plain data.
//!
//! Everything here is pure: parsing and validating what a runtime hands a plugin (environment
//! variables, `CNI_ARGS`, the network configuration's common fields) and writing what a plugin hands
//! back (results in the version the runtime asked for, error objects with the spec's codes).
//! Network and IPAM plugins, and the conformance harness that drives them, share it.

pub mod args;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use args::CniArgs;
pub use env::{Command, Invocation};
pub use error::{CniError, ErrorCode};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::Version;
