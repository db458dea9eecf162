//! `pyprobe calls --pid PID`, with an empty BPF program at the same sites
//! as the counter: what `cargo xtask bench` times to tell the cost of the
//! trap from the cost of counting. Not part of the product.
//!
//! Usage: `pyprobe-empty-calls PID`; prints pyprobe's set-up lines, then
//! runs until Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use pyprobe::calls::{self, CallsOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pid: u32 = std::env::args()
        .nth(1)
        .context("usage: pyprobe-empty-calls PID")?
        .parse()
        .context("PID is a number")?;
    calls::run(CallsOptions {
        per_process_probes: false,
        pids: vec![pid],
        all: false,
        select: Default::default(),
        interval: Duration::from_secs(3600),
        duration: None,
        top: None,
        filter: None,
        json: true,
        empty_program: true,
        builtins: true,
        latency: false,
    })
    .await
}
