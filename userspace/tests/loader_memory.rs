//! The BPF loader must not parse the kernel's BTF on its own: aya 0.14's
//! `EbpfLoader::new` did (about 19 MB of heap for a type table pyprobe never
//! uses, most of `record`'s peak RSS). A counting allocator measures it.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

/// The system allocator, keeping the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only counts
// are kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as it came.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn the_bpf_loader_does_not_parse_the_kernel_btf() {
    let vmlinux = std::path::Path::new("/sys/kernel/btf/vmlinux");
    let size = std::fs::metadata(vmlinux)
        .expect("this test needs the kernel's BTF at /sys/kernel/btf/vmlinux")
        .len();
    assert!(
        size > 1 << 20,
        "kernel BTF of {size} bytes: too small to tell"
    );
    let before = IN_USE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let loader = aya::EbpfLoader::new();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    drop(loader);
    assert!(
        peak < 64 * 1024,
        "EbpfLoader::new allocated up to {peak} bytes (the kernel BTF is {size} bytes)"
    );
}
