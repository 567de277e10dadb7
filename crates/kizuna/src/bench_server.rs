//! What the HTTP benchmarks share: a `kizuna serve` child process on a loopback port with the
//! development issuer, percentiles, the server's memory and the machine's facts.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// A `kizuna serve` child process on a free loopback port, killed when dropped.
pub struct BenchServer {
    /// The child process.
    pub child: Child,
    /// `http://127.0.0.1:{port}/fhir`.
    pub base: String,
    /// An operator token.
    pub token: String,
    /// The development issuer the server trusts, for tokens of other roles.
    pub dev: kizuna_auth::dev::DevIssuer,
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a benchmarked server's log goes: the file `KIZUNA_BENCH_SERVER_LOG` names, or nowhere.
fn server_log() -> Stdio {
    match std::env::var_os("KIZUNA_BENCH_SERVER_LOG") {
        Some(p) => std::fs::File::create(p)
            .map(Stdio::from)
            .unwrap_or(Stdio::null()),
        None => Stdio::null(),
    }
}

/// Polls a health URL until it answers.
fn wait_until_up(url: &str, seconds: u64) -> anyhow::Result<()> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(2))
        .build();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while agent.get(url).call().is_err() {
        if Instant::now() > deadline {
            bail!("サーバーが起動しません / the server did not start ({url})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl BenchServer {
    /// Starts `kizuna serve --dev-issuer` on SQLite or PostgreSQL (`db`) with the validation mode
    /// given, and waits until it answers.
    pub fn start(data: &Path, db: &str, validation: &str) -> anyhow::Result<BenchServer> {
        let port = free_port()?;
        let base = format!("http://127.0.0.1:{port}/fhir");
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .args(["serve", "--dev-issuer", "--addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data)
            .args(["--database", db, "--validation", validation])
            .stdout(Stdio::null())
            .stderr(server_log())
            .spawn()
            .context("kizuna serve を起動できません / cannot start kizuna serve")?;
        wait_until_up(&format!("http://127.0.0.1:{port}/healthz"), 60)?;
        let dev = kizuna_auth::dev::DevIssuer::load_or_create(&data.join("dev-issuer.key"), &base)?;
        let mut r = kizuna_auth::dev::TokenRequest::for_role(kizuna_auth::Role::Operator);
        r.subject = "bench".into();
        r.scope = "system/*.cruds".into();
        r.lifetime = 24 * 3600;
        let token = dev.issue(&r, chrono::Utc::now().timestamp())?;
        Ok(BenchServer {
            child,
            base,
            token,
            dev,
        })
    }

    /// Starts a Helios FHIR Server (`hfs`, a peer measured side by side) on SQLite in `data`, with
    /// its search-parameter and compartment bundles read from `hfs_data`, and waits until it
    /// answers. It has no authorisation configured; the token sent is ignored.
    pub fn start_hfs(data: &Path, bin: &Path, hfs_data: &Path) -> anyhow::Result<BenchServer> {
        let port = free_port()?;
        let root = format!("http://127.0.0.1:{port}");
        let export_dir = data.join("hfs-export");
        std::fs::create_dir_all(&export_dir)?;
        let child = Command::new(bin)
            .arg("--port")
            .arg(port.to_string())
            .arg("--database-url")
            .arg(data.join("hfs.db"))
            .arg("--data-dir")
            .arg(hfs_data)
            .args(["--log-level", "error"])
            .env("HFS_BASE_URL", &root)
            .env("HFS_BULK_EXPORT_OUTPUT_DIR", &export_dir)
            .current_dir(data)
            .stdout(Stdio::null())
            .stderr(server_log())
            .spawn()
            .with_context(|| format!("{} を起動できません / cannot start hfs", bin.display()))?;
        wait_until_up(&format!("{root}/health"), 120)?;
        let dev = kizuna_auth::dev::DevIssuer::load_or_create(&data.join("dev-issuer.key"), &root)?;
        Ok(BenchServer {
            child,
            base: root,
            token: "unused".into(),
            dev,
        })
    }

    /// A token of another role for this server.
    pub fn token_for(&self, r: &kizuna_auth::dev::TokenRequest) -> anyhow::Result<String> {
        Ok(self.dev.issue(r, chrono::Utc::now().timestamp())?)
    }
}

/// The database a benchmark runs on (`--database`, or SQLite in its temporary directory) and the
/// backend's name for the report.
pub fn bench_database(arg: &Option<String>, tmp: &Path) -> (String, &'static str) {
    let db = arg
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", tmp.join("kizuna.db").display()));
    let backend = if db.starts_with("postgres") {
        "postgresql"
    } else {
        "sqlite"
    };
    (db, backend)
}

/// Loads eligibility bundles through `Coverage/$import-eligibility` with the operator token.
pub fn import_eligibility(
    agent: &ureq::Agent,
    srv: &BenchServer,
    bundles: &[String],
) -> anyhow::Result<()> {
    let url = format!("{}/Coverage/$import-eligibility", srv.base);
    for body in bundles {
        call(agent, "POST", &url, &srv.token, Some(body))?;
    }
    Ok(())
}

/// `VmRSS` and `VmHWM` of a process, in MiB (Linux).
pub fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<f64>().ok())
            .map(|k| k / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Bytes a process has written so far (`wchar` in `/proc/PID/io`: to files and sockets, cached or
/// not), for how much a server writes per stored resource; `None` where there is no `/proc`.
pub fn bytes_written(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// CPU time a process has used so far (user and system, `/proc/PID/stat`), in seconds. Its
/// difference over a run, per resource, tells the server's work from its waiting when two builds
/// are compared (it still moves with the host's load); `None` where there is no `/proc`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // In USER_HZ, which Linux fixes at 100 on the architectures it reports to user space.
    Some(cpu_ticks(&s)? as f64 / 100.0)
}

/// utime + stime of a `/proc/PID/stat` line.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses; the fields after its last `)` are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The whole machine's CPU time so far by kind (`/proc/stat`, all cores), in USER_HZ ticks.
/// Over a run it says how much the server and client left idle and how much the host took back
/// (steal): on a shared host the same build varied by a fifth from run to run with steal at
/// 3–7 %, and figures from two runs compare only together with these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineTicks {
    /// user, nice, system, irq, softirq.
    busy: u64,
    /// idle and iowait.
    idle: u64,
    /// Time the hypervisor ran something else while this machine wanted a core.
    steal: u64,
}

impl MachineTicks {
    /// Now, or `None` where there is no `/proc/stat`.
    pub fn now() -> Option<MachineTicks> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The summary `cpu` line of a `/proc/stat` text.
    fn parse(stat: &str) -> Option<MachineTicks> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        Some(MachineTicks {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            idle: at(3) + at(4),
            steal: at(7),
        })
    }

    /// Shares of busy, idle and stolen time between two readings, as JSON (null when either is
    /// missing or no time passed).
    pub fn shares(before: Option<MachineTicks>, after: Option<MachineTicks>) -> Value {
        let (Some(b), Some(a)) = (before, after) else {
            return Value::Null;
        };
        let busy = a.busy.saturating_sub(b.busy) as f64;
        let idle = a.idle.saturating_sub(b.idle) as f64;
        let steal = a.steal.saturating_sub(b.steal) as f64;
        let all = busy + idle + steal;
        if all == 0.0 {
            return Value::Null;
        }
        json!({"busy": busy / all, "idle": idle / all, "steal": steal / all})
    }
}

/// The server's CPU time per resource over a run, in microseconds.
pub fn cpu_us_per(before: Option<f64>, after: Option<f64>, resources: u64) -> Option<f64> {
    let (b, a) = (before?, after?);
    (resources > 0).then(|| (a - b).max(0.0) * 1e6 / resources as f64)
}

/// p50, p99 and max of a set of durations, in milliseconds.
pub fn percentiles(mut d: Vec<Duration>) -> Value {
    d.sort_unstable();
    let at = |p: f64| {
        d.get(((d.len() as f64 - 1.0) * p).round() as usize)
            .map(|x| x.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    json!({"n": d.len(), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

/// GET with the operator token; the answer as JSON.
pub fn get_json(agent: &ureq::Agent, srv: &BenchServer, url: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&get_bytes(agent, srv, url)?)?)
}

/// GET with the operator token; the answer's bytes, read to the end. Timing this and not
/// [`get_json`] measures the server, not the client's JSON parser (a 50-resource page is 160 KB).
pub fn get_bytes(agent: &ureq::Agent, srv: &BenchServer, url: &str) -> anyhow::Result<Vec<u8>> {
    call_bytes(agent, "GET", url, &srv.token, None)
}

/// A call with a bearer token; the JSON answer (`Null` when there is none), or the failure.
pub fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: &str,
    body: Option<&str>,
) -> anyhow::Result<Value> {
    let bytes = call_bytes(agent, method, url, token, body)?;
    Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// [`call`]'s answer as bytes read to the end: what a benchmark times, so the figure is the
/// server's latency and not the client's JSON parser.
pub fn call_bytes(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: &str,
    body: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    let r = agent
        .request(method, url)
        .set("authorization", &format!("Bearer {token}"));
    let res = match body {
        Some(b) => r
            .set("content-type", "application/fhir+json")
            .send_string(b),
        None => r.call(),
    };
    let resp = res.map_err(|e| anyhow::anyhow!("{method} {url}: {}", status_of(&e)))?;
    let mut bytes = Vec::new();
    resp.into_reader().read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A short text for a failed call.
pub fn status_of(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(c, _) => format!("HTTP {c}"),
        ureq::Error::Transport(t) => t.to_string(),
    }
}

/// Facts about the machine the figures come from.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|k| (k / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
        "memory_gib": mem_gib,
        "os": std::env::consts::OS,
        "kizuna": env!("CARGO_PKG_VERSION"),
    })
}

/// Runs a benchmark in a temporary directory of its own (removed afterwards, pass or fail), writes
/// its JSON report to `out` and prints it.
pub fn run_in_temp(
    name: &str,
    out: &Path,
    bench: impl FnOnce(&Path) -> anyhow::Result<Value>,
) -> anyhow::Result<std::process::ExitCode> {
    let tmp = std::env::temp_dir().join(format!("kizuna-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = bench(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let report = result?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_shares_come_from_the_summary_line_and_add_up_to_one() {
        let before = "cpu  100 5 20 300 10 1 2 7 0 0\ncpu0 50 2 10 150 5 0 1 3 0 0\n";
        let after = "cpu  160 5 30 330 20 2 3 17 0 0\ncpu0 80 2 15 165 10 1 1 8 0 0\n";
        let (b, a) = (MachineTicks::parse(before), MachineTicks::parse(after));
        // busy 60+0+10+1+1 = 72, idle 30+10 = 40, steal 10: of 122.
        let s = MachineTicks::shares(b, a);
        let share = |k: &str| s[k].as_f64().unwrap_or(-1.0);
        assert!((share("busy") - 72.0 / 122.0).abs() < 1e-12);
        assert!((share("idle") - 40.0 / 122.0).abs() < 1e-12);
        assert!((share("steal") - 10.0 / 122.0).abs() < 1e-12);
        assert!((share("busy") + share("idle") + share("steal") - 1.0).abs() < 1e-12);
        // No time passed, a reading missing, or no summary line: no shares.
        assert!(MachineTicks::shares(a, a).is_null());
        assert!(MachineTicks::shares(None, a).is_null());
        assert_eq!(MachineTicks::parse("cpu0 1 2 3 4\n"), None);
        assert_eq!(MachineTicks::parse("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn cpu_ticks_are_read_after_a_name_with_spaces_and_parentheses() {
        let line =
            "4242 (kizuna (w) 1) S 1 4242 4242 0 -1 4194304 900 0 0 0 731 129 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_ticks(line), Some(731 + 129));
        assert_eq!(cpu_ticks("4242 (short) S 1 2"), None);
        assert_eq!(cpu_ticks("no name at all"), None);
    }

    #[test]
    fn this_process_accumulates_cpu_time_while_it_works() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).expect("/proc/self/stat");
        // Work until the clock ticks (10 ms each) show it, however busy the machine is.
        let t = Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after <= before && t.elapsed() < Duration::from_secs(30) {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            after = cpu_seconds(pid).expect("/proc/self/stat");
        }
        assert!(after > before, "{before} -> {after}");
        assert_eq!(cpu_us_per(Some(1.0), Some(1.5), 1000), Some(500.0));
        assert_eq!(cpu_us_per(Some(1.0), Some(1.5), 0), None);
        assert_eq!(cpu_us_per(None, Some(1.5), 10), None);
    }
}
