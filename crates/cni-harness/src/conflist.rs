//! Network configuration lists, run the way libcni runs them.

use crate::exec::{self, Call, Reply};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A conflist (or a single plugin config, read as a list of one).
#[derive(Debug, Clone)]
pub struct NetList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Value>,
}

impl NetList {
    pub fn from_value(v: &Value) -> Result<NetList, String> {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .ok_or("config has no name")?
            .to_string();
        let cni_version = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.1.0")
            .to_string();
        let plugins = match v.get("plugins") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err("plugins must be a list".into()),
            None => vec![v.clone()],
        };
        if plugins.is_empty() {
            return Err("plugins is empty".into());
        }
        Ok(NetList {
            name,
            cni_version,
            plugins,
        })
    }

    pub fn load(path: &Path) -> Result<NetList, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        NetList::from_value(&v)
    }

    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The config one plugin sees: its own section plus name, version, prevResult and the
    /// runtimeConfig entries for the capabilities it declares.
    pub fn plugin_config(
        &self,
        i: usize,
        version: &str,
        prev: Option<&Value>,
        runtime: &Value,
    ) -> Value {
        let mut conf = self.plugins[i].clone();
        let obj = conf.as_object_mut().expect("plugin config is an object");
        obj.insert("name".into(), json!(self.name));
        obj.insert("cniVersion".into(), json!(version));
        obj.remove("plugins");
        if let Some(p) = prev {
            obj.insert("prevResult".into(), p.clone());
        }
        let caps = obj.remove("capabilities").unwrap_or(Value::Null);
        let mut rc = serde_json::Map::new();
        if let (Some(caps), Some(runtime)) = (caps.as_object(), runtime.as_object()) {
            for (k, on) in caps {
                if on.as_bool() == Some(true) {
                    if let Some(v) = runtime.get(k) {
                        rc.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        if !rc.is_empty() {
            obj.insert("runtimeConfig".into(), Value::Object(rc));
        }
        conf
    }
}

/// A runtime's view of one network: where plugins live and which namespace is the node.
pub struct Runtime<'a> {
    pub bin_dirs: Vec<PathBuf>,
    pub node: Option<&'a netns::NetNs>,
    /// Capability arguments (portMappings, bandwidth, ips, mac …) handed to plugins declaring them.
    pub runtime_config: Value,
}

/// One attachment: container, namespace, interface.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: Option<String>,
}

#[derive(Debug)]
pub struct StepError {
    pub plugin: String,
    pub reply: Reply,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin {} exited {}: {}{}",
            self.plugin,
            self.reply.exit_code,
            self.reply.stdout.trim(),
            self.reply.stderr.trim()
        )
    }
}

impl Runtime<'_> {
    pub fn find(&self, plugin: &str) -> PathBuf {
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(plugin))
    }

    pub fn call(
        &self,
        list: &NetList,
        i: usize,
        version: &str,
        command: &str,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Reply, StepError> {
        let plugin = list.plugin_type(i).to_string();
        let conf = list.plugin_config(i, version, prev, &self.runtime_config);
        let mut call = Call::new(
            command,
            &att.container_id,
            att.netns.as_deref(),
            &att.ifname,
            &self.bin_dirs,
        );
        call.args = att.args.clone();
        self.exec(plugin, &call, &conf)
    }

    /// Runs `plugin` with `conf` on stdin; a failed start or a non-zero exit is a [`StepError`].
    fn exec(&self, plugin: String, call: &Call, conf: &Value) -> Result<Reply, StepError> {
        let bin = self.find(&plugin);
        match exec::run(&bin, call, conf.to_string().as_bytes(), self.node) {
            Ok(reply) if reply.ok() => Ok(reply),
            Ok(reply) => Err(StepError { plugin, reply }),
            Err(e) => Err(StepError {
                plugin,
                reply: io_reply(e),
            }),
        }
    }

    /// ADD through the list; returns the final result.
    pub fn add(&self, list: &NetList, version: &str, att: &Attachment) -> Result<Value, StepError> {
        let mut prev: Option<Value> = None;
        for i in 0..list.plugins.len() {
            let r = self.call(list, i, version, "ADD", att, prev.as_ref())?;
            prev = r.json().or(prev);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    pub fn check(
        &self,
        list: &NetList,
        version: &str,
        att: &Attachment,
        result: &Value,
    ) -> Result<(), StepError> {
        for i in 0..list.plugins.len() {
            self.call(list, i, version, "CHECK", att, Some(result))?;
        }
        Ok(())
    }

    /// DEL in reverse order; every plugin is called even if one fails, the first failure returned.
    pub fn del(
        &self,
        list: &NetList,
        version: &str,
        att: &Attachment,
        result: Option<&Value>,
    ) -> Result<(), StepError> {
        let mut first = None;
        for i in (0..list.plugins.len()).rev() {
            if let Err(e) = self.call(list, i, version, "DEL", att, result) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// GC with the attachments that are still valid.
    pub fn gc(
        &self,
        list: &NetList,
        version: &str,
        valid: &[(&str, &str)],
    ) -> Result<(), StepError> {
        let valid: Vec<Value> = valid
            .iter()
            .map(|(id, ifname)| json!({"containerID": id, "ifname": ifname}))
            .collect();
        for i in 0..list.plugins.len() {
            let plugin = list.plugin_type(i).to_string();
            let mut conf = list.plugin_config(i, version, None, &self.runtime_config);
            conf["cni.dev/valid-attachments"] = Value::Array(valid.clone());
            let call = Call {
                command: "GC".into(),
                path: self.bin_dirs.clone(),
                ..Default::default()
            };
            self.exec(plugin, &call, &conf)?;
        }
        Ok(())
    }
}

fn io_reply(e: std::io::Error) -> Reply {
    Reply {
        exit_code: -1,
        stdout: String::new(),
        stderr: e.to_string(),
        elapsed: Default::default(),
    }
}
