//! What the benches in throw-away namespaces share: the process's memory, idle CPUs before a
//! figure is taken (the kernel tears a removed namespace's tables down in the background), and
//! percentiles.

use std::time::{Duration, Instant};

/// This process's resident memory in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Waits (up to 30 s) until the CPUs are at least 90% idle over 200 ms.
pub fn settle() {
    let busy_idle = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = (stat.lines().next()?.split_whitespace().skip(1))
            .filter_map(|f| f.parse().ok())
            .collect();
        let idle = fields.get(3)? + fields.get(4)?;
        Some((fields.iter().sum::<u64>() - idle, idle))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some((busy, idle)) = busy_idle() {
        std::thread::sleep(Duration::from_millis(200));
        let Some((busy2, idle2)) = busy_idle() else {
            return;
        };
        let (b, i) = (busy2 - busy, idle2 - idle);
        if b * 10 <= b + i || Instant::now() > deadline {
            return;
        }
    }
}

/// Keeps the calling thread on CPU `cpu` (when the machine has it): a latency figure taken on
/// one CPU is not spread by the scheduler moving the thread between rounds.
pub fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// p50 and p99 of a non-empty sample.
pub fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A process a bench started, ended when dropped (a bench ends only what it started): SIGTERM
/// first, so a server with worker processes (nginx) takes them down with it; SIGKILL after 2 s.
pub struct Pinned(pub std::process::Child);

impl Drop for Pinned {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Pinned {
    /// The process's resident memory now, KiB (0 once it is gone).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse().ok()
            })
            .unwrap_or(0)
    }
}

/// Starts `argv` on CPU `cpu` (through `taskset`), its output going to `log`.
pub fn spawn_pinned(cpu: usize, argv: &[String], log: &std::path::Path) -> Result<Pinned, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = std::process::Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .args(argv)
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", argv[0]))?;
    Ok(Pinned(child))
}

/// Fails naming the Debian package when `cmd` is not on the PATH.
pub fn need(cmd: &str, package: &str) -> Result<(), String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(format!("{cmd} not found: apt-get install {package}"))
    }
}
