//! Names of the code objects the kernel counted.
//!
//! The kernel keys counts by (process, code address, `co_name` address,
//! first line), so a code object freed and replaced by another at the same
//! address gets a new key. Each key is named once, when first seen, by
//! reading the code object from the live process; the name stays valid after
//! the code object is gone.

use std::collections::{BTreeMap, HashMap};

use pyprobe_common::calls::{self, BuiltinKey, CodeKey};

use crate::container::{Container, Placement};
use crate::python::{
    memory::{Memory, ProcessMemory},
    reader::{CodeSummary, Target},
};

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
    names: HashMap<CodeKey, Resolved>,
    /// For each builtin row, the kernel key to name it from (see
    /// [`naming_key`]).
    builtins: HashMap<CodeKey, BuiltinKey>,
    /// The container of each process in one.
    containers: BTreeMap<u32, Container>,
}

impl Symbols {
    /// Adds a process to read names from.
    pub fn add_process(&mut self, pid: u32, target: Target<ProcessMemory>) {
        self.processes.insert(pid, target);
        if let Some(container) = Placement::of(pid).and_then(|p| p.container) {
            self.containers.insert(pid, container);
        }
    }

    /// The container process `pid` runs in, if any.
    pub fn container(&self, pid: u32) -> Option<&Container> {
        self.containers.get(&pid)
    }

    /// Whether `pid` was added.
    pub fn has_process(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
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

    /// Names every key not named yet; returns the keys named now.
    pub fn resolve<'a>(&mut self, keys: impl IntoIterator<Item = &'a CodeKey>) -> Vec<CodeKey> {
        let mut new = Vec::new();
        for key in keys {
            if self.names.contains_key(key) {
                continue;
            }
            new.push(*key);
            let resolved = match self.processes.get(&key.tgid) {
                None => Resolved::Unknown("process not set up".into()),
                Some(_) if is_builtin_row(key) && !self.builtins.contains_key(key) => {
                    Resolved::Unknown("builtin not noted".into())
                }
                Some(target) if let Some(b) = self.builtins.get(key) => {
                    let kind = if b.kind == calls::BUILTIN_METHOD {
                        super::builtins::BuiltinKind::MethodDescriptor
                    } else {
                        super::builtins::BuiltinKind::Function
                    };
                    match super::builtins::builtin_label(target, kind, b.method_def, b.owner) {
                        Ok(label) => Resolved::Code(CodeSummary {
                            qualname: label,
                            filename: BUILTIN_FILE.into(),
                            first_line: 0,
                        }),
                        Err(e) => Resolved::Unknown(e.to_string()),
                    }
                }
                Some(target) => {
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
            self.names.insert(*key, resolved);
        }
        new
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
}
