//! `pyprobe log`: arming log points in live processes and printing their
//! hits.
//!
//! For each process: the log point's location is resolved to code objects
//! ([`super::locate`]); for each, its condition and message are compiled to
//! a kernel [`Program`](pyprobe_common::logpoint::Program) over the code's
//! locals; the probed instruction's oparg byte is registered in the
//! kernel's watch map and a hardware watchpoint is set on it in every
//! thread. A log point whose file is not imported yet waits: the process
//! is scanned again every second and the log point arms itself when the
//! code appears; the same scan arms armed log points on new code for their
//! location (a reloaded module), and a code object's watchpoints come off
//! when the process frees it. A process forked by a watched one inherits
//! its watchpoints and is set up in the kernel at the fork
//! ([`pyprobe_common::process::FORKED`]): its hits are printed from its
//! first run. One that execs is set up again if it runs Python (a
//! `spawn` worker), as soon as its interpreter has started. Hits are
//! drained every 50 ms, the full
//! condition is evaluated over the captured values, and one line (or JSON
//! object) is printed per hit.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write as _,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use pyprobe_common::logpoint::{
    EVAL_RANGES, LogProcess, MAX_ARMED, MAX_LOGPOINTS, MAX_PROGRAMS, NO_REGISTER, Program, Watch,
    WatchKey,
};
use serde_json::json;

use super::{
    compile::{Compiled, compile},
    eval::{self, Captured},
    expr::{self, Expr, Segment},
    hit::{self, HitValues},
    locate::{Found, LocateError, Location, parse_location, similar_names},
};
use crate::{
    bpf::{LogCounters, LogProbes, WatchError},
    live,
    process::{Tasks, thread_id_text},
    python::{
        memory::{Memory, ProcessMemory},
        offsets::{InstanceDictModel, InstructionModel, LongModel},
        reader::Target,
    },
    registry::ExecOutcome,
};

/// One log point as the user gave it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PointSpec {
    /// `FILE:LINE`, `FILE:FUNCTION` or `MODULE:QUALNAME`.
    pub at: String,
    /// Condition (`--when`).
    pub when: Option<String>,
    /// Message template (`--msg`).
    pub msg: Option<String>,
    /// Where it was written in a probe file; `None` for the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// The probe file lines a [`PointSpec`] was read from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// The file's name as given (`<stdin>` for standard input).
    pub file: String,
    /// Line of its `at`.
    pub at: usize,
    /// Line of its `when`, if any.
    pub when: Option<usize>,
    /// Line of its `msg`, if any.
    pub msg: Option<usize>,
}

impl PointSpec {
    /// How errors name this log point: `--at WHERE`, or `FILE:LINE: at
    /// WHERE` for one from a probe file.
    pub fn label(&self) -> String {
        match &self.origin {
            Some(origin) => format!("{}:{}: at {}", origin.file, origin.at, self.at),
            None => format!("--at {}", self.at),
        }
    }

    /// How errors name its condition or message option.
    fn option(&self, name: &str) -> String {
        match &self.origin {
            Some(origin) => {
                let line = if name == "when" {
                    origin.when
                } else {
                    origin.msg
                };
                format!("{}:{}: {name}", origin.file, line.unwrap_or(origin.at))
            }
            None => format!("--{name}"),
        }
    }
}

/// Options of `pyprobe log`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LogOptions {
    /// Processes to watch.
    pub pids: Vec<u32>,
    /// Every Python process running the files.
    pub all: bool,
    /// With `all`: which processes (`--name`, `--container`); the others
    /// are left alone.
    pub select: crate::selection::Selector,
    /// The log points.
    pub points: Vec<PointSpec>,
    /// Hits printed per second per log point at most (0: no limit).
    pub rate: u32,
    /// Stop after this many hits in all.
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[serde(with = "crate::job::opt_seconds")]
    pub duration: Option<Duration>,
    /// JSON lines instead of text.
    pub json: bool,
    /// Add the Python stack to each hit.
    pub stack: bool,
    /// Redact values read through secret-looking names.
    pub redact: bool,
}

/// A log point, parsed.
struct Point {
    spec: PointSpec,
    location: Location,
    condition: Option<Expr>,
    template: Vec<Segment>,
    /// Set when the agent added it: its own id, processes, rate, count.
    agent: Option<AgentPoint>,
    /// Taken off (`ctl log rm`, its time to live, its count): its slot
    /// may serve another.
    removed: bool,
    /// Hits written.
    printed: u64,
    /// What its armed entries recycled since had counted (see
    /// [`Session::recycle`]): kept in its totals.
    recycled: PointStats,
    /// It armed somewhere once (its entries may have been recycled
    /// since): a process where its place is wrong has other code.
    armed_once: bool,
    /// Processes where its place is wrong (an ambiguous file, no such
    /// function...) while it armed elsewhere: said for the first only.
    wrong_in: u64,
}

/// Which processes a log point added to a running session is for.
#[derive(Debug, Clone, Default)]
pub struct PointScope {
    /// These processes only (none: every one `select` takes).
    pub pids: Vec<u32>,
    /// With no `pids`: the processes it takes (every one when empty).
    pub select: crate::selection::Selector,
}

/// What a log point the agent added has of its own.
#[derive(Debug, Clone)]
pub struct AgentPoint {
    /// Its id, written with each hit.
    pub id: String,
    /// Its processes.
    pub scope: PointScope,
    /// Hits written per second at most (0: no limit).
    pub rate: u32,
    /// Hits written in all at most.
    pub count: Option<u64>,
}

impl Point {
    /// Whether it is to be armed in process `pid`.
    fn wants(&self, pid: u32) -> bool {
        if self.removed {
            return false;
        }
        match &self.agent {
            None => true,
            Some(a) if a.scope.pids.is_empty() => a.scope.select.selects(pid),
            Some(a) => a.scope.pids.contains(&pid),
        }
    }
}

/// What happened at one log point so far (see [`Session::point_stats`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PointStats {
    /// Code objects it is armed on now.
    pub armed: u64,
    /// Processes it waits in for its code to be loaded.
    pub waiting: u64,
    /// Hits written.
    pub written: u64,
    /// Runs its condition dropped (in the kernel and in userspace).
    pub condition_false: u64,
    /// Runs whose condition could not be evaluated.
    pub condition_errors: u64,
    /// Hits over its rate limit.
    pub rate_limited: u64,
    /// Hits lost: the ring buffer was full.
    pub lost: u64,
}

/// One armed instruction: a log point in one code object of one process.
struct Armed {
    point: usize,
    pid: u32,
    found: Found,
    compiled: Compiled,
    /// The message: `--msg`, or the default one for this code.
    template: Vec<Segment>,
    /// Hits printed.
    printed: u64,
    /// Hits the full condition dropped in userspace.
    condition_false: u64,
    /// Hits whose condition could not be evaluated.
    condition_errors: u64,
    /// Its watchpoints, one per thread that was running when it armed
    /// (processes forked since inherited copies, removed with them).
    links: Vec<crate::bpf::Watchpoint>,
    /// Its code object was freed and its watchpoints removed.
    retired: bool,
    /// Its log point was taken off: its hits still in the ring are not
    /// written.
    removed: bool,
    /// When its code object was found freed, until that is reported: the
    /// report waits a moment, as a process exiting frees all its code.
    freed_at: Option<Instant>,
    /// Its index in `LOG_PROGRAMS`.
    program: u32,
    /// The drain at which it was seen done with (retired, no watchpoint
    /// left); recycled two drains later, when no hit of it can be left
    /// in the ring (see [`Session::recycle`]).
    done_at: Option<u64>,
    /// Recycled: its slot (and its `LOG_STATE` entry) serve the next
    /// arming; it names no log point and no process.
    free: bool,
}

/// A watched process.
struct Process {
    /// What was read of it to set it up, shared with the run's other jobs
    /// (none for a process forked from a watched one: read as its parent).
    attachment: Option<std::rc::Rc<crate::registry::Attachment>>,
    target: Target<ProcessMemory>,
    /// Log points (by index) not armed yet, waiting for their code.
    waiting: Vec<usize>,
    /// Code objects that appeared after their log point armed and could
    /// not be armed (no free debug register): not tried again.
    refused: BTreeSet<u64>,
    /// Type names read so far.
    type_names: HashMap<u64, String>,
    /// Failed looks for the code of waiting log points, by log point
    /// (a process changing its modules while read), and the last error.
    scan_errors: BTreeMap<usize, (u64, String)>,
    /// It exited (said once).
    exited: bool,
    /// What the last look for code saw: code objects freed, modules in
    /// `sys.modules`, and when it was.
    last_look: Option<(u64, u64, Instant)>,
    /// Its threads, for the ids they have in its PID namespace (a
    /// container): re-read when a hit comes from a thread not listed.
    tasks: Tasks,
    /// The container it runs in, if any.
    container: Option<crate::container::Container>,
    /// The watched process it was forked from (directly or not), whose
    /// watchpoints it inherited, if it was.
    origin: Option<u32>,
    /// When it was set up: a young process is looked at for its log
    /// points' code at every drain, not every second (a `spawn` worker
    /// may live 100 ms).
    since: Instant,
    /// Started by a watched process (forked, or forked and exec'd): a
    /// worker of a pool. Its exit and the failed looks into it while it
    /// starts are counted, not printed one by one.
    worker: bool,
    /// "attached to PID" was said (under --all, once a log point armed).
    announced: bool,
    /// Its executable when set up: another one means it exec'd (the
    /// kernel's news of it is missed when the exec came between reading
    /// the process and configuring it).
    exe: Option<std::path::PathBuf>,
}

impl Process {
    /// Process `pid`, just set up, with log points `waiting` for their
    /// code; neither forked from a watched one nor announced.
    fn new(
        pid: u32,
        target: Target<ProcessMemory>,
        waiting: Vec<usize>,
        container: Option<crate::container::Container>,
        exe: Option<std::path::PathBuf>,
    ) -> Self {
        Process {
            attachment: None,
            target,
            waiting,
            refused: BTreeSet::new(),
            type_names: HashMap::new(),
            scan_errors: BTreeMap::new(),
            exited: false,
            last_look: None,
            tasks: Tasks::read(pid),
            container,
            origin: None,
            since: Instant::now(),
            worker: false,
            announced: false,
            exe,
        }
    }

    /// The id the process knows host thread `tid` by, when it differs.
    fn namespace_tid(&mut self, pid: u32, tid: u32) -> Option<u32> {
        if !self.tasks.in_own_namespace() {
            return None;
        }
        if !self.tasks.host_tids().any(|t| t == tid) {
            self.tasks = Tasks::read(pid);
        }
        self.tasks.ns_of(tid)
    }
}

/// Interval between drains of the hit ring buffer.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// Interval between scans for code not loaded yet.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest time between two looks for new code when nothing said it
/// may have appeared (a function defined later by a running script).
const LOOK_AT_LEAST_EVERY: Duration = Duration::from_secs(10);
/// How long a freed code object waits to be reported: if its process
/// exits meanwhile, the exit is reported instead.
const FREED_REPORT_DELAY: Duration = Duration::from_millis(500);
/// How long a `--pid` target that could not be set up may take to exit
/// for the failure to count as its exit, not an error.
const EXITING_READ_WAIT: Duration = Duration::from_millis(500);
/// How long a process counts as young (see [`Process::since`]).
const YOUNG: Duration = Duration::from_secs(5);
/// The longest time between two looks for new code in a young process.
const YOUNG_LOOK_EVERY: Duration = Duration::from_millis(250);

/// Runs `pyprobe log` until Ctrl-C, `--duration`, `--count`, or the exit of
/// every target.
pub async fn run(opts: LogOptions) -> anyhow::Result<()> {
    let points = parse_points(&opts)?;
    crate::privileges::check()?;
    // The verifier's work and the reading of the kernel's BTF (where it
    // keeps a task's ids) run beside the reading of the targets.
    let wide = opts.all;
    let loading = std::thread::spawn(move || {
        let engine = crate::engine::Engine::load(crate::bpf::Features {
            log: true,
            wide,
            ..Default::default()
        })?;
        engine.follow_forks();
        let probes = LogProbes::new(engine.object())?;
        anyhow::Ok((engine, probes))
    });
    // Every --pid is attached and its log points resolved and compiled
    // before anything is armed: a wrong --at or --when fails before.
    let mut attached = Vec::new();
    for &pid in &opts.pids {
        crate::process::find_interpreter(pid)?;
        let a = match Attached::new(pid, &points) {
            Ok(a) => a,
            // One of several that could not be read as it exited.
            Err(_)
                if opts.pids.len() > 1 && crate::process::exits_within(pid, EXITING_READ_WAIT) =>
            {
                eprintln!("pyprobe: PID {pid} exited while pyprobe set it up");
                continue;
            }
            Err(e) => return Err(e.context(format!("setting up PID {pid}"))),
        };
        a.check(&points)
            .with_context(|| format!("setting up PID {pid}"))?;
        attached.push(a);
    }
    // Under --all, the processes running now are read meanwhile too.
    let mut registry = crate::registry::Registry::new(opts.select.clone());
    let early: Vec<(u32, Option<anyhow::Result<Attached>>)> = if opts.all {
        registry
            .new_pids(|pid| opts.pids.contains(&pid))
            .into_iter()
            .map(|pid| (pid, Some(Attached::new(pid, &points))))
            .collect()
    } else {
        Vec::new()
    };
    let (engine, mut probes) = loading
        .join()
        .map_err(|_| anyhow::anyhow!("loading the eBPF programs failed (a thread panicked)"))??;
    probes.follow_forks(engine.follow_forks());
    let mut session = Session {
        probes,
        news: engine.news(),
        _engine: engine,
        points,
        armed: Vec::new(),
        programs: Vec::new(),
        processes: BTreeMap::new(),
        registry,
        opts: opts.clone(),
        clock: Clock::new(),
        printed: 0,
        gone_during_setup: BTreeSet::new(),
        forks: BTreeMap::new(),
        out: Box::new(std::io::stdout()),
        unwritten: 0,
        drains: 0,
    };
    if let Some(why) = session.probes.forks_unfollowed() {
        eprintln!(
            "pyprobe: processes forked by watched ones are not followed: {why}; their hits are counted as \
             \"at addresses not watched\""
        );
    }
    for a in attached {
        let pid = a.pid;
        match session.add_attached(a, false) {
            Ok(()) => {}
            // It exited while being set up: said, and the others go on.
            Err(_) if !crate::process::is_alive(pid) => {
                eprintln!("pyprobe: PID {pid} exited while pyprobe set it up");
                session.gone_during_setup.insert(pid);
            }
            Err(e) => return Err(e.context(format!("setting up PID {pid}"))),
        }
    }
    if opts.all {
        session.set_up_found(early)?;
        session.scan()?;
        eprintln!(
            "pyprobe: watching {} for the log points (forked ones from their first run, others within a second)",
            opts.select.describe()
        );
        if let Some(note) = opts.select.no_container_yet() {
            eprintln!("pyprobe: {note}");
        }
    }
    // A launched program goes on now that its log points wait for it.
    crate::launch::release_held()?;
    let mut ticks: u64 = 0;
    let started = Instant::now();
    let mut drain = live::ticker(DRAIN_INTERVAL);
    let mut scan = live::ticker(SCAN_INTERVAL);
    let stop = live::stop_requested(opts.duration);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = drain.tick() => {
                session.tick_drain()?;
                if opts.count.is_some_and(|n| session.printed >= n) {
                    break;
                }
            }
            _ = scan.tick() => {
                ticks += 1;
                session.tick_scan(ticks)?;
                if (!opts.all || opts.select.follows_family())
                    && !session.processes.values().any(|p| !p.exited)
                {
                    eprintln!("pyprobe: every watched process exited");
                    break;
                }
            }
        }
    }
    session.drain()?;
    session.summary(started.elapsed())
}

fn parse_points(opts: &LogOptions) -> anyhow::Result<Vec<Point>> {
    if opts.points.is_empty() {
        bail!(
            "no log point: give --at FILE:LINE (or FILE:FUNCTION, MODULE:QUALNAME), or --probes FILE"
        );
    }
    if opts.points.len() > MAX_LOGPOINTS as usize {
        bail!("at most {MAX_LOGPOINTS} log points at once");
    }
    opts.points.iter().map(parse_point).collect()
}

/// One log point, parsed: its place, condition and message checked.
fn parse_point(spec: &PointSpec) -> anyhow::Result<Point> {
    {
        let location =
            parse_location(&spec.at).map_err(|e| anyhow::anyhow!("{}: {e}", spec.label()))?;
        let condition = match &spec.when {
            Some(text) => Some(
                expr::parse(text)
                    .map_err(|e| anyhow::anyhow!("{} {text:?}: {e}", spec.option("when")))?,
            ),
            None => None,
        };
        let template = match &spec.msg {
            Some(text) => expr::parse_template(text)
                .map_err(|e| anyhow::anyhow!("{} {text:?}: {e}", spec.option("msg")))?,
            None => Vec::new(),
        };
        Ok(Point {
            spec: spec.clone(),
            location,
            condition,
            template,
            agent: None,
            removed: false,
            printed: 0,
            recycled: PointStats::default(),
            armed_once: false,
            wrong_in: 0,
        })
    }
}

/// Converts `bpf_ktime_get_ns` (CLOCK_MONOTONIC) to wall-clock time.
struct Clock {
    offset_ns: i128,
}

impl Clock {
    fn new() -> Self {
        let mono = i128::from(crate::kernel::monotonic_ns());
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Clock {
            offset_ns: wall - mono,
        }
    }

    /// Wall-clock nanoseconds since the epoch.
    fn wall_ns(&self, ktime: u64) -> i128 {
        i128::from(ktime) + self.offset_ns
    }
}

/// `HH:MM:SS.micros` (UTC) of a wall-clock time.
fn clock_text(ns: i128) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let micros = ns.rem_euclid(1_000_000_000) / 1000;
    let day = secs.rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        micros
    )
}

/// A process attached and its log points resolved, before anything is
/// loaded into the kernel.
struct Attached {
    pid: u32,
    /// Its executable when it was read.
    exe: Option<std::path::PathBuf>,
    attachment: std::rc::Rc<crate::registry::Attachment>,
    /// This job's reader of it.
    target: Target<ProcessMemory>,
    /// What each log point resolved to, by index.
    located: Vec<Result<Vec<Found>, LocateError>>,
}

impl Attached {
    fn new(pid: u32, points: &[Point]) -> anyhow::Result<Attached> {
        let exe = crate::process::exe_of(pid);
        let attachment = crate::registry::attach(pid)?;
        let target = attachment.reader();
        let located = points
            .iter()
            .map(|p| target.find_code(&p.location))
            .collect();
        Ok(Attached {
            pid,
            exe,
            attachment,
            target,
            located,
        })
    }

    /// The first error a log point would meet when armed: its location
    /// (but for "not loaded yet", when it waits), or its condition or
    /// message over the code found.
    fn check(&self, points: &[Point]) -> anyhow::Result<()> {
        for (point, located) in points.iter().zip(&self.located) {
            let found = match located {
                Ok(found) => found,
                Err(e) if e.is_not_loaded() => continue,
                Err(e) => bail!("{}: {e}", point.spec.label()),
            };
            for f in found {
                point.compile_for(f)?;
            }
        }
        Ok(())
    }
}

impl Point {
    /// The kernel program and userspace evaluation of this log point at
    /// the code `found`.
    fn compile_for(&self, found: &Found) -> anyhow::Result<Compiled> {
        let template = if self.spec.msg.is_some() {
            self.template.clone()
        } else {
            default_template(found)
        };
        compile(
            self.condition.as_ref(),
            &template,
            &found.varnames,
            &found.qualname,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", self.spec.label()))
    }
}

pub(crate) struct Session {
    probes: LogProbes,
    /// The kernel's news of processes (forks, execs).
    news: std::sync::mpsc::Receiver<crate::engine::Arrival>,
    /// Keeps the news coming.
    _engine: crate::engine::Engine,
    points: Vec<Point>,
    armed: Vec<Armed>,
    /// The programs in the kernel's `LOG_PROGRAMS`, by index.
    programs: Vec<Program>,
    processes: BTreeMap<u32, Process>,
    /// Processes found, passed over, and waiting after an exec.
    registry: crate::registry::Registry,
    opts: LogOptions,
    clock: Clock,
    printed: u64,
    /// `--pid` targets that exited while being set up.
    gone_during_setup: BTreeSet<u32>,
    /// Processes forked from each watched one since pyprobe started.
    forks: BTreeMap<u32, u64>,
    /// Where hits go (stdout for `pyprobe log`, `--hits` for the agent).
    out: Box<dyn std::io::Write>,
    /// Hits that could not be written (the agent counts them and goes
    /// on; `pyprobe log` stops).
    unwritten: u64,
    /// Drains so far (see [`Armed::done_at`]).
    drains: u64,
}

impl Session {
    /// What to do every [`DRAIN_INTERVAL`]: the kernel's news, young
    /// processes looked at, hits written, freed code retired.
    pub(crate) fn tick_drain(&mut self) -> anyhow::Result<()> {
        self.read_news();
        self.rescan_young()?;
        self.drain()?;
        self.drains += 1;
        for line in self.retire_freed()? {
            eprintln!("pyprobe: {line}");
        }
        if self.points.iter().any(|p| p.agent.is_some()) {
            self.recycle()?;
        }
        Ok(())
    }

    /// Frees the armed entries an always-on session is done with, so that
    /// log points added and taken off, and processes coming and going,
    /// never use up the kernel's [`MAX_ARMED`] entries, its `LOG_WATCH`
    /// map or its [`MAX_PROGRAMS`] programs, nor the agent's memory: an entry retired (its log
    /// point taken off, its code freed, its process exited or exec'd)
    /// whose watchpoints are all closed is recycled two drains after it
    /// was seen so (a hit it sent just before is written or dropped by
    /// then, never taken for the entry's next owner). What it counted
    /// stays in its log point's totals. `pyprobe log` keeps its entries
    /// for its summary.
    fn recycle(&mut self) -> anyhow::Result<()> {
        for i in 0..self.armed.len() {
            let a = &mut self.armed[i];
            if a.free || !a.retired || !a.links.is_empty() {
                continue;
            }
            let Some(seen) = a.done_at else {
                a.done_at = Some(self.drains);
                continue;
            };
            if self.drains < seen + 2 {
                continue;
            }
            let c: LogCounters = self.probes.counters(i as u32)?;
            let a = &mut self.armed[i];
            if let Some(point) = self.points.get_mut(a.point)
                && !a.removed
            {
                let r = &mut point.recycled;
                r.condition_false += c.condition_false + a.condition_false;
                r.condition_errors += a.condition_errors;
                r.rate_limited += c.rate_limited;
                r.lost += c.lost;
            }
            // Its kernel entries (an exited process's are still there).
            self.unwatch_entry(i)?;
            self.probes.reset_state(i as u32)?;
            let a = &mut self.armed[i];
            a.free = true;
            a.removed = true;
            a.point = usize::MAX;
            a.pid = 0;
        }
        // An exited process goes too once nothing of it is left: no
        // entry armed in it, no process forked from it alive (their hits
        // are read in their own memory, named by its). Its PID may come
        // back as another process, set up afresh.
        let live_origins = self.live_origins();
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(pid, p)| {
                p.exited
                    && !live_origins.contains(pid)
                    && !self.armed.iter().any(|a| !a.free && a.pid == **pid)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            self.processes.remove(&pid);
            self.forks.remove(&pid);
        }
        Ok(())
    }

    /// What to do every [`SCAN_INTERVAL`] (`ticks` counts them): new
    /// processes set up, code not loaded yet looked for, exits noted.
    pub(crate) fn tick_scan(&mut self, ticks: u64) -> anyhow::Result<()> {
        if self.opts.all {
            self.scan()?;
        }
        // Under --all most processes never load the file: look into them
        // every 5 s only.
        if !self.opts.all || ticks.is_multiple_of(5) {
            self.rescan()?;
        }
        for line in self.note_exits()? {
            eprintln!("pyprobe: {line}");
        }
        Ok(())
    }

    /// A session with no log point yet over `engine` (made for log
    /// points), for the agent: every Python process is watched, hits go to
    /// `out` as JSON lines with their log point's id.
    pub(crate) fn for_agent(
        engine: &crate::engine::Engine,
        out: Box<dyn std::io::Write>,
    ) -> anyhow::Result<Session> {
        let mut probes = LogProbes::new(engine.object())?;
        probes.follow_forks(engine.follow_forks());
        Ok(Session {
            probes,
            news: engine.news(),
            _engine: engine.clone(),
            points: Vec::new(),
            armed: Vec::new(),
            programs: Vec::new(),
            processes: BTreeMap::new(),
            registry: crate::registry::Registry::new(crate::selection::Selector::default()),
            opts: LogOptions {
                pids: Vec::new(),
                all: true,
                select: crate::selection::Selector::default(),
                points: Vec::new(),
                rate: 0,
                count: None,
                duration: None,
                json: true,
                stack: false,
                redact: true,
            },
            clock: Clock::new(),
            printed: 0,
            gone_during_setup: BTreeSet::new(),
            forks: BTreeMap::new(),
            out,
            unwritten: 0,
            drains: 0,
        })
    }

    /// Adds a log point to a running session: armed in every watched
    /// process `agent.scope` takes whose code is loaded, waiting in the
    /// others. Returns its index and what was done, one line each. A
    /// wrong place, condition or message in a process it is for is an
    /// error, and nothing stays armed.
    pub(crate) fn add_point(
        &mut self,
        spec: PointSpec,
        agent: AgentPoint,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        let mut point = parse_point(&spec)?;
        for &pid in &agent.scope.pids {
            if self.processes.get(&pid).is_none_or(|p| p.exited) {
                bail!(
                    "PID {pid} is not a Python process the agent watches (see pyprobe ctl status, /api/v1/processes)"
                );
            }
        }
        point.agent = Some(agent);
        let index = match self.points.iter().position(|p| p.removed) {
            Some(free) => {
                self.probes.reset_limit(free as u32)?;
                self.points[free] = point;
                free
            }
            None if self.points.len() < MAX_LOGPOINTS as usize => {
                self.points.push(point);
                self.points.len() - 1
            }
            None => bail!("at most {MAX_LOGPOINTS} log points at once: remove one first"),
        };
        let pids: Vec<u32> = self
            .processes
            .iter()
            .filter(|(pid, p)| !p.exited && p.origin.is_none() && self.points[index].wants(**pid))
            .map(|(&pid, _)| pid)
            .collect();
        let mut lines = Vec::new();
        for pid in pids {
            let process = self.processes.get_mut(&pid).expect("listed");
            let found = process.target.find_code(&self.points[index].location);
            match self.arm_located(pid, false, vec![(index, found)]) {
                Ok(armed) => lines.extend(armed),
                Err(e) => {
                    self.remove_point(index)?;
                    return Err(e);
                }
            }
        }
        let waiting = self
            .processes
            .values()
            .filter(|p| p.waiting.contains(&index))
            .count();
        if waiting > 0 {
            lines.push(format!(
                "waits for its code in {waiting} process{}",
                if waiting == 1 { "" } else { "es" }
            ));
        }
        Ok((index, lines))
    }

    /// Takes log point `index` off: its watchpoints and kernel entries
    /// go, processes stop waiting for it, and its hits still in the ring
    /// are not written.
    pub(crate) fn remove_point(&mut self, index: usize) -> anyhow::Result<()> {
        let Some(point) = self.points.get_mut(index) else {
            return Ok(());
        };
        point.removed = true;
        for p in self.processes.values_mut() {
            p.waiting.retain(|&i| i != index);
        }
        for i in 0..self.armed.len() {
            let armed = &mut self.armed[i];
            if armed.point != index {
                continue;
            }
            armed.removed = true;
            if !armed.retired {
                armed.retired = true;
                armed.links.clear();
                self.unwatch_entry(i)?;
            }
        }
        Ok(())
    }

    /// Whether log point `index` wrote all its `count` of hits.
    pub(crate) fn point_done(&self, index: usize) -> bool {
        self.points.get(index).is_some_and(|p| {
            p.agent
                .as_ref()
                .is_some_and(|a| a.count.is_some_and(|n| p.printed >= n))
        })
    }

    /// What happened at log point `index` so far.
    pub(crate) fn point_stats(&self, index: usize) -> anyhow::Result<PointStats> {
        let recycled = self
            .points
            .get(index)
            .map(|p| p.recycled.clone())
            .unwrap_or_default();
        let mut stats = PointStats {
            written: self.points.get(index).map_or(0, |p| p.printed),
            condition_false: recycled.condition_false,
            condition_errors: recycled.condition_errors,
            rate_limited: recycled.rate_limited,
            lost: recycled.lost,
            waiting: self
                .processes
                .values()
                .filter(|p| !p.exited && p.waiting.contains(&index))
                .count() as u64,
            ..PointStats::default()
        };
        for (i, armed) in self.armed.iter().enumerate() {
            if armed.point != index || armed.removed {
                continue;
            }
            if !armed.retired {
                stats.armed += 1;
            }
            let c: LogCounters = self.probes.counters(i as u32)?;
            stats.condition_false += c.condition_false + armed.condition_false;
            stats.condition_errors += armed.condition_errors;
            stats.rate_limited += c.rate_limited;
            stats.lost += c.lost;
        }
        Ok(stats)
    }

    /// Hits that could not be written.
    pub(crate) fn unwritten(&self) -> u64 {
        self.unwritten
    }

    /// Processes watched for log points (alive).
    pub(crate) fn watched(&self) -> usize {
        self.processes.values().filter(|p| !p.exited).count()
    }

    /// Sets up process `pid` and arms what can be armed. `quiet` (under
    /// `--all`): say nothing of log points waiting for their code, and
    /// print the attach line only when one was armed.
    fn add(&mut self, pid: u32, quiet: bool) -> anyhow::Result<()> {
        // Forked by a watched process after it armed: it has its
        // watchpoints already (the news of it may not be read yet).
        if let Some(origin) = self.probes.origin_of(pid) {
            self.add_forked(pid, origin);
            return Ok(());
        }
        let attached = Attached::new(pid, &self.points)?;
        self.add_attached(attached, quiet)
    }

    /// Records process `pid`, forked by `origin` (or by one of its
    /// children) after log points armed there: the kernel set it up at the
    /// fork and its watchpoints are inherited copies, so nothing is armed;
    /// its own copy of the memory is read for its hits.
    fn add_forked(&mut self, pid: u32, origin: u32) {
        if self.processes.contains_key(&pid) {
            return;
        }
        *self.forks.entry(origin).or_default() += 1;
        log::debug!("PID {pid} forked from watched PID {origin}");
        let Some(parent) = self.processes.get(&origin) else {
            return;
        };
        // Gone already (a worker may live milliseconds): its hits are read
        // in its parent's memory, the same before the fork.
        let Ok(memory) = ProcessMemory::open(pid) else {
            return;
        };
        let mut process = Process::new(
            pid,
            parent.target.over(memory),
            parent.waiting.clone(),
            parent.container.clone(),
            parent.exe.clone(),
        );
        process.origin = Some(origin);
        process.worker = true;
        process.announced = true;
        self.processes.insert(pid, process);
    }

    /// [`Self::add`] for a process already attached.
    fn add_attached(&mut self, attached: Attached, quiet: bool) -> anyhow::Result<()> {
        let Attached {
            pid,
            exe,
            attachment,
            target,
            located,
        } = attached;
        let image = attachment.image()?;
        let config = process_config(&target, &image)?;
        self.probes.configure(pid, &attachment.facts()?, &config)?;
        // Before any arming: a code object freed unseen would keep its
        // watchpoint on memory that holds something else.
        if let Some(offset) = attachment.code_freed_site() {
            let whole_file = self.opts.all && self.opts.select.is_everything();
            self.probes.object().watch_code_frees(
                attachment.interpreter(),
                offset,
                pid,
                whole_file,
            )?;
        }
        let version = target.version.to_string();
        let mut process = Process::new(
            pid,
            target,
            (0..self.points.len())
                .filter(|&i| self.points[i].wants(pid))
                .collect(),
            attachment.container().cloned(),
            exe,
        );
        process.attachment = Some(attachment);
        self.processes.insert(pid, process);
        let located = located
            .into_iter()
            .enumerate()
            .filter(|(i, _)| self.points[*i].wants(pid))
            .collect();
        let lines = self.arm_located(pid, !quiet, located)?;
        // What was just looked at: the next look waits for a change.
        if let Some(p) = self.processes.get_mut(&pid) {
            let modules = p.target.modules_count().unwrap_or(u64::MAX);
            p.last_look = Some((0, modules, Instant::now()));
        }
        for line in &lines {
            eprintln!("pyprobe: {line}");
        }
        if !quiet || !lines.is_empty() {
            eprintln!("pyprobe: attached to PID {pid} (CPython {version})");
            if let Some(p) = self.processes.get_mut(&pid) {
                p.announced = true;
            }
        }
        Ok(())
    }

    /// Tries to arm the log points of `pid` that wait for their code.
    /// At start (`first`), every error but "not loaded yet" is fatal.
    fn arm_waiting(&mut self, pid: u32, first: bool) -> anyhow::Result<Vec<String>> {
        let waiting = std::mem::take(&mut self.processes.get_mut(&pid).expect("added").waiting);
        let located = waiting
            .into_iter()
            .map(|index| {
                let found = self.processes[&pid]
                    .target
                    .find_code(&self.points[index].location);
                (index, found)
            })
            .collect();
        self.arm_located(pid, first, located)
    }

    /// Arms log points of `pid` on the code found for them, and keeps
    /// those whose code is not loaded waiting (the process's waiting list
    /// becomes exactly those).
    fn arm_located(
        &mut self,
        pid: u32,
        first: bool,
        located: Vec<(usize, Result<Vec<Found>, LocateError>)>,
    ) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        let mut still = Vec::new();
        for (index, found) in located {
            match found {
                Ok(found) => {
                    for f in found {
                        lines.push(self.arm(index, pid, f)?);
                    }
                }
                Err(e) if e.is_not_loaded() => {
                    if first {
                        let point = &self.points[index];
                        let similar = self.processes[&pid]
                            .target
                            .loaded_modules()
                            .map(|modules| similar_loaded(&point.location, &modules))
                            .unwrap_or_default();
                        lines.push(format!(
                            "log point {} ({}) waits for {} to be imported in PID {pid}; it arms when it is{}",
                            index + 1,
                            point.spec.at,
                            point.location.file_or_module(),
                            if similar.is_empty() {
                                String::new()
                            } else {
                                format!(" (loaded now with a similar name: {})", similar.join(", "))
                            },
                        ));
                    }
                    still.push(index);
                }
                // A wrong --at ends the run wherever it is found first (under
                // --all too: every process would say the same), unless the
                // log point armed already elsewhere (a later process with
                // other code).
                Err(e) if first || (e.is_wrong_spec() && !self.points[index].armed_once) => {
                    return Err(anyhow::Error::new(e).context(self.points[index].spec.label()));
                }
                Err(e) if e.is_wrong_spec() => {
                    // Wrong here (an ambiguous file, say), right in a process
                    // where it armed: a retry cannot change that. Said once,
                    // for the first such process; not looked for again here.
                    let point = &mut self.points[index];
                    point.wrong_in += 1;
                    if point.wrong_in == 1 {
                        lines.push(format!(
                            "{}: not armed in PID {pid} (nor in other processes where this holds): {e}",
                            point.spec.label()
                        ));
                    }
                }
                Err(e) => {
                    // A process changing its modules while read: said the
                    // first time, counted, and tried again at the next scan.
                    let process = self.processes.get_mut(&pid).expect("added");
                    let entry = process
                        .scan_errors
                        .entry(index)
                        .or_insert((0, String::new()));
                    entry.0 += 1;
                    entry.1 = e.to_string();
                    log::debug!(
                        "log point {} in PID {pid}: looking for its code failed: {e:#}",
                        index + 1
                    );
                    if entry.0 == 1 && !process.worker {
                        lines.push(format!(
                            "log point {} in PID {pid}: cannot look for its code now ({e}); trying again every second",
                            index + 1
                        ));
                    }
                    still.push(index);
                }
            }
        }
        self.processes.get_mut(&pid).expect("added").waiting = still;
        Ok(lines)
    }

    /// Arms log point `point` on one code object.
    fn arm(&mut self, point: usize, pid: u32, found: Found) -> anyhow::Result<String> {
        let p = &self.points[point];
        let template = if p.spec.msg.is_some() {
            p.template.clone()
        } else {
            default_template(&found)
        };
        let mut compiled = p.compile_for(&found)?;
        let index = match self.armed.iter().position(|a| a.free) {
            Some(free) => free as u32,
            None if self.armed.len() < MAX_ARMED as usize => self.armed.len() as u32,
            None => bail!(
                "more than {MAX_ARMED} armed code objects (log points taken off free theirs a moment later)"
            ),
        };
        let (rate, count) = match &p.agent {
            Some(a) => (a.rate, a.count),
            None => (self.opts.rate, self.opts.count),
        };
        compiled.program.rate = rate;
        compiled.program.max_hits = count.unwrap_or(0);
        compiled.program.stack = u32::from(self.opts.stack);
        // The same file on the same interpreter compiles to the same
        // program in every process: one copy in the kernel.
        let program = match self.programs.iter().position(|p| *p == compiled.program) {
            Some(at) => at as u32,
            None => {
                // A slot no armed entry uses any more, else a new one.
                let unused = (0..self.programs.len()).find(|&at| {
                    !self
                        .armed
                        .iter()
                        .any(|a| !a.free && a.program as usize == at)
                });
                let at = match unused {
                    Some(at) => at,
                    None if self.programs.len() < MAX_PROGRAMS as usize => {
                        self.programs.push(compiled.program);
                        self.programs.len() - 1
                    }
                    None => bail!(
                        "more than {MAX_PROGRAMS} different log point programs (log points taken off free theirs a moment later)"
                    ),
                };
                self.programs[at] = compiled.program;
                self.probes.set_program(at as u32, &compiled.program)?;
                at as u32
            }
        };
        let process = self.processes.get_mut(&pid).expect("added");
        let target = &process.target;
        let frame_bytes = match (found.function_start, target.info.offsets.code_framesize) {
            (true, Some(at)) => {
                let words = target
                    .mem
                    .read_u32(found.code.wrapping_add(at))
                    .with_context(|| {
                        format!("reading co_framesize of the code at {:#x}", found.code)
                    })?;
                u64::from(words) * 8
            }
            _ => 0,
        };
        self.probes.watch(
            watch_key(pid, &found),
            &Watch {
                logpoint: index,
                program,
                point: point as u32,
                code: found.code,
                started: started_marker(target.info.layout.instruction, &found),
                frame_bytes,
                ..Watch::default()
            },
        )?;
        let mut links = Vec::new();
        for tid in crate::process::Tasks::read(pid)
            .host_tids()
            .collect::<Vec<_>>()
        {
            let error = match self.probes.set_watchpoint(tid, found.watched_byte()) {
                Ok(link) => {
                    links.push(link);
                    continue;
                }
                Err(WatchError::Gone { .. }) => continue,
                Err(e @ WatchError::NoSlot { .. }) => anyhow::anyhow!(
                    "too many line and function log points: {e}; each log point in a process takes one \
                     watchpoint in every thread: use at most 4 (fewer if a debugger holds some)"
                ),
                Err(e) => e.into(),
            };
            // Half-armed, it would hold debug registers of some threads for
            // nothing (a later rescan may go on without it).
            drop(links);
            self.probes.unwatch(watch_key(pid, &found), found.code)?;
            return Err(error);
        }
        let threads = links.len();
        log::debug!(
            "log point {}: watchpoint at {:#x} in PID {pid}",
            point + 1,
            found.watched_byte()
        );
        let kernel = if compiled.kernel_atoms.is_empty() {
            String::new()
        } else {
            format!(", kernel tests {}", compiled.kernel_atoms.join(" and "))
        };
        let name = match &self.points[point].agent {
            Some(a) => a.id.clone(),
            None => (point + 1).to_string(),
        };
        let line = format!(
            "log point {name} armed at {}:{} ({}{}) in PID {pid}: hardware watchpoint on {} thread{}{kernel}{}",
            found.filename,
            found.line,
            found.qualname,
            if found.function_start {
                ", function start"
            } else {
                ""
            },
            threads,
            if threads == 1 { "" } else { "s" },
            if found.places > 1 && !found.function_start {
                format!(
                    "; note: the line's code is in {} places (a loop test repeated at the loop's end, or a \
                     statement over several lines): it fires where execution enters the first",
                    found.places
                )
            } else {
                String::new()
            },
        );
        let armed = Armed {
            point,
            pid,
            found,
            compiled,
            template,
            printed: 0,
            condition_false: 0,
            condition_errors: 0,
            links,
            retired: false,
            removed: false,
            freed_at: None,
            program,
            done_at: None,
            free: false,
        };
        match self.armed.get_mut(index as usize) {
            Some(slot) => *slot = armed,
            None => self.armed.push(armed),
        }
        self.points[point].armed_once = true;
        Ok(line)
    }

    /// Takes the watchpoints off code objects that were freed (a reloaded
    /// module's old functions): their memory will hold other objects, whose
    /// every access would trap. Returns the lines to print.
    fn retire_freed(&mut self) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        for i in 0..self.armed.len() {
            let armed = &self.armed[i];
            if armed.retired || !self.probes.freed_code(armed.pid, armed.found.code)? {
                continue;
            }
            let armed = &mut self.armed[i];
            armed.links.clear();
            armed.retired = true;
            armed.freed_at = Some(Instant::now());
            self.unwatch_entry(i)?;
        }
        // A process that exits frees its code too: that is said once, as its
        // exit (see `note_exits`), not per code object.
        for armed in self.armed.iter_mut() {
            let Some(at) = armed.freed_at else {
                continue;
            };
            if at.elapsed() < FREED_REPORT_DELAY {
                continue;
            }
            armed.freed_at = None;
            if !crate::process::is_alive(armed.pid) {
                continue;
            }
            lines.push(format!(
                "log point {}: the code of {} at {}:{} in PID {} was freed while the process runs \
                 (a reloaded module?): its watchpoint is off",
                armed.point + 1,
                armed.found.qualname,
                armed.found.filename,
                armed.found.line,
                armed.pid
            ));
        }
        Ok(lines)
    }

    /// Says once of each watched process that exited, and takes off what
    /// was armed in it. Returns the lines to print.
    fn note_exits(&mut self) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        let changed: Vec<u32> = self
            .processes
            .iter()
            .filter(|(pid, p)| !p.exited && p.exe != crate::process::exe_of(**pid))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in changed {
            if crate::process::is_alive(pid) {
                self.exec_seen(pid);
            }
        }
        let exited: Vec<u32> = self
            .processes
            .iter()
            .filter(|(pid, p)| !p.exited && !crate::process::is_alive(**pid))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in exited {
            for armed in self.armed.iter_mut().filter(|a| a.pid == pid) {
                armed.freed_at = None;
                armed.retired = true;
            }
            let mut forked = false;
            if let Some(p) = self.processes.get_mut(&pid) {
                p.exited = true;
                forked = p.worker;
            }
            self.probes.forget(pid);
            // Forked workers come and go by the hundred: the summary
            // counts them.
            if !forked {
                lines.push(format!("PID {pid} exited"));
            }
        }
        self.drop_unused_watchpoints();
        Ok(lines)
    }

    /// Takes armed entry `i`'s kernel entries away, its watched address
    /// (`LOG_WATCH`) and its code object's free flag (`LOG_FREED`), each
    /// unless another entry still armed uses the same one (the same line
    /// armed again by a log point added since, another line of the same
    /// code object): an entry retired must not take a live one's away.
    fn unwatch_entry(&mut self, i: usize) -> anyhow::Result<()> {
        let a = &self.armed[i];
        let key = watch_key(a.pid, &a.found);
        let (pid, code) = (a.pid, a.found.code);
        let others = || {
            self.armed
                .iter()
                .enumerate()
                .filter(move |(j, b)| *j != i && !b.free && !b.retired)
                .map(|(_, b)| b)
        };
        let watch_used = others().any(|b| watch_key(b.pid, &b.found) == key);
        let code_used = others().any(|b| b.pid == pid && b.found.code == code);
        if !watch_used {
            self.probes.forget_watch(key)?;
        }
        if !code_used {
            self.probes.forget_code(pid, code)?;
        }
        Ok(())
    }

    /// The watched processes that processes alive now were forked from.
    fn live_origins(&self) -> BTreeSet<u32> {
        self.processes
            .values()
            .filter(|p| !p.exited)
            .filter_map(|p| p.origin)
            .collect()
    }

    /// Closes the watchpoints of log points retired (their process exited
    /// or exec'd) once no process forked from theirs runs: those hold
    /// inherited copies, which closing would take off.
    fn drop_unused_watchpoints(&mut self) {
        let live_origins = self.live_origins();
        for armed in self.armed.iter_mut() {
            if armed.retired && !live_origins.contains(&armed.pid) {
                armed.links.clear();
            }
        }
    }

    /// Reads the kernel's news of processes: children forked by watched
    /// processes, watched processes that exec'd.
    fn read_news(&mut self) {
        let news: Vec<_> = self
            .news
            .try_iter()
            .filter_map(|a| match a.news {
                crate::bpf::News::Process(event) => Some(event),
                _ => None,
            })
            .collect();
        for event in news {
            match event.kind {
                pyprobe_common::process::FORKED => self.add_forked(event.tgid, event.template),
                pyprobe_common::process::EXEC => self.exec_seen(event.tgid),
                _ => {}
            }
        }
        self.set_up_exec_pending();
    }

    /// Process `pid` exec'd: what was armed in it is gone with its old
    /// image (the kernel removed its watchpoints); it is set up again if
    /// it now runs Python.
    fn exec_seen(&mut self, pid: u32) {
        let Some(process) = self.processes.remove(&pid) else {
            return;
        };
        for armed in self.armed.iter_mut().filter(|a| a.pid == pid) {
            armed.retired = true;
            armed.freed_at = None;
        }
        self.probes.forget(pid);
        log::debug!("PID {pid} exec'd: set up again once it runs Python");
        // A worker that execs (a `spawn` worker, a subprocess) is not
        // reported if it runs something else.
        self.registry.exec_seen(pid, !process.worker);
    }

    /// Sets up the processes that exec'd, once their new interpreter has
    /// started; reports and drops a watched one that runs no Python.
    fn set_up_exec_pending(&mut self) {
        for pid in self.registry.execs_to_retry() {
            let tried = self.add(pid, true);
            if tried.is_err() {
                self.processes.remove(&pid);
            }
            match self.registry.exec_tried(pid, tried) {
                Some(ExecOutcome::Ready { announce, .. }) => {
                    log::debug!(
                        "PID {pid} set up after its exec; log points waiting: {:?}",
                        self.processes.get(&pid).map(|p| p.waiting.clone())
                    );
                    if let Some(p) = self.processes.get_mut(&pid) {
                        p.worker = !announce;
                    }
                }
                Some(ExecOutcome::Dropped {
                    line: Some(line), ..
                }) => {
                    eprintln!("pyprobe: {line}");
                }
                Some(ExecOutcome::Dropped { line: None, .. }) | None => {}
            }
        }
    }

    /// Under `--all`: sets up the Python processes not seen before. A
    /// process that cannot be set up is skipped with a line saying why.
    fn scan(&mut self) -> anyhow::Result<()> {
        // Forked children known first: they are not armed again.
        self.read_news();
        let processes = &self.processes;
        let pids = self.registry.new_pids(|pid| processes.contains_key(&pid));
        self.set_up_found(pids.into_iter().map(|pid| (pid, None)).collect())
    }

    /// Sets up processes found by a scan, some of them read already; one
    /// that cannot be set up is skipped with a line saying why.
    fn set_up_found(
        &mut self,
        found: Vec<(u32, Option<anyhow::Result<Attached>>)>,
    ) -> anyhow::Result<()> {
        for (pid, read) in found {
            let result = match read {
                Some(Ok(attached)) => self.add_attached(attached, true),
                Some(Err(e)) => Err(e),
                None => self.add(pid, true),
            };
            if let Err(e) = result {
                self.processes.remove(&pid);
                if e.downcast_ref::<super::locate::LocateError>()
                    .is_some_and(|l| l.is_wrong_spec())
                {
                    return Err(e.context(format!("in PID {pid}")));
                }
                let quiet = crate::selection::is_not_python(&e) || !crate::process::is_alive(pid);
                log::debug!("PID {pid} passed over: {e:#}");
                if !quiet {
                    eprintln!(
                        "pyprobe: not watching PID {pid}: {}",
                        crate::errors::one_line(e.as_ref())
                    );
                }
                self.registry.pass_over(pid);
            }
        }
        crate::process::release_images();
        Ok(())
    }

    /// Looks again for code not loaded before: for log points still
    /// waiting, and for armed ones whose file made new code objects since
    /// (a reloaded module, the file run again).
    fn rescan(&mut self) -> anyhow::Result<()> {
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        for pid in pids {
            self.rescan_one(pid)?;
        }
        Ok(())
    }

    /// [`Self::rescan`] for the young processes only, at every drain: a
    /// worker started after pyprobe arms as soon as it imports the file.
    fn rescan_young(&mut self) -> anyhow::Result<()> {
        let young: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, p)| !p.exited && !p.waiting.is_empty() && p.since.elapsed() < YOUNG)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in young {
            self.rescan_one(pid)?;
        }
        Ok(())
    }

    /// [`Self::rescan`] for process `pid`.
    fn rescan_one(&mut self, pid: u32) -> anyhow::Result<()> {
        if !crate::process::is_alive(pid) || !self.may_have_new_code(pid) {
            return Ok(());
        }
        for line in self.arm_new_code(pid) {
            eprintln!("pyprobe: {line}");
        }
        if self.processes[&pid].waiting.is_empty() {
            return Ok(());
        }
        let lines = match self.arm_waiting(pid, false) {
            Ok(lines) => lines,
            // Under --all a process may refuse (no free watchpoint): it is
            // left alone, the others go on.
            Err(e) if self.opts.all => {
                eprintln!(
                    "pyprobe: not watching PID {pid} any more: {}",
                    crate::errors::one_line(e.as_ref())
                );
                if let Some(p) = self.processes.get_mut(&pid) {
                    p.waiting.clear();
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for line in &lines {
            eprintln!("pyprobe: {line}");
        }
        // A process set up before its file was imported is announced when
        // a log point arms in it.
        if let Some(p) = self.processes.get_mut(&pid)
            && !lines.is_empty()
            && !p.announced
            && self.armed.iter().any(|a| a.pid == pid)
        {
            p.announced = true;
            eprintln!(
                "pyprobe: attached to PID {pid} (CPython {})",
                p.target.version
            );
        }
        Ok(())
    }

    /// Whether `pid` may hold code it did not when last looked at: a
    /// scan reads every module and class of the process (tens of ms for a
    /// web application), so it is done when a module was imported (the
    /// count of `sys.modules` changed), when code objects were freed (a
    /// reloaded module replaces its code), and at least every
    /// [`LOOK_AT_LEAST_EVERY`].
    fn may_have_new_code(&mut self, pid: u32) -> bool {
        let frees = self.probes.code_epoch(pid).unwrap_or(u64::MAX);
        let Some(process) = self.processes.get_mut(&pid) else {
            return false;
        };
        let modules = process.target.modules_count().unwrap_or(u64::MAX);
        // A young process may be running the body of a module already in
        // `sys.modules` (its `__main__`): looked at every quarter second.
        let every = if process.since.elapsed() < YOUNG {
            YOUNG_LOOK_EVERY
        } else {
            LOOK_AT_LEAST_EVERY
        };
        let due = match process.last_look {
            None => true,
            Some((f, m, at)) => f != frees || m != modules || at.elapsed() >= every,
        };
        if due {
            process.last_look = Some((frees, modules, Instant::now()));
        }
        due
    }

    /// Arms the log points already armed in `pid` on the code objects for
    /// their location that appeared since; returns the lines to print.
    fn arm_new_code(&mut self, pid: u32) -> Vec<String> {
        // Not of a log point taken off: its slot may serve another now.
        let points: BTreeSet<usize> = self
            .armed
            .iter()
            .filter(|a| a.pid == pid && !a.removed && !self.points[a.point].removed)
            .map(|a| a.point)
            .collect();
        let mut lines = Vec::new();
        for point in points {
            // A process busy changing its modules may be read half-way:
            // the next rescan sees it whole.
            let Ok(found) = self.processes[&pid]
                .target
                .find_code(&self.points[point].location)
            else {
                continue;
            };
            for f in found {
                let known = self.processes[&pid].refused.contains(&f.code)
                    || self.armed.iter().any(|a| {
                        a.pid == pid
                            && !a.retired
                            && a.point == point
                            && a.found.code == f.code
                            && a.found.unit_addr == f.unit_addr
                    });
                if known {
                    continue;
                }
                let code = f.code;
                match self.arm(point, pid, f) {
                    Ok(line) => lines.push(format!("{line} (new code object)")),
                    Err(e) => {
                        lines.push(format!(
                            "log point {}: new code object at {code:#x} in PID {pid} not armed: {}",
                            point + 1,
                            crate::errors::one_line(e.as_ref())
                        ));
                        if let Some(p) = self.processes.get_mut(&pid) {
                            p.refused.insert(code);
                        }
                    }
                }
            }
        }
        lines
    }

    /// Prints every waiting hit.
    fn drain(&mut self) -> anyhow::Result<()> {
        let mut hits = Vec::new();
        self.probes.drain(|bytes| {
            if let Some(h) = hit::parse(bytes) {
                hits.push(h);
            }
        });
        let agent = self.points.iter().any(|p| p.agent.is_some());
        for h in hits {
            if self.opts.count.is_some_and(|n| self.printed >= n) {
                break;
            }
            let Some(armed) = self.armed.get_mut(h.logpoint as usize) else {
                continue;
            };
            // Hits of a log point taken off, or past its count, that were
            // in the ring already.
            let Some(point) = self.points.get(armed.point) else {
                continue;
            };
            if armed.removed
                || point.removed
                || point
                    .agent
                    .as_ref()
                    .is_some_and(|a| a.count.is_some_and(|n| point.printed >= n))
            {
                continue;
            }
            // A forked child's hit is read in its own memory.
            let owner = if self.processes.contains_key(&h.tgid) {
                h.tgid
            } else {
                armed.pid
            };
            let Some(process) = self.processes.get_mut(&owner) else {
                continue;
            };
            let mut type_name = |ty: u64| {
                process
                    .type_names
                    .entry(ty)
                    .or_insert_with(|| {
                        process
                            .target
                            .type_name(ty)
                            .unwrap_or_else(|_| "object".to_owned())
                    })
                    .clone()
            };
            let values = HitValues {
                values: armed
                    .compiled
                    .wanted
                    .iter()
                    .zip(hit::values(&h))
                    .map(|(w, v)| (w.clone(), hit::captured(w, v, &mut type_name)))
                    .collect(),
            };
            if let Some(c) = &point.condition {
                match eval::truth(c, &values) {
                    Ok(true) => {}
                    Ok(false) => {
                        armed.condition_false += 1;
                        continue;
                    }
                    Err(_) => {
                        armed.condition_errors += 1;
                        continue;
                    }
                }
            }
            let message = eval::render(&armed.template, &values, self.opts.redact);
            let namespace_tid = process.namespace_tid(h.tgid, h.tid);
            // Frames that are not Python code (3.12+ entry frames) are
            // left out. The innermost frame has not stored its position
            // yet when the probed instruction is read: its line is the log
            // point's.
            let stack: Vec<serde_json::Value> = hit::stack(&h)
                .iter()
                .enumerate()
                .filter_map(|(i, f)| {
                    let (frame, _) = process
                        .target
                        .code_frame(f.code, f.instruction)
                        .ok()
                        .flatten()?;
                    let line = if i == 0 {
                        Some(i64::from(armed.found.line))
                    } else {
                        frame.line.map(i64::from)
                    };
                    Some(json!({
                        "function": frame.function,
                        "file": frame.filename,
                        "line": line,
                    }))
                })
                .collect();
            let wall = self.clock.wall_ns(h.time_ns);
            let found = &armed.found;
            if self.opts.json {
                let captured: serde_json::Map<String, serde_json::Value> = values
                    .values
                    .iter()
                    .map(|(w, v)| {
                        let key = if w.len {
                            format!("len({})", w.path)
                        } else {
                            w.path.to_string()
                        };
                        let shown = if self.opts.redact && eval::is_secret(&w.path) {
                            json!("<redacted>")
                        } else {
                            captured_json(v)
                        };
                        (key, shown)
                    })
                    .collect();
                let mut obj = json!({
                    "time": wall as f64 / 1e9,
                    "pid": h.tgid,
                    "tid": h.tid,
                    "file": found.filename,
                    "line": found.line,
                    "function": found.qualname,
                    "logpoint": armed.point + 1,
                    "message": message,
                    "values": captured,
                });
                if let Some(ns) = namespace_tid {
                    obj["namespace_tid"] = json!(ns);
                }
                if let Some(c) = &process.container {
                    obj["container"] = json!(c);
                }
                if let Some(a) = &point.agent {
                    obj["id"] = json!(a.id);
                    // The slot, not the id users know it by.
                    if let Some(o) = obj.as_object_mut() {
                        o.remove("logpoint");
                    }
                    if process.container.is_none() {
                        obj["container"] = serde_json::Value::Null;
                    }
                }
                if self.opts.stack {
                    obj["stack"] = serde_json::Value::Array(stack);
                }
                // One write per hit: a reader following the file (or a
                // pipe) never sees half a line.
                if let Err(e) = self.out.write_all(format!("{obj}\n").as_bytes()) {
                    if !agent {
                        return Err(e.into());
                    }
                    self.unwritten += 1;
                    continue;
                }
            } else {
                let mut text = format!(
                    "{} {} {} {}:{} {}\n",
                    clock_text(wall),
                    h.tgid,
                    thread_id_text(h.tid, namespace_tid),
                    found.filename,
                    found.line,
                    message
                );
                for f in &stack {
                    if let Some(function) = f.get("function") {
                        let line = f["line"]
                            .as_i64()
                            .map_or_else(|| "?".to_owned(), |l| l.to_string());
                        text.push_str(&format!(
                            "    {} ({}:{line})\n",
                            function.as_str().unwrap_or("?"),
                            f["file"].as_str().unwrap_or("?"),
                        ));
                    }
                }
                self.out.write_all(text.as_bytes())?;
            }
            armed.printed += 1;
            let point = armed.point;
            self.points[point].printed += 1;
            self.printed += 1;
        }
        if let Err(e) = self.out.flush() {
            if !agent {
                return Err(e.into());
            }
            self.unwritten += 1;
        }
        Ok(())
    }

    /// Prints what happened at each log point.
    fn summary(&self, elapsed: Duration) -> anyhow::Result<()> {
        for (index, armed) in self.armed.iter().enumerate() {
            let c: LogCounters = self.probes.counters(index as u32)?;

            eprintln!(
                "pyprobe: log point {} {}:{} in PID {}{}{}: {} printed; {} runs in {:.1} s; dropped: {} by the condition \
                 in the kernel, {} by the condition in userspace, {} condition errors, {} over the rate limit ({}), \
                 {} after --count, {} lost (ring buffer full); {} watchpoint hits were not runs ({} accesses from \
                 outside the eval loop, {} from other frames, {} second accesses of a run)",
                armed.point + 1,
                armed.found.filename,
                armed.found.line,
                armed.pid,
                if self.processes.get(&armed.pid).is_some_and(|p| p.exited) {
                    " (exited since)"
                } else if armed.retired {
                    " (code object freed since)"
                } else {
                    ""
                },
                match self.forks.get(&armed.pid) {
                    Some(n) => format!(
                        " and {n} process{} forked from it",
                        if *n == 1 { "" } else { "es" }
                    ),
                    None => String::new(),
                },
                armed.printed,
                c.hits - c.foreign - c.other_frame - c.repeats,
                elapsed.as_secs_f64(),
                c.condition_false,
                armed.condition_false,
                armed.condition_errors,
                c.rate_limited,
                if self.opts.rate == 0 {
                    "none set".to_owned()
                } else {
                    format!("{}/s", self.opts.rate)
                },
                c.over_count,
                c.lost,
                c.foreign + c.other_frame + c.repeats,
                c.foreign,
                c.other_frame,
                c.repeats,
            );
        }
        // A log point that never armed is most likely a wrong path: say so
        // once per log point (under --all, not once per unrelated process),
        // and end with an error.
        for (pid, process) in self.processes.iter().filter(|(_, p)| !p.worker) {
            for (index, (count, last)) in &process.scan_errors {
                eprintln!(
                    "pyprobe: log point {} in PID {pid}: {count} looks for its code failed (last: {last})",
                    index + 1
                );
            }
        }
        let mut never = Vec::new();
        for (index, point) in self.points.iter().enumerate() {
            let waiting_in: Vec<u32> = self
                .processes
                .iter()
                .filter(|(_, p)| p.waiting.contains(&index))
                .map(|(pid, _)| *pid)
                .collect();
            let armed_somewhere = point.armed_once;
            // Where every process it waited in exited, the path may be right:
            // said, but not an error.
            let all_exited = !self.opts.all
                && if waiting_in.is_empty() {
                    !self.gone_during_setup.is_empty()
                } else {
                    waiting_in
                        .iter()
                        .all(|pid| self.processes.get(pid).is_some_and(|p| p.exited))
                };
            if !armed_somewhere && all_exited && waiting_in.is_empty() {
                let gone: Vec<u32> = self.gone_during_setup.iter().copied().collect();
                eprintln!(
                    "pyprobe: log point {} ({}) never armed: {} exited while pyprobe set {} up",
                    index + 1,
                    point.spec.at,
                    pid_list(&gone),
                    if gone.len() == 1 { "it" } else { "them" },
                );
            } else if !armed_somewhere && all_exited {
                eprintln!(
                    "pyprobe: log point {} ({}) never armed: {} exited before {} was loaded",
                    index + 1,
                    point.spec.at,
                    pid_list(&waiting_in),
                    point.location.file_or_module(),
                );
            } else if !armed_somewhere {
                let r#where = if self.opts.all {
                    "by any Python process".to_owned()
                } else {
                    format!("in {}", pid_list(&waiting_in))
                };
                eprintln!(
                    "pyprobe: log point {} ({}) never armed: {} was not loaded {where}",
                    index + 1,
                    point.spec.at,
                    point.location.file_or_module(),
                );
                never.push(index + 1);
            } else if !self.opts.all && !waiting_in.is_empty() {
                let (gone, alive): (Vec<u32>, Vec<u32>) = waiting_in
                    .iter()
                    .partition(|pid| self.processes.get(pid).is_some_and(|p| p.exited));
                let file = point.location.file_or_module();
                if !alive.is_empty() {
                    eprintln!(
                        "pyprobe: log point {} ({}) never armed in {}: {file} was not loaded there",
                        index + 1,
                        point.spec.at,
                        pid_list(&alive),
                    );
                }
                if !gone.is_empty() {
                    eprintln!(
                        "pyprobe: log point {} ({}) never armed in {}: exited before {file} was loaded",
                        index + 1,
                        point.spec.at,
                        pid_list(&gone),
                    );
                }
            }
        }
        let (no_process, no_watch, unreadable) = self.probes.losses()?;
        if no_process + no_watch + unreadable > 0 {
            eprintln!(
                "pyprobe: {no_process} hits in processes not set up, {no_watch} at addresses not watched, \
                 {unreadable} with unreadable frames"
            );
        }
        if !never.is_empty() {
            let which: Vec<String> = never.iter().map(usize::to_string).collect();
            bail!(
                "log point{} {} never armed: check the path or module name in --at (a file matches by the end of its path)",
                if never.len() == 1 { "" } else { "s" },
                which.join(", ")
            );
        }
        Ok(())
    }
}

/// `PID 12` or `PIDs 12, 13`.
/// Where the kernel keeps what is armed on `found` in process `pid`.
fn watch_key(pid: u32, found: &Found) -> WatchKey {
    WatchKey {
        tgid: pid,
        _pad: 0,
        addr: found.watched_byte(),
    }
}

fn pid_list(pids: &[u32]) -> String {
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    match pids.len() {
        0 => "the watched processes".to_owned(),
        1 => format!("PID {}", list[0]),
        _ => format!("PIDs {}", list.join(", ")),
    }
}

/// Loaded files (for a file location) or modules (for a module location)
/// with a name like the one a waiting log point asks for.
fn similar_loaded(location: &Location, modules: &[(String, Option<String>)]) -> Vec<String> {
    match location {
        Location::FileLine { file, .. } | Location::FileFunction { file, .. } => {
            similar_names(file, modules.iter().filter_map(|(_, f)| f.as_deref()))
        }
        Location::ModuleQualname { module, .. } => {
            similar_names(module, modules.iter().map(|(m, _)| m.as_str()))
        }
    }
}

/// Without `--msg`: the function's arguments at a function start, else its
/// first locals (at most 8), as `name=value`.
fn default_template(found: &Found) -> Vec<Segment> {
    let count = if found.function_start {
        (found.argcount as usize).min(8)
    } else {
        found.varnames.len().min(8)
    };
    let mut out = Vec::new();
    for (i, name) in found.varnames.iter().take(count).enumerate() {
        if i > 0 {
            out.push(Segment::Text(" ".into()));
        }
        out.push(Segment::Text(format!("{name}=")));
        out.push(Segment::Value(Expr::Path(expr::Path {
            root: name.clone(),
            steps: Vec::new(),
        })));
    }
    out
}

/// A captured value as JSON.
fn captured_json(v: &Captured) -> serde_json::Value {
    match v {
        Captured::None => serde_json::Value::Null,
        Captured::Bool(b) => json!(b),
        Captured::Int(i) => match i64::try_from(*i) {
            Ok(i) => json!(i),
            Err(_) => json!(i.to_string()),
        },
        Captured::Float(f) => json!(f),
        Captured::Str { text, len } => {
            if (text.chars().count() as u64) < *len {
                json!({ "str": text, "len": len, "truncated": true })
            } else {
                json!(text)
            }
        }
        Captured::Other { type_name, address } => {
            json!({ "type": type_name, "address": format!("{address:#x}") })
        }
        Captured::Missing(why) => json!({ "missing": why }),
    }
}

/// What the frame's instruction field holds once the watched instruction
/// has started in the frame (see [`Watch::started`]), or 0 where that
/// cannot tell a second read of a run from the first: up to 3.10 the eval
/// loop stores `f_lasti` before reading the opcode, and from 3.13 a new
/// frame starts with `instr_ptr` at unit 0.
fn started_marker(model: InstructionModel, found: &Found) -> u64 {
    match model {
        InstructionModel::LastiBytes | InstructionModel::LastiUnits => 0,
        InstructionModel::PrevInstr => found.unit_addr,
        InstructionModel::InstrPtr if found.instr_index == 0 => 0,
        InstructionModel::InstrPtr => found.unit_addr,
    }
}

/// What the kernel needs to know about one process.
fn process_config(
    target: &Target<ProcessMemory>,
    image: &crate::elf::ElfImage,
) -> anyhow::Result<LogProcess> {
    let o = &target.info.offsets;
    let layout = &target.info.layout;
    let interp = target
        .interpreter
        .as_ref()
        .context("a live target knows its interpreter")?;
    let eval = crate::interp_binary::start_sites::eval_loop_code(image);
    if eval.is_empty() {
        bail!("the interpreter has no _PyEval_EvalFrameDefault symbol");
    }
    if eval.len() > EVAL_RANGES {
        bail!(
            "_PyEval_EvalFrameDefault is split in {} pieces; pyprobe handles {EVAL_RANGES}",
            eval.len()
        );
    }
    let mut eval_code = [0u64; 2 * EVAL_RANGES];
    for (i, r) in eval.iter().enumerate() {
        eval_code[2 * i] = interp.load_bias.wrapping_add(r.start);
        eval_code[2 * i + 1] = interp.load_bias.wrapping_add(r.end);
    }
    let known = &target.known;
    let ty = |name: &str| -> anyhow::Result<u64> {
        known
            .types
            .get(name)
            .copied()
            .with_context(|| format!("the interpreter has no {name} symbol"))
    };
    Ok(LogProcess {
        frame_localsplus: o.frame_localsplus,
        long_tag: u64::from(layout.long == LongModel::LvTag),
        none: known.none,
        true_: known.true_,
        false_: known.false_,
        type_int: ty("PyLong_Type")?,
        type_float: ty("PyFloat_Type")?,
        type_str: ty("PyUnicode_Type")?,
        type_dict: ty("PyDict_Type")?,
        type_list: ty("PyList_Type")?,
        type_tuple: ty("PyTuple_Type")?,
        unicode_ascii_data: o.unicode_ascii_data,
        unicode_compact_data: o.unicode_compact_data,
        tuple_items: o.tuple_items,
        dict_sized: u64::from(layout.dict_keys == crate::python::offsets::DictKeysModel::Sized),
        dict_values_items: o.dict_values_items.unwrap_or(0),
        instance_model: match layout.instance_dict {
            InstanceDictModel::TypeOffset => 0,
            InstanceDictModel::ValuesOrDict => 1,
            InstanceDictModel::TaggedDictOrValues => 2,
            InstanceDictModel::InlineValues => 3,
        },
        heaptype_cached_keys: o.heaptype_cached_keys,
        eval_code,
        frame_register: crate::interp_binary::start_sites::eval_frame_register(
            image,
            layout,
            o.frame_instruction,
        )
        .map_or(NO_REGISTER, |r| u64::from(r.bpf_index())),
        tstate_datastack_top: o.tstate_datastack_top.unwrap_or(0),
    })
}
