//! One attachment per live process, for every job of the run: the
//! interpreter found in its memory map, its parsed image, its reader
//! (offsets, `_PyRuntime`, known objects), the facts every kernel program
//! needs ([`PyProcess`]), its `code_dealloc` site and its container. Under
//! the agent the profile, the log points and a calls job set the same
//! process up; each asks [`attach`] and gets the one attachment that is
//! already there while another job holds it, or a new one.
//!
//! What stays each job's own: its reader's cache of code objects
//! ([`Attachment::reader`]: each job forgets freed code by its own rule)
//! and what it loads into the kernel.
//!
//! An attachment is handed out again only while its process is the same
//! one: the same start time (a PID reused is another process) and no exec
//! or exit news since it was made ([`note_changed`], called by the
//! engine's news reader as the kernel tells).

use std::{
    cell::{OnceCell, RefCell},
    collections::{BTreeMap, HashMap},
    rc::{Rc, Weak},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use pyprobe_common::process::PyProcess;

use crate::{
    container::{Container, Placement},
    elf::ElfImage,
    kabi::ConfigError,
    process::Interpreter,
    python::{
        memory::{Memory, ProcessMemory},
        reader::{ReadError, Target},
    },
};

/// A live process attached: what every job needs of it, read once.
pub struct Attachment {
    pid: u32,
    /// Its start time (clock ticks after boot, `/proc/PID/stat`).
    started: Option<u64>,
    /// [`CHANGES`]' count when it was made.
    made_at: u64,
    target: Target<ProcessMemory>,
    /// Its interpreter's parsed file while someone holds it (a file may
    /// be tens of MB: parsed copies last one round of set-ups, see
    /// [`crate::process::release_images`]).
    image: RefCell<std::sync::Weak<ElfImage>>,
    interp: Interpreter,
    facts: OnceCell<PyProcess>,
    code_freed: Option<u64>,
    container: OnceCell<Option<Container>>,
}

impl Attachment {
    /// The process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A reader of the process for one job: the attachment's facts with
    /// a code object cache of its own.
    pub fn reader(&self) -> Target<ProcessMemory> {
        self.target.over(self.target.mem.clone())
    }

    /// The attachment's own reader, for what reads no code objects
    /// (versions, offsets, a few words).
    pub fn target(&self) -> &Target<ProcessMemory> {
        &self.target
    }

    /// The interpreter's parsed file (read again if no one holds it).
    pub fn image(&self) -> Result<Arc<ElfImage>, crate::elf::ElfError> {
        if let Some(image) = self.image.borrow().upgrade() {
            return Ok(image);
        }
        let image = crate::process::interpreter_image(&self.interp)?;
        *self.image.borrow_mut() = Arc::downgrade(&image);
        Ok(image)
    }

    /// The interpreter file and where it is mapped.
    pub fn interpreter(&self) -> &Interpreter {
        &self.interp
    }

    /// The facts every kernel program needs, read once the interpreter
    /// has made its first thread state (a process still starting has
    /// none yet: asked again, it is read again).
    pub fn facts(&self) -> Result<PyProcess, ConfigError> {
        if let Some(facts) = self.facts.get() {
            return Ok(*facts);
        }
        let t = &self.target;
        let facts =
            crate::kabi::py_process(&t.version, &t.info, t.runtime, |a| t.mem.read_u64(a).ok())?;
        Ok(*self.facts.get_or_init(|| facts))
    }

    /// File offset of `code_dealloc` in the interpreter file (see
    /// [`crate::kabi::code_dealloc_site`]).
    pub fn code_freed_site(&self) -> Option<u64> {
        self.code_freed
    }

    /// The container the process runs in, if any.
    pub fn container(&self) -> Option<&Container> {
        self.container
            .get_or_init(|| Placement::of(self.pid).and_then(|p| p.container))
            .as_ref()
    }

    /// Whether this is still the process it was made for: it neither
    /// exited nor exec'd since (a job holding an attachment that is not
    /// current sets the process up again, or drops it).
    pub fn is_current(&self) -> bool {
        let changed = CHANGED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.pid)
            .is_some_and(|&at| at >= self.made_at);
        !changed && self.started.is_some() && self.started == crate::process::start_time(self.pid)
    }
}

thread_local! {
    /// The attachments jobs hold, by PID. Jobs run on one thread (the
    /// command's or the agent's loop); an attachment goes when the last
    /// job lets go of it.
    static ATTACHED: RefCell<HashMap<u32, Weak<Attachment>>> = RefCell::new(HashMap::new());
}

/// Exec and exit news counted so far (see [`note_changed`]).
static CHANGES: AtomicU64 = AtomicU64::new(1);

/// For each process that exec'd or exited: [`CHANGES`]' count then.
static CHANGED: Mutex<BTreeMap<u32, u64>> = Mutex::new(BTreeMap::new());

/// Notes that process `pid` exec'd or exited: no attachment made before
/// is handed out for it again.
pub fn note_changed(pid: u32) {
    let at = CHANGES.fetch_add(1, Ordering::Relaxed);
    CHANGED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(pid, at);
}

/// Forgets the news of processes not in `alive` (their attachments, if
/// any job still holds one, fail the start time check).
pub(super) fn forget_exited(alive: &std::collections::BTreeSet<u32>) {
    CHANGED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|pid, _| alive.contains(pid));
    ATTACHED.with(|a| a.borrow_mut().retain(|_, w| w.strong_count() > 0));
}

/// The attachment of process `pid`: the one a job holds if it is still
/// current, else a new one (the interpreter found in its memory map, its
/// reader prepared).
pub fn attach(pid: u32) -> Result<Rc<Attachment>, ReadError> {
    let held = ATTACHED.with(|a| a.borrow().get(&pid).and_then(Weak::upgrade));
    if let Some(held) = held.filter(|a| a.is_current()) {
        return Ok(held);
    }
    let made_at = CHANGES.load(Ordering::Relaxed);
    let started = crate::process::start_time(pid);
    let (target, image) = Target::attach_with_image(pid, |m| m)?;
    let interp = target
        .interpreter
        .clone()
        .expect("a live target knows its interpreter");
    let code_freed = crate::kabi::code_dealloc_site(&target, &image, interp.load_bias);
    let attachment = Rc::new(Attachment {
        pid,
        started,
        made_at,
        target,
        image: RefCell::new(Arc::downgrade(&image)),
        interp,
        facts: OnceCell::new(),
        code_freed,
        container: OnceCell::new(),
    });
    ATTACHED.with(|a| {
        a.borrow_mut().insert(pid, Rc::downgrade(&attachment));
    });
    Ok(attachment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_share_an_attachment_until_its_process_changes() {
        let child = pyprobe_testenv::sleeping_python();
        let pid = child.pid();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let first = loop {
            match attach(pid) {
                Ok(a) if a.facts().is_ok() => break a,
                _ => {
                    assert!(std::time::Instant::now() < deadline, "Python never ran");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        };
        // A second job gets the same one, with the same facts.
        let second = attach(pid).expect("attached again");
        assert!(Rc::ptr_eq(&first, &second));
        assert_eq!(second.facts().ok(), first.facts().ok());
        // Once the kernel tells of an exec, a new one is made.
        note_changed(pid);
        let third = attach(pid).expect("attached after the news");
        assert!(!Rc::ptr_eq(&first, &third));
        assert!(Rc::ptr_eq(&third, &attach(pid).expect("attached again")));
        // When no job holds it, it goes.
        let weak = Rc::downgrade(&third);
        drop((first, second, third));
        assert!(weak.upgrade().is_none());
        drop(child);
        // Another process: not attached.
        assert!(attach(pid).is_err());
    }
}
