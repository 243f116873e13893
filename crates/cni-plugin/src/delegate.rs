//! Running another plugin (an IPAM plugin named in `ipam.type`) the way a runtime would: found on
//! `CNI_PATH`, same environment but for the command, same config on stdin.

use cni_spec::error::{CniError, ErrorCode};
use cni_spec::{CniResult, Command, Invocation};
use serde_json::Value;
use std::io::Write;
use std::process::Stdio;

pub fn find(plugin: &str, inv: &Invocation) -> Result<std::path::PathBuf, CniError> {
    if plugin.contains('/') || !cni_spec::env::is_valid_name(plugin) {
        return Err(cni_spec::error::invalid_config(format!(
            "plugin type {plugin:?} is not a valid plugin name"
        )));
    }
    inv.path
        .iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            let dirs: Vec<String> = inv.path.iter().map(|p| p.display().to_string()).collect();
            CniError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "plugin {plugin:?} not found in CNI_PATH ({})",
                    dirs.join(":")
                ),
            )
        })
}

pub fn call(
    plugin: &str,
    inv: &Invocation,
    cmd: Command,
    raw: &Value,
) -> Result<Option<CniResult>, CniError> {
    let bin = find(plugin, inv)?;
    let mut env = inv.to_env();
    env.insert("CNI_COMMAND", cmd.as_str().to_string());
    let mut child = std::process::Command::new(&bin)
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| cni_spec::error::io_error(format!("running {}", bin.display()), e))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(raw.to_string().as_bytes())
        .map_err(|e| cni_spec::error::io_error("writing to delegate", e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| cni_spec::error::io_error("waiting for delegate", e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let e = CniError::from_json(&stdout)
            .unwrap_or_else(|| CniError::new(ErrorCode::Io, format!("exited with {}", out.status)));
        return Err(e.context(format!("IPAM plugin {plugin} {}", cmd.as_str())));
    }
    if cmd != Command::Add {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(&stdout).map_err(|e| {
        CniError::new(
            ErrorCode::Decode,
            format!("IPAM plugin {plugin} printed no JSON result: {e}"),
        )
    })?;
    CniResult::from_value(&v).map(Some)
}
