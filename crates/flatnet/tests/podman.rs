//! A real container runtime calls flatnet: podman (CNI backend) runs two busybox containers on a
//! flatnet network inside a throw-away node namespace; the second reaches the first by the IP
//! flatnet gave it. Every file podman and libcni write lives under a temporary root: podman's
//! storage and run dirs are flags, and /var/lib/cni (libcni's result cache) and /run/netns are
//! bind-mounted over from that root in a private mount namespace.

use netns::TempNetNs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

const NETWORK: &str = "flatnet-podman";

fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The hard limit the container's RLIMIT_NPROC may not exceed: podman asks for more than this VM
/// grants, so the config names a value within it.
fn nproc_limit() -> u64 {
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC)
        .map(|(_, hard)| hard)
        .unwrap_or(4096);
    limit.min(4096)
}

#[test]
fn podman_containers_get_flatnet_addresses_and_reach_each_other() {
    if !netns::can_create() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    let missing: Vec<&str> = [
        "podman", "runc", "busybox", "unshare", "nsenter", "bash", "timeout",
    ]
    .into_iter()
    .filter(|p| !have(p))
    .collect();
    if !missing.is_empty() {
        eprintln!("skipped: {missing:?} not installed (bash .ci/run --setup-only installs them)");
        return;
    }
    let node = TempNetNs::new("fnt-podman").unwrap();
    let root = tempfile::tempdir().unwrap();
    let t = root.path();
    for d in [
        "bin",
        "net.d",
        "rootfs/bin",
        "storage",
        "run",
        "tmp",
        "data",
        "cni-cache",
        "netns",
    ] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_flatnet"), t.join("bin/flatnet")).unwrap();
    let busybox = Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()
        .unwrap();
    let busybox = String::from_utf8(busybox.stdout).unwrap();
    std::fs::copy(busybox.trim(), t.join("rootfs/bin/busybox")).unwrap();
    write(&t.join("rootfs/www/index.html"), "hello from a\n");
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0", "name": NETWORK,
        "plugins": [{"type": "flatnet", "bridge": "fnpodman0", "isGateway": true,
                     "ipam": {"type": "flatnet", "dataDir": t.join("data"),
                              "ranges": [[{"subnet": "10.88.44.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]
    });
    write(
        &t.join(format!("net.d/{NETWORK}.conflist")),
        &conflist.to_string(),
    );
    let conf = format!(
        r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc={nproc}:{nproc}"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{t}/events.log"
runtime = "runc"
tmp_dir = "{t}/tmp"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{t}/bin"]
network_config_dir = "{t}/net.d"
"#,
        nproc = nproc_limit(),
        t = t.display()
    );
    write(&t.join("containers.conf"), &conf);
    let script = format!(
        r#"set -eu
mkdir -p /var/lib/cni
mount --bind {t}/cni-cache /var/lib/cni
mount --bind {t}/netns /run/netns
P="podman --root {t}/storage --runroot {t}/run --storage-driver vfs"
trap '$P rm -a -f -t 0 >/dev/null 2>&1 || true' EXIT
$P run -d --name a --network {NETWORK} --rootfs {t}/rootfs /bin/busybox httpd -f -p 8080 -h /www >/dev/null
ip=$($P inspect -f '{{{{range .NetworkSettings.Networks}}}}{{{{.IPAddress}}}}{{{{end}}}}' a)
echo "A_IP=$ip"
echo "LEASES=$(ls {t}/data/{NETWORK} | tr '\n' ' ')"
# httpd needs a moment to listen; the node reaches the pod through the bridge. (Not busybox wget:
# the static build crashes resolving through the host's NSS, and its -T option crashes too.)
for i in $(seq 1 50); do timeout 1 bash -c "</dev/tcp/$ip/8080" 2>/dev/null && break; sleep 0.1; done
echo "FETCHED=$(timeout 60 $P run --rm --network {NETWORK} --rootfs {t}/rootfs /bin/busybox wget -q -O - http://$ip:8080/index.html)"
$P rm -f -t 0 a >/dev/null
echo "AFTER=$(ls {t}/data/{NETWORK} | tr '\n' ' ')"
"#,
        t = t.display()
    );
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .env("CONTAINERS_CONF", t.join("containers.conf"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "podman run failed:\n{stdout}\n{stderr}"
    );
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let ip: Ipv4Addr = field("A_IP")
        .parse()
        .unwrap_or_else(|_| panic!("no container IP in:\n{stdout}\n{stderr}"));
    assert!(
        "10.88.44.0/24"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(&ip),
        "{ip} is not from the flatnet range"
    );
    let leases = field("LEASES");
    assert!(
        leases.split_whitespace().any(|f| f == ip.to_string()),
        "flatnet holds no lease for {ip}: {leases}"
    );
    assert_eq!(field("FETCHED"), "hello from a", "{stdout}\n{stderr}");
    let after = field("AFTER");
    assert!(
        !after
            .split_whitespace()
            .any(|f| f.parse::<Ipv4Addr>().is_ok()),
        "leases left after the containers were removed: {after}"
    );
}
