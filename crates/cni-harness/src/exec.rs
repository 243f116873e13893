//! Runs a plugin binary as a runtime does: `CNI_*` in the environment, config on stdin, inside
//! the node's network namespace (entered in the child before exec, so the caller stays put).

use nix::sched::{setns, CloneFlags};
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One call's inputs.
#[derive(Debug, Clone, Default)]
pub struct Call {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Vec<PathBuf>,
}

impl Call {
    pub fn new(
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        path: &[PathBuf],
    ) -> Call {
        Call {
            command: command.into(),
            container_id: Some(container_id.into()),
            netns: netns.map(Path::to_path_buf),
            ifname: Some(ifname.into()),
            args: None,
            path: path.to_vec(),
        }
    }
}

/// What the plugin did.
#[derive(Debug, Clone)]
pub struct Reply {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.exit_code == 0
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.stdout).ok()
    }

    /// The spec error code, if the plugin printed an error object.
    pub fn error_code(&self) -> Option<u64> {
        self.json()?.get("code")?.as_u64()
    }
}

/// Runs `bin` with `stdin`, inside the namespace `node` if given.
pub fn run(
    bin: &Path,
    call: &Call,
    stdin: &[u8],
    node: Option<&netns::NetNs>,
) -> std::io::Result<Reply> {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", &call.command);
    let opt = [
        ("CNI_CONTAINERID", call.container_id.clone()),
        (
            "CNI_NETNS",
            call.netns.as_ref().map(|p| p.display().to_string()),
        ),
        ("CNI_IFNAME", call.ifname.clone()),
        ("CNI_ARGS", call.args.clone()),
    ];
    for (k, v) in opt {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let path: Vec<String> = call.path.iter().map(|p| p.display().to_string()).collect();
    cmd.env("CNI_PATH", path.join(":"));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = node {
        let fd = ns.fd();
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent for the call.
        unsafe {
            cmd.pre_exec(move || {
                setns(BorrowedFd::borrow_raw(fd), CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    {
        let mut sin = child.stdin.take().expect("piped");
        let _ = sin.write_all(stdin);
    }
    let out = child.wait_with_output()?;
    let elapsed = start.elapsed();
    Ok(Reply {
        exit_code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed,
    })
}
