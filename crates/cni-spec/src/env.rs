//! The runtime's side of an invocation: `CNI_*` environment variables, validated as the spec says.

use crate::args::CniArgs;
use crate::error::{CniError, ErrorCode};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!(
                        "CNI_COMMAND is \"{other}\"; valid: ADD, DEL, CHECK, STATUS, GC, VERSION"
                    ),
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }

    /// ADD, DEL and CHECK act on one attachment: (container ID, interface name).
    pub fn targets_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// One call of a plugin, as the runtime described it in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// Absent on DEL when the runtime no longer has the namespace.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
    /// `CNI_PATH`: where delegated plugins are looked up.
    pub path: Vec<PathBuf>,
}

impl Invocation {
    /// Reads and validates `CNI_*` from a variable lookup (the process environment in production).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
        let command = Command::parse(&get("CNI_COMMAND").ok_or_else(|| {
            CniError::new(ErrorCode::InvalidEnvironment, "CNI_COMMAND is not set")
        })?)?;
        let mut missing = Vec::new();
        let mut required = |name: &'static str, needed: bool| -> String {
            match get(name).filter(|v| !v.is_empty()) {
                Some(v) => v,
                None => {
                    if needed {
                        missing.push(name);
                    }
                    String::new()
                }
            }
        };
        let attach = command.targets_attachment();
        let container_id = required("CNI_CONTAINERID", attach);
        let netns = required(
            "CNI_NETNS",
            matches!(command, Command::Add | Command::Check),
        );
        let ifname = required("CNI_IFNAME", attach);
        if !missing.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!(
                    "required environment variables missing for {}: {}",
                    command.as_str(),
                    missing.join(", ")
                ),
            ));
        }
        if attach {
            validate_container_id(&container_id)?;
            validate_ifname(&ifname)?;
        }
        let args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        let path = get("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Invocation {
            command,
            container_id,
            netns: (!netns.is_empty()).then(|| PathBuf::from(netns)),
            ifname,
            args,
            path,
        })
    }

    /// The environment to hand to a delegated plugin for the same call.
    pub fn to_env(&self) -> HashMap<&'static str, String> {
        let mut env = HashMap::new();
        env.insert("CNI_COMMAND", self.command.as_str().to_string());
        env.insert("CNI_CONTAINERID", self.container_id.clone());
        env.insert("CNI_IFNAME", self.ifname.clone());
        if let Some(ns) = &self.netns {
            env.insert("CNI_NETNS", ns.display().to_string());
        }
        env.insert("CNI_ARGS", self.args.raw.clone());
        let path: Vec<String> = self.path.iter().map(|p| p.display().to_string()).collect();
        env.insert("CNI_PATH", path.join(":"));
        env
    }
}

/// Names the spec allows for containers and networks: `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`.
pub fn is_valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::new(
            ErrorCode::UnknownContainer,
            "CNI_CONTAINERID is empty",
        ));
    }
    if !is_valid_name(id) {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "CNI_CONTAINERID has invalid characters",
        )
        .with_details(format!(
            "got {id:?}; valid: a letter or digit, then letters, digits, '_', '.', '-'"
        )));
    }
    Ok(())
}

/// The spec's interface name rules (also what the kernel accepts): 1-15 bytes, not "." or "..",
/// no '/', ':' or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > 15 {
        Some("is longer than 15 characters")
    } else if name == "." || name == ".." {
        Some("may not be \".\" or \"..\"")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("may not contain '/', ':' or whitespace")
    } else {
        None
    };
    match problem {
        Some(p) => Err(
            CniError::new(ErrorCode::InvalidEnvironment, format!("CNI_IFNAME {p}"))
                .with_details(format!("got {name:?}")),
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn add_needs_its_variables() {
        let e = Invocation::from_env(env(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert!(e.is(ErrorCode::InvalidEnvironment));
        assert!(
            e.msg.contains("CNI_CONTAINERID")
                && e.msg.contains("CNI_NETNS")
                && e.msg.contains("CNI_IFNAME")
        );
    }

    #[test]
    fn del_without_netns_is_fine() {
        let inv = Invocation::from_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]))
        .unwrap();
        assert_eq!(inv.netns, None);
        assert_eq!(inv.path.len(), 2);
    }

    #[test]
    fn unknown_command() {
        let e = Invocation::from_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert!(e.is(ErrorCode::InvalidEnvironment) && e.msg.contains("FROB"));
    }

    #[test]
    fn ifname_rules() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "eth\t",
            "sixteen-chars-xx",
        ] {
            assert!(
                validate_ifname(bad)
                    .unwrap_err()
                    .is(ErrorCode::InvalidEnvironment),
                "{bad:?}"
            );
        }
        for good in ["eth0", "net1", "a.b", "fifteen-chars-x"] {
            validate_ifname(good).unwrap();
        }
    }

    #[test]
    fn container_id_rules() {
        assert!(validate_container_id("")
            .unwrap_err()
            .is(ErrorCode::UnknownContainer));
        for bad in ["../etc", "-x", "a/b", "a b", ".hidden"] {
            assert!(
                validate_container_id(bad)
                    .unwrap_err()
                    .is(ErrorCode::InvalidEnvironment),
                "{bad}"
            );
        }
        validate_container_id("0123abc_def.g-h").unwrap();
    }
}
