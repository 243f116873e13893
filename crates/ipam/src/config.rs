//! The `ipam` section, read with host-local's field names and defaults.

use crate::range::{Range, RangeSet};
use crate::resolv;
use cni_spec::error::{CniError, ErrorCode};
use cni_spec::{Dns, Route};
use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConfig {
    pub network: String,
    pub ranges: Vec<RangeSet>,
    pub routes: Vec<Route>,
    /// The parent of the network's lease directory.
    pub data_dir: PathBuf,
    pub resolv_conf: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    #[serde(rename = "type")]
    _type: String,
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    subnet: Option<IpNet>,
    range_start: Option<IpAddr>,
    range_end: Option<IpAddr>,
    gateway: Option<IpAddr>,
    #[serde(default)]
    routes: Vec<Route>,
    data_dir: Option<PathBuf>,
    resolv_conf: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRange {
    subnet: IpNet,
    range_start: Option<IpAddr>,
    range_end: Option<IpAddr>,
    gateway: Option<IpAddr>,
}

/// Sorts a serde complaint into the spec's codes: unknown fields are 2, the rest 7.
pub fn decode_error(section: &str, e: serde_json::Error) -> CniError {
    let text = e.to_string();
    let code = if text.starts_with("unknown field") {
        ErrorCode::UnsupportedField
    } else {
        ErrorCode::InvalidConfig
    };
    CniError::new(code, format!("{section}: {text}"))
}

impl IpamConfig {
    /// `ipam` is the config's `ipam` object; `ip_ranges` the runtime's `ipRanges` capability, which
    /// replaces the configured ranges when given.
    pub fn parse(
        network: &str,
        ipam: &serde_json::Value,
        ip_ranges: Option<&serde_json::Value>,
    ) -> Result<IpamConfig, CniError> {
        let raw: Raw = serde_json::from_value(ipam.clone()).map_err(|e| decode_error("ipam", e))?;
        let mut raw_sets = raw.ranges;
        if let Some(subnet) = raw.subnet {
            raw_sets.insert(
                0,
                vec![RawRange {
                    subnet,
                    range_start: raw.range_start,
                    range_end: raw.range_end,
                    gateway: raw.gateway,
                }],
            );
        }
        let mut field = "ipam.ranges";
        if let Some(v) = ip_ranges {
            raw_sets = serde_json::from_value(v.clone())
                .map_err(|e| decode_error("runtimeConfig.ipRanges", e))?;
            field = "runtimeConfig.ipRanges";
        }
        if raw_sets.is_empty() {
            return Err(
                CniError::new(ErrorCode::InvalidConfig, "ipam: no address ranges").with_details(
                    "set ipam.ranges (e.g. [[{\"subnet\": \"10.244.1.0/24\"}]]) or ipam.subnet",
                ),
            );
        }
        let mut ranges: Vec<RangeSet> = Vec::new();
        for (i, set) in raw_sets.into_iter().enumerate() {
            let built: Result<Vec<Range>, String> = set
                .into_iter()
                .map(|r| Range::new(r.subnet, r.range_start, r.range_end, r.gateway))
                .collect();
            let set = built.and_then(RangeSet::new).map_err(|e| {
                CniError::new(ErrorCode::InvalidConfig, format!("{field}[{i}]: {e}"))
            })?;
            if let Some(j) = ranges.iter().position(|o| o.overlaps(&set)) {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("{field}[{i}] overlaps {field}[{j}]"),
                ));
            }
            ranges.push(set);
        }
        Ok(IpamConfig {
            network: network.to_string(),
            ranges,
            routes: raw.routes,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            resolv_conf: raw.resolv_conf,
        })
    }

    pub fn describe_ranges(&self) -> String {
        self.ranges
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// DNS settings from `resolvConf`, if configured.
    pub fn dns(&self) -> Result<Dns, CniError> {
        match &self.resolv_conf {
            None => Ok(Dns::default()),
            Some(p) => resolv::read(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn legacy_subnet_and_ranges() {
        let c = IpamConfig::parse(
            "n",
            &json!({"type": "flatnet", "subnet": "10.0.0.0/24", "ranges": [[{"subnet": "fd00::/64"}]],
                    "routes": [{"dst": "0.0.0.0/0"}]}),
            None,
        )
        .unwrap();
        assert_eq!(c.ranges.len(), 2);
        assert!(c.ranges[0].contains("10.0.0.5".parse().unwrap()));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn runtime_ip_ranges_replace_config() {
        let c = IpamConfig::parse(
            "n",
            &json!({"type": "flatnet", "subnet": "10.0.0.0/24"}),
            Some(&json!([[{"subnet": "10.9.0.0/24"}]])),
        )
        .unwrap();
        assert!(c.ranges[0].contains("10.9.0.5".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_field() {
        let e = IpamConfig::parse("n", &json!({"type": "flatnet", "rangestart": "1"}), None)
            .unwrap_err();
        assert!(
            e.is(ErrorCode::UnsupportedField) && e.msg.contains("rangestart"),
            "{e}"
        );
        let e = IpamConfig::parse("n", &json!({"type": "flatnet"}), None).unwrap_err();
        assert!(e.is(ErrorCode::InvalidConfig) && e.msg.contains("no address ranges"));
        let e = IpamConfig::parse(
            "n",
            &json!({"type": "flatnet", "ranges": [[{"subnet": "10.0.0.1/24"}]]}),
            None,
        )
        .unwrap_err();
        assert!(
            e.msg.contains("ipam.ranges[0]") && e.msg.contains("host bits"),
            "{e}"
        );
        let e = IpamConfig::parse(
            "n",
            &json!({"type": "flatnet", "ranges": [[{"subnet": "10.0.0.0/16"}], [{"subnet": "10.0.1.0/24"}]]}),
            None,
        )
        .unwrap_err();
        assert!(e.msg.contains("overlaps"), "{e}");
    }
}
