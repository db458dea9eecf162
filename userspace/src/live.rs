//! What every live command (`calls`, `entries`) shares: when to stop, how
//! often to report, and how a report is printed.

use std::{io::Write, time::Duration};

use serde::Serialize;

/// Resolves when the user wants to stop: Ctrl-C, SIGTERM, or the end of
/// `duration` if given.
pub async fn stop_requested(duration: Option<Duration>) -> std::io::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = deadline => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    Ok(())
}

/// A ticker whose first tick is one `period` from now (not immediately).
pub fn ticker(period: Duration) -> tokio::time::Interval {
    tokio::time::interval_at(tokio::time::Instant::now() + period, period)
}

/// Prints a report to stdout: one JSON document per line for machines, or
/// `table` for people.
pub fn emit<T: Serialize>(
    report: &T,
    json: bool,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", table(report))?;
    }
    out.flush()?;
    Ok(())
}
