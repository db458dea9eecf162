//! Builds the eBPF programs of `probe-ebpf` (nightly, `bpf-linker`) and leaves
//! the object in `OUT_DIR`, where `src/bpf.rs` embeds it into the binary. The
//! user of `pyprobe` never needs a compiler or a separate object file.

fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "pyprobe-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../probe-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
