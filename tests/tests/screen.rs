//! The full-screen views of `top` and `calls` in a real terminal (tmux):
//! drawn in place (one header on the screen and none left in the
//! scrollback, however many redraws), sorted and toggled by keys; `q`
//! quits within a second, gives the terminal back (main screen, cooked
//! mode, cursor shown) and leaves the final table.
//!
//! Needs root (run through `cargo xtask test`).

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use pyprobe_tests::{
    Fixture, Interpreter, fixture_path, for_each_newest_pyenv, marks, pyprobe_bin,
};

/// A command running in a detached tmux session of its own server.
struct Tmux {
    socket: String,
    /// Where the pane's shell writes pyprobe's exit code and `stty -a`.
    dir: PathBuf,
}

impl Tmux {
    /// Runs `command` in a 200x50 terminal; when it ends the pane's shell
    /// writes its exit code to `exit` and the terminal's modes to `stty`,
    /// then waits.
    fn start(tag: &str, command: &str) -> anyhow::Result<Self> {
        let socket = format!("pyprobe-test-{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&socket);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let script = format!(
            "{command}; echo $? > {d}/exit.tmp; stty -a > {d}/stty; mv {d}/exit.tmp {d}/exit; exec sleep 600",
            d = dir.display()
        );
        let tmux = Self { socket, dir };
        let status = tmux
            .command()
            .args(["new-session", "-d", "-x", "200", "-y", "50", "sh", "-c"])
            .arg(&script)
            .status()
            .context("running tmux (cargo xtask setup installs it)")?;
        ensure!(status.success(), "tmux new-session failed");
        Ok(tmux)
    }

    fn command(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket, "-f", "/dev/null"])
            .env("TERM", "xterm-256color");
        c
    }

    /// The screen as shown; with `history`, the scrollback above it too.
    fn capture(&self, history: bool) -> anyhow::Result<String> {
        let mut c = self.command();
        c.args(["capture-pane", "-p"]);
        if history {
            c.args(["-S", "-"]);
        }
        let out = c.output()?;
        ensure!(out.status.success(), "tmux capture-pane failed");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn keys(&self, keys: &str) -> anyhow::Result<()> {
        let status = self.command().args(["send-keys", keys]).status()?;
        ensure!(status.success(), "tmux send-keys failed");
        Ok(())
    }

    /// A pane variable (`alternate_on`, `cursor_flag`).
    fn pane(&self, variable: &str) -> anyhow::Result<String> {
        let out = self
            .command()
            .args(["display-message", "-p", &format!("#{{{variable}}}")])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Waits up to `timeout` for the screen to satisfy `ok`; returns it.
    fn wait_screen(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture(false)?;
            if ok(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                bail!("no {what} within {timeout:?}; the screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Presses `q` and returns how long the command took to end, and its
    /// exit code.
    fn quit(&self) -> anyhow::Result<(Duration, String)> {
        let exit = self.dir.join("exit");
        let pressed = Instant::now();
        self.keys("q")?;
        while !exit.exists() {
            if pressed.elapsed() > Duration::from_secs(10) {
                bail!(
                    "still running 10 s after q; the screen:\n{}",
                    self.capture(false)?
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = pressed.elapsed();
        Ok((took, std::fs::read_to_string(exit)?.trim().to_owned()))
    }

    /// Presses `q`: the command must end with status 0 within a second,
    /// give the terminal back and leave no copy of the live `header` in
    /// the scrollback; returns the screen and scrollback then.
    fn quit_and_check(&self, header: &str) -> anyhow::Result<String> {
        let (took, code) = self.quit()?;
        ensure!(code == "0", "exit code {code}");
        ensure!(took < Duration::from_secs(1), "q took {took:?} to quit");
        self.check_restored()?;
        let all = self.capture(true)?;
        ensure!(
            count(&all, header) == 0,
            "the live view left its header in the scrollback:\n{all}"
        );
        Ok(all)
    }

    /// Checks the terminal is given back: main screen, cursor shown,
    /// canonical mode with echo.
    fn check_restored(&self) -> anyhow::Result<()> {
        ensure!(
            self.pane("alternate_on")? == "0",
            "still on the alternate screen"
        );
        ensure!(self.pane("cursor_flag")? == "1", "cursor still hidden");
        let stty = std::fs::read_to_string(self.dir.join("stty"))?;
        let modes: BTreeSet<&str> = stty.split_whitespace().collect();
        for mode in ["icanon", "echo", "isig", "icrnl", "opost"] {
            ensure!(modes.contains(mode), "terminal left without {mode}: {stty}");
        }
        Ok(())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Lines of `text` containing `needle`.
fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// The rows under the line holding `titles` (up to the first blank line),
/// split on whitespace.
fn rows_under<'a>(screen: &'a str, titles: &str) -> Vec<Vec<&'a str>> {
    screen
        .lines()
        .skip_while(|l| !l.contains(titles))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect()
}

/// The function column (`name (file:line)`) of a `top` row: the cell
/// `(FILE.py:LINE)` and the name before it.
fn function_of(row: &[&str]) -> String {
    match row
        .iter()
        .position(|c| c.starts_with('(') && c.ends_with(')') && c.contains(".py:"))
    {
        Some(at) if at > 0 => format!("{} {}", row[at - 1], row[at]),
        _ => String::new(),
    }
}

fn top_view(interp: &Interpreter) -> anyhow::Result<()> {
    let fixture = Fixture::start(interp, "profile_workload.py", &[])?;
    let m = marks("profile_workload.py")?;
    let file = fixture_path("profile_workload.py");
    let hot = format!("hot ({}:{})", file.display(), m["hot-loop"] - 2);
    let command = format!(
        "{} top --pid {} --rate 499 --interval 0.5",
        pyprobe_bin().display(),
        fixture.pid()
    );
    let tmux = Tmux::start("top", &command)?;

    // Drawn and redrawn: after a few intervals, hot is first.
    let started = Instant::now();
    let screen = tmux.wait_screen("hot function first", Duration::from_secs(15), |s| {
        rows_under(s, "%Own▼")
            .first()
            .is_some_and(|r| function_of(r) == hot)
    })?;
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    let all = tmux.capture(true)?;
    ensure!(
        count(&all, "pyprobe top:") == 1,
        "the header is not drawn in place: {} copies in screen and scrollback:\n{all}",
        count(&all, "pyprobe top:")
    );
    ensure!(screen.contains("Hz"), "{screen}");

    // Sorted by total: the %Total column never grows down the table.
    tmux.keys("t")?;
    let screen = tmux.wait_screen("sort by total", Duration::from_secs(3), |s| {
        s.contains("%Total▼")
    })?;
    let totals: Vec<f64> = rows_under(&screen, "%Total▼")
        .iter()
        .filter_map(|r| r.get(1)?.parse().ok())
        .collect();
    ensure!(totals.len() >= 5, "{screen}");
    ensure!(
        totals.windows(2).all(|w| w[0] >= w[1]),
        "not sorted by total: {totals:?}\n{screen}"
    );

    // Per thread: each of the 3 workers has its own hot row.
    tmux.keys("o")?;
    tmux.keys("h")?;
    let screen = tmux.wait_screen("rows per thread", Duration::from_secs(3), |s| {
        s.lines()
            .any(|l| l.contains("%Own▼") && l.contains(" Thread "))
    })?;
    let threads: BTreeSet<&str> = rows_under(&screen, "%Own▼")
        .iter()
        .filter(|r| function_of(r) == hot)
        .map(|r| r[4])
        .collect();
    ensure!(
        threads.len() == 3,
        "hot on {} threads, want 3:\n{screen}",
        threads.len()
    );

    // Idle threads: the main thread waits in idle_wait(), off CPU all
    // along, as long as the 3 workers run in all (they share one GIL): about
    // half the samples once shown, none once hidden again.
    let idle_own = |s: &str| -> Option<f64> {
        rows_under(s, "%Own▼")
            .iter()
            .find(|r| function_of(r).starts_with("idle_wait ("))
            .and_then(|r| r[0].parse().ok())
    };
    tmux.keys("h")?;
    tmux.keys("i")?;
    tmux.wait_screen("the idle main thread", Duration::from_secs(5), |s| {
        s.contains("idle: on") && idle_own(s).is_some_and(|own| own >= 20.0)
    })?;
    tmux.keys("i")?;
    tmux.wait_screen("idle hidden again", Duration::from_secs(3), |s| {
        s.contains("idle: off") && s.contains("(hidden)") && idle_own(s).is_none_or(|own| own < 5.0)
    })?;

    let all = tmux.quit_and_check("pyprobe top:")?;
    ensure!(count(&all, "whole run:") == 1, "no final table:\n{all}");
    let last = rows_under(&all, "Function (filename:line)");
    ensure!(
        last.first().is_some_and(|r| function_of(r) == hot),
        "final table does not start with hot:\n{all}"
    );
    Ok(())
}

#[test]
fn top_full_screen_redraws_in_place_takes_keys_and_restores_the_terminal() {
    for_each_newest_pyenv(
        "screen_top",
        "the view does not depend on the interpreter",
        "not run (full-screen view: newest pyenv build)",
        top_view,
    );
}

fn calls_view(interp: &Interpreter) -> anyhow::Result<()> {
    // cProfile's count of fib() for one run of the workload.
    let out = Command::new(&interp.path)
        .arg(fixture_path("calls_workload.py"))
        .arg("--profile")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()?;
    ensure!(out.status.success(), "cProfile run failed");
    let oracle: Vec<(i64, String, u64)> = serde_json::from_slice(&out.stdout)?;
    let (fib_line, _, fib_calls) = oracle
        .iter()
        .find(|(_, name, _)| name == "fib")
        .cloned()
        .context("no fib in cProfile's counts")?;
    let fib_calls = fib_calls.to_string();
    let file_line = format!("calls_workload.py:{fib_line}");
    let is_fib = |r: &Vec<&str>| r.len() >= 6 && r[3] == "fib" && r[4].ends_with(&file_line);

    let mut fixture = Fixture::start(interp, "calls_workload.py", &[])?;
    let command = format!(
        "{} calls --pid {} --interval 0.3",
        pyprobe_bin().display(),
        fixture.pid()
    );
    let tmux = Tmux::start("calls", &command)?;
    tmux.wait_screen("the calls view", Duration::from_secs(15), |s| {
        s.contains("pyprobe calls:")
    })?;
    fixture.call("run", "done")?;
    let screen = tmux.wait_screen("fib's exact count", Duration::from_secs(5), |s| {
        rows_under(s, "CALLS▼")
            .iter()
            .any(|r| is_fib(r) && r[1] == fib_calls)
    })?;
    let all = tmux.capture(true)?;
    ensure!(
        count(&all, "pyprobe calls:") == 1,
        "the header is not drawn in place:\n{all}"
    );
    ensure!(screen.contains("lost: 0"), "{screen}");

    tmux.keys("r")?;
    let screen = tmux.wait_screen("sort by rate", Duration::from_secs(3), |s| {
        s.contains("CALLS/S▼")
    })?;
    let rates: Vec<f64> = rows_under(&screen, "CALLS/S▼")
        .iter()
        .filter_map(|r| r.first()?.parse().ok())
        .collect();
    ensure!(
        rates.windows(2).all(|w| w[0] >= w[1]),
        "not sorted by rate: {rates:?}\n{screen}"
    );

    let all = tmux.quit_and_check("pyprobe calls:")?;
    ensure!(count(&all, "final totals") == 1, "no final totals:\n{all}");
    // The final table (psql style: cells between '|').
    let fib_final = all
        .lines()
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .find(|c| c.len() >= 6 && c[3] == "fib" && c[4].ends_with(&file_line))
        .context("no fib row in the final totals")?;
    ensure!(
        fib_final[1] == fib_calls,
        "final fib calls {}, cProfile {fib_calls}",
        fib_final[1]
    );
    Ok(())
}

#[test]
fn calls_full_screen_shows_exact_counts_in_place_and_restores_the_terminal() {
    for_each_newest_pyenv(
        "screen_calls",
        "the view does not depend on the interpreter",
        "not run (full-screen view: newest pyenv build)",
        calls_view,
    );
}

/// What pyprobe says while the view is up (here: a process picked up by
/// `--name` after the start) goes on the line above the keys, not over the
/// view; once the view ends it is in the scrollback, once.
fn messages_view(interp: &Interpreter) -> anyhow::Result<()> {
    let command = format!(
        "{} top --name 'profile_workload[.]py' --rate 99 --interval 0.5",
        pyprobe_bin().display()
    );
    let tmux = Tmux::start("messages", &command)?;
    tmux.wait_screen("the view", Duration::from_secs(15), |s| {
        s.contains("pyprobe top:") && s.contains(" q quit")
    })?;
    let fixture = Fixture::start(interp, "profile_workload.py", &[])?;
    let said = format!("sampling PID {}", fixture.pid());
    let screen = tmux.wait_screen("the message line", Duration::from_secs(10), |s| {
        s.contains(&said)
    })?;
    // Let it redraw a few times over.
    std::thread::sleep(Duration::from_secs(2));
    let screen_now = tmux.capture(false)?;
    let lines: Vec<&str> = screen_now.lines().collect();
    ensure!(
        lines.first().is_some_and(|l| l.contains("pyprobe top:")),
        "the header is not on the first line:\n{screen_now}"
    );
    let at = lines
        .iter()
        .position(|l| l.contains(&said))
        .with_context(|| format!("the message went away:\n{screen_now}\n(before:\n{screen})"))?;
    ensure!(
        lines.get(at + 1).is_some_and(|l| l.contains(" q quit")),
        "the message is not on the line above the keys:\n{screen_now}"
    );
    ensure!(
        count(&screen_now, &said) == 1,
        "the message is shown more than once:\n{screen_now}"
    );
    let all = tmux.quit_and_check("pyprobe top:")?;
    ensure!(
        count(&all, &said) == 1,
        "the message is not in the scrollback once after the view:\n{all}"
    );
    Ok(())
}

#[test]
fn messages_go_under_the_full_screen_view_and_to_the_scrollback_after() {
    for_each_newest_pyenv(
        "screen_messages",
        "the view does not depend on the interpreter",
        "not run (full-screen view: newest pyenv build)",
        messages_view,
    );
}
