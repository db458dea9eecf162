//! Debian sid's own CPythons (3.13, 3.14, 3.15) for the tests.
//!
//! No 3.14 or 3.15 build exists on this machine kind, and a distribution's
//! stripped builds are what production runs, so setup takes sid's. They
//! need sid's newer glibc, so setup downloads the packages with apt into a
//! private directory (nothing is installed system-wide), unpacks them into
//! one root, and writes a wrapper per interpreter that runs it through
//! sid's own dynamic loader:
//!
//! ```text
//! <data>/debian-sid/bin/python3.X    (wrappers, found by the test harness)
//! <data>/debian-sid/root/...         (unpacked packages: also the /usr of
//!                                     the tests' container roots)
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

/// The interpreters taken from sid.
pub const VERSIONS: &[&str] = &["3.13", "3.14", "3.15"];

/// Packages that make each of [`VERSIONS`] work with `threading` and
/// `json`: its own three and the libraries they share.
fn packages() -> Vec<String> {
    let mut out: Vec<String> = VERSIONS
        .iter()
        .flat_map(|v| {
            [
                format!("python{v}-minimal"),
                format!("libpython{v}-minimal"),
                format!("libpython{v}-stdlib"),
            ]
        })
        .collect();
    out.extend(SHARED.iter().map(|p| (*p).to_owned()));
    out
}

/// Libraries the interpreters need.
/// (libgcc_s is for python3.15: on the host the system's would do, but
/// not in the tests' container roots, which hold sid's /usr alone.)
const SHARED: &[&str] = &[
    "libc6",
    "libgcc-s1",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libzstd1",
];

/// Where the private interpreters live: `<pyprobe data dir>/debian-sid`.
pub fn sid_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("debian-sid")
}

/// Makes sure every `<data>/debian-sid/bin/python3.X` runs from a root
/// unpacked from today's package list; downloads and unpacks Debian sid's
/// packages if not.
pub fn ensure(data_dir: &Path) -> anyhow::Result<String> {
    let dir = sid_dir(data_dir);
    let wrapper = |v: &str| dir.join("bin").join(format!("python{v}"));
    // The package list the root was unpacked from: a root from another
    // list is unpacked again.
    let stamp = dir.join("root").join(".pyprobe-packages");
    let wanted = packages().join(" ");
    let present: Vec<String> = VERSIONS
        .iter()
        .filter_map(|v| runs(&wrapper(v), v))
        .collect();
    if present.len() == VERSIONS.len()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted)
    {
        return Ok(format!("present ({})", present.join(", ")));
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("apt-get is needed to fetch Debian sid's Python packages");
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
        .args(packages());
    run(&mut download).context("apt-get download (Debian sid's Python packages)")?;

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
    if !loader.exists() {
        bail!("{} is missing from the unpacked packages", loader.display());
    }
    std::fs::create_dir_all(dir.join("bin"))?;
    let mut installed = Vec::new();
    for v in VERSIONS {
        let python = root.join(format!("usr/bin/python{v}"));
        if !python.exists() {
            bail!("{} is missing from the unpacked packages", python.display());
        }
        let wrapper = wrapper(v);
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\n# Debian sid's CPython {v}, run through sid's own loader (written by cargo xtask setup).\n\
                 exec '{}' --library-path '{}' '{}' \"$@\"\n",
                loader.display(),
                lib.display(),
                python.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        match runs(&wrapper, v) {
            Some(version) => installed.push(version),
            None => bail!("{} does not run after unpacking", wrapper.display()),
        }
    }
    std::fs::remove_dir_all(&debs)?;
    std::fs::write(&stamp, &wanted)?;
    Ok(format!("installed ({})", installed.join(", ")))
}

/// The version a wrapper reports, if it runs, is `minor` and can import
/// what the fixtures use.
fn runs(wrapper: &Path, minor: &str) -> Option<String> {
    if !wrapper.exists() {
        return None;
    }
    stdout_of(Command::new(wrapper).args([
        "-c",
        "import sys, threading, json; print('%d.%d.%d' % sys.version_info[:3])",
    ]))
    .ok()
    .map(|s| s.trim().to_owned())
    .filter(|s| s.starts_with(&format!("{minor}.")))
}
