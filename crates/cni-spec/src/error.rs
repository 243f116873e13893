//! The spec's error object and its well-known codes.

use serde::Serialize;

/// Error codes reserved by the spec (0-99); plugin-specific codes start at 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    NotAvailableDamaged = 51,
    /// flatnet's own: CHECK found the kernel or IPAM state different from the result.
    CheckFailed = 100,
    /// flatnet's own: the kernel refused an operation ADD or DEL needed.
    Kernel = 101,
    /// flatnet's own: the address ranges have no free address left.
    RangeFull = 102,
}

/// A CNI error: printed as the spec's JSON object on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        CniError {
            code: code as u32,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Prefixes the message with what was being done, keeping the code.
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }

    pub fn is(&self, code: ErrorCode) -> bool {
        self.code == code as u32
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        let wire = Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&wire).expect("error object serializes")
    }

    /// Reads an error object a delegated plugin printed.
    pub fn from_json(text: &str) -> Option<CniError> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let code = v.get("code")?.as_u64()? as u32;
        let msg = v
            .get("msg")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string();
        let details = v
            .get("details")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string();
        Some(CniError { code, msg, details })
    }
}

pub fn io_error(what: impl std::fmt::Display, err: std::io::Error) -> CniError {
    CniError::new(ErrorCode::Io, format!("{what}: {err}"))
}

pub fn invalid_config(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_matches_spec() {
        let e = CniError::new(ErrorCode::InvalidConfig, "bad").with_details("why");
        assert_eq!(
            e.to_json("1.1.0"),
            r#"{"cniVersion":"1.1.0","code":7,"msg":"bad","details":"why"}"#
        );
        let e = CniError::new(ErrorCode::Decode, "x");
        assert_eq!(
            e.to_json("0.4.0"),
            r#"{"cniVersion":"0.4.0","code":6,"msg":"x"}"#
        );
        assert_eq!(CniError::from_json(&e.to_json("0.4.0")), Some(e));
    }
}
