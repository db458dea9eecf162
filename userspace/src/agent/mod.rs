//! `pyprobe agent`: the always-on, system-wide daemon. One engine runs a
//! continuous CPU profile of every Python process (containers and later
//! processes included) at a low rate; HTTP exports metrics, pprof profiles
//! and the process list; a root-only Unix socket takes control requests
//! (`pyprobe ctl`).
//!
//! The loop in [`run`] owns the jobs (their process readers are not
//! `Send`); the HTTP handlers and the control socket reach it over
//! channels.

pub mod control;
pub mod http;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::{
    live,
    profile::{self, stacks::StackKey},
    sink::prometheus::{Kind, Metrics},
};
use control::{Call, Request, Response};
use http::Ask;

/// The continuous profile's rate unless configured: low enough to leave
/// on everywhere, as the field does (19-49 Hz).
pub const DEFAULT_RATE: u64 = 19;
/// Where HTTP listens unless configured: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9465";
/// How often samples are taken from the kernel.
const DRAIN_INTERVAL: Duration = Duration::from_millis(200);
/// How often processes are looked for and thread lists read again.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// The agent's settings: flags, or the same keys in `--config`'s TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// HTTP address (`/metrics`, `/debug/pprof/profile`, `/api/v1/processes`).
    pub listen: SocketAddr,
    /// The control socket's path.
    pub control: PathBuf,
    /// The continuous profile's samples per second.
    pub rate: u64,
    /// Where log point hits go, one JSON object per line: a file
    /// (appended to) or `-` for standard output.
    pub hits: String,
    /// The most a calls job may cost one process, in % of a CPU: a
    /// process whose calls would cost more stops being counted.
    pub calls_budget: f64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            control: PathBuf::from(control::DEFAULT_CONTROL),
            rate: DEFAULT_RATE,
            hits: "-".into(),
            calls_budget: DEFAULT_CALLS_BUDGET,
        }
    }
}

impl AgentConfig {
    /// Reads a TOML config file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let config: Self = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid agent config: {}",
                path.display(),
                e.message()
            )
        })?;
        config.check()?;
        Ok(config)
    }

    /// Refuses settings that cannot work.
    pub fn check(&self) -> anyhow::Result<()> {
        if !(self.calls_budget > 0.0 && self.calls_budget <= 100.0) {
            anyhow::bail!(
                "a calls budget of {}% is out of range: give more than 0 and at most 100 (% of a CPU)",
                self.calls_budget
            );
        }
        check_rate(self.rate)
    }
}

fn check_rate(hz: u64) -> anyhow::Result<()> {
    if !(1..=profile::MAX_RATE).contains(&hz) {
        anyhow::bail!(
            "a rate of {hz} Hz is out of range: give 1 to {} samples a second",
            profile::MAX_RATE
        );
    }
    Ok(())
}

/// What the agent knows of a watched process, for labels and the API.
#[derive(Debug, Clone, Serialize)]
struct Watched {
    pid: u32,
    version: String,
    binary: String,
    container: Option<String>,
    command: String,
    samples: u64,
}

/// A profile being collected for a request.
struct Collector {
    until: Instant,
    started: SystemTime,
    seconds: u64,
    pid: Option<u32>,
    container: Option<String>,
    stacks: HashMap<StackKey, u64>,
    reply: oneshot::Sender<Result<Vec<u8>, String>>,
}

/// A log point added through the control socket.
#[derive(Debug, Clone, Serialize)]
struct LogPoint {
    id: String,
    #[serde(skip)]
    index: usize,
    at: String,
    when: Option<String>,
    msg: Option<String>,
    /// Which processes, in words.
    processes: String,
    rate: u32,
    count: Option<u64>,
    #[serde(skip)]
    expires: Instant,
    ttl_seconds: f64,
}

/// How long a log point lives unless `--ttl` says otherwise: a forgotten
/// one ends by itself.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// How often log point hits are read.
const LOG_DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// The default calls budget: 5% of a CPU per process.
pub const DEFAULT_CALLS_BUDGET: f64 = 5.0;
/// What one counted call costs the process it runs in, in µs: a trap into
/// the kernel and the counting program, 0.65-1 µs measured by `cargo xtask
/// bench --only calls` on this machine kind (the higher figure, to err on
/// the side of the target).
const CALL_COST_US: f64 = 1.0;

/// A process a calls job stopped counting: its calls would cost more than
/// the budget.
#[derive(Debug, Clone, Serialize)]
struct OverBudget {
    pid: u32,
    calls_per_s: f64,
    /// What counting them would cost, in % of a CPU.
    cost_percent: f64,
    /// Its own probes came off (under a probe on its whole file it still
    /// traps, uncounted).
    detached: bool,
}

/// A calls job started through the control socket.
struct CallsJob {
    /// Its report for `/metrics` (apart, so scrapes do not move the
    /// intervals `ctl calls show` reports).
    metrics_reporter: crate::calls::report::Reporter,
    /// Calls per process when last looked at.
    last: Option<(Instant, BTreeMap<u32, u64>)>,
    /// Processes stopped by the budget.
    over_budget: BTreeMap<u32, OverBudget>,
    id: String,
    session: crate::calls::Session,
    reporter: crate::calls::report::Reporter,
    filter: Option<String>,
    all: bool,
    expires: Instant,
}

/// Functions of the running calls job exported in `/metrics` (those with
/// most calls): bounds the series a scrape gets.
const METRIC_FUNCTIONS: usize = 50;

/// Final reports of calls jobs that ended, kept for `ctl calls show`.
const FINISHED_KEPT: usize = 8;
/// How often a calls job reads the kernel's news of processes.
const CALLS_EVENTS_INTERVAL: Duration = Duration::from_millis(10);

/// The agent's state, owned by its loop.
struct Agent {
    /// See [`AgentConfig::calls_budget`].
    calls_budget: f64,
    /// The running calls job (one at a time: they share the call maps).
    calls: Option<CallsJob>,
    /// Calls jobs started since start (for ids).
    calls_started: u64,
    /// Final reports of ended calls jobs, oldest first.
    finished: Vec<(String, serde_json::Value, String)>,
    engine: crate::engine::Engine,
    /// The log points' session, made at the first `ctl log add`.
    log: Option<crate::logpoint::session::Session>,
    /// Where hits go, until the log session takes it.
    hits: Option<Box<dyn std::io::Write>>,
    points: BTreeMap<String, LogPoint>,
    /// Log points added since start (for ids).
    added: u64,
    log_ticks: u64,
    session: profile::Session,
    rate: u64,
    watched: BTreeMap<u32, Watched>,
    collectors: Vec<Collector>,
    started: Instant,
    config_path: Option<PathBuf>,
    /// Keeps the kernel's run-time statistics of BPF programs on while
    /// the agent runs (`None` when the kernel refused).
    _run_stats: Option<std::os::fd::OwnedFd>,
}

/// When a job given `ttl_seconds` to live ends.
fn expiry(ttl_seconds: f64) -> anyhow::Result<Instant> {
    if !(ttl_seconds > 0.0 && ttl_seconds.is_finite()) {
        anyhow::bail!("--ttl must be a positive duration (e.g. 30s, 10m, 1h)");
    }
    Ok(Instant::now() + Duration::from_secs_f64(ttl_seconds))
}

/// A calls report as JSON and as a table, with the processes the budget
/// stopped counting and how many were picked up after they started.
fn with_over_budget(
    report: &crate::calls::report::CallsReport,
    over: &BTreeMap<u32, OverBudget>,
    late: u64,
) -> (serde_json::Value, String) {
    let mut json = serde_json::to_value(report).unwrap_or_default();
    json["picked_up_late"] = serde_json::json!(late);
    json["over_budget"] =
        serde_json::to_value(over.values().collect::<Vec<_>>()).unwrap_or_default();
    let mut table = report.to_table();
    if let Some(line) = crate::calls::late_line(late) {
        table.push_str(&line);
        table.push('\n');
    }
    for o in over.values() {
        table.push_str(&format!(
            "PID {} not counted since it made {:.0} calls/s ({:.1}% of a CPU, over the budget){}\n",
            o.pid,
            o.calls_per_s,
            o.cost_percent,
            if o.detached { "" } else { "; it still traps" }
        ));
    }
    (json, table)
}

/// Runs the agent until SIGTERM or Ctrl-C (exit 0, nothing left attached);
/// SIGHUP reads `config_path` again.
pub async fn run(config: AgentConfig, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    config.check()?;
    crate::privileges::check()?;
    let socket = control::ControlSocket::bind(&config.control)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let hits: Box<dyn std::io::Write> = if config.hits == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&config.hits)
                .map_err(|e| anyhow::anyhow!("cannot open --hits {}: {e}", config.hits))?,
        )
    };
    let engine = crate::engine::Engine::load(crate::bpf::Features {
        sample_rate: Some(config.rate.max(99)),
        log: true,
        calls: true,
        latency: false,
        wide: true,
    })?;
    // Now, on the main thread: the BTF parse's memory then goes back to
    // the system (on a runtime thread its arena kept 10 MB for good).
    if let Some(why) = engine.follow_forks() {
        eprintln!("pyprobe: warning: processes forked by watched ones are picked up late ({why})");
    }
    let opts = profile::ProfileOptions {
        pids: Vec::new(),
        all: true,
        select: crate::selection::Selector::default(),
        rate: config.rate,
        duration: None,
        idle: false,
        gil: false,
        threads: true,
    };
    let mut agent = Agent {
        calls_budget: config.calls_budget,
        calls: None,
        calls_started: 0,
        finished: Vec::new(),
        engine: engine.clone(),
        log: None,
        hits: Some(hits),
        points: BTreeMap::new(),
        added: 0,
        log_ticks: 0,
        session: {
            let mut session = profile::Session::new(&engine, &opts)?;
            session.keep_exited_names = false;
            session
        },
        rate: config.rate,
        watched: BTreeMap::new(),
        collectors: Vec::new(),
        started: Instant::now(),
        config_path,
        _run_stats: match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!(
                    "pyprobe: warning: BPF run time not measured (the kernel refused run-time statistics: {e})"
                );
                None
            }
        },
    };
    agent.session.scan();
    agent.note_processes();
    agent.session.sampler.start(agent.rate)?;

    let (ask_tx, mut asks) = mpsc::channel::<Ask>(64);
    let (call_tx, mut calls) = mpsc::channel::<Call>(16);
    eprintln!(
        "pyprobe: agent sampling every Python process at {} Hz; HTTP on http://{} (/metrics, /debug/pprof/profile, /api/v1/processes); control on {}",
        agent.rate,
        listener.local_addr()?,
        socket.path().display()
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, http::router(ask_tx)).await;
    });
    let control = tokio::spawn(socket.serve(call_tx));

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut drain = live::ticker(DRAIN_INTERVAL);
    let mut log_drain = live::ticker(LOG_DRAIN_INTERVAL);
    let mut calls_events = live::ticker(CALLS_EVENTS_INTERVAL);
    let mut scan = live::ticker(SCAN_INTERVAL);
    let stop = live::stop_requested(None);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            _ = drain.tick() => agent.drain(),
            _ = log_drain.tick(), if agent.log.is_some() => agent.log_tick(false),
            _ = calls_events.tick(), if agent.calls.is_some() => {
                if let Some(job) = agent.calls.as_mut() {
                    job.session.tick_events();
                }
            }
            _ = scan.tick() => {
                agent.drain();
                agent.session.refresh_threads();
                agent.session.scan();
                agent.note_processes();
                agent.log_tick(true);
                agent.calls_tick();
            }
            Some(ask) = asks.recv() => agent.answer(ask),
            Some((request, reply)) = calls.recv() => {
                let _ = reply.send(agent.call(request));
            }
            _ = hangup.recv() => agent.reload(),
        }
    }
    // The HTTP server and the control socket go first, then the probes
    // (dropped with the session and the engine).
    server.abort();
    control.abort();
    let _ = control.await;
    drop(agent);
    drop(engine);
    eprintln!("pyprobe: agent stopped");
    Ok(())
}

impl Agent {
    /// The calls job's work once a second: names read while processes
    /// live, new processes set up (`--all`); it stops at its time to live
    /// or when every process it watched is gone.
    fn calls_tick(&mut self) {
        let Some(job) = self.calls.as_mut() else {
            return;
        };
        if job.all {
            job.session.tick_scan();
        }
        // Names read while processes live; the same read of the counts
        // feeds the overhead guard: a process whose calls in the last
        // second would cost more than the budget stops being counted.
        let counted = job.session.resolve_counted(job.filter.as_deref());
        if let Err(e) = &counted {
            eprintln!(
                "pyprobe: calls {}: {}",
                job.id,
                crate::errors::one_line(e.as_ref())
            );
        }
        if let Ok(now_counts) = counted {
            let now = Instant::now();
            if let Some((then, before)) = &job.last {
                let dt = now.duration_since(*then).as_secs_f64().max(1e-3);
                for (&pid, &n) in &now_counts {
                    if job.over_budget.contains_key(&pid) {
                        continue;
                    }
                    let rate = n.saturating_sub(before.get(&pid).copied().unwrap_or(0)) as f64 / dt;
                    let cost = rate * CALL_COST_US / 1e6 * 100.0;
                    if cost > self.calls_budget {
                        let detached = job.session.stop_process(pid).unwrap_or(false);
                        eprintln!(
                            "pyprobe: calls {}: PID {pid} makes {rate:.0} calls/s, which would cost {cost:.1}% of a CPU \
                             (budget {}%): no longer counted",
                            job.id, self.calls_budget
                        );
                        job.over_budget.insert(
                            pid,
                            OverBudget {
                                pid,
                                calls_per_s: rate,
                                cost_percent: cost,
                                detached,
                            },
                        );
                    }
                }
            }
            job.last = Some((now, now_counts));
        }
        let why = if Instant::now() >= job.expires {
            Some("its time to live ran out")
        } else if !job.all && job.session.all_gone() {
            Some("every process it watched exited")
        } else {
            None
        };
        if let Some(why) = why {
            let id = job.id.clone();
            match self.stop_calls(&id) {
                Ok(_) => eprintln!("pyprobe: calls {id} ended: {why}"),
                Err(e) => eprintln!("pyprobe: calls {id}: {e:#}"),
            }
        }
    }

    /// Starts a calls job; returns its id.
    fn start_calls(&mut self, start: control::CallsStart) -> anyhow::Result<String> {
        if let Some(job) = &self.calls {
            anyhow::bail!(
                "calls job {} runs already: one at a time (pyprobe ctl calls stop {})",
                job.id,
                job.id
            );
        }
        let scope = start.targets.scope()?;
        let expires = expiry(start.ttl_seconds)?;
        for &pid in &scope.pids {
            crate::process::find_interpreter(pid)?;
        }
        let all = scope.pids.is_empty();
        let opts = crate::calls::CallsOptions {
            pids: scope.pids,
            all,
            select: scope.select,
            interval: Duration::from_secs(1),
            duration: None,
            top: None,
            filter: start.filter.clone(),
            json: true,
            empty_program: false,
            builtins: true,
            latency: false,
            per_process_probes: true,
        };
        let mut session = crate::calls::Session::new(&self.engine, &opts)?;
        session.start(&opts)?;
        self.calls_started += 1;
        let id = format!("calls{}", self.calls_started);
        self.calls = Some(CallsJob {
            // Nothing counted yet: a burst before the first look is judged
            // at it.
            last: Some((Instant::now(), BTreeMap::new())),
            over_budget: BTreeMap::new(),
            id: id.clone(),
            session,
            reporter: crate::calls::report::Reporter::new(
                Instant::now(),
                None,
                start.filter.clone(),
            ),
            metrics_reporter: crate::calls::report::Reporter::new(
                Instant::now(),
                Some(METRIC_FUNCTIONS),
                start.filter.clone(),
            ),
            filter: start.filter,
            all,
            expires,
        });
        eprintln!("pyprobe: calls {id} started");
        Ok(id)
    }

    /// The report of calls job `id`: so far if it runs, final if it ended.
    fn show_calls(&mut self, id: &str) -> anyhow::Result<(serde_json::Value, String)> {
        if let Some(job) = self.calls.as_mut().filter(|j| j.id == id) {
            let report =
                job.session
                    .report(&mut job.reporter, job.filter.as_deref(), "interval")?;
            return Ok(with_over_budget(
                &report,
                &job.over_budget,
                job.session.picked_up_late(),
            ));
        }
        self.finished
            .iter()
            .find(|(i, _, _)| i == id)
            .map(|(_, json, table)| (json.clone(), table.clone()))
            .ok_or_else(|| anyhow::anyhow!("no calls job {id}"))
    }

    /// Stops calls job `id` (its probes go); returns its final report.
    fn stop_calls(&mut self, id: &str) -> anyhow::Result<(serde_json::Value, String)> {
        let Some(mut job) = self.calls.take_if(|j| j.id == id) else {
            if self.finished.iter().any(|(i, _, _)| i == id) {
                anyhow::bail!("calls job {id} has ended already (pyprobe ctl calls show {id})");
            }
            anyhow::bail!("no calls job {id}");
        };
        let report = job
            .session
            .report(&mut job.reporter, job.filter.as_deref(), "final")?;
        let (json, table) =
            with_over_budget(&report, &job.over_budget, job.session.picked_up_late());
        drop(job);
        self.finished
            .push((id.to_owned(), json.clone(), table.clone()));
        if self.finished.len() > FINISHED_KEPT {
            self.finished.remove(0);
        }
        Ok((json, table))
    }

    /// The log session's periodic work (`slow`: once a second); log
    /// points past their time to live or count are taken off. A failure is
    /// said and the agent goes on.
    fn log_tick(&mut self, slow: bool) {
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let result = if slow {
            self.log_ticks += 1;
            log.tick_scan(self.log_ticks)
        } else {
            log.tick_drain()
        };
        if let Err(e) = result {
            eprintln!(
                "pyprobe: log points: {}",
                crate::errors::one_line(e.as_ref())
            );
        }
        let now = Instant::now();
        let ended: Vec<(String, &'static str)> = self
            .points
            .values()
            .filter_map(|p| {
                if now >= p.expires {
                    Some((p.id.clone(), "its time to live ran out"))
                } else if log.point_done(p.index) {
                    Some((p.id.clone(), "it wrote its count of hits"))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in ended {
            if let Err(e) = self.remove_point(&id) {
                eprintln!("pyprobe: log point {id}: {e:#}");
            } else {
                eprintln!("pyprobe: log point {id} ended: {why}");
            }
        }
    }

    /// Adds a log point (see [`control::LogAdd`]); returns its id and
    /// what was done.
    fn add_point(&mut self, add: control::LogAdd) -> anyhow::Result<(String, Vec<String>)> {
        use crate::logpoint::session::{AgentPoint, PointSpec};
        let scope = add.targets.scope()?;
        let processes = add.targets.describe()?;
        let expires = expiry(add.ttl_seconds)?;
        if self.log.is_none() {
            let out = self.hits.take().expect("hits output kept until now");
            self.log = Some(crate::logpoint::session::Session::for_agent(
                &self.engine,
                out,
            )?);
            // Every Python process read now, so a --pid target is known.
            self.log.as_mut().expect("made").tick_scan(0)?;
        }
        let log = self.log.as_mut().expect("made");
        self.added += 1;
        let id = format!("lp{}", self.added);
        let (index, lines) = log.add_point(
            PointSpec {
                at: add.at.clone(),
                when: add.when.clone(),
                msg: add.msg.clone(),
                origin: None,
            },
            AgentPoint {
                id: id.clone(),
                scope,
                rate: add.rate,
                count: add.count,
            },
        )?;
        self.points.insert(
            id.clone(),
            LogPoint {
                id: id.clone(),
                index,
                at: add.at,
                when: add.when,
                msg: add.msg,
                processes,
                rate: add.rate,
                count: add.count,
                expires,
                ttl_seconds: add.ttl_seconds,
            },
        );
        eprintln!("pyprobe: log point {id} added at {}", self.points[&id].at);
        Ok((id, lines))
    }

    /// Takes log point `id` off.
    fn remove_point(&mut self, id: &str) -> anyhow::Result<()> {
        let Some(point) = self.points.get(id) else {
            anyhow::bail!("no log point {id} (see pyprobe ctl log list)");
        };
        if let Some(log) = self.log.as_mut() {
            // Its last hits are written first.
            log.tick_drain()?;
            log.remove_point(point.index)?;
        }
        self.points.remove(id);
        Ok(())
    }

    /// The log points, with what happened at each.
    fn list_points(&self) -> serde_json::Value {
        let now = Instant::now();
        let list: Vec<serde_json::Value> = self
            .points
            .values()
            .map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or_default();
                v["expires_in_seconds"] =
                    serde_json::json!(p.expires.saturating_duration_since(now).as_secs());
                if let Some(stats) = self.log.as_ref().and_then(|l| l.point_stats(p.index).ok()) {
                    v["stats"] = serde_json::to_value(stats).unwrap_or_default();
                }
                v
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// Takes the samples waiting, counts them per process and hands them
    /// to the profiles being collected; sends the profiles that are done.
    fn drain(&mut self) {
        // Children forked by watched processes, from their first moments.
        if self.session.take_children() > 0 {
            self.note_processes();
        }
        if let Err(e) = self.session.drain() {
            log::warn!("reading samples: {e:#}");
        }
        let stacks = std::mem::take(&mut self.session.profile.stacks);
        for (key, n) in stacks {
            if let Some(w) = self.watched.get_mut(&key.pid) {
                w.samples += n;
            }
            for c in &mut self.collectors {
                if c.pid.is_some_and(|p| p != key.pid) {
                    continue;
                }
                if let Some(wanted) = &c.container {
                    let inside = self
                        .watched
                        .get(&key.pid)
                        .and_then(|w| w.container.as_deref())
                        .is_some_and(|id| id.starts_with(wanted.as_str()));
                    if !inside {
                        continue;
                    }
                }
                *c.stacks.entry(key.clone()).or_insert(0) += n;
            }
        }
        let now = Instant::now();
        let (done, going): (Vec<_>, Vec<_>) = std::mem::take(&mut self.collectors)
            .into_iter()
            .partition(|c| now >= c.until);
        self.collectors = going;
        for c in done {
            let bytes = self.encode(&c);
            let _ = c.reply.send(Ok(bytes));
        }
    }

    /// A collected profile as gzip'd profile.proto.
    fn encode(&self, c: &Collector) -> Vec<u8> {
        crate::sink::pprof::encode_stacks(
            &c.stacks,
            &self.session.profile.frames,
            &self.session.roots,
            |pid| self.watched.get(&pid).and_then(|w| w.container.clone()),
            c.started,
            Duration::from_secs(c.seconds),
            self.rate,
        )
    }

    /// Brings the list of watched processes in line with the session's.
    fn note_processes(&mut self) {
        self.watched
            .retain(|pid, _| self.session.processes.contains_key(pid));
        for (&pid, p) in &self.session.processes {
            self.watched.entry(pid).or_insert_with(|| Watched {
                pid,
                version: p.target.version.to_string(),
                binary: p
                    .target
                    .interpreter
                    .as_ref()
                    .map(|i| i.binary.display().to_string())
                    .unwrap_or_default(),
                container: crate::container::Placement::of(pid)
                    .and_then(|placement| placement.container)
                    .map(|c| c.id),
                command: crate::selection::command_line(pid).unwrap_or_default(),
                samples: 0,
            });
        }
    }

    fn answer(&mut self, ask: Ask) {
        match ask {
            Ask::Metrics(reply) => {
                let _ = reply.send(self.metrics().render());
            }
            Ask::Processes(reply) => {
                let list: Vec<&Watched> = self.watched.values().collect();
                let _ = reply.send(serde_json::to_value(list).unwrap_or_default());
            }
            Ask::Profile {
                reply,
                pid: Some(pid),
                ..
            } if !self.watched.contains_key(&pid) => {
                let _ = reply.send(Err(format!(
                    "PID {pid} is not watched by the agent (GET /api/v1/processes lists those it is)"
                )));
            }
            Ask::Profile {
                seconds,
                pid,
                container,
                reply,
            } => self.collectors.push(Collector {
                until: Instant::now() + Duration::from_secs(seconds),
                started: SystemTime::now(),
                seconds,
                pid,
                container,
                stacks: HashMap::new(),
                reply,
            }),
        }
    }

    /// The metrics as they stand.
    fn metrics(&mut self) -> Metrics {
        let mut m = Metrics::default();
        m.declare(
            "pyprobe_processes",
            Kind::Gauge,
            "Python processes watched, by interpreter version and container.",
        );
        let mut by_kind: BTreeMap<(String, String), u64> = BTreeMap::new();
        for w in self.watched.values() {
            *by_kind
                .entry((w.version.clone(), w.container.clone().unwrap_or_default()))
                .or_default() += 1;
        }
        for ((version, container), n) in by_kind {
            m.add(
                "pyprobe_processes",
                &[("version", &version), ("container", &container)],
                n as f64,
            );
        }
        m.declare(
            "pyprobe_process_samples_total",
            Kind::Counter,
            "CPU samples taken of a watched process since the agent saw it.",
        );
        for w in self.watched.values() {
            m.add(
                "pyprobe_process_samples_total",
                &[("pid", &w.pid.to_string())],
                w.samples as f64,
            );
        }
        let p = &self.session.profile;
        m.declare(
            "pyprobe_samples_total",
            Kind::Counter,
            "CPU samples taken of every process.",
        );
        m.add("pyprobe_samples_total", &[], p.samples as f64);
        m.declare(
            "pyprobe_samples_lost_total",
            Kind::Counter,
            "Ticks of a watched process's thread that gave no sample, by reason.",
        );
        if let Ok(k) = self.session.losses() {
            for (reason, n) in [
                ("thread_not_yet_known", k.unknown_thread),
                ("outside_python_code", k.no_frame),
                ("unreadable", k.unreadable),
                ("ring_buffer_full", k.ring_full),
                ("skipped_by_kernel", k.recursion_misses),
            ] {
                m.add(
                    "pyprobe_samples_lost_total",
                    &[("reason", reason)],
                    n as f64,
                );
            }
        }
        let d = &p.dropped;
        for (reason, n) in [
            ("unreadable_frames", d.unreadable_frames),
            ("unknown_process", d.unknown_process),
            ("malformed", d.malformed),
        ] {
            m.add(
                "pyprobe_samples_lost_total",
                &[("reason", reason)],
                n as f64,
            );
        }
        m.declare(
            "pyprobe_logpoint_hits_total",
            Kind::Counter,
            "Hits a log point wrote.",
        );
        m.declare(
            "pyprobe_logpoint_dropped_total",
            Kind::Counter,
            "Runs of a log point not written, by reason.",
        );
        if let Some(log) = &self.log {
            for p in self.points.values() {
                let Ok(st) = log.point_stats(p.index) else {
                    continue;
                };
                m.add(
                    "pyprobe_logpoint_hits_total",
                    &[("id", &p.id)],
                    st.written as f64,
                );
                for (reason, n) in [
                    ("condition_false", st.condition_false),
                    ("condition_error", st.condition_errors),
                    ("rate_limited", st.rate_limited),
                    ("ring_buffer_full", st.lost),
                ] {
                    m.add(
                        "pyprobe_logpoint_dropped_total",
                        &[("id", &p.id), ("reason", reason)],
                        n as f64,
                    );
                }
            }
        }
        m.declare(
            "pyprobe_calls_over_budget_processes",
            Kind::Gauge,
            "Processes the running calls job stopped counting: their calls would cost more than the budget.",
        );
        m.add(
            "pyprobe_calls_over_budget_processes",
            &[],
            self.calls.as_ref().map_or(0, |j| j.over_budget.len()) as f64,
        );
        self.calls_metrics(&mut m);
        self.bpf_metrics(&mut m);
        m.declare(
            "pyprobe_hits_unwritten_total",
            Kind::Counter,
            "Log point hits that could not be written to --hits.",
        );
        m.add(
            "pyprobe_hits_unwritten_total",
            &[],
            self.log.as_ref().map_or(0, |l| l.unwritten()) as f64,
        );
        m.declare(
            "pyprobe_sampling_rate_hertz",
            Kind::Gauge,
            "Samples per second of CPU time of the continuous profile.",
        );
        m.add("pyprobe_sampling_rate_hertz", &[], self.rate as f64);
        m.declare(
            "pyprobe_uptime_seconds",
            Kind::Gauge,
            "Seconds since the agent started.",
        );
        m.add(
            "pyprobe_uptime_seconds",
            &[],
            self.started.elapsed().as_secs_f64().floor(),
        );
        m
    }

    /// The running calls job's functions with most calls, its function
    /// count and its losses.
    fn calls_metrics(&mut self, m: &mut Metrics) {
        m.declare(
            "pyprobe_function_calls_total",
            Kind::Counter,
            "Calls of a function in a process counted by the running calls job (the 50 functions with most calls).",
        );
        m.declare(
            "pyprobe_calls_functions",
            Kind::Gauge,
            "Functions with calls in the running calls job (those beyond 50 have no series).",
        );
        m.declare(
            "pyprobe_calls_lost_total",
            Kind::Counter,
            "Calls the running calls job could not count or attribute, by reason.",
        );
        let Some(job) = self.calls.as_mut() else {
            return;
        };
        let report =
            match job
                .session
                .report(&mut job.metrics_reporter, job.filter.as_deref(), "interval")
            {
                Ok(report) => report,
                Err(e) => {
                    log::warn!("calls job {} not reported in metrics: {e:#}", job.id);
                    return;
                }
            };
        for row in &report.rows {
            m.add(
                "pyprobe_function_calls_total",
                &[
                    ("job", &job.id),
                    ("pid", &row.pid.to_string()),
                    ("function", &row.function),
                    ("file", &row.file),
                    ("line", &row.line.to_string()),
                ],
                row.calls as f64,
            );
        }
        m.add(
            "pyprobe_calls_functions",
            &[("job", &job.id)],
            report.functions as f64,
        );
        let l = &report.lost;
        for (reason, n) in [
            ("map_full", l.map_full),
            ("process_not_yet_set_up", l.unconfigured),
            ("unreadable", l.unreadable),
            ("untimed", l.untimed),
            ("frame_mismatch", l.frame_mismatches),
            ("skipped_by_kernel", l.recursion_misses),
        ] {
            m.add(
                "pyprobe_calls_lost_total",
                &[("job", &job.id), ("reason", reason)],
                n as f64,
            );
        }
    }

    /// Runs and run time of each of pyprobe's BPF programs, as the kernel
    /// measures them.
    fn bpf_metrics(&self, m: &mut Metrics) {
        m.declare(
            "pyprobe_bpf_program_runs_total",
            Kind::Counter,
            "Runs of one of pyprobe's BPF programs in the kernel.",
        );
        m.declare(
            "pyprobe_bpf_program_run_seconds_total",
            Kind::Counter,
            "CPU time one of pyprobe's BPF programs took in the kernel (the time of traps and interrupts around it is not included).",
        );
        if self._run_stats.is_none() {
            return;
        }
        let mut by_name: BTreeMap<String, crate::bpf::ProgramRuns> = BTreeMap::new();
        let mut all = self.engine.object().program_runs();
        if let Some(job) = &self.calls {
            all.extend(job.session.program_runs());
        }
        for (name, runs) in all {
            by_name.entry(name).or_default().add(runs);
        }
        for (name, runs) in by_name {
            m.add(
                "pyprobe_bpf_program_runs_total",
                &[("program", &name)],
                runs.runs as f64,
            );
            m.add(
                "pyprobe_bpf_program_run_seconds_total",
                &[("program", &name)],
                runs.run_time_ns as f64 / 1e9,
            );
        }
    }

    /// Carries out a control request.
    fn call(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::ok(serde_json::json!({
                "rate": self.rate,
                "processes": self.watched.len(),
                "samples": self.session.profile.samples,
                "uptime_seconds": self.started.elapsed().as_secs(),
                "profiles_in_progress": self.collectors.len(),
                "log_points": self.points.len(),
                "calls_job": self.calls.as_ref().map(|j| j.id.clone()),
                "calls_budget_percent": self.calls_budget,
                "log_processes": self.log.as_ref().map_or(0, |l| l.watched()),
                "hits_unwritten": self.log.as_ref().map_or(0, |l| l.unwritten()),
            })),
            Request::ProfileRate { hz } => match self.set_rate(hz) {
                Ok(()) => Response::ok(serde_json::json!({ "rate": self.rate })),
                Err(e) => Response::error(crate::errors::one_line(e.as_ref())),
            },
            Request::LogAdd(add) => match self.add_point(add) {
                Ok((id, lines)) => Response::ok(serde_json::json!({ "id": id, "lines": lines })),
                Err(e) => Response::error(crate::errors::one_line(e.as_ref())),
            },
            Request::LogList => Response::ok(self.list_points()),
            Request::CallsStart(start) => match self.start_calls(start) {
                Ok(id) => Response::ok(serde_json::json!({ "id": id })),
                Err(e) => Response::error(crate::errors::one_line(e.as_ref())),
            },
            Request::CallsShow { id } => match self.show_calls(&id) {
                Ok((report, table)) => {
                    Response::ok(serde_json::json!({ "report": report, "table": table }))
                }
                Err(e) => Response::error(crate::errors::one_line(e.as_ref())),
            },
            Request::CallsStop { id } => match self.stop_calls(&id) {
                Ok((report, table)) => {
                    Response::ok(serde_json::json!({ "report": report, "table": table }))
                }
                Err(e) => Response::error(crate::errors::one_line(e.as_ref())),
            },
            Request::LogRm { id } => match self.remove_point(&id) {
                Ok(()) => Response::ok(serde_json::json!({ "removed": id })),
                Err(e) => Response::error(crate::errors::one_line(e.as_ref())),
            },
        }
    }

    fn set_rate(&mut self, hz: u64) -> anyhow::Result<()> {
        check_rate(hz)?;
        if hz != self.rate {
            // Samples taken at the old rate are counted at it.
            self.drain();
            self.session.sampler.start(hz)?;
            self.rate = hz;
            eprintln!("pyprobe: agent now samples at {hz} Hz");
        }
        Ok(())
    }

    /// SIGHUP: reads the config file again and applies what can change
    /// while running (the rate).
    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            eprintln!("pyprobe: SIGHUP: no --config to read again");
            return;
        };
        match AgentConfig::read(&path).and_then(|c| self.set_rate(c.rate)) {
            Ok(()) => eprintln!("pyprobe: read {} again", path.display()),
            Err(e) => eprintln!(
                "pyprobe: SIGHUP: kept the running settings: {}",
                crate::errors::one_line(e.as_ref())
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_config_reads_as_the_defaults_and_bad_keys_are_refused() {
        let dist = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/agent.toml");
        assert_eq!(
            AgentConfig::read(Path::new(dist)).unwrap(),
            AgentConfig::default()
        );
        let partial: AgentConfig = toml::from_str("rate = 49").unwrap();
        assert_eq!(partial.rate, 49);
        assert_eq!(partial.listen, AgentConfig::default().listen);
        assert!(toml::from_str::<AgentConfig>("rates = 49").is_err());
        let dir = std::env::temp_dir().join(format!("pyprobe-agent-config-{}", std::process::id()));
        std::fs::write(&dir, "rate = 0\n").unwrap();
        let e = AgentConfig::read(&dir).unwrap_err().to_string();
        std::fs::remove_file(&dir).unwrap();
        assert!(e.contains("out of range"), "{e}");
    }
}
