//! A private CPython 3.14 for the tests.
//!
//! No 3.14 build exists on this machine kind, but Debian sid packages one.
//! Its binary needs sid's newer glibc, so setup downloads the packages with
//! apt into a private directory (nothing is installed system-wide), unpacks
//! them, and writes a wrapper that runs the interpreter through sid's own
//! dynamic loader:
//!
//! ```text
//! <data>/debian-sid/bin/python3.14   (wrapper, found by the test harness)
//! <data>/debian-sid/root/...         (unpacked packages)
//! ```
//!
//! Under the wrapper the process's exe is `ld-linux-x86-64.so.2` and the
//! interpreter (stripped, libpython linked in, `_Py_DebugOffsets` present)
//! is mapped like a library, which pyprobe must handle anyway.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util::{run, stdout_of};

/// Packages that make a working `python3.14` with `threading` and `json`.
const PACKAGES: &[&str] = &[
    "python3.14-minimal",
    "libpython3.14-minimal",
    "libpython3.14-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libzstd1",
];

/// Where the private interpreters live: `<pyprobe data dir>/debian-sid`.
pub fn sid_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("debian-sid")
}

/// Makes sure `<data>/debian-sid/bin/python3.14` runs; downloads and
/// unpacks Debian sid's packages if it does not.
pub fn ensure(data_dir: &Path) -> anyhow::Result<String> {
    let dir = sid_dir(data_dir);
    let wrapper = dir.join("bin").join("python3.14");
    if let Some(version) = runs(&wrapper) {
        return Ok(format!("present ({version})"));
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("apt-get is needed to fetch Debian sid's python3.14");
    }
    let apt = dir.join("apt");
    let root = dir.join("root");
    let debs = dir.join("debs");
    for d in [
        apt.join("lists/partial"),
        apt.join("archives/partial"),
        apt.join("sources.list.d"),
        apt.join("preferences.d"),
        debs.clone(),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(
        apt.join("sources.list"),
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
         http://deb.debian.org/debian sid main\n",
    )?;
    std::fs::write(apt.join("status"), "")?;
    let apt_options = |cmd: &mut Command| {
        let a = apt.display();
        for opt in [
            format!("Dir::Etc::SourceList={a}/sources.list"),
            format!("Dir::Etc::SourceParts={a}/sources.list.d"),
            format!("Dir::Etc::PreferencesParts={a}/preferences.d"),
            format!("Dir::State={a}"),
            format!("Dir::State::status={a}/status"),
            format!("Dir::Cache={a}"),
        ] {
            cmd.arg("-o").arg(opt);
        }
    };
    let mut update = Command::new("apt-get");
    apt_options(&mut update);
    update.args(["-q", "update"]);
    run(&mut update).context("apt-get update (Debian sid index)")?;

    for old in std::fs::read_dir(&debs)?.flatten() {
        std::fs::remove_file(old.path())?;
    }
    let mut download = Command::new("apt-get");
    apt_options(&mut download);
    download
        .current_dir(&debs)
        .args(["-q", "download"])
        .args(PACKAGES);
    run(&mut download).context("apt-get download (Debian sid python3.14)")?;

    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    for deb in std::fs::read_dir(&debs)?.flatten() {
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb.path())
            .arg(&root))?;
    }
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    let loader = lib.join("ld-linux-x86-64.so.2");
    let python = root.join("usr/bin/python3.14");
    for needed in [&loader, &python] {
        if !needed.exists() {
            bail!("{} is missing from the unpacked packages", needed.display());
        }
    }
    std::fs::create_dir_all(wrapper.parent().expect("bin dir"))?;
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# Debian sid's CPython 3.14, run through sid's own loader (written by cargo xtask setup).\n\
             exec '{}' --library-path '{}' '{}' \"$@\"\n",
            loader.display(),
            lib.display(),
            python.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    std::fs::remove_dir_all(&debs)?;
    match runs(&wrapper) {
        Some(version) => Ok(format!("installed ({version})")),
        None => bail!("{} does not run after unpacking", wrapper.display()),
    }
}

/// The version a wrapper reports, if it runs and can import what the
/// fixtures use.
fn runs(wrapper: &Path) -> Option<String> {
    if !wrapper.exists() {
        return None;
    }
    stdout_of(Command::new(wrapper).args([
        "-c",
        "import sys, threading, json; print('%d.%d.%d' % sys.version_info[:3])",
    ]))
    .ok()
    .map(|s| s.trim().to_owned())
    .filter(|s| s.starts_with("3.14."))
}
