//! Names of the code objects the kernel counted.
//!
//! The kernel keys counts by (process, code address, `co_name` address,
//! first line), so a code object freed and replaced by another at the same
//! address gets a new key. Each key is named once, when first seen, by
//! reading the code object from the live process; the name stays valid after
//! the code object is gone.

use std::collections::{BTreeMap, HashMap};

use pyprobe_common::calls::{self, BuiltinKey, CodeKey};

use crate::python::{
    memory::{Memory, ProcessMemory},
    reader::{CodeSummary, Target},
};

/// File name shown for builtins.
pub const BUILTIN_FILE: &str = "<builtin>";

/// The key a builtin's count is reported under, beside code objects: its
/// first line is `u32::MAX - kind`, a line no code object starts at.
pub fn builtin_row_key(b: &BuiltinKey) -> CodeKey {
    CodeKey {
        tgid: b.tgid,
        firstlineno: u32::MAX - b.kind,
        code: b.method_def,
        name: b.owner,
    }
}

/// The builtin a key made by [`builtin_row_key`] stands for.
pub fn row_builtin(key: &CodeKey) -> Option<BuiltinKey> {
    let kind = u32::MAX - key.firstlineno;
    (kind == calls::BUILTIN_FUNCTION || kind == calls::BUILTIN_METHOD).then_some(BuiltinKey {
        tgid: key.tgid,
        kind,
        method_def: key.code,
        owner: key.name,
    })
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
}

impl Symbols {
    /// Adds a process to read names from.
    pub fn add_process(&mut self, pid: u32, target: Target<ProcessMemory>) {
        self.processes.insert(pid, target);
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
                Some(target) if let Some(b) = row_builtin(key) => {
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
