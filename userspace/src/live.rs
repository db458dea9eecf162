//! What every live command (`calls`, `entries`) shares: when to stop, how
//! often to report, and how a report is printed.

use std::{io::Write, time::Duration};

use serde::Serialize;

/// Ctrl-C and SIGTERM, listened for from the moment they are made.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

/// The stop signals [`listen_for_stop`] started listening to.
static SIGNALS: std::sync::Mutex<Option<StopSignals>> = std::sync::Mutex::new(None);

/// Starts listening for Ctrl-C and SIGTERM, so that one that comes while a
/// command attaches (before it waits for it) still stops it. Call once at
/// start, inside the runtime.
pub fn listen_for_stop() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = StopSignals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
    };
    if let Ok(mut slot) = SIGNALS.lock() {
        *slot = Some(signals);
    }
    Ok(())
}

/// Resolves when the user wants to stop: Ctrl-C, SIGTERM (also one that
/// came since [`listen_for_stop`]), or the end of `duration` if given.
pub async fn stop_requested(duration: Option<Duration>) -> std::io::Result<()> {
    let taken = SIGNALS.lock().ok().and_then(|mut s| s.take());
    let mut signals = match taken {
        Some(signals) => signals,
        None => {
            listen_for_stop()?;
            SIGNALS
                .lock()
                .ok()
                .and_then(|mut s| s.take())
                .ok_or_else(|| std::io::Error::other("cannot listen for signals"))?
        }
    };
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    // Ctrl-C in a terminal reaches a launched program too (one process
    // group): it is the program's to take; pyprobe ends when it exits.
    let interrupt = async {
        loop {
            signals.interrupt.recv().await;
            if !crate::launch::any_launched() {
                break;
            }
            eprintln!(
                "pyprobe: Ctrl-C went to the program; pyprobe stops when it exits (SIGTERM stops pyprobe now)"
            );
        }
    };
    tokio::select! {
        _ = deadline => {}
        _ = interrupt => {}
        _ = signals.terminate.recv() => {}
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
