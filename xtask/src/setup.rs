//! `cargo xtask setup`: installs what building pyprobe needs, idempotently.
//!
//! 1. The nightly toolchain with `rust-src` (the eBPF crate is built with
//!    `-Z build-std=core` for `bpfel-unknown-none`).
//! 2. `bpf-linker` 0.13, built against the LLVM that nightly rustc itself
//!    ships (`cargo install bpf-linker` with default features wants a system
//!    LLVM this machine does not have). The LLVM library is copied out of the
//!    rustup tree, which rustup prunes on updates, into
//!    `~/.local/share/pyprobe/`, and the linker is linked against that copy.
//!
//! 3. Debian sid's CPython 3.13, 3.14 and 3.15 for the tests (see `sid`).
//!
//! A stamp file records what was built; a second run only checks and takes
//! seconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{
    sid,
    util::{self, cargo_home, home, run, stdout_of},
};

/// bpf-linker version known to work with aya 0.14 and LLVM 22 here.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors bpf-linker 0.13 has a feature for.
const SUPPORTED_LLVM: &[u32] = &[20, 21, 22];

/// Runs every step; returns the wall time it took.
pub fn setup() -> anyhow::Result<f64> {
    let started = Instant::now();
    println!(
        "xtask setup: checking the build toolchain (first run builds bpf-linker: a few minutes)"
    );
    step("nightly toolchain", ensure_nightly)?;
    step("nightly rust-src", ensure_rust_src)?;
    step("bpf-linker", ensure_bpf_linker)?;
    step("Debian tools", ensure_debian_tools)?;
    // Only the tests need sid's interpreters; without them they still run
    // (and say which versions were not covered), so a failed download
    // warns instead of stopping setup.
    let data = data_dir()?;
    if let Err(e) = step("Debian sid python3.13-3.15 (tests)", || sid::ensure(&data)) {
        println!(
            "  Debian sid python3.13-3.15 (tests) NOT AVAILABLE, tests will not cover them: {e:#}"
        );
    }
    let secs = started.elapsed().as_secs_f64();
    println!("xtask setup: done in {secs:.1}s");
    Ok(secs)
}

/// Real tools the tests hold pyprobe's output to, from Debian's packages:
/// (command, package).
const DEBIAN_TOOLS: &[(&str, &str)] = &[
    // `promtool check metrics` for the agent's /metrics.
    ("promtool", "prometheus"),
    // `go tool pprof` for pprof profiles.
    ("go", "golang-go"),
    // A real terminal for the full-screen `top` and `calls` views.
    ("tmux", "tmux"),
];

/// Installs the packages of [`DEBIAN_TOOLS`] whose command is missing.
fn ensure_debian_tools() -> anyhow::Result<String> {
    let missing: Vec<&str> = DEBIAN_TOOLS
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok("present".into());
    }
    println!("  installing {} from Debian...", missing.join(" "));
    let apt_get = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .context("running apt-get")
    };
    let install: Vec<&str> = ["install", "-y", "-q", "--no-install-recommends"]
        .into_iter()
        .chain(missing.iter().copied())
        .collect();
    if !apt_get(&install)?.success() {
        // A machine whose package lists are stale: read them and try once more.
        apt_get(&["update", "-q"])?;
        anyhow::ensure!(
            apt_get(&install)?.success(),
            "apt-get install {} failed",
            missing.join(" ")
        );
    }
    Ok(format!("installed {}", missing.join(" ")))
}

/// Whether `command` is an executable file in a `$PATH` directory.
fn on_path(command: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(command))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
    let started = Instant::now();
    let what = f().with_context(|| format!("setup step `{name}`"))?;
    println!(
        "  {name:<18} {what} ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn ensure_nightly() -> anyhow::Result<String> {
    let list = stdout_of(rustup().args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs)")?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        return Ok("present".into());
    }
    println!("  installing the nightly toolchain (minimal profile)...");
    run(rustup().args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    Ok("installed".into())
}

fn ensure_rust_src() -> anyhow::Result<String> {
    let installed =
        stdout_of(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok("present".into());
    }
    run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok("installed".into())
}

/// What the nightly toolchain's LLVM is.
struct NightlyLlvm {
    major: u32,
    /// The real shared library in the nightly sysroot, e.g.
    /// `libLLVM.so.22.1-rust-1.97.0-nightly`.
    library: PathBuf,
}

fn nightly_llvm() -> anyhow::Result<NightlyLlvm> {
    let version = stdout_of(rustup().args(["run", "nightly", "rustc", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` reports no LLVM version")?
        .trim()
        .to_owned();
    let major: u32 = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot parse LLVM version {llvm}"))?;
    let sysroot = stdout_of(rustup().args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    // The real library is libLLVM.so.<ver>-rust-<ver>; libLLVM-NN-rust-*.so
    // is only a linker script.
    let library = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib_dir.display()))?;
    Ok(NightlyLlvm { major, library })
}

/// pyprobe's data directory: `${XDG_DATA_HOME:-~/.local/share}/pyprobe`.
pub fn data_dir() -> anyhow::Result<PathBuf> {
    if std::env::var_os("XDG_DATA_HOME").is_none() {
        // Says what is missing rather than writing under /.
        home()?;
    }
    Ok(pyprobe_testenv::data_dir())
}

fn ensure_bpf_linker() -> anyhow::Result<String> {
    let llvm = nightly_llvm()?;
    if !SUPPORTED_LLVM.contains(&llvm.major) {
        bail!(
            "nightly rustc uses LLVM {}, but bpf-linker {BPF_LINKER_VERSION} supports LLVM {:?}; \
             install a nightly with one of those",
            llvm.major,
            SUPPORTED_LLVM
        );
    }
    let lib_name = llvm
        .library
        .file_name()
        .and_then(|n| n.to_str())
        .context("LLVM library name")?
        .to_owned();
    let prefix = data_dir()?.join("llvm").join(&lib_name);
    let stamp_path = data_dir()?.join("bpf-linker.stamp");
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm-{} {lib_name}\n",
        llvm.major
    );
    let linker = cargo_home()?.join("bin").join("bpf-linker");

    let stamp_ok = std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str());
    let lib_ok = prefix.join("lib").join(&lib_name).is_file();
    if stamp_ok && lib_ok && linker_runs(&linker) {
        return Ok(format!(
            "{BPF_LINKER_VERSION} (LLVM {}) present",
            llvm.major
        ));
    }

    // Copy rustc's LLVM out of the rustup tree (rustup removes it on update).
    let lib_dir = prefix.join("lib");
    if !lib_ok {
        std::fs::create_dir_all(&lib_dir)?;
        let tmp = lib_dir.join(format!("{lib_name}.tmp"));
        std::fs::copy(&llvm.library, &tmp)
            .with_context(|| format!("copying {}", llvm.library.display()))?;
        std::fs::rename(&tmp, lib_dir.join(&lib_name))?;
    }
    let link = lib_dir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib_name, &link)?;

    println!(
        "  building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM {} (about a minute)...",
        llvm.major
    );
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--force",
        "--no-default-features",
        "--features",
        &format!("llvm-{}", llvm.major),
    ])
    .env("LLVM_PREFIX", &prefix)
    // Build with the default toolchain even if xtask runs under another.
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO_TARGET_DIR");
    let log = data_dir()?.join("bpf-linker-build.log");
    let out = util::output(&mut cmd)?;
    std::fs::write(&log, [&out.stdout[..], &out.stderr[..]].concat())?;
    if !out.status.success() {
        bail!(
            "building bpf-linker failed ({}); full log in {}",
            out.status,
            log.display()
        );
    }
    if !linker_runs(&linker) {
        bail!(
            "{} was installed but does not run; log in {}",
            linker.display(),
            log.display()
        );
    }
    std::fs::write(&stamp_path, stamp)?;
    Ok(format!("{BPF_LINKER_VERSION} (LLVM {}) built", llvm.major))
}

fn linker_runs(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}
