//! `pyprobe record` and `pyprobe top`: statistical profiling of one process
//! or every Python process, with stacks walked in the kernel.
//!
//! The flow of a sample:
//! 1. [`Session::add`] builds the process's facts
//!    ([`crate::kabi::py_process`]) and maps its threads to thread states
//!    ([`ThreadMapper`]); both go into BPF maps.
//! 2. The `sample_cpu` program (probe-ebpf/src/sample.rs) runs on every
//!    CPU-clock tick of every CPU; for a mapped thread it walks the frame
//!    chain and sends (code object, instruction word) per frame.
//! 3. [`Session::drain`] takes samples from the ring buffer every
//!    [`DRAIN_INTERVAL`]; [`stacks::Profile`] names each new frame once
//!    (reading the code object while the process still lives) and counts
//!    samples per distinct stack.
//! 4. At the end `record` writes folded stacks, a flamegraph or a
//!    speedscope file ([`output`]); `top` prints the hottest functions
//!    every interval.

pub mod idle;
pub mod output;
pub mod stacks;
mod top;
pub mod walk;

pub use top::{TopLine, TopOptions, TopReport, top};

use std::{
    collections::HashMap,
    ops::ControlFlow,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;

use self::{
    idle::{IDLE_PERIOD, IdleSampler},
    output::Roots,
    stacks::{Keep, Process, Profile},
};
use crate::{
    bpf::{SampleLosses, Sampler},
    live, process,
    python::threads::ThreadMapper,
    registry::ExecOutcome,
};

/// How often samples are taken from the ring buffer.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
/// How often thread lists are re-read (sooner when the kernel saw a thread
/// it did not know).
const THREADS_INTERVAL: Duration = Duration::from_secs(1);
/// Highest sampling rate accepted.
pub const MAX_RATE: u64 = 20_000;

/// What to profile and how (shared by `record` and `top`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProfileOptions {
    /// Processes to sample.
    pub pids: Vec<u32>,
    /// Sample every Python process, including ones started later.
    pub all: bool,
    /// With `all`: which processes (`--name`, `--container`); the others
    /// are left alone.
    pub select: crate::selection::Selector,
    /// Samples per second of CPU time (per thread).
    pub rate: u64,
    /// Stop after this long (`None`: Ctrl-C, or every target exited).
    #[serde(with = "crate::job::opt_seconds")]
    pub duration: Option<Duration>,
    /// Also sample threads that are off CPU (sleeping, waiting for I/O or
    /// the GIL), read from userspace at the same rate.
    pub idle: bool,
    /// Keep only samples of threads holding the GIL.
    pub gil: bool,
    /// Keep threads apart.
    pub threads: bool,
}

/// Output format of `record`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Flamegraph SVG.
    Flamegraph,
    /// speedscope JSON (open at speedscope.app).
    Speedscope,
    /// Folded stacks text (`a;b;c COUNT`), for flamegraph.pl, inferno and friends.
    Folded,
    /// pprof `profile.proto`, gzip'd: for go tool pprof, Parca, Pyroscope, speedscope.
    Pprof,
    /// Chrome trace-event JSON: each thread's functions over time (Perfetto, chrome://tracing, speedscope).
    Chrometrace,
}

impl Format {
    /// The format a file name's extension names, if it names one:
    /// `.svg`, `.json` (speedscope), `.trace.json`, `.txt`/`.folded`,
    /// `.pb.gz`/`.pb`/`.pprof`.
    pub fn of_path(path: &std::path::Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let ends = |suffix: &str| name.ends_with(suffix);
        Some(if ends(".svg") {
            Format::Flamegraph
        } else if ends(".trace.json") {
            Format::Chrometrace
        } else if ends(".json") {
            Format::Speedscope
        } else if ends(".txt") || ends(".folded") {
            Format::Folded
        } else if ends(".pb.gz") || ends(".pb") || ends(".pprof") {
            Format::Pprof
        } else {
            return None;
        })
    }

    /// The file name extension of this format.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Flamegraph => "svg",
            Format::Speedscope => "json",
            Format::Folded => "txt",
            Format::Pprof => "pb.gz",
            Format::Chrometrace => "trace.json",
        }
    }
}

/// The processes being sampled (the agent drives one too).
pub(crate) struct Session {
    pub(crate) sampler: Sampler,
    /// The engine the sampler runs over.
    _engine: crate::engine::Engine,
    pub(crate) processes: HashMap<u32, Process>,
    mappers: HashMap<u32, ThreadMapper>,
    /// Python threads of each live process: (thread id, thread state).
    threads: HashMap<u32, Vec<(u32, u64)>>,
    pub(crate) roots: Roots,
    /// Processes found and passed over (`--all`).
    registry: crate::registry::Registry,
    pub(crate) profile: Profile,
    keep: Keep,
    idle: bool,
    /// Off-CPU accounting (`--idle`).
    idle_sampler: IdleSampler,
    /// Samples per second.
    rate: u64,
    /// `unknown_thread` count when threads were last re-read.
    unknown_seen: u64,
    /// Plain `--all`: per-file probes serve every process.
    whole_files: bool,
    /// Keep the names of exited processes and their threads for the
    /// output (a command's profile names them at the end); the agent
    /// forgets them, so its memory follows the live processes.
    pub(crate) keep_exited_names: bool,
    /// The threads named in each process (see `keep_exited_names`).
    named_tids: HashMap<u32, Vec<u32>>,
    /// When sampling began, on the clock of the samples' times
    /// ([`crate::kernel::monotonic_ns`]).
    pub(crate) started_ns: u64,
    /// Sampling is on: a process set up now started while it was.
    sampling: bool,
    /// Under `--all` (a selection or not): the kernel's news of children
    /// forked by sampled processes, set up at once rather than by the
    /// next scan (up to a second later). `None` when forks cannot be
    /// followed (said at the start) or without `--all`.
    children: Option<std::sync::mpsc::Receiver<crate::engine::Arrival>>,
    /// Processes that started while sampling and were set up later (up to
    /// a second later): time the profile does not hold.
    late: Late,
}

impl Session {
    /// A session over `engine` (made for sampling); nothing sampled yet.
    pub(crate) fn new(
        engine: &crate::engine::Engine,
        opts: &ProfileOptions,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            sampler: Sampler::new(engine.object())?,
            _engine: engine.clone(),
            processes: HashMap::new(),
            mappers: HashMap::new(),
            threads: HashMap::new(),
            roots: Roots {
                processes: opts.all || opts.pids.len() > 1,
                ..Roots::default()
            },
            registry: crate::registry::Registry::new(opts.select.clone()),
            profile: Profile::default(),
            keep: Keep {
                threads: opts.threads,
                gil_only: opts.gil,
            },
            idle: opts.idle,
            idle_sampler: IdleSampler::default(),
            rate: opts.rate,
            unknown_seen: 0,
            whole_files: opts.all && opts.select.is_everything(),
            keep_exited_names: true,
            named_tids: HashMap::new(),
            started_ns: crate::kernel::monotonic_ns(),
            sampling: false,
            late: Late::default(),
            children: if opts.all {
                match engine.follow_forks() {
                    None => Some(engine.news()),
                    Some(why) => {
                        eprintln!(
                            "pyprobe: warning: children of sampled processes are picked up at the next scan, not as they fork ({why})"
                        );
                        None
                    }
                }
            } else {
                None
            },
        })
    }

    /// Sets up one process; returns a line describing it.
    pub(crate) fn add(&mut self, pid: u32) -> anyhow::Result<String> {
        let attachment = crate::registry::attach(pid)?;
        let target = attachment.reader();
        let facts = attachment.facts()?;
        let mut mapper = ThreadMapper::default();
        let tasks = process::Tasks::read(pid);
        let threads = mapper.map_tasks(&tasks, &target)?;
        self.sampler
            .configure(pid, &facts, self.children.is_some())?;
        // Before any sample: a free that went unseen would leave a stale
        // name trusted.
        let watched = match attachment.code_freed_site() {
            Some(offset) => {
                self.sampler.object().watch_code_frees(
                    attachment.interpreter(),
                    offset,
                    pid,
                    self.whole_files,
                )?;
                true
            }
            None => false,
        };
        self.sampler.set_threads(pid, &threads)?;
        let python = threads.iter().filter(|(_, t)| *t != 0).count();
        let binary = target
            .interpreter
            .as_ref()
            .map(|i| i.binary.display().to_string())
            .unwrap_or_default();
        let line = format!(
            "PID {pid}: CPython {} ({binary}), {python} Python thread{} of {}, offsets from {}{}",
            target.version,
            if python == 1 { "" } else { "s" },
            threads.len(),
            target.offsets_source,
            if mapper.knows_threads(&target) {
                ""
            } else {
                " (threads could not be matched to kernel thread ids: no samples)"
            }
        );
        self.roots
            .process_names
            .insert(pid, command_line(pid).unwrap_or_default());
        self.note_threads(pid, &threads, &tasks);
        self.mappers.insert(pid, mapper);
        self.processes
            .insert(pid, Process::new(attachment, target, watched));
        Ok(line)
    }

    /// Remembers a process's Python threads (for `--idle`) and the names
    /// of threads not seen before (for `--threads`).
    fn note_threads(&mut self, pid: u32, threads: &[(u32, u64)], tasks: &process::Tasks) {
        for &(tid, _) in threads {
            if self.roots.thread_names.contains_key(&tid) {
                continue;
            }
            if let Some(ns) = tasks.ns_of(tid) {
                self.roots.namespace_tids.insert(tid, ns);
            }
            if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")) {
                self.roots.thread_names.insert(tid, comm.trim().to_owned());
            }
            self.named_tids.entry(pid).or_default().push(tid);
        }
        let python: Vec<(u32, u64)> = threads.iter().copied().filter(|(_, t)| *t != 0).collect();
        self.idle_sampler.retain(pid, &python);
        self.threads.insert(pid, python);
    }

    /// Re-reads every live process's thread list; forgets exited ones
    /// (their names stay for the output); sets up again those that
    /// exec'd, once their new image runs an interpreter.
    pub(crate) fn refresh_threads(&mut self) {
        let pids: Vec<u32> = self.threads.keys().copied().collect();
        for pid in pids {
            let alive = process::is_alive(pid);
            if alive
                && self
                    .processes
                    .get(&pid)
                    .is_some_and(|p| !p.attachment.is_current())
            {
                // It exec'd: the kernel forgot it; what was read of its
                // old image is read again from the new one.
                self.stop_sampling(pid);
                self.registry.exec_seen(pid, true);
                continue;
            }
            if !alive {
                self.stop_sampling(pid);
                let named = self.named_tids.remove(&pid).unwrap_or_default();
                if !self.keep_exited_names {
                    self.roots.process_names.remove(&pid);
                    for tid in named {
                        self.roots.thread_names.remove(&tid);
                        self.roots.namespace_tids.remove(&tid);
                    }
                }
                continue;
            }
            let (Some(process), Some(mapper)) =
                (self.processes.get(&pid), self.mappers.get_mut(&pid))
            else {
                continue;
            };
            // A thread list read while it changes can fail; the next
            // refresh tries again.
            let tasks = process::Tasks::read(pid);
            if let Ok(threads) = mapper.map_tasks(&tasks, &process.target)
                && self.sampler.set_threads(pid, &threads).is_ok()
            {
                self.note_threads(pid, &threads, &tasks);
            }
        }
        for pid in self.registry.execs_to_retry() {
            let tried = self.add(pid);
            match self.registry.exec_tried(pid, tried) {
                Some(ExecOutcome::Ready { value: line, .. }) => {
                    eprintln!("pyprobe: PID {pid} exec'd: sampling {line}");
                }
                Some(ExecOutcome::Dropped {
                    line: Some(line), ..
                }) => {
                    eprintln!("pyprobe: {line}");
                }
                _ => {}
            }
        }
        crate::process::release_images();
    }

    /// Stops sampling process `pid` (it exited or exec'd) and forgets
    /// what was read of it; the names the output needs stay.
    fn stop_sampling(&mut self, pid: u32) {
        self.threads.remove(&pid);
        self.processes.remove(&pid);
        self.mappers.remove(&pid);
        self.idle_sampler.forget(pid);
        let _ = self.sampler.forget(pid);
    }

    /// Under `--all`: sets up Python processes not seen before.
    pub(crate) fn scan(&mut self) {
        let processes = &self.processes;
        let pids = self.registry.new_pids(|pid| processes.contains_key(&pid));
        self.set_up_new(pids);
    }

    /// Sets up the children the kernel said sampled processes forked, if
    /// the selection takes them; returns how many it tried.
    pub(crate) fn take_children(&mut self) -> usize {
        let Some(news) = &self.children else {
            return 0;
        };
        let forked: Vec<u32> = news
            .try_iter()
            .filter_map(|a| match a.news {
                crate::bpf::News::Process(e) if e.kind == pyprobe_common::process::CHILD => {
                    Some(e.tgid)
                }
                _ => None,
            })
            .collect();
        let pids: Vec<u32> = forked
            .into_iter()
            .filter(|&pid| !self.processes.contains_key(&pid) && self.registry.takes_new(pid))
            .collect();
        let n = pids.len();
        self.set_up_new(pids);
        n
    }

    /// Sets up processes found after the start, counting what they ran
    /// before.
    fn set_up_new(&mut self, pids: Vec<u32>) {
        for pid in pids {
            let result = self.add(pid);
            if result.is_ok()
                && self.sampling
                && let Some(cpu) = crate::process::cpu_seconds(pid)
            {
                self.late.processes += 1;
                self.late.cpu_seconds += cpu;
            }
            self.registry.note_scanned(pid, result, "sampling");
        }
        crate::process::release_images();
    }

    /// Takes the waiting samples; re-reads thread lists if the kernel saw
    /// threads it did not know.
    pub(crate) fn drain(&mut self) -> anyhow::Result<()> {
        let Self {
            sampler,
            processes,
            profile,
            keep,
            ..
        } = self;
        sampler.drain(|bytes| profile.add_kernel_sample(bytes, processes, *keep));
        let unknown = self.sampler.unknown_threads()?;
        if unknown != self.unknown_seen {
            self.unknown_seen = unknown;
            self.refresh_threads();
        }
        Ok(())
    }

    /// `--idle`: the samples each Python thread is owed for the time it
    /// spent off CPU since the last call (see [`idle`]).
    fn sample_idle(&mut self) {
        for (&pid, threads) in &self.threads {
            let Some(process) = self.processes.get(&pid) else {
                continue;
            };
            for &(tid, tstate) in threads {
                if let Some((frames, n)) =
                    self.idle_sampler
                        .account(&process.target, pid, tid, tstate, self.rate)
                {
                    self.profile
                        .add_idle_samples(pid, tid, &frames, self.keep, n);
                }
            }
        }
    }

    /// Starts sampling threads off CPU (`--idle`) from now on.
    fn start_idle(&mut self) {
        self.idle = true;
        // The first reads only set each thread's baseline.
        self.sample_idle();
    }

    fn any_alive(&self) -> bool {
        self.processes.keys().any(|&pid| process::is_alive(pid)) || self.registry.any_exec_pending()
    }

    /// Ticks of the kernel that gave no sample, by reason.
    pub(crate) fn losses(&self) -> anyhow::Result<SampleLosses> {
        Ok(self.sampler.losses()?)
    }
}

/// A process's command line, shortened for labels.
fn command_line(pid: u32) -> Option<String> {
    let mut line = crate::selection::command_line(pid)?;
    if line.chars().count() > 80 {
        line = line.chars().take(77).collect::<String>() + "...";
    }
    Some(line)
}

/// Sets up the session: targets checked, probes loaded, processes added,
/// sampling started.
fn start(opts: &ProfileOptions, what: &str) -> anyhow::Result<Session> {
    for &pid in &opts.pids {
        process::find_interpreter(pid)?;
    }
    let engine = crate::engine::Engine::load(crate::bpf::Features {
        sample_rate: Some(opts.rate),
        wide: opts.all,
        ..Default::default()
    })?;
    let mut session = Session::new(&engine, opts)?;
    for &pid in &opts.pids {
        let line = session
            .add(pid)
            .with_context(|| format!("setting up PID {pid}"))?;
        eprintln!("pyprobe: sampling {line}");
    }
    if opts.all {
        session.scan();
        eprintln!(
            "pyprobe: sampling {} (new ones are picked up every second)",
            opts.select.describe()
        );
        if let Some(note) = opts.select.no_container_yet() {
            eprintln!("pyprobe: {note}");
        }
    }
    session.sampler.start(opts.rate)?;
    session.sampling = true;
    // A launched program goes on now that it is sampled.
    crate::launch::release_held()?;
    eprintln!(
        "pyprobe: {what} at {} Hz{}; Ctrl-C to stop",
        opts.rate,
        if opts.idle { " (idle threads too)" } else { "" }
    );
    Ok(session)
}

/// Processes that started while sampling and were set up after their
/// start (a second at most later under a selection).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Late {
    /// How many.
    pub processes: u64,
    /// The CPU seconds they had used when set up, all together.
    pub cpu_seconds: f64,
}

/// What happened during a run, for the closing lines (and `top --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Seconds sampled.
    pub seconds: f64,
    /// Samples kept.
    pub samples: u64,
    /// Of which off CPU.
    pub idle_samples: u64,
    /// Of which the thread held the GIL.
    pub gil_samples: u64,
    /// Of which truncated or torn.
    pub truncated: u64,
    /// Distinct stacks.
    pub stacks: usize,
    /// Ticks in the kernel that gave no sample, by reason.
    pub kernel: SampleLosses,
    /// Samples or frames dropped in userspace, by reason.
    pub dropped: stacks::Dropped,
    /// Processes started while sampling and set up after (not in the
    /// profile before).
    pub late: Late,
    /// The sampling rate.
    pub rate: u64,
}

impl Summary {
    fn of(session: &Session, started: Instant) -> anyhow::Result<Self> {
        let p = &session.profile;
        Ok(Self {
            seconds: started.elapsed().as_secs_f64(),
            samples: p.samples,
            idle_samples: p.idle_samples,
            gil_samples: p.gil_samples,
            truncated: p.truncated + p.torn,
            stacks: p.stacks.len(),
            kernel: session.losses()?,
            late: session.late,
            rate: session.rate,
            dropped: p.dropped,
        })
    }

    /// One line for people.
    fn line(&self) -> String {
        let k = &self.kernel;
        let d = &self.dropped;
        format!(
            "{} samples in {:.1} s ({} off CPU, {} holding the GIL, {} truncated), {} distinct stacks; \
             not sampled: {} on threads not yet known, {} on non-Python threads, {} outside Python code, \
             {} unreadable, {} lost (ring buffer full), {} skipped by the kernel, {} unreadable frames, {} of unknown processes, \
             {} not holding the GIL (--gil)",
            self.samples,
            self.seconds,
            self.idle_samples,
            self.gil_samples,
            self.truncated,
            self.stacks,
            k.unknown_thread,
            k.not_python,
            k.no_frame,
            k.unreadable,
            k.ring_full,
            k.recursion_misses,
            d.unreadable_frames,
            d.unknown_process,
            d.not_holding_gil,
        ) + &self.late_text()
    }

    /// What processes picked up after their start cost the profile, if
    /// any were.
    fn late_text(&self) -> String {
        let Late {
            processes: n,
            cpu_seconds: cpu,
        } = self.late;
        if n == 0 {
            return String::new();
        }
        format!(
            "; {n} process{} started while sampling had run {cpu:.2} s of CPU before {} picked up \
             (about {} samples at {} Hz not in the profile)",
            if n == 1 { "" } else { "es" },
            if n == 1 { "it was" } else { "they were" },
            (cpu * self.rate as f64).round() as u64,
            self.rate,
        )
    }
}

/// Why the sampling loop hands control to its caller.
pub(crate) enum Wake {
    /// The reporting interval passed.
    Interval,
    /// SIGUSR1 came.
    Signal,
    /// The user pressed a key in the full-screen view.
    Input(crate::screen::Input),
}

/// Runs the sampling loop until the duration, Ctrl-C, (without `--all`)
/// the exit of every target, or `on` breaks it; `on` is called every
/// `interval` (if any), at each signal `usr1` receives (if given) and at
/// each of the `inputs` (if given).
async fn sample_loop(
    session: &mut Session,
    opts: &ProfileOptions,
    interval: Option<Duration>,
    mut usr1: Option<tokio::signal::unix::Signal>,
    mut inputs: Option<&mut crate::screen::Inputs>,
    mut on: impl FnMut(&mut Session, Wake) -> anyhow::Result<ControlFlow<()>>,
) -> anyhow::Result<()> {
    let mut drain = live::ticker(DRAIN_INTERVAL);
    let mut threads = live::ticker(THREADS_INTERVAL);
    let mut reports = interval.map(live::ticker);
    if session.idle {
        // The first reads only set each thread's baseline.
        session.sample_idle();
    }
    let mut idle = live::ticker(IDLE_PERIOD);
    let stop = live::stop_requested(opts.duration);
    tokio::pin!(stop);
    loop {
        let wake = tokio::select! {
            _ = drain.tick() => {
                session.take_children();
                session.drain()?;
                continue;
            }
            _ = idle.tick(), if session.idle => {
                session.sample_idle();
                continue;
            }
            _ = threads.tick() => {
                // Samples of a process that exited are named before it
                // is forgotten.
                session.drain()?;
                session.refresh_threads();
                if opts.all {
                    session.scan();
                }
                if (!opts.all || opts.select.follows_family()) && !session.any_alive() {
                    eprintln!("pyprobe: every target process has exited");
                    break;
                }
                continue;
            }
            _ = async { reports.as_mut().expect("guarded").tick().await }, if reports.is_some() => {
                Wake::Interval
            }
            _ = async { usr1.as_mut().expect("guarded").recv().await }, if usr1.is_some() => {
                Wake::Signal
            }
            // A closed channel (the key reader gave up) is no input.
            Some(input) = async { inputs.as_mut().expect("guarded").recv().await }, if inputs.is_some() => {
                Wake::Input(input)
            }
            r = &mut stop => {
                r?;
                break;
            }
        };
        if on(session, wake)?.is_break() {
            break;
        }
    }
    session.drain()?;
    if session.idle {
        session.sample_idle();
    }
    Ok(())
}

/// Options of `pyprobe record`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RecordOptions {
    /// What to sample.
    pub profile: ProfileOptions,
    /// Where to write.
    pub output: PathBuf,
    /// What to write.
    pub format: Format,
    /// Also write the profile so far this often while recording.
    #[serde(default, with = "crate::job::opt_seconds")]
    pub every: Option<Duration>,
}

/// Runs `pyprobe record`: samples until stopped, then writes the profile;
/// `--every` and SIGUSR1 write the profile so far meanwhile.
pub async fn record(opts: RecordOptions) -> anyhow::Result<()> {
    // Caught from the start: SIGUSR1's default would end pyprobe.
    let usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let mut session = start(&opts.profile, "recording")?;
    // Fail on an unwritable output now rather than after sampling for
    // minutes (the targets were checked first: a bad PID leaves no file).
    // A file there already is kept as it is until the profile replaces it.
    let existed = opts.output.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&opts.output)
        .with_context(|| format!("cannot write {}", opts.output.display()))?;
    if opts.format == Format::Chrometrace {
        session.profile.timeline = Some(stacks::Timeline::default());
    }
    let started = Instant::now();
    let began = std::time::SystemTime::now();
    sample_loop(
        &mut session,
        &opts.profile,
        opts.every,
        Some(usr1),
        None,
        |session, _| {
            session.drain()?;
            write_profile(session, &opts, began, started.elapsed())?;
            let p = &session.profile;
            eprintln!(
                "pyprobe: wrote {} ({} samples so far)",
                opts.output.display(),
                p.samples
            );
            Ok(ControlFlow::Continue(()))
        },
    )
    .await?;
    let summary = Summary::of(&session, started)?;
    if summary.samples == 0 && summary.kernel.unknown_thread > 0 {
        // Ticks landed on the targets' threads, none could be named: an
        // empty profile would read as "idle".
        if !existed {
            let _ = std::fs::remove_file(&opts.output);
        }
        anyhow::bail!(
            "no sample could be attributed: the CPU clock ticked {} times on threads pyprobe \
             could not match to Python thread states (nothing written to {}); \
             run with -v and report it",
            summary.kernel.unknown_thread,
            opts.output.display()
        );
    }
    write_profile(&session, &opts, began, started.elapsed())?;
    eprintln!("pyprobe: {}", summary.line());
    if let Some(timeline) = &session.profile.timeline
        && timeline.left_out > 0
    {
        eprintln!(
            "pyprobe: the trace holds the first {} samples; {} later ones are in the summary only",
            stacks::TIMELINE_CAP,
            timeline.left_out
        );
    }
    eprintln!("pyprobe: wrote {}", opts.output.display());
    Ok(())
}

/// Writes the profile gathered so far to `--output`, whole or not at all:
/// a regular file is replaced by one written beside it (a reader never
/// sees half of one); anything else (`/dev/null`, a pipe, a terminal) is
/// written to in place, never replaced.
fn write_profile(
    session: &Session,
    opts: &RecordOptions,
    began: std::time::SystemTime,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let profile = &session.profile;
    let roots = &session.roots;
    let in_place = std::fs::metadata(&opts.output).is_ok_and(|m| !m.is_file());
    let partial = if in_place {
        opts.output.clone()
    } else {
        let mut partial = opts.output.clone().into_os_string();
        partial.push(".partial");
        PathBuf::from(partial)
    };
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let title = match opts.profile.pids.as_slice() {
        [pid] => format!("pyprobe record --pid {pid}"),
        _ if opts.profile.all => "pyprobe record --all".to_owned(),
        pids => format!("pyprobe record, PIDs {pids:?}"),
    };
    match opts.format {
        Format::Folded => {
            use std::io::Write;
            for line in output::folded(profile, roots) {
                writeln!(out, "{line}")?;
            }
        }
        Format::Flamegraph => {
            output::flamegraph(&output::folded(profile, roots), &title, &mut out)?
        }
        Format::Speedscope => serde_json::to_writer(
            &mut out,
            &output::speedscope(profile, roots, opts.profile.rate, &title),
        )?,
        Format::Chrometrace => serde_json::to_writer(
            &mut out,
            &output::chrometrace(profile, roots, opts.profile.rate, session.started_ns),
        )?,
        Format::Pprof => std::io::Write::write_all(
            &mut out,
            &crate::sink::pprof::encode_stacks(
                &profile.stacks,
                &profile.frames,
                roots,
                |pid| {
                    session
                        .processes
                        .get(&pid)
                        .and_then(|p| p.attachment.container())
                        .map(|c| c.id.clone())
                },
                began,
                elapsed,
                opts.profile.rate,
            ),
        )?,
    }
    std::io::Write::flush(&mut out)?;
    drop(out);
    if !in_place {
        std::fs::rename(&partial, &opts.output)
            .with_context(|| format!("cannot write {}", opts.output.display()))?;
    }
    Ok(())
}
