//! Spec versions: which ones flatnet speaks and how the runtime's choice is read.

use crate::error::{CniError, ErrorCode};
use std::fmt;

/// A spec version this implementation can read configs of and write results for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const ALL: [Version; 5] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];
    pub const LATEST: Version = Version::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(s: &str) -> Option<Version> {
        Version::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Reads the `cniVersion` of a config; a missing field means 0.1.0, which we do not speak.
    pub fn from_config(raw: &serde_json::Value) -> Result<Version, CniError> {
        let given = match raw.get("cniVersion") {
            None => "0.1.0",
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(CniError::new(
                    ErrorCode::Decode,
                    format!("field cniVersion must be a string such as \"1.1.0\", got {other}"),
                ))
            }
        };
        Version::parse(given).ok_or_else(|| incompatible(given))
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= Version::V1_1_0
    }

    /// Results before 1.0.0 carry a "version" field on every IP.
    pub fn ips_carry_family(self) -> bool {
        self < Version::V1_0_0
    }

    /// The `{"cniVersion", "supportedVersions"}` answer to VERSION.
    pub fn version_answer(requested: &str) -> String {
        let supported: Vec<&str> = Version::ALL.iter().map(|v| v.as_str()).collect();
        serde_json::json!({"cniVersion": requested, "supportedVersions": supported}).to_string()
    }
}

pub fn incompatible(given: &str) -> CniError {
    let supported: Vec<&str> = Version::ALL.iter().map(|v| v.as_str()).collect();
    CniError::new(ErrorCode::IncompatibleVersion, "incompatible CNI versions").with_details(
        format!(
            "field cniVersion is \"{given}\" (absent means 0.1.0); flatnet supports {}",
            supported.join(", ")
        ),
    )
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_versions_and_rejects_others() {
        assert_eq!(
            Version::from_config(&json!({"cniVersion": "0.4.0"})),
            Ok(Version::V0_4_0)
        );
        let e = Version::from_config(&json!({})).unwrap_err();
        assert!(e.is(ErrorCode::IncompatibleVersion) && e.details.contains("0.1.0"));
        let e = Version::from_config(&json!({"cniVersion": "2.0.0"})).unwrap_err();
        assert!(e.is(ErrorCode::IncompatibleVersion));
        let e = Version::from_config(&json!({"cniVersion": 1})).unwrap_err();
        assert!(e.is(ErrorCode::Decode));
    }

    #[test]
    fn version_gates() {
        assert!(!Version::V0_3_1.has_check() && Version::V0_4_0.has_check());
        assert!(!Version::V1_0_0.has_status_and_gc() && Version::V1_1_0.has_status_and_gc());
        assert!(Version::V0_4_0.ips_carry_family() && !Version::V1_0_0.ips_carry_family());
    }
}
