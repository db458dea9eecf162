//! `pyprobe calls`: live, exact counts of Python function calls, counted in
//! the kernel.
//!
//! A uprobe program (`call_start` in probe-ebpf) runs at every site where a
//! Python function starts ([`crate::interp_binary::start_sites`]) and counts per
//! (process, code object) in a per-CPU map. This module sets it up for each
//! target ([`config`]), reads the aggregates every interval, names the code
//! objects ([`symbols`]), and prints tables or JSON ([`report`]).

pub mod builtins;
pub mod config;
pub mod latency;
pub mod live_view;
pub mod report;
pub mod symbols;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{
    bpf::{CallCounter, CallProgram, News},
    elf::ElfImage,
    interp_binary::start_sites,
    live, process,
    python::offsets::FrameModel,
    registry::ExecOutcome,
};

use crate::engine::Arrival;
use builtins::BuiltinKind;
use pyprobe_common::calls::{CallCounts, CodeKey, Histogram};
use report::{Reporter, emit};
use symbols::{Resolved, Symbols};

/// How often new code objects are named (at most; reports may be rarer).
const RESOLVE_INTERVAL: Duration = Duration::from_millis(200);

/// How often the kernel's news of processes is read.
const EVENTS_INTERVAL: Duration = Duration::from_millis(10);

/// Options of `pyprobe calls`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CallsOptions {
    /// Processes to watch.
    pub pids: Vec<u32>,
    /// Watch every Python process, including ones started later.
    pub all: bool,
    /// With `all`: which processes (`--name`, `--container`); the others
    /// are left alone.
    pub select: crate::selection::Selector,
    /// Time between two reports.
    #[serde(with = "crate::job::seconds")]
    pub interval: Duration,
    /// Stop after this long; `None` runs until Ctrl-C (or, without `--all`,
    /// until every target has exited).
    #[serde(with = "crate::job::opt_seconds")]
    pub duration: Option<Duration>,
    /// Rows per report (`None`: all).
    pub top: Option<usize>,
    /// Only functions whose file or qualified name contains this.
    pub filter: Option<String>,
    /// One JSON document per report instead of tables.
    pub json: bool,
    /// Attach an empty program instead of the counter (benchmarks only:
    /// measures the cost of the trap alone; counts stay zero).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_program: bool,
    /// Count calls of builtins (C functions) too.
    pub builtins: bool,
    /// Time calls too (p50/p99/max per function).
    pub latency: bool,
    /// Probes for each process alone even under `--all` (the agent: so
    /// that one process can stop being counted); new processes are then
    /// picked up by the scan every second, not from their first call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_process_probes: bool,
}

/// The processes being watched and the probes set up for them.
pub(crate) struct Session {
    counter: CallCounter,
    symbols: Symbols,
    /// Interpreter files probed for every process (`--all`).
    probed_files: BTreeSet<crate::process::FileId>,
    /// (process, interpreter file) pairs probed for that process alone: a
    /// process that execs the same interpreter keeps its probes.
    probed_for: BTreeSet<(u32, crate::process::FileId)>,
    /// Template index of each interpreter file (see
    /// [`pyprobe_common::calls::cookie`]).
    templates: BTreeMap<crate::process::FileId, u32>,
    /// Interpreter files probed for every process whose template the
    /// kernel applies by itself: another process of such a file needs no
    /// set-up (plain `--all`).
    kernel_ready: BTreeMap<crate::process::FileId, u32>,
    /// The kernel's news of processes ([`read_news`]).
    news: std::sync::mpsc::Receiver<Arrival>,
    /// A watched process exec'd something pyprobe cannot watch.
    dropped: bool,
    /// Processes found, passed over, and waiting after an exec.
    registry: crate::registry::Registry,
    /// Probes go on every process that maps an interpreter file, set up
    /// or not (plain `--all`); else on each set-up process alone, so
    /// processes left out of a selection never trap.
    all: bool,
    empty_program: bool,
    builtins: bool,
    latency: bool,
    /// `--filter` was given (the kernel looks up skip sets).
    filtering: bool,
    /// [`Self::start`] is over: processes set up from now on by a scan
    /// had started before (their first calls are not counted).
    started: bool,
    /// Processes set up by a scan after the start.
    picked_up_late: u64,
    /// A selection is watched with probes per process: the kernel tells
    /// of each child a counted process forks ([`process::CHILD`]), which
    /// is set up at once if the selection takes it, not at the next scan.
    follow_children: bool,
    /// Children set up as they were forked, until they exec or exit (one
    /// that execs something else is dropped without a word, as a pool's
    /// worker running a subprocess is).
    children: BTreeSet<u32>,
}

impl Session {
    /// Sets up one process: offsets into the config map, probes on its
    /// start sites (for this PID only, or for its interpreter file when
    /// watching every process). Returns a line describing what was done.
    fn add(&mut self, pid: u32) -> anyhow::Result<String> {
        let attachment = crate::registry::attach(pid)?;
        let target = attachment.reader();
        let image = attachment.image()?;
        let interp = attachment.interpreter().clone();
        let facts = attachment.facts()?;
        let mut cfg = config::process_config(&target.version, &target.info)?;
        // 3.11+ frames leave through opcode handlers, where the frame is
        // known; up to 3.10 each frame is one C call of the eval loop.
        let interpreter_frames = target.info.layout.frame_model == FrameModel::Interpreter;
        let timed = self.latency && !self.empty_program;
        if timed {
            cfg.latency = if interpreter_frames {
                pyprobe_common::calls::LATENCY_BY_FRAME
            } else {
                pyprobe_common::calls::LATENCY_BY_STACK
            };
        }
        let probe_sites = start_sites::find_probe_sites(
            &image,
            &target.version,
            &target.info.layout,
            target.info.offsets.frame_instruction,
            start_sites::CurrentFrameSlot::of(target.info.offsets.tstate_frame),
            timed,
        )
        .with_context(|| {
            format!(
                "finding function-start sites in {}",
                interp.binary.display()
            )
        })?;
        let sites = probe_sites.starts;
        let exit_sites = probe_sites.exits;
        if let Some(register) = probe_sites.frame_register {
            cfg.frame_mode = pyprobe_common::calls::FRAME_REGISTER;
            cfg.frame_register = register.bpf_index();
        }
        let builtin_sites = if self.builtins && !self.empty_program {
            builtins::find_builtin_sites(&target, &image, interp.load_bias)
                .context("finding the entry points of builtin calls")?
        } else {
            Vec::new()
        };
        let code_freed = if self.empty_program {
            None
        } else {
            attachment.code_freed_site()
        };
        cfg.epoch_watched = code_freed.is_some() as u8;
        cfg.filtering = self.filtering as u8;
        cfg.follow_children = self.follow_children as u8;
        let template = self.template(&interp, &image, &facts, &mut cfg)?;
        self.counter.configure(pid, &facts, &cfg)?;
        let cookie = |file_offset: u64| {
            pyprobe_common::calls::cookie(
                template,
                image.file_offset_to_vaddr(file_offset).unwrap_or(0),
            )
        };
        let scope = if self.all { None } else { Some(pid) };
        // From 3.11 a generator resumed by throw()/close() runs no RESUME;
        // it enters the eval loop with throwflag set.
        let throw_site = interpreter_frames;
        let fresh = if self.all {
            self.probed_files.insert(interp.file)
        } else {
            self.probed_for.insert((pid, interp.file))
        };
        if fresh {
            // Before the start sites: no cache slot may be filled while a
            // free could go unseen.
            if let Some(offset) = code_freed {
                self.counter.attach(
                    CallProgram::CodeFreed,
                    &interp,
                    offset,
                    scope,
                    cookie(offset),
                )?;
            }
            let start = if self.empty_program {
                CallProgram::Empty
            } else {
                CallProgram::Start
            };
            for site in &sites {
                self.counter.attach(
                    start,
                    &interp,
                    site.file_offset,
                    scope,
                    cookie(site.file_offset),
                )?;
            }
            if throw_site && !self.empty_program {
                self.counter.attach(
                    CallProgram::Throw,
                    &interp,
                    interp.eval_frame_offset,
                    scope,
                    cookie(interp.eval_frame_offset),
                )?;
            }
            for site in &exit_sites {
                self.counter.attach(
                    CallProgram::Exit,
                    &interp,
                    site.file_offset,
                    scope,
                    cookie(site.file_offset),
                )?;
            }
            if timed && !interpreter_frames {
                self.counter.attach(
                    CallProgram::ExitStack,
                    &interp,
                    interp.eval_frame_offset,
                    scope,
                    cookie(interp.eval_frame_offset),
                )?;
            }
            for site in &builtin_sites {
                let program = match site.kind {
                    BuiltinKind::Function => CallProgram::BuiltinFunction,
                    BuiltinKind::MethodDescriptor => CallProgram::BuiltinMethod,
                };
                let offset = image.past_endbr64(site.file_offset);
                self.counter
                    .attach(program, &interp, offset, scope, cookie(offset))?;
            }
            self.counter.flush()?;
        }
        let builtins_line = if !self.builtins {
            String::new()
        } else if target.info.layout.frame_model == FrameModel::Interpreter {
            format!(
                "; builtins at {} entry points (calls the specializing interpreter \
                 makes directly, e.g. len() in a hot loop, are not seen)",
                builtin_sites.len()
            )
        } else {
            format!("; builtins at {} entry points", builtin_sites.len())
        };
        let latency_line = if !timed {
            String::new()
        } else if interpreter_frames {
            format!(
                "; timed to {} return/yield site{} ({}; frames left by an exception are not timed)",
                exit_sites.len(),
                if exit_sites.len() == 1 { "" } else { "s" },
                describe_sites(&exit_sites)
            )
        } else {
            format!("; timed to the return of {}", start_sites::EVAL_FRAME)
        };
        let frame_from = match probe_sites.frame_register {
            Some(register) => format!("; frame from {register}"),
            None => String::new(),
        };
        let line = format!(
            "PID {pid}: CPython {} ({}), {} start site{} ({}){frame_from}, offsets from {}{builtins_line}{latency_line}",
            target.version,
            interp.binary.display(),
            sites.len(),
            if sites.len() == 1 { "" } else { "s" },
            describe_sites(&sites),
            target.offsets_source,
        );
        self.symbols.add_process(attachment, target, template);
        Ok(line)
    }

    /// The template index of `interp`'s file, assigned (and its template
    /// written, when one works for every process of the file) the first
    /// time: `cfg` (which gets the index), with its thread-state slot as a
    /// link-time address.
    /// A slot outside the file's static data (a heap address, which no
    /// other process shares) gives no template: a process of that file
    /// then waits for userspace to set it up, its calls counted as lost
    /// until then.
    fn template(
        &mut self,
        interp: &crate::process::Interpreter,
        image: &ElfImage,
        facts: &pyprobe_common::process::PyProcess,
        cfg: &mut pyprobe_common::calls::ProcessConfig,
    ) -> anyhow::Result<u32> {
        if let Some(&index) = self.templates.get(&interp.file) {
            cfg.template = index;
            return Ok(index);
        }
        let index = self.templates.len() as u32;
        cfg.template = index;
        anyhow::ensure!(
            index < pyprobe_common::calls::MAX_TEMPLATES,
            "more than {} interpreter files watched at once",
            pyprobe_common::calls::MAX_TEMPLATES
        );
        self.templates.insert(interp.file, index);
        // Link-time addresses: the kernel moves them by each process's
        // load bias.
        let thread = facts.thread.moved(interp.load_bias.wrapping_neg());
        let slot = thread.holder_slot();
        // Every job may read the facts the kernel makes from the template
        // (the sampler, log points): the slot must be the file's, whatever
        // the counter's frame mode.
        if image.is_loaded(slot) {
            let template = pyprobe_common::calls::Template {
                process: pyprobe_common::process::PyProcess { thread, ..*facts },
                calls: *cfg,
            };
            self.counter.set_template(index, &template)?;
            self.kernel_ready.insert(interp.file, index);
        } else {
            log::info!(
                "{}: the thread-state slot {:#x} is not static data; new processes of this \
                 file are set up by pyprobe, not from their first call",
                interp.binary.display(),
                facts.thread.holder_slot()
            );
        }
        Ok(index)
    }

    /// Acts on what the kernel says of watched processes: names code
    /// objects counted for the first time at once (short-lived processes
    /// are gone by the next report), reads the processes the kernel set up
    /// from a template, and sets up again processes that exec'd, or drops
    /// them when they no longer run Python.
    fn on_process_events(&mut self) {
        let arrivals: Vec<Arrival> = self.news.try_iter().collect();
        for Arrival { news, forked_from } in arrivals {
            let event = match news {
                News::Code(code) => {
                    self.symbols.name_captured(&code);
                    continue;
                }
                News::Builtin(builtin) => {
                    self.symbols.name_captured_builtin(&builtin);
                    continue;
                }
                News::Process(event) => event,
            };
            let pid = event.tgid;
            match event.kind {
                pyprobe_common::process::NEW
                    if !self.symbols.has_process(pid) && !self.registry.is_exec_pending(pid) =>
                {
                    self.symbols
                        .add_kernel_set_up(pid, event.template, forked_from);
                    eprintln!("pyprobe: watching PID {pid} (counted from its first call)");
                }
                pyprobe_common::process::CHILD
                    if self.follow_children && !self.symbols.has_process(pid) =>
                {
                    self.add_child(pid);
                }
                pyprobe_common::process::EXEC => {
                    self.symbols.forget_process(pid);
                    let announce = !self.children.remove(&pid);
                    self.registry.exec_seen(pid, announce);
                }
                pyprobe_common::process::EXIT => {
                    self.children.remove(&pid);
                    self.registry.exited(pid);
                    self.symbols.forget_process(pid);
                }
                _ => {}
            }
        }
        self.set_up_exec_pending();
    }

    /// Sets up child `pid` of a counted process, just forked, if the
    /// selection takes it: counted from a few milliseconds after its fork
    /// instead of from the next scan (up to a second; a short-lived worker
    /// would be missed whole). Its first calls, made before its probes
    /// went on, are not counted: it is reported as picked up late.
    fn add_child(&mut self, pid: u32) {
        if !self.registry.takes_new(pid) {
            return;
        }
        let result = self.add(pid);
        match &result {
            Ok(_) => {
                self.children.insert(pid);
                self.picked_up_late += 1;
            }
            // Gone already: nothing to say.
            Err(_) if !crate::process::is_alive(pid) => {
                self.registry.pass_over(pid);
                return;
            }
            Err(_) => {}
        }
        self.registry.note_scanned(pid, result, "watching");
    }

    /// Sets up again processes that exec'd, once their new image maps an
    /// interpreter; reports and drops those that run no Python.
    fn set_up_exec_pending(&mut self) {
        for pid in self.registry.execs_to_retry() {
            let tried = self.add(pid);
            match self.registry.exec_tried(pid, tried) {
                Some(ExecOutcome::Ready { value: line, .. }) => {
                    eprintln!("pyprobe: PID {pid} exec'd: watching {line}");
                }
                Some(ExecOutcome::Dropped { line, .. }) => {
                    self.dropped = true;
                    if let Some(line) = line {
                        eprintln!("pyprobe: {line}");
                    }
                }
                None => {}
            }
        }
    }

    /// Counts so far: code objects, and builtins under
    /// [`symbols::builtin_row_key`]. The kernel's news is read first, so
    /// that what it named is not read again from processes maybe gone.
    fn counts(&mut self) -> anyhow::Result<BTreeMap<CodeKey, CallCounts>> {
        self.on_process_events();
        let mut counts = self.counter.counts()?;
        let builtins = self.counter.builtin_counts()?;
        self.symbols.note_builtins(builtins.keys().copied());
        for (key, calls) in builtins {
            counts
                .entry(symbols::builtin_row_key(&key))
                .or_insert(CallCounts {
                    starts: 0,
                    resumes: 0,
                })
                .starts += calls;
        }
        Ok(counts)
    }

    /// Call durations so far, when calls are timed.
    fn latencies(&self) -> anyhow::Result<Option<BTreeMap<CodeKey, Histogram>>> {
        if !self.latency {
            return Ok(None);
        }
        Ok(Some(self.counter.latencies()?))
    }

    /// Names the code objects counted for the first time; with `--filter`,
    /// tells the kernel to stop counting those that do not match.
    fn resolve<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a CodeKey>,
        filter: Option<&str>,
    ) -> anyhow::Result<()> {
        let new = self.symbols.resolve(keys);
        let Some(filter) = filter else {
            return Ok(());
        };
        for key in new {
            if !symbols::is_builtin_row(&key)
                && let Some(Resolved::Code(code)) = self.symbols.get(&key)
                && !report::matches_filter(filter, &code.qualname, &code.filename)
            {
                self.counter.skip(&key)?;
            }
        }
        Ok(())
    }

    /// Under `--all`: sets up Python processes not seen before.
    fn scan(&mut self) {
        let symbols = &self.symbols;
        let pids = self.registry.new_pids(|pid| symbols.has_process(pid));
        for pid in pids {
            if let Some(template) = self.kernel_ready_template(pid) {
                self.symbols.add_kernel_set_up(pid, template, None);
                eprintln!(
                    "pyprobe: watching PID {pid} (an interpreter already probed; set up by the kernel at its next call)"
                );
                continue;
            }
            let result = self.add(pid);
            if result.is_ok() && self.started {
                self.picked_up_late += 1;
            }
            self.registry.note_scanned(pid, result, "watching");
        }
        process::release_images();
    }

    /// Under plain `--all`: the template of an interpreter file that
    /// process `pid` maps, when that file is probed for every process and
    /// the kernel sets its processes up by itself. Set-up then costs a
    /// read of `/proc/PID/maps`, not a parse of the interpreter.
    fn kernel_ready_template(&self, pid: u32) -> Option<u32> {
        if !self.all {
            return None;
        }
        let maps = process::read_maps(pid).ok()?;
        maps.iter().find_map(|m| {
            self.kernel_ready
                .get(&crate::process::FileId {
                    dev: m.dev,
                    inode: m.inode,
                })
                .copied()
        })
    }
}

/// How often `--all` looks for processes it has not seen.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Sites for the attach line: `RESUME(151)@0x1143d7→0x114400(jcc), ...`.
fn describe_sites(sites: &[start_sites::StartSite]) -> String {
    sites
        .iter()
        .map(|s| s.describe())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `pyprobe calls` until Ctrl-C, SIGTERM, the duration, or (without
/// `--all`) the exit of every target; then prints the final totals.
pub async fn run(opts: CallsOptions) -> anyhow::Result<()> {
    // Check the targets before loading anything, so a bad PID gets its own
    // one-line error.
    for &pid in &opts.pids {
        process::find_interpreter(pid)?;
    }
    let engine = crate::engine::Engine::load(crate::bpf::Features {
        calls: true,
        latency: opts.latency,
        wide: opts.all,
        ..Default::default()
    })?;
    let mut session = Session::new(&engine, &opts)?;
    session.start(&opts)?;
    // A launched program goes on now that it is counted.
    crate::launch::release_held()?;
    eprintln!("pyprobe: counting calls; Ctrl-C to stop");

    let started = Instant::now();
    // Plain tables show 20 rows unless --top says; the full-screen view
    // what fits; JSON all.
    let table_rows = opts.top.or((!opts.json).then_some(DEFAULT_TABLE_ROWS));
    let full_screen = crate::screen::wanted(opts.json);
    let mut reporter = Reporter::new(
        started,
        if full_screen { None } else { table_rows },
        opts.filter.clone(),
    );
    let mut ticker = live::ticker(opts.interval);
    let stop = live::stop_requested(opts.duration);
    tokio::pin!(stop);
    // Code objects are named while they (and their process) still exist:
    // more often than reports, so short-lived ones get names too.
    let resolve_every = opts.interval.min(RESOLVE_INTERVAL);
    let mut resolver = live::ticker(resolve_every);
    let mut events = live::ticker(EVENTS_INTERVAL);
    // New processes are looked for every second, whatever the report
    // interval.
    let mut scanner = live::ticker(SCAN_INTERVAL);
    let (mut screen, mut inputs) = if full_screen {
        let (screen, inputs) = crate::screen::Screen::open()?;
        (Some(screen), Some(inputs))
    } else {
        (None, None)
    };
    let mut view = live_view::CallsScreen::new(opts.top);
    let mut quits = 0;

    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                _ = events.tick() => {
                    session.tick_events();
                    if (!opts.all || opts.select.follows_family()) && session.all_gone() {
                        if session.dropped {
                            eprintln!("pyprobe: no target process runs Python any more");
                        } else {
                            eprintln!("pyprobe: every target process has exited");
                        }
                        break;
                    }
                }
                _ = resolver.tick() => {
                    session.resolve_counted(opts.filter.as_deref())?;
                }
                _ = ticker.tick() => {
                    let report = session.report(&mut reporter, opts.filter.as_deref(), "interval")?;
                    match &mut screen {
                        None => emit(&report, opts.json)?,
                        Some(screen) => {
                            if !view.paused {
                                view.last = Some(report);
                                view.draw(screen)?;
                            }
                        }
                    }
                }
                Some(input) = async { inputs.as_mut().expect("guarded").recv().await }, if inputs.is_some() => {
                    if view.key(input).is_break() {
                        quits += 1;
                        // Ctrl-C is the launched program's, as without the
                        // view; a second one leaves at once.
                        if quits > 1 || !crate::launch::interrupt_launched() {
                            break;
                        }
                    }
                    if let Some(screen) = &mut screen {
                        view.draw(screen)?;
                    }
                }
                _ = scanner.tick(), if opts.all => session.tick_scan(),
                r = &mut stop => {
                    r?;
                    break;
                }
            }
        }
        Ok(())
    }
    .await;
    // The terminal is given back before anything more is printed.
    drop(screen);
    result?;
    reporter.top = table_rows;
    let report = session.report(&mut reporter, opts.filter.as_deref(), "final")?;
    emit(&report, opts.json)?;
    if let Some(line) = late_line(session.picked_up_late()) {
        eprintln!("pyprobe: {line}");
    }
    Ok(())
}

/// Rows of a plain table when `--top` does not say.
const DEFAULT_TABLE_ROWS: usize = 20;

/// What to say of processes picked up by a scan after the start, if any.
pub fn late_line(n: u64) -> Option<String> {
    (n > 0).then(|| {
        format!(
            "{n} process{} started while watching {} counted from when {} picked up (a child of a \
             watched process as it was forked, another within a second of {its} start), not from \
             {its} first call",
            if n == 1 { "" } else { "es" },
            if n == 1 { "was" } else { "were" },
            if n == 1 { "it was" } else { "they were" },
            its = if n == 1 { "its" } else { "their" },
        )
    })
}

impl Session {
    /// A session over `engine` (made for calls) with nothing set up yet.
    pub(crate) fn new(engine: &crate::engine::Engine, opts: &CallsOptions) -> anyhow::Result<Self> {
        let counter = CallCounter::new(engine.object())?;
        let news = engine.news();
        let all = opts.all && opts.select.is_everything() && !opts.per_process_probes;
        let follow_children = opts.all && !all;
        if follow_children && let Some(why) = engine.follow_forks() {
            eprintln!(
                "pyprobe: warning: children of watched processes are picked up at the next scan, not as they fork ({why})"
            );
        }
        Ok(Session {
            counter,
            news,
            symbols: Symbols::default(),
            probed_files: BTreeSet::new(),
            probed_for: BTreeSet::new(),
            templates: BTreeMap::new(),
            kernel_ready: BTreeMap::new(),
            dropped: false,
            registry: crate::registry::Registry::new(opts.select.clone()),
            all,
            empty_program: opts.empty_program,
            builtins: opts.builtins,
            latency: opts.latency,
            filtering: opts.filter.is_some(),
            started: false,
            picked_up_late: 0,
            follow_children,
            children: BTreeSet::new(),
        })
    }

    /// Sets up the `opts.pids` (an error of one is the whole start's) and,
    /// under `--all`, every process the selection takes.
    pub(crate) fn start(&mut self, opts: &CallsOptions) -> anyhow::Result<()> {
        let session = self;
        for &pid in &opts.pids {
            let line = session
                .add(pid)
                .with_context(|| format!("setting up PID {pid}"))?;
            eprintln!("pyprobe: attached to {line}");
        }
        if opts.all {
            session.scan();
            if session.all {
                eprintln!(
                    "pyprobe: watching {} (new ones are counted from their first call)",
                    opts.select.describe()
                );
            } else {
                eprintln!(
                    "pyprobe: watching {} (a child of a watched one is picked up as it forks, others every second)",
                    opts.select.describe()
                );
            }
            if let Some(note) = opts.select.no_container_yet() {
                eprintln!("pyprobe: {note}");
            }
        }
        session.started = true;
        Ok(())
    }

    /// Processes a scan set up after the start: counted from then on, not
    /// from their first call.
    pub(crate) fn picked_up_late(&self) -> u64 {
        self.picked_up_late
    }

    /// Names what was counted while its process still exists.
    /// Returns the calls counted so far per process (Python functions and
    /// builtins), from the same read of the count maps.
    pub(crate) fn resolve_counted(
        &mut self,
        filter: Option<&str>,
    ) -> anyhow::Result<BTreeMap<u32, u64>> {
        let counts = self.counts()?;
        self.resolve(counts.keys(), filter)?;
        let mut per_process = BTreeMap::new();
        for (key, c) in &counts {
            *per_process.entry(key.tgid).or_insert(0) += c.starts + c.resumes;
        }
        Ok(per_process)
    }

    /// The report of everything counted so far (`kind`: "interval" or
    /// "final"; a final one names what it can and calls the rest unknown).
    pub(crate) fn report(
        &mut self,
        reporter: &mut Reporter,
        filter: Option<&str>,
        kind: &'static str,
    ) -> anyhow::Result<report::CallsReport> {
        let counts = self.counts()?;
        if kind == "final" {
            self.symbols.resolve(counts.keys());
        } else {
            self.resolve(counts.keys(), filter)?;
        }
        let latencies = self.latencies()?;
        Ok(reporter.report(
            &counts,
            latencies.as_ref(),
            &self.symbols,
            self.counter.losses()?,
            kind,
        ))
    }

    /// Runs of the programs this session holds apart from the engine's
    /// object, by name.
    pub(crate) fn program_runs(&self) -> Vec<(String, crate::bpf::ProgramRuns)> {
        self.counter.program_runs()
    }

    /// Stops counting process `pid` (its own probes come off) and passes
    /// over it from now on; its counts so far stay in the reports.
    pub(crate) fn stop_process(&mut self, pid: u32) -> anyhow::Result<bool> {
        self.registry.pass_over(pid);
        Ok(self.counter.detach_process(pid)?)
    }

    /// Whether the processes it watches are all gone (not under `--all`).
    pub(crate) fn all_gone(&self) -> bool {
        !self.registry.any_exec_pending() && !self.symbols.any_alive()
    }

    /// Reads the kernel's news of processes (see [`Self::on_process_events`]).
    pub(crate) fn tick_events(&mut self) {
        self.on_process_events();
    }

    /// Looks for processes not seen yet (`--all`).
    pub(crate) fn tick_scan(&mut self) {
        self.scan();
    }
}
