//! flatnet as a CNI plugin: what runs when a container runtime executes `/opt/cni/bin/flatnet`
//! with `CNI_COMMAND` set.
//!
//! Two roles, picked by the config:
//! - `"type": "flatnet"`: the network plugin (bridge or ptp mode, see [`plan`]), with IPAM built in
//!   (`"ipam": {"type": "flatnet"}`) or delegated to any IPAM plugin found on `CNI_PATH`;
//! - another `type` whose `ipam.type` is `"flatnet"`: flatnet is that plugin's IPAM (how the
//!   reference `bridge` uses it).
//!
//! Like the reference plugins, a command is a short walk over small helpers: parse and validate
//! ([`conf`]), get addresses ([`ipam`] or a delegate), plan ([`plan`]), apply ([`apply`]).
//! Every failure is a spec error object with the right code; a failed ADD undoes what it did.

pub mod apply;
pub mod conf;
pub mod delegate;
pub mod hostport;
pub mod naming;
pub mod plan;

use cni_spec::error::{CniError, ErrorCode};
use cni_spec::{CniResult, Command, Invocation, Version};
use conf::{Common, NetConf};
use serde_json::Value;

pub const PLUGIN_TYPE: &str = "flatnet";

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs one CNI invocation: `env` looks up `CNI_*` variables, `stdin` is the config.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let raw: Result<Value, CniError> = if stdin.iter().all(u8::is_ascii_whitespace) {
        Ok(Value::Object(Default::default()))
    } else {
        serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                format!("network config on stdin is not valid JSON: {e}"),
            )
        })
    };
    let echo_version = raw
        .as_ref()
        .ok()
        .and_then(|v| v.get("cniVersion"))
        .and_then(Value::as_str)
        .filter(|v| Version::parse(v).is_some())
        .unwrap_or(Version::LATEST.as_str())
        .to_string();
    match dispatch(env, raw) {
        Ok(stdout) => Outcome {
            stdout,
            exit_code: 0,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&echo_version),
            exit_code: 1,
        },
    }
}

fn dispatch(
    env: impl Fn(&str) -> Option<String>,
    raw: Result<Value, CniError>,
) -> Result<String, CniError> {
    let inv = Invocation::from_env(&env)?;
    let raw = raw?;
    if inv.command == Command::Version {
        let asked = raw
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or(Version::LATEST.as_str());
        return Ok(Version::version_answer(asked));
    }
    let mut common = Common::parse(&raw)?;
    let v = common.version;
    let gate = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(gated(inv.command, v))
        }
    };
    match inv.command {
        Command::Check => gate(v.has_check())?,
        Command::Status | Command::Gc => gate(v.has_status_and_gc())?,
        _ => {}
    }
    common.runtime.merge_cni_args(&inv.args)?;
    let result = if common.plugin_type == PLUGIN_TYPE {
        let conf = NetConf::parse(&raw)?;
        network::run(&inv, &common, &conf, &raw)?
    } else if common.ipam_type() == Some(PLUGIN_TYPE) {
        ipam_only(&inv, &common)?
    } else {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            format!("field type is {:?} and ipam.type is {:?}; flatnet serves \"type\": \"flatnet\" or \"ipam\": {{\"type\": \"flatnet\"}}", common.plugin_type, common.ipam_type().unwrap_or("")),
        ));
    };
    Ok(result
        .map(|r| r.to_value(v).to_string())
        .unwrap_or_default())
}

fn gated(cmd: Command, v: Version) -> CniError {
    let since = if cmd == Command::Check {
        "0.4.0"
    } else {
        "1.1.0"
    };
    CniError::new(
        ErrorCode::IncompatibleVersion,
        format!("config version {v} does not allow {}", cmd.as_str()),
    )
    .with_details(format!(
        "{} exists from cniVersion {since} on",
        cmd.as_str()
    ))
}

/// The built-in IPAM's config, from the `ipam` section and the `ipRanges` capability.
fn builtin_ipam(common: &Common) -> Result<ipam::IpamConfig, CniError> {
    let section = common
        .ipam
        .as_ref()
        .ok_or_else(|| cni_spec::error::invalid_config("field ipam is missing"))?;
    ipam::IpamConfig::parse(&common.name, section, common.runtime.ip_ranges.as_ref())
}

fn request(inv: &Invocation, common: &Common) -> ipam::Request {
    ipam::Request {
        container_id: inv.container_id.clone(),
        ifname: inv.ifname.clone(),
        requested: common.runtime.ips.clone(),
    }
}

/// flatnet as another plugin's IPAM: addresses only.
fn ipam_only(inv: &Invocation, common: &Common) -> Result<Option<CniResult>, CniError> {
    builtin_call(&builtin_ipam(common)?, inv, common, inv.command)
}

/// One command of the built-in IPAM, for either role.
fn builtin_call(
    cfg: &ipam::IpamConfig,
    inv: &Invocation,
    common: &Common,
    cmd: Command,
) -> Result<Option<CniResult>, CniError> {
    match cmd {
        Command::Add => {
            let mut r = ipam::allocate(cfg, &request(inv, common))?;
            r.dns = common.dns.clone().or(&r.dns);
            Ok(Some(r))
        }
        Command::Del => ipam::release(cfg, &inv.container_id, &inv.ifname).map(|_| None),
        Command::Gc => ipam::gc(cfg, &common.valid_attachments).map(|_| None),
        Command::Status => ipam::status(cfg).map(|_| None),
        Command::Check => {
            let held = ipam::held(cfg, &inv.container_id, &inv.ifname)?;
            let fail = |msg: String| Err(CniError::new(ErrorCode::CheckFailed, msg));
            if held.is_empty() {
                return fail(format!(
                    "container {:?} interface {:?} holds no address in network {:?}",
                    inv.container_id, inv.ifname, common.name
                ));
            }
            let prev = common.prev_result.iter().flat_map(|p| &p.ips);
            match prev.into_iter().find(|i| !held.contains(&i.address.addr())) {
                Some(i) => fail(format!(
                    "address {} is not leased to this container",
                    i.address
                )),
                None => Ok(None),
            }
        }
        Command::Version => unreachable!("answered before"),
    }
}

/// The network plugin's commands.
mod network {
    use super::*;
    use crate::plan::{self, Attachment};

    enum Ipam {
        Builtin(ipam::IpamConfig),
        Delegated(String),
    }

    impl Ipam {
        fn of(common: &Common) -> Result<Ipam, CniError> {
            match common.ipam_type() {
                Some(PLUGIN_TYPE) => Ok(Ipam::Builtin(builtin_ipam(common)?)),
                Some(other) => Ok(Ipam::Delegated(other.to_string())),
                None => Err(cni_spec::error::invalid_config("field ipam.type is missing")
                    .with_details("use \"ipam\": {\"type\": \"flatnet\", \"ranges\": [[{\"subnet\": \"...\"}]]} or name an IPAM plugin on CNI_PATH")),
            }
        }

        fn call(
            &self,
            inv: &Invocation,
            common: &Common,
            raw: &Value,
            cmd: Command,
        ) -> Result<Option<CniResult>, CniError> {
            match self {
                Ipam::Builtin(cfg) => builtin_call(cfg, inv, common, cmd),
                Ipam::Delegated(ty) => delegate::call(ty, inv, cmd, raw),
            }
        }
    }

    pub fn run(
        inv: &Invocation,
        common: &Common,
        conf: &NetConf,
        raw: &Value,
    ) -> Result<Option<CniResult>, CniError> {
        let ipam = Ipam::of(common)?;
        match inv.command {
            Command::Add => add(inv, common, conf, raw, &ipam).map(Some),
            Command::Del => {
                // Devices first, then addresses: an address is never free while a pod still uses it.
                let pod_ns = inv
                    .netns
                    .as_deref()
                    .and_then(|p| netns::NetNs::open(p).ok());
                apply::del(
                    &common.name,
                    &inv.container_id,
                    &inv.ifname,
                    pod_ns.as_ref(),
                )?;
                hostport::remove(&common.name, &inv.container_id, &inv.ifname)?;
                ipam.call(inv, common, raw, Command::Del)?;
                Ok(None)
            }
            Command::Check => {
                let prev = common.prev_result.as_ref().ok_or_else(|| {
                    cni_spec::error::invalid_config("CHECK needs prevResult")
                        .with_details("the runtime passes the cached ADD result as prevResult")
                })?;
                let ns =
                    apply::open_netns(inv.netns.as_deref().expect("CHECK requires CNI_NETNS"))?;
                let bridge = (conf.mode == conf::Mode::Bridge).then_some(conf.bridge.as_str());
                apply::check(
                    &common.name,
                    &inv.container_id,
                    &inv.ifname,
                    bridge,
                    &ns,
                    prev,
                )?;
                ipam.call(inv, common, raw, Command::Check)?;
                Ok(None)
            }
            Command::Gc => {
                apply::gc(&common.name, &common.valid_attachments)?;
                hostport::gc(&common.name, &common.valid_attachments)?;
                ipam.call(inv, common, raw, Command::Gc)?;
                Ok(None)
            }
            Command::Status => {
                if conf.ip_masq && !nft::available() {
                    return Err(CniError::new(
                        ErrorCode::NotAvailable,
                        "ipMasq needs the nft program (package nftables), which is not installed",
                    ));
                }
                ipam.call(inv, common, raw, Command::Status)?;
                Ok(None)
            }
            Command::Version => unreachable!("answered before"),
        }
    }

    fn add(
        inv: &Invocation,
        common: &Common,
        conf: &NetConf,
        raw: &Value,
        ipam: &Ipam,
    ) -> Result<CniResult, CniError> {
        let mappings = &common.runtime.port_mappings;
        // Bad mappings are refused before anything is made.
        hostport::script(&common.name, &inv.container_id, &inv.ifname, &[], mappings)?;
        let netns = inv.netns.as_deref().expect("ADD requires CNI_NETNS");
        let pod_ns = apply::open_netns(netns)?;
        let mut addrs = ipam
            .call(inv, common, raw, Command::Add)?
            .expect("ADD returns a result");
        if addrs.ips.is_empty() {
            let _ = ipam.call(inv, common, raw, Command::Del);
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "IPAM returned no addresses",
            ));
        }
        addrs.dns = common.runtime.dns.clone().or(&common.dns).or(&addrs.dns);
        let att = Attachment {
            network: common.name.clone(),
            container_id: inv.container_id.clone(),
            ifname: inv.ifname.clone(),
            netns: netns.to_path_buf(),
        };
        let plan = plan::plan(conf, &att, &addrs, common.runtime.mac);
        let added = apply::add(&plan, &pod_ns).and_then(|mac| {
            if mappings.is_empty() {
                return Ok(mac);
            }
            let (net, id, ifname) = (&common.name, &inv.container_id, &inv.ifname);
            let installed = hostport::script(net, id, ifname, &addrs.ips, mappings)
                .and_then(|s| hostport::install(net, id, ifname, &s));
            match installed {
                Ok(()) => Ok(mac),
                Err(e) => {
                    let _ = hostport::remove(net, id, ifname);
                    let _ = apply::del(net, id, ifname, Some(&pod_ns));
                    Err(e)
                }
            }
        });
        match added {
            Ok(bridge_mac) => {
                let ours = plan.result(&addrs, bridge_mac, &netns.display().to_string());
                Ok(plan::merge(common.prev_result.as_ref(), ours))
            }
            Err(e) => {
                let _ = ipam.call(inv, common, raw, Command::Del);
                Err(e)
            }
        }
    }
}
