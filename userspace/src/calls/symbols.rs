//! Names of the code objects the kernel counted.
//!
//! The kernel keys counts by (process, code address, `co_name` address,
//! first line), so a code object freed and replaced by another at the same
//! address gets a new key. Each key is named once, when first seen, by
//! reading the code object from the live process; the name stays valid after
//! the code object is gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use pyprobe_common::calls::{self, BuiltinKey, CodeKey};

use crate::container::{Container, Placement};
use crate::python::offsets;
use crate::python::{
    memory::{Captured, Memory, NoMemory, ProcessMemory},
    reader::{CodeSummary, Target},
};
use pyprobe_common::process::{BuiltinEvent, CSTR_CAPTURE, CodeEvent, STR_CAPTURE};

/// File name shown for builtins.
pub const BUILTIN_FILE: &str = "<builtin>";

/// The first line marking a builtin's row key: a line no code object
/// starts at.
const BUILTIN_ROW_LINE: u32 = u32::MAX;

/// The key a builtin's count is reported under, beside code objects: one
/// row per C function (its `PyMethodDef`) and process, however it was
/// called: a bound method (`pattern.match`) and its method descriptor
/// (`re.Pattern.match(pattern, s)`) are counted under different kernel keys
/// and shown as one function.
pub fn builtin_row_key(b: &BuiltinKey) -> CodeKey {
    CodeKey {
        tgid: b.tgid,
        firstlineno: BUILTIN_ROW_LINE,
        code: b.method_def,
        name: 0,
    }
}

/// Whether a key was made by [`builtin_row_key`].
pub fn is_builtin_row(key: &CodeKey) -> bool {
    key.firstlineno == BUILTIN_ROW_LINE && key.name == 0
}

/// The kernel key a builtin row is named from, among those counted under
/// it: a method descriptor's (its owner is the type that defines the
/// method) before a bound method's (the type of the object it is bound to,
/// perhaps a subclass), then the lowest owner, so the name does not depend
/// on which call came first.
pub fn naming_key(candidates: impl IntoIterator<Item = BuiltinKey>) -> Option<BuiltinKey> {
    candidates
        .into_iter()
        .min_by_key(|b| (b.kind != calls::BUILTIN_METHOD, b.owner))
}

/// The kind of builtin a kernel key counts.
fn builtin_kind(b: &BuiltinKey) -> super::builtins::BuiltinKind {
    if b.kind == calls::BUILTIN_METHOD {
        super::builtins::BuiltinKind::MethodDescriptor
    } else {
        super::builtins::BuiltinKind::Function
    }
}

/// How a builtin labelled `label` is shown.
fn builtin_summary(label: String) -> CodeSummary {
    CodeSummary {
        qualname: label,
        filename: BUILTIN_FILE.into(),
        first_line: 0,
    }
}

/// What is known about a counted code object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Named from the live process.
    Code(CodeSummary),
    /// Could not be named (the process exited, or the code object was freed
    /// before pyprobe read it); the reason says which.
    Unknown(String),
}

/// Readers of the watched processes and the names found so far.
#[derive(Default)]
pub struct Symbols {
    processes: BTreeMap<u32, Target<ProcessMemory>>,
    /// What was read of each process to set it up, shared with the run's
    /// other jobs while held.
    attachments: BTreeMap<u32, std::rc::Rc<crate::registry::Attachment>>,
    names: HashMap<CodeKey, Resolved>,
    /// For each builtin row, the kernel key to name it from (see
    /// [`naming_key`]).
    builtins: HashMap<CodeKey, BuiltinKey>,
    /// The container of each process in one.
    containers: BTreeMap<u32, Container>,
    /// Build facts of each interpreter file, by template index: how to
    /// read the bytes [`CodeEvent`]s carry.
    facts: BTreeMap<u32, Target<NoMemory>>,
    /// Live processes the kernel set up from a template, not read by
    /// pyprobe (yet); their template is in `template_of`.
    kernel_set_up: BTreeSet<u32>,
    /// Processes that exited or exec'd (until their PID is set up again).
    gone: BTreeSet<u32>,
    /// Labels of builtins named from [`BuiltinEvent`]s.
    builtin_labels: HashMap<BuiltinKey, String>,
    /// Processes the kernel set up that were forked (with no exec since)
    /// from another watched process: that parent.
    fork_parent: BTreeMap<u32, u32>,
    /// Builtin labels by where they are: (template, kind, `PyMethodDef`,
    /// owner) addresses. Processes of one interpreter file share them
    /// only when forked from one another (or one ancestor) with no exec
    /// since: anything else lays the file out at another random address.
    labels_by_site: HashMap<(u32, u32, u64, u64), String>,
    /// Code objects named, by (template, code, name, first line): what a
    /// fork relative of the same file finds at the very same addresses.
    codes_by_site: HashMap<(u32, u64, u64, u32), CodeSummary>,
    /// The template of each process seen, gone or not.
    template_of: BTreeMap<u32, u32>,
    /// Keys named from the kernel's events since [`Symbols::resolve`] last
    /// returned: it returns them too.
    named_from_events: Vec<CodeKey>,
}

impl Symbols {
    /// Adds a process to read names from (`target`, this job's reader of
    /// `attachment`'s process), whose interpreter file has template index
    /// `template` (its build facts are kept to read what [`CodeEvent`]s
    /// carry).
    pub fn add_process(
        &mut self,
        attachment: std::rc::Rc<crate::registry::Attachment>,
        target: Target<ProcessMemory>,
        template: u32,
    ) {
        let pid = attachment.pid();
        self.facts.entry(template).or_insert_with(|| target.facts());
        self.processes.insert(pid, target);
        self.template_of.insert(pid, template);
        self.gone.remove(&pid);
        if let Some(container) = attachment.container() {
            self.containers.insert(pid, container.clone());
        }
        self.attachments.insert(pid, attachment);
    }

    /// Stops reading process `pid` (it exited or exec'd); the names found
    /// so far stay.
    pub fn forget_process(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.attachments.remove(&pid);
        self.kernel_set_up.remove(&pid);
        self.gone.insert(pid);
    }

    /// Notes a process the kernel set up from template `template` at its
    /// first call: its names come from [`CodeEvent`]s, read in the kernel,
    /// and its container is read now, while it lives. `forked_from` is the
    /// process it was forked from with no exec since, if known.
    pub fn add_kernel_set_up(&mut self, pid: u32, template: u32, forked_from: Option<u32>) {
        self.kernel_set_up.insert(pid);
        self.template_of.insert(pid, template);
        self.gone.remove(&pid);
        self.fork_parent.remove(&pid);
        if let Some(parent) = forked_from
            && self.has_process(parent)
        {
            self.fork_parent.insert(pid, parent);
        }

        if let Some(container) = Placement::of(pid).and_then(|p| p.container) {
            self.containers.insert(pid, container);
        }
    }

    /// Labels a builtin from the bytes the kernel read when it first
    /// counted it; one cut short or not captured is left to
    /// [`Symbols::resolve`].
    pub fn name_captured_builtin(&mut self, event: &BuiltinEvent) {
        self.label_captured_builtin(event);
        let key = event.key;
        if !self.builtin_labels.contains_key(&key) {
            // Not all captured (e.g. a page of the interpreter's data that
            // a process just forked has not touched yet, which the kernel
            // cannot read without a fault): read it now, while the
            // process surely lives.
            self.note_builtins([key]);
            let named = self.resolve([&builtin_row_key(&key)]);
            self.named_from_events.extend(named);
        }
    }

    /// The labelling part of [`Symbols::name_captured_builtin`].
    fn label_captured_builtin(&mut self, event: &BuiltinEvent) {
        let key = event.key;
        if self.builtin_labels.contains_key(&key) {
            return;
        }
        // A row named unknown before this event was read is named again.
        let row = builtin_row_key(&key);
        if let Some(Resolved::Unknown(_)) = self.names.get(&row) {
            self.names.remove(&row);
        }
        let Some(facts) = self.facts.get(&event.template) else {
            return;
        };
        let whole_c = |len: u32, cap: usize| len > 0 && (len as usize) < cap;
        if !whole_c(event.name_len, CSTR_CAPTURE) {
            return;
        }
        let owner_type = event.owner_type.to_le_bytes();
        let owner_flags = event.owner_flags.to_le_bytes();
        let owner_name = event.owner_name.to_le_bytes();
        let name_ptr = event.name.to_le_bytes();
        let mut regions: Vec<(u64, &[u8])> = vec![
            (
                key.method_def
                    .wrapping_add(facts.info.offsets.method_def_name),
                &name_ptr[..],
            ),
            (event.name, &event.name_bytes[..]),
        ];
        if key.owner != 0 {
            regions.push((
                key.owner.wrapping_add(offsets::common::OB_TYPE),
                &owner_type[..],
            ));
            regions.push((
                event.owner_type.wrapping_add(offsets::common::TP_FLAGS),
                &owner_flags[..],
            ));
            if event.owner_name != 0 {
                if !whole_c(event.owner_len, STR_CAPTURE) {
                    return;
                }
                regions.push((
                    key.owner.wrapping_add(offsets::common::TP_NAME),
                    &owner_name[..],
                ));
                regions.push((event.owner_name, &event.owner_bytes[..]));
            } else if event.owner_len as usize == STR_CAPTURE {
                regions.push((key.owner, &event.owner_bytes[..]));
            }
        }
        let target = facts.over(Captured { regions: &regions });
        if let Ok(label) =
            super::builtins::builtin_label(&target, builtin_kind(&key), key.method_def, key.owner)
        {
            self.labels_by_site.insert(
                (event.template, key.kind, key.method_def, key.owner),
                label.clone(),
            );
            self.builtin_labels.insert(key, label);
        }
    }

    /// Names a code object from the bytes the kernel read when it first
    /// counted it. Names cut short by the capture, or not captured, are
    /// left to [`Symbols::resolve`] (which reads the live process).
    pub fn name_captured(&mut self, event: &CodeEvent) {
        if let Some(Resolved::Code(_)) = self.names.get(&event.key) {
            return;
        }
        // Its file, even if the news of its process was missed: what a
        // fork relative named at the same addresses can name it.
        self.template_of
            .entry(event.key.tgid)
            .or_insert(event.template);
        let Some(facts) = self.facts.get(&event.template) else {
            return;
        };
        let regions = [
            (event.qualname, &event.qualname_bytes[..]),
            (event.filename, &event.filename_bytes[..]),
        ];
        let target = facts.over(Captured { regions: &regions });
        let whole = |addr: u64| -> Option<String> {
            let (text, len) = target.read_str_bounded(addr, STR_CAPTURE).ok()?;
            (text.chars().count() as u64 == len).then_some(text)
        };
        let names = whole(event.qualname).zip(whole(event.filename));
        if let Some((qualname, filename)) = names {
            let code = CodeSummary {
                qualname,
                filename,
                first_line: event.key.firstlineno as i32,
            };
            let key = event.key;
            self.codes_by_site
                .entry((event.template, key.code, key.name, key.firstlineno))
                .or_insert_with(|| code.clone());
            self.named_from_events.push(key);
            self.names.insert(key, Resolved::Code(code));
        } else {
            // Not all captured (a long name, a page the kernel could not
            // read without a fault): read it now, while the process
            // surely lives.
            self.names.remove(&event.key);
            let named = self.resolve([&event.key]);
            self.named_from_events.extend(named);
        }
    }

    /// The container process `pid` runs in, if any.
    pub fn container(&self, pid: u32) -> Option<&Container> {
        self.containers.get(&pid)
    }

    /// Whether `pid` was added (or set up by the kernel).
    pub fn has_process(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid) || self.kernel_set_up.contains(&pid)
    }

    /// Whether any added process is still running.
    pub fn any_alive(&self) -> bool {
        self.processes
            .keys()
            .any(|&pid| crate::process::is_alive(pid))
    }

    /// Records the kernel keys counted under builtin rows, to name the rows
    /// from (see [`naming_key`]).
    pub fn note_builtins(&mut self, keys: impl IntoIterator<Item = BuiltinKey>) {
        for key in keys {
            let row = builtin_row_key(&key);
            let best = naming_key(self.builtins.get(&row).copied().into_iter().chain([key]));
            if let Some(best) = best {
                self.builtins.insert(row, best);
            }
        }
    }

    /// Names every key not named yet; returns the keys named now (and
    /// those named from the kernel's events since the last call).
    pub fn resolve<'a>(&mut self, keys: impl IntoIterator<Item = &'a CodeKey>) -> Vec<CodeKey> {
        let mut new = std::mem::take(&mut self.named_from_events);
        for key in keys {
            match self.names.get(key) {
                Some(Resolved::Code(_)) => continue,
                // A code object of a process that ended unread: a fork
                // relative may have named the same object since.
                Some(Resolved::Unknown(_))
                    if self.gone.contains(&key.tgid) && !is_builtin_row(key) =>
                {
                    if let Some(code) = self.relative_code(key) {
                        new.push(*key);
                        self.names.insert(*key, Resolved::Code(code));
                    }
                    continue;
                }
                Some(Resolved::Unknown(_)) => continue,
                None => {}
            }
            let builtin = if is_builtin_row(key) {
                match self.builtins.get(key).copied() {
                    Some(b) => Some(b),
                    None => continue,
                }
            } else {
                None
            };
            if let Some(label) = builtin.and_then(|b| self.builtin_labels.get(&b)) {
                new.push(*key);
                self.names
                    .insert(*key, Resolved::Code(builtin_summary(label.clone())));
                continue;
            }
            // A process the kernel set up is read only when a name did not
            // come with its event (a full ring, a long name, a page the
            // kernel could not read).
            self.ensure_read(key.tgid);
            let resolved = match (self.processes.get(&key.tgid), builtin) {
                (None, _) if self.gone.contains(&key.tgid) => match builtin {
                    Some(b) => self
                        .parent_label(&b)
                        .map(|label| Resolved::Code(builtin_summary(label))),
                    None => self.relative_code(key).map(Resolved::Code),
                }
                .unwrap_or_else(|| {
                    Resolved::Unknown("the process ended before its names were read".into())
                }),
                // Maybe later: the kernel counts a new process before
                // pyprobe reads it. Final reports call it unknown.
                (None, _) => continue,
                (Some(target), Some(b)) => {
                    match super::builtins::builtin_label(
                        target,
                        builtin_kind(&b),
                        b.method_def,
                        b.owner,
                    ) {
                        Ok(label) => Resolved::Code(builtin_summary(label)),
                        Err(e) => match self.parent_label(&b) {
                            Some(label) => Resolved::Code(builtin_summary(label)),
                            None => Resolved::Unknown(e.to_string()),
                        },
                    }
                }
                (Some(target), None) => {
                    // The name's address and the first line are part of
                    // the key: a mismatch means the code object was
                    // replaced since it was counted.
                    let name = target
                        .mem
                        .read_u64(key.code.wrapping_add(target.info.offsets.code_name));
                    match (name, target.code_summary(key.code)) {
                        (Ok(name), Ok(code))
                            if name == key.name && code.first_line as u32 == key.firstlineno =>
                        {
                            Resolved::Code(code)
                        }
                        (Ok(_), Ok(_)) => Resolved::Unknown("code object freed".into()),
                        (Err(e), _) => Resolved::Unknown(e.to_string()),
                        (_, Err(e)) => Resolved::Unknown(e.to_string()),
                    }
                }
            };
            if let (None, Resolved::Code(code)) = (builtin, &resolved)
                && let Some(&template) = self.template_of.get(&key.tgid)
            {
                self.codes_by_site
                    .entry((template, key.code, key.name, key.firstlineno))
                    .or_insert_with(|| code.clone());
            }
            if let (Some(b), Resolved::Code(code)) = (builtin, &resolved)
                && let Some(&template) = self.template_of.get(&b.tgid)
            {
                self.labels_by_site
                    .entry((template, b.kind, b.method_def, b.owner))
                    .or_insert_with(|| code.qualname.clone());
            }
            new.push(*key);
            self.names.insert(*key, resolved);
        }
        new
    }

    /// Reads process `pid` if the kernel set it up and pyprobe has not
    /// read it yet.
    fn ensure_read(&mut self, pid: u32) {
        if !self.processes.contains_key(&pid)
            && self.kernel_set_up.contains(&pid)
            && let Ok(attachment) = crate::registry::attach(pid)
        {
            self.processes.insert(pid, attachment.reader());
            self.attachments.insert(pid, attachment);
        }
    }

    /// The label of builtin `b` read in the process its process was forked
    /// from, with the same image: what a process reads from its
    /// interpreter's (and extensions') read-only data is at the same
    /// address, the same bytes, in its parent, which may well outlive it
    /// (a pool's workers).
    fn parent_label(&mut self, b: &BuiltinKey) -> Option<String> {
        let Some(&parent) = self.fork_parent.get(&b.tgid) else {
            // Not known to be forked (it ended before its parent was
            // read): a label at the very same addresses in a process of
            // the same file, which only a fork relative can have.
            let template = *self.template_of.get(&b.tgid)?;
            return self
                .labels_by_site
                .get(&(template, b.kind, b.method_def, b.owner))
                .cloned();
        };
        let in_parent = BuiltinKey { tgid: parent, ..*b };
        if let Some(label) = self.builtin_labels.get(&in_parent) {
            return Some(label.clone());
        }
        self.ensure_read(parent);
        let target = self.processes.get(&parent)?;
        super::builtins::builtin_label(target, builtin_kind(b), b.method_def, b.owner).ok()
    }

    /// The name of code object `key` of a process that ended before it
    /// was read, read where a fork relative has it: in its parent (the
    /// object existed before the fork, so it is at the same address with
    /// the same name and first line unless freed since, which the check
    /// of both tells), or as named in another process of the same file at
    /// the very same addresses, or as read in a live one (its parent
    /// unknown).
    fn relative_code(&mut self, key: &CodeKey) -> Option<CodeSummary> {
        if let Some(&parent) = self.fork_parent.get(&key.tgid) {
            let in_parent = CodeKey {
                tgid: parent,
                ..*key
            };
            if let Some(Resolved::Code(code)) = self.names.get(&in_parent) {
                return Some(code.clone());
            }
            self.ensure_read(parent);
            if let Some(target) = self.processes.get(&parent) {
                let name = target
                    .mem
                    .read_u64(key.code.wrapping_add(target.info.offsets.code_name));
                if let (Ok(name), Ok(code)) = (name, target.code_summary(key.code))
                    && name == key.name
                    && code.first_line as u32 == key.firstlineno
                {
                    return Some(code);
                }
            }
        }
        let template = *self.template_of.get(&key.tgid)?;
        if let Some(code) = self
            .codes_by_site
            .get(&(template, key.code, key.name, key.firstlineno))
        {
            return Some(code.clone());
        }
        // Its parent unknown (it was gone before the news of it was read):
        // any live process of the same file that has the very same code
        // object (its name's address and first line: another layout of
        // the file would not) is a fork relative.
        let relatives: Vec<u32> = self
            .processes
            .keys()
            .copied()
            .filter(|pid| *pid != key.tgid && self.template_of.get(pid) == Some(&template))
            .collect();
        relatives.into_iter().find_map(|pid| {
            let target = self.processes.get(&pid)?;
            let name = target
                .mem
                .read_u64(key.code.wrapping_add(target.info.offsets.code_name))
                .ok()?;
            let code = target.code_summary(key.code).ok()?;
            (name == key.name && code.first_line as u32 == key.firstlineno).then_some(code)
        })
    }

    /// The name of a key, if [`Symbols::resolve`] has seen it.
    pub fn get(&self, key: &CodeKey) -> Option<&Resolved> {
        self.names.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builtin_is_one_row_however_it_was_called() {
        let bound = BuiltinKey {
            tgid: 7,
            kind: calls::BUILTIN_FUNCTION,
            method_def: 0x1000,
            owner: 0x9000,
        };
        let descriptor = BuiltinKey {
            kind: calls::BUILTIN_METHOD,
            owner: 0xa000,
            ..bound
        };
        assert_eq!(builtin_row_key(&bound), builtin_row_key(&descriptor));
        assert!(is_builtin_row(&builtin_row_key(&bound)));
        // Named from the method descriptor, whichever came first.
        assert_eq!(naming_key([bound, descriptor]), Some(descriptor));
        assert_eq!(naming_key([descriptor, bound]), Some(descriptor));
        // Another process, another row.
        let other = BuiltinKey { tgid: 8, ..bound };
        assert_ne!(builtin_row_key(&bound), builtin_row_key(&other));
    }

    #[test]
    fn code_of_a_worker_gone_unread_is_named_as_a_relative_of_its_file_has_it() {
        // A pool's worker ran a code object and exited before its name
        // was read; a process of the same interpreter file named the very
        // same addresses.
        let mut symbols = Symbols::default();
        let worker = 4_000_001;
        symbols.add_kernel_set_up(worker, 3, None);
        symbols.forget_process(worker);
        let key = CodeKey {
            tgid: worker,
            firstlineno: 12,
            code: 0xc2_75a0,
            name: 0xc2_7000,
        };
        let code = CodeSummary {
            qualname: "task".into(),
            filename: "pool.py".into(),
            first_line: 12,
        };
        symbols
            .codes_by_site
            .insert((3, key.code, key.name, 12), code.clone());
        assert_eq!(symbols.resolve([&key]), vec![key]);
        assert_eq!(symbols.get(&key), Some(&Resolved::Code(code.clone())));
        // Another first line at the same address is another object.
        let other = CodeKey {
            firstlineno: 13,
            ..key
        };
        symbols.resolve([&other]);
        assert!(matches!(symbols.get(&other), Some(Resolved::Unknown(_))));
        // Called unknown first, named once a relative names that object.
        let third = CodeKey {
            code: 0xc2_8000,
            ..key
        };
        symbols.resolve([&third]);
        assert!(matches!(symbols.get(&third), Some(Resolved::Unknown(_))));
        let code3 = CodeSummary {
            qualname: "finish".into(),
            ..code.clone()
        };
        symbols
            .codes_by_site
            .insert((3, third.code, third.name, 12), code3.clone());
        assert_eq!(symbols.resolve([&third]), vec![third]);
        assert_eq!(symbols.get(&third), Some(&Resolved::Code(code3)));
    }
}
