//! The lab's applier: namespaces, the links between them, and the processes that run inside.
//! Everything it makes is named `flatnet.<lab>.…`, so a lab can be found and removed from the
//! namespace list alone, even after a crash left no state behind.

use netlink::{Netlink, Request, RouteSpec, VethEnd};
use netns::NetNs;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::ffi::CStr;
use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The prefix of every namespace of lab `lab` (lab names cannot contain dots, so no lab's prefix
/// is another's).
pub fn prefix(lab: &str) -> String {
    format!("flatnet.{lab}.")
}

/// A namespace name of lab `lab`; long pod names are shortened with a hash.
pub fn ns_name(lab: &str, role: &str) -> String {
    let full = format!("{}{role}", prefix(lab));
    if full.len() <= 200 {
        return full;
    }
    let h = Sha256::digest(role.as_bytes());
    let tag: String = h[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}{}-{tag}", prefix(lab), &role[..150])
}

/// A stable, locally administered unicast MAC for a lab interface.
pub fn mac(seed: &str) -> [u8; 6] {
    let h = Sha256::digest(format!("flatnet-lab:{seed}").as_bytes());
    [(h[0] & 0xfe) | 0x02, h[1], h[2], h[3], h[4], h[5]]
}

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

pub fn create_ns(name: &str) -> Result<NetNs, String> {
    let path =
        netns::create_named(name).map_err(|e| err(format!("creating namespace {name}"), e))?;
    let ns = NetNs::open(&path).map_err(|e| err(format!("opening namespace {name}"), e))?;
    let nl = Netlink::connect_in(&ns).map_err(|e| err("netlink", e))?;
    nl.run(Request::set_up(1, "lo"))
        .map_err(|e| e.to_string())?;
    Ok(ns)
}

pub fn open_ns(name: &str) -> Result<NetNs, String> {
    NetNs::open(netns::named_path(name)).map_err(|e| err(format!("opening namespace {name}"), e))
}

pub fn nl(ns: &NetNs) -> Result<Netlink, String> {
    Netlink::connect_in(ns).map_err(|e| err(format!("netlink in {}", ns.path().display()), e))
}

/// A bridge `name` in `ns`, up; returns its index.
pub fn bridge(ns: &NetNs, name: &str, mtu: Option<u32>) -> Result<u32, String> {
    let nl = nl(ns)?;
    let (br, _) = nl.ensure_bridge(name, mtu).map_err(|e| e.to_string())?;
    use netlink::LinkInfo;
    if !br.is_up() {
        nl.run(Request::set_up(br.index(), name))
            .map_err(|e| e.to_string())?;
    }
    Ok(br.index())
}

/// Writes a sysctl inside `ns`.
pub fn sysctl(ns: &NetNs, key: &str, value: &str) -> Result<(), String> {
    let path = format!("/proc/sys/{key}");
    ns.run(|| std::fs::write(&path, value))
        .map_err(|e| err("entering namespace", e))?
        .map_err(|e| err(&path, e))
}

/// A veth from `a` (named `a_name`, enslaved to `a_master`, up) to `b` (named `b_name`, left
/// down for the caller to address); returns the index of `b_name` in `b`.
pub fn wire(
    a: &NetNs,
    a_name: &str,
    a_master: Option<u32>,
    b: &NetNs,
    b_name: &str,
    mtu: u32,
) -> Result<u32, String> {
    let nla = nl(a)?;
    let host = VethEnd {
        name: a_name.into(),
        mac: mac(&format!("{}/{a_name}", a.path().display())),
        mtu: Some(mtu),
        netns_fd: None,
        master: a_master,
        up: true,
    };
    let peer = VethEnd {
        name: b_name.into(),
        mac: mac(&format!("{}/{b_name}", b.path().display())),
        mtu: Some(mtu),
        netns_fd: Some(b.fd()),
        master: None,
        up: false,
    };
    let link = nla.create_veth(&host, &peer).map_err(|e| e.to_string())?;
    use netlink::LinkInfo;
    match link.peer_index() {
        Some(i) => Ok(i),
        None => nl(b)?
            .link_by_name(b_name)
            .map_err(|e| e.to_string())?
            .map(|l| l.index())
            .ok_or_else(|| format!("{b_name} did not appear")),
    }
}

/// Addresses link `idx` of `ns` with `addr`, brings it up and adds `default_via` if given.
pub fn address(
    ns: &NetNs,
    idx: u32,
    name: &str,
    addr: ipnet::Ipv4Net,
    default_via: Option<Ipv4Addr>,
) -> Result<(), String> {
    let nl = nl(ns)?;
    let mut batch = vec![
        Request::add_address(idx, ipnet::IpNet::V4(addr), false),
        Request::set_up(idx, name),
    ];
    if let Some(gw) = default_via {
        batch.push(Request::add_route(&RouteSpec::new(
            "0.0.0.0/0".parse().expect("valid"),
            Some(gw.into()),
            idx,
        )));
    }
    nl.apply(batch).map_err(|e| e.to_string())?;
    Ok(())
}

/// A process the lab started: its pid and kernel start time (so a recycled pid is never killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: i32,
    pub start: u64,
}

/// A process's state letter and kernel start time (fields 3 and 22 of /proc/PID/stat, counted
/// after the command name's closing parenthesis).
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(18)?.parse().ok()?))
}

/// How many threads process `pid` still has (its entries under /proc/PID/task).
fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

impl Proc {
    /// Still this process (not a recycled pid) and not fully exited. A multi-threaded process's
    /// leader shows as a zombie while its other threads, which share its sockets, are still
    /// exiting: it counts as alive until it is the last thread left.
    pub fn alive(&self) -> bool {
        stat(self.pid).is_some_and(|(state, start)| {
            start == self.start && (state != 'Z' || threads(self.pid) > 1)
        })
    }

    /// Kills the process group (a workload's children too), if it is still this process.
    pub fn kill(&self) {
        if start_time(self.pid) == Some(self.start) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Makes `cmd` start inside namespace `ns` with its own UTS namespace named `hostname` (a pod's
/// hostname is its name, a node's its name), optionally in a new session. With `resolv_conf`,
/// also in a private mount namespace where that file is `/etc/resolv.conf` (as the kubelet
/// gives each pod its own, and as `ip netns exec` does with `/etc/netns/<name>/`); the host's
/// file is never touched.
pub fn enter(
    cmd: &mut Command,
    ns: &NetNs,
    hostname: &str,
    new_session: bool,
    resolv_conf: Option<&Path>,
) {
    use nix::mount::{mount, MsFlags};
    let fd = ns.fd();
    let host = hostname.to_string();
    let resolv =
        resolv_conf.and_then(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok());
    // SAFETY: only async-signal-safe syscalls between fork and exec (paths prepared before).
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(
                BorrowedFd::borrow_raw(fd),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )?;
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)?;
            nix::unistd::sethostname(&host)?;
            if let Some(r) = &resolv {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
                // Private first, so the bind below never propagates to the host.
                mount(
                    None::<&CStr>,
                    c"/",
                    None::<&CStr>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&CStr>,
                )?;
                mount(
                    Some(r.as_c_str()),
                    c"/etc/resolv.conf",
                    None::<&CStr>,
                    MsFlags::MS_BIND,
                    None::<&CStr>,
                )?;
            }
            if new_session {
                nix::unistd::setsid()?;
            }
            Ok(())
        });
    }
}

/// Starts `argv` inside namespace `ns` with its own UTS namespace and hostname, in a new
/// session, output appended to `log`. The lab does not wait for it.
pub fn spawn(
    ns: &NetNs,
    hostname: &str,
    argv: &[String],
    env: &[(String, String)],
    log: &Path,
    resolv_conf: Option<&Path>,
) -> Result<Proc, String> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| err(log.display(), e))?;
    let out2 = out.try_clone().map_err(|e| err(log.display(), e))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(out2);
    enter(&mut cmd, ns, hostname, true, resolv_conf);
    let child = cmd
        .spawn()
        .map_err(|e| err(format!("starting {}", argv[0]), e))?;
    let pid = child.id() as i32;
    let start = start_time(pid).unwrap_or(0);
    Ok(Proc { pid, start })
}

/// The namespaces of lab `lab` that exist now.
pub fn lab_namespaces(lab: &str) -> Vec<String> {
    let p = prefix(lab);
    let mut v: Vec<String> = std::fs::read_dir(netns::NETNS_RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&p))
        .collect();
    v.sort();
    v
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Kills every process living in one of `namespaces` (found through /proc, so also those a
/// crashed run never recorded).
pub fn kill_inside(namespaces: &[String]) {
    let inodes: std::collections::BTreeSet<u64> = namespaces
        .iter()
        .filter_map(|n| inode(&netns::named_path(n)))
        .collect();
    if inodes.is_empty() {
        return;
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if inode(&PathBuf::from(format!("/proc/{pid}/ns/net"))).is_some_and(|i| inodes.contains(&i))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Removes every namespace of lab `lab` and every process inside them.
pub fn teardown(lab: &str) {
    let all = lab_namespaces(lab);
    kill_inside(&all);
    // Pods first: their veths' peers in the node namespaces go with them.
    let (pods, rest): (Vec<&String>, Vec<&String>) = all.iter().partition(|n| n.contains(".pod."));
    for n in pods.into_iter().chain(rest) {
        let _ = netns::delete_named(n);
    }
}
