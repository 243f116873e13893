//! `flatnet dns`: the command line.

use crate::forward::resolv_conf_servers;
use crate::server::{run, Options};
use crate::zone::{PodMode, ZoneConfig};
use clap::{Args, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum DnsTool {
    /// dnsperf against flatnet, unbound and knot with the same records, pinned to separate
    /// CPUs; then flatnet's memory with 10k Services and 100k endpoints. Needs dnsperf,
    /// unbound, knot and dnsutils.
    Bench {
        /// Services in the zone (half ClusterIP, half headless with 4 endpoints).
        #[arg(long, default_value_t = 1000)]
        services: usize,
        /// Seconds per dnsperf run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[arg(long, default_value_t = 0)]
        server_cpu: usize,
        #[arg(long, default_value_t = 1)]
        client_cpu: usize,
    },
}

pub fn tool(t: DnsTool) -> ExitCode {
    let DnsTool::Bench {
        services,
        seconds,
        server_cpu,
        client_cpu,
    } = t;
    let o = crate::bench::BenchOptions {
        services: services.max(1),
        seconds,
        server_cpu,
        client_cpu,
    };
    match crate::bench::run(&o) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
pub struct DnsArgs {
    /// Address for UDP and TCP.
    #[arg(long, default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    pub domain: String,
    /// Where Services, EndpointSlices and Pods come from: `--source kube` (the Kubernetes API)
    /// or `--source file --dir DIR`. With the file source and no `--dir`, the zone holds only
    /// its apex records and `--record`s.
    #[command(flatten)]
    pub source: state::SourceArgs,
    /// Upstream server for names outside the zone (IP or IP:PORT; repeat for more, tried in
    /// order). Default: the nameservers of --resolv-conf.
    #[arg(long = "upstream")]
    pub upstreams: Vec<String>,
    /// Where the default upstreams come from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Answer only from the zone: names outside it get REFUSED.
    #[arg(long, conflicts_with = "upstreams")]
    pub no_forward: bool,
    /// Which `a-b-c-d.<ns>.pod.<domain>` names are answered.
    #[arg(long, value_enum, default_value = "verified")]
    pub pods: PodMode,
    /// TTL of the zone's records and negative answers, seconds.
    #[arg(long, default_value_t = 30)]
    pub ttl: u32,
    /// A fixed A/AAAA record, NAME=IP (repeatable).
    #[arg(long = "record", value_parser = parse_record)]
    pub records: Vec<(String, IpAddr)>,
    /// A hosts file (`IP NAME [ALIAS…]` lines) whose names are answered too, re-read whenever
    /// it changes, as CoreDNS's `hosts` plugin does. Only without a source.
    #[arg(long)]
    pub hosts: Option<PathBuf>,
    /// HTTP address for /health, /ready and /metrics (empty: none).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http: String,
    /// Per-attempt upstream timeout, milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Forwarded answers kept at most.
    #[arg(long, default_value_t = 10_000)]
    pub cache_size: usize,
    /// Worker threads (and UDP sockets); default: the CPUs this process may run on.
    #[arg(long)]
    pub workers: Option<usize>,
    /// After each zone load, write the loaded state's fingerprint to DIR/<hostname>.
    #[arg(long)]
    pub status_dir: Option<PathBuf>,
}

fn parse_record(s: &str) -> Result<(String, IpAddr), String> {
    let (name, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("--record {s:?}: expected NAME=IP"))?;
    let ip = ip
        .parse()
        .map_err(|_| format!("--record {s:?}: {ip:?} is not an IP address"))?;
    Ok((name.to_string(), ip))
}

fn upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("--upstream {s:?}: expected IP or IP:PORT"))
}

/// A domain name as given on the command line, checked.
fn domain(flag: &str, name: &str) -> Result<(), String> {
    let trimmed = name.trim_end_matches('.');
    if trimmed.is_empty() || trimmed.split('.').any(|l| l.is_empty() || l.len() > 63) {
        return Err(format!(
            "{flag} {name:?}: not a domain name (dot-separated labels of 1 to 63 characters)"
        ));
    }
    hickory_proto::rr::Name::from_ascii(name)
        .map(drop)
        .map_err(|e| format!("{flag} {name:?}: {e}"))
}

fn options(a: DnsArgs) -> Result<Options, String> {
    domain("--domain", &a.domain)?;
    for (name, _) in &a.records {
        domain("--record", name)?;
    }
    let has_source = a.source.source == state::SourceKind::Kube || a.source.dir.is_some();
    if a.hosts.is_some() && has_source {
        return Err(
            "--hosts: only for a server without a source (no --dir, no --source kube)".into(),
        );
    }
    let upstreams = if a.no_forward {
        Vec::new()
    } else if a.upstreams.is_empty() {
        let text = std::fs::read_to_string(&a.resolv_conf)
            .map_err(|e| format!("--resolv-conf {}: {e}", a.resolv_conf.display()))?;
        resolv_conf_servers(&text)
    } else {
        a.upstreams
            .iter()
            .map(|s| upstream(s))
            .collect::<Result<_, _>>()?
    };
    let http = match a.http.as_str() {
        "" => None,
        h => Some(
            h.parse()
                .map_err(|_| format!("--http {h:?}: expected IP:PORT"))?,
        ),
    };
    Ok(Options {
        listen: a.listen,
        http,
        source: has_source.then_some(a.source),
        zone: ZoneConfig {
            domain: a.domain,
            ttl: a.ttl,
            pods: a.pods,
            records: a.records,
        },
        upstreams,
        timeout: Duration::from_millis(a.timeout_ms),
        cache_size: a.cache_size.max(1),
        workers: a
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        status_dir: a.status_dir,
        hosts: a.hosts,
    })
}

pub fn main(a: DnsArgs) -> ExitCode {
    match options(a).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
