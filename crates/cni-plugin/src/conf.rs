//! The network configuration of `"type": "flatnet"`, with the reference bridge plugin's field
//! names and meanings, plus `mode` and `clusterCIDR`. Unknown fields are refused (code 2) so a
//! typo never silently changes nothing.

use cni_spec::error::{invalid_config, CniError, ErrorCode};
use cni_spec::{CniResult, Dns, Version};
use ipam::config::decode_error;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pods on a node bridge (L2), the gateway address on the bridge.
    #[default]
    Bridge,
    /// No bridge: a routed veth per pod with a host route to its address (L3).
    Ptp,
}

/// Fields every config may carry, whatever the plugin type: read by both the network plugin and
/// flatnet-as-IPAM (whose top level belongs to another plugin).
#[derive(Debug, Clone)]
pub struct Common {
    pub version: Version,
    pub name: String,
    pub plugin_type: String,
    pub ipam: Option<Value>,
    pub dns: Dns,
    pub prev_result: Option<CniResult>,
    pub runtime: Runtime,
    /// `cni.dev/valid-attachments` of GC: (container ID, ifname).
    pub valid_attachments: Vec<(String, String)>,
}

/// Capabilities the runtime filled in (`runtimeConfig`) and static requests (`args.cni`).
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    pub ips: Vec<IpAddr>,
    pub mac: Option<[u8; 6]>,
    pub ip_ranges: Option<Value>,
    pub dns: Dns,
    pub port_mappings: Vec<PortMapping>,
}

/// One `portMappings` entry; containerd writes `HostPort`, podman `hostPort`: both are read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PortMapping {
    #[serde(alias = "HostPort", rename = "hostPort")]
    pub host_port: u16,
    #[serde(alias = "ContainerPort", rename = "containerPort")]
    pub container_port: u16,
    #[serde(alias = "Protocol", default = "tcp")]
    pub protocol: String,
    #[serde(alias = "HostIP", rename = "hostIP", default)]
    pub host_ip: String,
}

fn tcp() -> String {
    "tcp".into()
}

impl Common {
    pub fn parse(raw: &Value) -> Result<Common, CniError> {
        let version = Version::from_config(raw)?;
        let name = str_field(raw, "name")?;
        if !cni_spec::env::is_valid_name(&name) {
            return Err(
                invalid_config(format!("field name {name:?} is not a valid network name"))
                    .with_details("valid: a letter or digit, then letters, digits, '_', '.', '-'"),
            );
        }
        let plugin_type = str_field(raw, "type")?;
        let dns = match raw.get("dns") {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| decode_error("dns", e))?,
            None => Dns::default(),
        };
        let prev_result = raw
            .get("prevResult")
            .filter(|v| !v.is_null())
            .map(CniResult::from_value)
            .transpose()?;
        let valid_attachments = match raw.get("cni.dev/valid-attachments") {
            None => Vec::new(),
            Some(v) => {
                #[derive(Deserialize)]
                struct A {
                    #[serde(rename = "containerID")]
                    id: String,
                    ifname: String,
                }
                let list: Vec<A> = serde_json::from_value(v.clone())
                    .map_err(|e| decode_error("cni.dev/valid-attachments", e))?;
                list.into_iter().map(|a| (a.id, a.ifname)).collect()
            }
        };
        Ok(Common {
            version,
            name,
            plugin_type,
            ipam: raw.get("ipam").cloned(),
            dns,
            prev_result,
            runtime: Runtime::parse(raw)?,
            valid_attachments,
        })
    }

    /// The IPAM plugin type named in `ipam.type`, if any.
    pub fn ipam_type(&self) -> Option<&str> {
        self.ipam.as_ref()?.get("type")?.as_str()
    }
}

impl Runtime {
    fn parse(raw: &Value) -> Result<Runtime, CniError> {
        let mut rt = Runtime::default();
        let runtime = raw.get("runtimeConfig");
        let args = raw.get("args").and_then(|a| a.get("cni"));
        for (src, v) in [
            ("runtimeConfig.ips", runtime.and_then(|r| r.get("ips"))),
            ("args.cni.ips", args.and_then(|a| a.get("ips"))),
        ] {
            if let Some(v) = v {
                let list: Vec<String> =
                    serde_json::from_value(v.clone()).map_err(|e| decode_error(src, e))?;
                for s in list {
                    // Requests may carry a prefix ("10.1.0.5/24"); only the address matters.
                    let ip = s
                        .split('/')
                        .next()
                        .unwrap_or_default()
                        .parse::<IpAddr>()
                        .map_err(|_| {
                            invalid_config(format!("{src}: {s:?} is not an IP address"))
                        })?;
                    rt.ips.push(ip);
                }
            }
        }
        for (src, v) in [
            ("runtimeConfig.mac", runtime.and_then(|r| r.get("mac"))),
            ("args.cni.mac", args.and_then(|a| a.get("mac"))),
        ] {
            if let Some(Value::String(s)) = v {
                rt.mac = Some(parse_unicast_mac(src, s)?);
            }
        }
        if let Some(r) = runtime {
            rt.ip_ranges = r
                .get("ipRanges")
                .filter(|v| v.as_array().is_some_and(|a| !a.is_empty()))
                .cloned();
            if let Some(d) = r.get("dns") {
                rt.dns = serde_json::from_value(d.clone())
                    .map_err(|e| decode_error("runtimeConfig.dns", e))?;
            }
            if let Some(p) = r.get("portMappings") {
                rt.port_mappings = serde_json::from_value(p.clone())
                    .map_err(|e| decode_error("runtimeConfig.portMappings", e))?;
            }
        }
        Ok(rt)
    }

    /// Adds what `CNI_ARGS` asks for (`IP=a,b`, `MAC=`), which host-local and bridge also honour.
    pub fn merge_cni_args(&mut self, args: &cni_spec::CniArgs) -> Result<(), CniError> {
        if let Some(list) = args.get("IP") {
            for s in list.split(',').filter(|s| !s.is_empty()) {
                self.ips.push(s.parse().map_err(|_| {
                    CniError::new(
                        ErrorCode::InvalidEnvironment,
                        format!("CNI_ARGS IP={s} is not an IP address"),
                    )
                })?);
            }
        }
        if let Some(m) = args.get("MAC") {
            self.mac = Some(parse_unicast_mac("CNI_ARGS MAC", m)?);
        }
        Ok(())
    }
}

fn parse_unicast_mac(src: &str, s: &str) -> Result<[u8; 6], CniError> {
    match netlink::parse_mac(s) {
        Some(m) if m[0] & 1 == 0 => Ok(m),
        _ => Err(invalid_config(format!(
            "{src}: {s:?} is not a unicast MAC address like 0a:58:0a:f4:01:05"
        ))),
    }
}

fn str_field(raw: &Value, field: &str) -> Result<String, CniError> {
    match raw.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None => Err(invalid_config(format!("field {field} is missing"))),
        Some(other) => Err(invalid_config(format!(
            "field {field} must be a string, got {other}"
        ))),
    }
}

/// The network plugin's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub mode: Mode,
    pub bridge: String,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub force_address: bool,
    pub ip_masq: bool,
    pub cluster_cidrs: Vec<IpNet>,
    pub mtu: Option<u32>,
    pub hairpin_mode: bool,
    pub promisc_mode: bool,
    pub enable_dad: bool,
    pub disable_container_interface: bool,
    pub port_isolation: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(IpNet),
    Many(Vec<IpNet>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNetConf {
    #[serde(rename = "cniVersion")]
    _cni_version: Value,
    #[serde(rename = "name")]
    _name: Value,
    #[serde(rename = "type")]
    _type: Value,
    #[serde(default)]
    mode: Mode,
    bridge: Option<String>,
    #[serde(default)]
    is_gateway: bool,
    #[serde(default)]
    is_default_gateway: bool,
    #[serde(default)]
    force_address: bool,
    #[serde(default)]
    ip_masq: bool,
    ip_masq_backend: Option<String>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<OneOrMany>,
    mtu: Option<u32>,
    #[serde(default)]
    hairpin_mode: bool,
    #[serde(default)]
    promisc_mode: bool,
    #[serde(default)]
    vlan: u16,
    vlan_trunk: Option<Value>,
    #[serde(default)]
    preserve_default_vlan: Option<bool>,
    #[serde(default)]
    enabledad: bool,
    #[serde(default)]
    macspoofchk: bool,
    #[serde(default)]
    disable_container_interface: bool,
    #[serde(default)]
    port_isolation: bool,
    // Common fields, read by `Common`.
    #[serde(rename = "ipam")]
    _ipam: Option<Value>,
    #[serde(rename = "dns")]
    _dns: Option<Value>,
    #[serde(rename = "prevResult")]
    _prev_result: Option<Value>,
    #[serde(rename = "runtimeConfig")]
    _runtime_config: Option<Value>,
    #[serde(rename = "args")]
    _args: Option<Value>,
    #[serde(rename = "capabilities")]
    _capabilities: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    _valid: Option<Value>,
}

pub const DEFAULT_BRIDGE: &str = "cni0";

fn unsupported(field: &str, why: &str) -> CniError {
    CniError::new(
        ErrorCode::UnsupportedField,
        format!("field {field} is not supported by flatnet: {why}"),
    )
}

impl NetConf {
    pub fn parse(raw: &Value) -> Result<NetConf, CniError> {
        let r: RawNetConf =
            serde_json::from_value(raw.clone()).map_err(|e| decode_error("network config", e))?;
        if r.vlan != 0 || r.vlan_trunk.is_some() || r.preserve_default_vlan.is_some() {
            return Err(unsupported(
                "vlan/vlanTrunk/preserveDefaultVlan",
                "pods share one untagged bridge; chain the reference bridge plugin for VLANs",
            ));
        }
        if r.macspoofchk {
            return Err(unsupported(
                "macspoofchk",
                "MAC anti-spoofing is not implemented yet",
            ));
        }
        if let Some(b) = r.ip_masq_backend.as_deref().filter(|b| *b != "nftables") {
            return Err(CniError::new(
                ErrorCode::UnsupportedField,
                format!("field ipMasqBackend is {b:?}; flatnet masquerades with nftables only (valid: \"nftables\")"),
            ));
        }
        if let Some(mtu) = r.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(invalid_config(format!(
                    "field mtu is {mtu}; valid: 68 to 65535"
                )));
            }
        }
        let bridge = r
            .bridge
            .clone()
            .unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        cni_spec::env::validate_ifname(&bridge).map_err(|e| {
            invalid_config(format!(
                "field bridge: {}",
                e.msg.replace("CNI_IFNAME ", "")
            ))
        })?;
        if r.mode == Mode::Ptp {
            for (set, field) in [
                (r.bridge.is_some(), "bridge"),
                (r.is_gateway, "isGateway"),
                (r.is_default_gateway, "isDefaultGateway"),
                (r.force_address, "forceAddress"),
                (r.hairpin_mode, "hairpinMode"),
                (r.promisc_mode, "promiscMode"),
                (r.port_isolation, "portIsolation"),
            ] {
                if set {
                    return Err(CniError::new(
                        ErrorCode::UnsupportedField,
                        format!("field {field} applies to mode \"bridge\" only; this config has mode \"ptp\""),
                    ));
                }
            }
        }
        let cluster_cidrs = match r.cluster_cidr {
            None => vec![],
            Some(OneOrMany::One(n)) => vec![n.trunc()],
            Some(OneOrMany::Many(v)) => v.into_iter().map(|n| n.trunc()).collect(),
        };
        Ok(NetConf {
            mode: r.mode,
            bridge,
            // isDefaultGateway implies isGateway, as in the reference plugin.
            is_gateway: r.is_gateway || r.is_default_gateway,
            is_default_gateway: r.is_default_gateway,
            force_address: r.force_address,
            ip_masq: r.ip_masq,
            cluster_cidrs,
            mtu: r.mtu,
            hairpin_mode: r.hairpin_mode,
            promisc_mode: r.promisc_mode,
            enable_dad: r.enabledad,
            disable_container_interface: r.disable_container_interface,
            port_isolation: r.port_isolation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"cniVersion": "1.1.0", "name": "n", "type": "flatnet", "ipam": {"type": "flatnet", "subnet": "10.0.0.0/24"}})
    }

    #[test]
    fn defaults() {
        let c = NetConf::parse(&base()).unwrap();
        assert_eq!(
            (c.mode, c.bridge.as_str(), c.is_gateway),
            (Mode::Bridge, "cni0", false)
        );
        let mut v = base();
        v["isDefaultGateway"] = json!(true);
        v["clusterCIDR"] = json!("10.244.0.0/16");
        let c = NetConf::parse(&v).unwrap();
        assert!(c.is_gateway);
        assert_eq!(
            c.cluster_cidrs,
            vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn refusals_name_the_field() {
        for (field, value, code, needle) in [
            (
                "bridgee",
                json!("x"),
                ErrorCode::UnsupportedField,
                "bridgee",
            ),
            ("vlan", json!(5), ErrorCode::UnsupportedField, "vlan"),
            (
                "ipMasqBackend",
                json!("iptables"),
                ErrorCode::UnsupportedField,
                "ipMasqBackend",
            ),
            ("mtu", json!(10), ErrorCode::InvalidConfig, "mtu"),
            (
                "mode",
                json!("macvlan"),
                ErrorCode::InvalidConfig,
                "macvlan",
            ),
            ("bridge", json!("a/b"), ErrorCode::InvalidConfig, "bridge"),
        ] {
            let mut v = base();
            v[field] = value;
            let e = NetConf::parse(&v).unwrap_err();
            assert!(e.is(code) && e.msg.contains(needle), "{field}: {e}");
        }
        let mut v = base();
        v["mode"] = json!("ptp");
        v["hairpinMode"] = json!(true);
        assert!(NetConf::parse(&v).unwrap_err().msg.contains("hairpinMode"));
    }

    #[test]
    fn common_fields_and_capabilities() {
        let mut v = base();
        v["runtimeConfig"] = json!({"ips": ["10.0.0.9/24"], "mac": "0a:00:00:00:00:01",
            "portMappings": [{"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp"}, {"hostPort": 53, "containerPort": 53, "protocol": "udp"}]});
        v["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
        let c = Common::parse(&v).unwrap();
        assert_eq!(c.runtime.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.runtime.port_mappings[0].host_port, 8080);
        assert_eq!(c.runtime.port_mappings[1].protocol, "udp");
        assert_eq!(
            c.valid_attachments,
            vec![("a".to_string(), "eth0".to_string())]
        );
        assert_eq!(c.ipam_type(), Some("flatnet"));
        let mut v = base();
        v["runtimeConfig"] = json!({"mac": "01:00:00:00:00:01"});
        assert!(Common::parse(&v).unwrap_err().msg.contains("unicast"));
        let mut v = base();
        v["name"] = json!("../x");
        assert!(Common::parse(&v).unwrap_err().is(ErrorCode::InvalidConfig));
    }
}
