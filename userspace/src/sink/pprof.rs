//! Profiles in pprof's `profile.proto` (gzip-compressed), the format Go's
//! `net/http/pprof`, `go tool pprof`, Parca and Pyroscope read: one
//! location per distinct frame (function, file and line), samples leaf
//! first, labelled with their process, thread and container.

use std::{collections::HashMap, io::Write, time::Duration};

use prost::Message;

use crate::profile::{
    output::Roots,
    stacks::{FrameName, StackKey},
};

/// `perftools.profiles.Profile`, the fields pyprobe writes.
#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    /// What each value of a sample is.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// The samples.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// The locations samples point to.
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// The functions locations point to.
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Every string, the empty one first; other fields index it.
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// When the profile began (ns since the epoch).
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    /// How long it covers.
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    /// What the period is counted in.
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    /// Time between two samples of a thread on CPU.
    #[prost(int64, tag = "12")]
    pub period: i64,
}

/// A value's type and unit (indices into the string table).
#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    /// Type, e.g. "cpu".
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// Unit, e.g. "nanoseconds".
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// One stack and its values.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Locations, leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// Labels.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// A sample's label: a string or a number.
#[derive(Clone, PartialEq, Message)]
pub struct Label {
    /// Key (string index).
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// String value (string index), or 0.
    #[prost(int64, tag = "2")]
    pub str: i64,
    /// Numeric value.
    #[prost(int64, tag = "3")]
    pub num: i64,
}

/// A place in the code.
#[derive(Clone, PartialEq, Message)]
pub struct Location {
    /// Its id (from 1).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The line it is at.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// A line of a function.
#[derive(Clone, PartialEq, Message)]
pub struct Line {
    /// The function (id).
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// The line number.
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// A function.
#[derive(Clone, PartialEq, Message)]
pub struct Function {
    /// Its id (from 1).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its name (string index).
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// Its name as the system knows it (string index).
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// Its file (string index).
    #[prost(int64, tag = "4")]
    pub filename: i64,
    /// The line it starts at.
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// A label of a stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LabelValue {
    /// A string.
    Str(String),
    /// A number.
    Num(i64),
}

/// Builds a profile of CPU samples taken `rate` times a second.
pub struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    /// Frame index (of the caller's frame table) -> location id.
    locations: HashMap<u32, u64>,
    functions: HashMap<(String, String, i32), u64>,
    period: i64,
}

impl Builder {
    /// A profile that began at `start` and covers `duration`, of samples
    /// taken `rate` times a second.
    pub fn new(start: std::time::SystemTime, duration: Duration, rate: u64) -> Self {
        let mut b = Self {
            profile: Profile::default(),
            strings: HashMap::new(),
            locations: HashMap::new(),
            functions: HashMap::new(),
            period: 1_000_000_000 / rate.max(1) as i64,
        };
        b.string("");
        let samples = b.value_type("samples", "count");
        let cpu = b.value_type("cpu", "nanoseconds");
        b.profile.sample_type = vec![samples, cpu.clone()];
        b.profile.period_type = Some(cpu);
        b.profile.period = b.period;
        b.profile.time_nanos = start
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        b.profile.duration_nanos = duration.as_nanos() as i64;
        b
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> ValueType {
        ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        }
    }

    fn location(&mut self, index: u32, frame: &FrameName) -> u64 {
        if let Some(&id) = self.locations.get(&index) {
            return id;
        }
        let key = (frame.function.clone(), frame.file.clone(), frame.first_line);
        let function_id = match self.functions.get(&key) {
            Some(&id) => id,
            None => {
                let id = self.profile.function.len() as u64 + 1;
                let name = self.string(&frame.function);
                let filename = self.string(&frame.file);
                self.profile.function.push(Function {
                    id,
                    name,
                    // None: pprof "demangles" a name equal to its system
                    // name, and may take `<...>` in it for C++ template
                    // arguments: `<module>` became "" (shown as
                    // `<unknown>`, every process's module frames merged).
                    system_name: 0,
                    filename,
                    start_line: i64::from(frame.first_line),
                });
                self.functions.insert(key, id);
                id
            }
        };
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            line: vec![Line {
                function_id,
                line: i64::from(frame.line.unwrap_or(frame.first_line)),
            }],
        });
        self.locations.insert(index, id);
        id
    }

    /// Adds `count` samples of the stack `stack` (indices into `frames`,
    /// outermost first) with `labels`.
    pub fn add(
        &mut self,
        frames: &[FrameName],
        stack: &[u32],
        count: u64,
        labels: &[(&str, LabelValue)],
    ) {
        let location_id = stack
            .iter()
            .rev()
            .filter_map(|&i| Some(self.location(i, frames.get(i as usize)?)))
            .collect();
        let label = labels
            .iter()
            .map(|(key, value)| {
                let key = self.string(key);
                match value {
                    LabelValue::Str(s) => Label {
                        key,
                        str: self.string(s),
                        num: 0,
                    },
                    LabelValue::Num(n) => Label {
                        key,
                        str: 0,
                        num: *n,
                    },
                }
            })
            .collect();
        self.profile.sample.push(Sample {
            location_id,
            value: vec![count as i64, count as i64 * self.period],
            label,
        });
    }

    /// The profile so far.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The profile, encoded and gzip-compressed.
    pub fn gzip(&self) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&self.profile.encode_to_vec())
            .expect("writing to memory");
        gz.finish().expect("writing to memory")
    }
}

/// The samples of `stacks` (frames indexing `frames`) as a gzip'd
/// profile: each labelled `pid`, and `tid` and `thread` (its name, from
/// `roots`) when threads were kept apart, `container` (from
/// `container_of`) when in one, `idle` when sampled off CPU. `started`,
/// `duration` and `rate` describe the sampling.
pub fn encode_stacks<'a>(
    stacks: impl IntoIterator<Item = (&'a StackKey, &'a u64)>,
    frames: &[FrameName],
    roots: &Roots,
    container_of: impl Fn(u32) -> Option<String>,
    started: std::time::SystemTime,
    duration: Duration,
    rate: u64,
) -> Vec<u8> {
    let mut b = Builder::new(started, duration, rate);
    for (key, &n) in stacks {
        let mut labels = vec![("pid", LabelValue::Num(i64::from(key.pid)))];
        if key.tid != 0 {
            labels.push(("tid", LabelValue::Num(i64::from(key.tid))));
            if let Some(name) = roots.thread_names.get(&key.tid) {
                labels.push(("thread", LabelValue::Str(name.clone())));
            }
        }
        if let Some(id) = container_of(key.pid) {
            labels.push(("container", LabelValue::Str(id)));
        }
        if key.idle {
            labels.push(("idle", LabelValue::Str("true".into())));
        }
        b.add(frames, &key.frames, n, &labels);
    }
    b.gzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, line: i32) -> FrameName {
        FrameName {
            function: function.into(),
            file: "app.py".into(),
            line: Some(line),
            first_line: line - 1,
        }
    }

    #[test]
    fn samples_are_leaf_first_with_lines_and_labels() {
        let frames = vec![frame("main", 10), frame("hot", 20), frame("cold", 30)];
        let mut b = Builder::new(std::time::UNIX_EPOCH, Duration::from_secs(2), 100);
        b.add(&frames, &[0, 1], 7, &[("pid", LabelValue::Num(42))]);
        b.add(
            &frames,
            &[0, 2],
            3,
            &[("container", LabelValue::Str("abc".into()))],
        );
        let decoded = {
            let mut raw = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::GzDecoder::new(b.gzip().as_slice()),
                &mut raw,
            )
            .unwrap();
            Profile::decode(raw.as_slice()).unwrap()
        };
        let s = |i: i64| decoded.string_table[i as usize].as_str();
        assert_eq!(decoded.string_table[0], "");
        assert_eq!(decoded.period, 10_000_000);
        assert_eq!(decoded.sample.len(), 2);
        let first = &decoded.sample[0];
        assert_eq!(first.value, vec![7, 70_000_000]);
        let leaf = &decoded.location[first.location_id[0] as usize - 1];
        let function = &decoded.function[leaf.line[0].function_id as usize - 1];
        assert_eq!((s(function.name), leaf.line[0].line), ("hot", 20));
        assert_eq!(s(function.system_name), "", "see Builder::location");
        assert_eq!(s(function.filename), "app.py");
        assert_eq!(function.start_line, 19);
        let root = &decoded.location[first.location_id[1] as usize - 1];
        assert_eq!(root.line[0].line, 10);
        assert_eq!((s(first.label[0].key), first.label[0].num), ("pid", 42));
        let second = &decoded.sample[1];
        assert_eq!(second.location_id[1], first.location_id[1], "main shared");
        assert_eq!(
            (s(second.label[0].key), s(second.label[0].str)),
            ("container", "abc")
        );
        assert_eq!(decoded.function.len(), 3);
    }
}
