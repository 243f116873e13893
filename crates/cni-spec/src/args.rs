//! `CNI_ARGS`: `KEY=VALUE;KEY=VALUE`, with `IgnoreUnknown` and the conventional keys.

use crate::error::{CniError, ErrorCode};

/// Keys flatnet understands; anything else is an error unless `IgnoreUnknown` is true.
pub const KNOWN_KEYS: [&str; 8] = [
    "IgnoreUnknown",
    "IP",
    "MAC",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "K8S_POD_NETWORK",
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub raw: String,
    pub pairs: Vec<(String, String)>,
}

impl CniArgs {
    pub fn parse(raw: &str) -> Result<CniArgs, CniError> {
        let mut pairs = Vec::new();
        for item in raw.split(';').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                CniError::new(ErrorCode::InvalidEnvironment, "CNI_ARGS is malformed")
                    .with_details(format!("item {item:?} is not KEY=VALUE"))
            })?;
            pairs.push((k.to_string(), v.to_string()));
        }
        let args = CniArgs {
            raw: raw.to_string(),
            pairs,
        };
        if !args.ignore_unknown() {
            if let Some((k, _)) = args
                .pairs
                .iter()
                .find(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
            {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS has unknown key {k:?}"),
                )
                .with_details(format!(
                    "known keys: {}; add IgnoreUnknown=1 to pass others through",
                    KNOWN_KEYS.join(", ")
                )));
            }
        }
        Ok(args)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn ignore_unknown(&self) -> bool {
        self.get("IgnoreUnknown")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_gates_unknown_keys() {
        let a = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAME=web;FOO=bar").unwrap();
        assert_eq!(a.get("K8S_POD_NAME"), Some("web"));
        assert_eq!(a.get("FOO"), Some("bar"));
        let e = CniArgs::parse("FOO=bar").unwrap_err();
        assert!(e.is(ErrorCode::InvalidEnvironment) && e.msg.contains("FOO"));
        assert!(CniArgs::parse("IP")
            .unwrap_err()
            .is(ErrorCode::InvalidEnvironment));
        assert_eq!(CniArgs::parse("").unwrap().pairs.len(), 0);
    }
}
