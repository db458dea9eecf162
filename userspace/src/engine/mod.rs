//! One engine under every job: the loaded BPF object (one load, whatever
//! the jobs) and the kernel's news of processes, read once and handed to
//! every job that asks.
//!
//! A command (`calls`, `record`, `top`, `log`) is one job over an engine;
//! the agent runs several over one. Jobs take from the object what is
//! theirs alone (a ring, their programs) and subscribe to the news with
//! [`Engine::news`].

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use crate::{
    bpf::{BpfError, Features, News, Object, ProcessEvents, SharedObject},
    process,
};

/// The longest the news thread waits for news before it looks whether
/// the engine is gone.
const NEWS_WAIT: Duration = Duration::from_millis(100);

/// One piece of the kernel's news, with what had to be read at once.
#[derive(Clone)]
pub struct Arrival {
    /// The news.
    pub news: News,
    /// For a process the kernel set up ([`pyprobe_common::process::NEW`]):
    /// the process it was forked from with no exec since, read as soon as
    /// the news came (a pool's worker may live a few milliseconds).
    pub forked_from: Option<u32>,
}

/// The loaded object and the reader of its news; clones share them (the
/// news stops being read when the last clone goes).
#[derive(Clone)]
pub struct Engine(Arc<Inner>);

struct Inner {
    object: SharedObject,
    /// Why `process_fork` cannot tell a new process from a new thread
    /// (the kernel's task layout could not be read), once a job asked.
    forks_unfollowed: std::sync::OnceLock<Option<String>>,
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Arrival>>>>,
    stop: Arc<AtomicBool>,
}

impl Engine {
    /// Loads the BPF object for `features` (see [`Features`]) and starts
    /// reading the kernel's news of processes.
    pub fn load(features: Features) -> Result<Self, BpfError> {
        let object = Object::load(features)?;
        let events = object
            .take_news()
            .ok_or(BpfError::Missing(pyprobe_common::names::MAP_PROCESS_EVENTS))?;
        let subscribers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        spawn_reader(events, subscribers.clone(), stop.clone());
        Ok(Self(Arc::new(Inner {
            object,
            forks_unfollowed: std::sync::OnceLock::new(),
            subscribers,
            stop,
        })))
    }

    /// The loaded object, for a job's handle on it.
    pub fn object(&self) -> &SharedObject {
        &self.0.object
    }

    /// What the object was made for.
    pub fn features(&self) -> Features {
        self.0.object.features()
    }

    /// Has the programs follow processes as they fork (tell a new process
    /// from a new thread: `task_struct`'s offsets, read from the kernel's
    /// BTF at the first call, about 150 ms); why they cannot, if they
    /// cannot. Jobs that need it ask (log points, calls under a
    /// selection); the others pay nothing.
    pub fn follow_forks(&self) -> Option<&str> {
        self.0
            .forks_unfollowed
            .get_or_init(|| {
                let why = match crate::kernel::TaskOffsets::read() {
                    Ok(offsets) => self
                        .0
                        .object
                        .set_task_offsets(offsets)
                        .err()
                        .map(|e| e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                // The parse's memory (about 10 MB, freed by now) would
                // stay with the allocator for an agent's whole life.
                // SAFETY: malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
                why
            })
            .as_deref()
    }

    /// A new subscriber to the kernel's news: every piece read from now
    /// on, oldest first. Dropping the receiver unsubscribes.
    pub fn news(&self) -> mpsc::Receiver<Arrival> {
        let (tx, rx) = mpsc::channel();
        self.0
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads the kernel's news on a thread of its own, so that what must be
/// read while a process lives (its parent) is read at once,
/// whatever the jobs are busy with (reading large count maps takes a
/// while). Each piece goes to every subscriber still listening.
fn spawn_reader(
    mut events: ProcessEvents,
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Arrival>>>>,
    stop: Arc<AtomicBool>,
) {
    std::thread::Builder::new()
        .name("pyprobe-news".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Woken by the kernel when news comes: read within
                // microseconds, and no wake-ups while nothing happens.
                events.wait(NEWS_WAIT);
                let mut arrivals = Vec::new();
                events.drain(|news| {
                    if let News::Process(e) = &news
                        && matches!(
                            e.kind,
                            pyprobe_common::process::EXEC | pyprobe_common::process::EXIT
                        )
                    {
                        crate::registry::note_changed(e.tgid);
                    }
                    let forked_from = match &news {
                        News::Process(e) if e.kind == pyprobe_common::process::NEW => {
                            process::parent_pid(e.tgid)
                                .filter(|&parent| process::same_image(e.tgid, parent))
                        }
                        _ => None,
                    };
                    arrivals.push(Arrival { news, forked_from });
                });
                if !arrivals.is_empty() {
                    let mut subs = subscribers.lock().unwrap_or_else(|p| p.into_inner());
                    subs.retain(|tx| arrivals.iter().all(|a| tx.send(a.clone()).is_ok()));
                }
            }
        })
        .expect("spawning the news thread");
}
