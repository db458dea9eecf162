//! Jobs as plain data: what a command asks of the engine, as a value the
//! command line builds (`main.rs`) and that reads and writes as JSON
//! (`{"job": "calls", "pids": [1234], ...}`), so a job can be stored,
//! sent and checked apart from the flags that made it. Running one is
//! [`Job::run`]: each command is one job over an engine of its own; the
//! agent runs its jobs over one engine.

use serde::{Deserialize, Serialize};

use crate::{
    calls::CallsOptions,
    dump::DumpOptions,
    logpoint::session::LogOptions,
    profile::{RecordOptions, TopOptions},
};

/// One job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// `pyprobe dump`: one process's threads, stacks and locals, now.
    Dump(DumpOptions),
    /// `pyprobe calls`: exact call counts (and latency) per function.
    Calls(CallsOptions),
    /// `pyprobe record`: a sampled profile written to a file.
    Record(RecordOptions),
    /// `pyprobe top`: the hottest functions, live.
    Top(TopOptions),
    /// `pyprobe log`: log points.
    Log(LogOptions),
}

impl Job {
    /// Runs the job to its end (its duration, its targets' exit, Ctrl-C).
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Job::Dump(opts) => crate::dump::run(&opts),
            Job::Calls(opts) => crate::calls::run(opts).await,
            Job::Record(opts) => crate::profile::record(opts).await,
            Job::Top(opts) => crate::profile::top(opts).await,
            Job::Log(opts) => crate::logpoint::session::run(opts).await,
        }
    }
}

/// A [`std::time::Duration`] as seconds (a float) in a job spec.
pub(crate) mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs)
            .map_err(|_| serde::de::Error::custom(format!("{secs} is not a number of seconds")))
    }
}

/// An optional [`std::time::Duration`] as seconds in a job spec.
pub(crate) mod opt_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|secs| {
                Duration::try_from_secs_f64(secs).map_err(|_| {
                    serde::de::Error::custom(format!("{secs} is not a number of seconds"))
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_calls_job_reads_from_json_as_the_command_line_would_build_it() {
        let job: Job = serde_json::from_str(
            r#"{"job": "calls", "pids": [], "all": true,
                "select": {"name": "gunicorn: worker", "container": null},
                "interval": 1.5, "duration": 30, "top": 20, "filter": "app.py",
                "json": false, "builtins": true, "latency": true}"#,
        )
        .unwrap();
        let Job::Calls(c) = job else {
            panic!("not a calls job: {job:?}")
        };
        assert!(c.all && c.pids.is_empty() && c.latency && c.builtins && !c.json);
        assert_eq!(
            c.select.name.as_ref().map(|r| r.as_str()),
            Some("gunicorn: worker")
        );
        assert!(
            c.select
                .name
                .as_ref()
                .is_some_and(|r| r.is_match("gunicorn: worker [app:app]"))
        );
        assert_eq!(c.interval, Duration::from_millis(1500));
        assert_eq!(c.duration, Some(Duration::from_secs(30)));
        assert_eq!((c.top, c.filter.as_deref()), (Some(20), Some("app.py")));
        // Knobs of the benchmarks and the agent default to off.
        assert!(!c.empty_program && !c.per_process_probes);
    }

    #[test]
    fn every_job_goes_to_json_and_back_unchanged() {
        let jobs = [
            r#"{"job":"dump","pid":7,"locals":true,"json":false,"bounds":{"depth":3,"items":100,"string_len":255,"redact":true}}"#,
            r#"{"job":"record","profile":{"pids":[7],"all":false,"select":{"name":null,"container":null},"rate":99,"duration":null,"idle":false,"gil":true,"threads":false},"output":"out.svg","format":"flamegraph","every":null}"#,
            r#"{"job":"top","profile":{"pids":[],"all":true,"select":{"name":null,"container":"3f2a"},"rate":49,"duration":10.0,"idle":true,"gil":false,"threads":true},"interval":1.0,"rows":25,"json":true}"#,
            r#"{"job":"log","pids":[7],"all":false,"select":{"name":null,"container":null},"points":[{"at":"app.py:42","when":"user.id == 7","msg":"order={order.id}"}],"rate":10,"count":null,"duration":null,"json":true,"stack":false,"redact":true}"#,
        ];
        for text in jobs {
            let job: Job = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let again: Job = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
            assert_eq!(
                serde_json::to_value(&job).unwrap(),
                serde_json::to_value(&again).unwrap()
            );
            assert_eq!(
                serde_json::to_value(&job).unwrap(),
                serde_json::from_str::<serde_json::Value>(text).unwrap(),
                "{text}"
            );
        }
    }

    #[test]
    fn a_bad_spec_says_what_is_wrong() {
        let e = serde_json::from_str::<Job>(
            r#"{"job":"calls","pids":[],"all":true,"select":{"name":"(unclosed"},"interval":1,"duration":null,"top":null,"filter":null,"json":true,"builtins":true,"latency":false}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("name \"(unclosed\" is not a regular expression"),
            "{e}"
        );
        let e = serde_json::from_str::<Job>(r#"{"job":"profile"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `profile`"), "{e}");
        let e = serde_json::from_str::<Job>(
            r#"{"job":"top","profile":{"pids":[],"all":true,"select":{},"rate":49,"duration":-1,"idle":false,"gil":false,"threads":false},"interval":1,"rows":null,"json":true}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("-1 is not a number of seconds"),
            "{e}"
        );
        // Read as seconds, never run (a negative one made a panic).
        let e = serde_json::from_str::<Job>(
            r#"{"job":"log","pids":[7],"all":false,"select":{},"points":[{"at":"app.py:42","when":null,"msg":null}],"rate":0,"count":null,"duration":-5,"json":true,"stack":false,"redact":true}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("-5 is not a number of seconds"),
            "{e}"
        );
    }
}
