//! Keeps freed memory in the process for reuse during training.
//!
//! A training step allocates and frees the same large activation and gradient buffers (tens of
//! MB) every step. glibc's malloc serves allocations above its mmap threshold with fresh `mmap`
//! pages and unmaps them on free, so every step paid a page fault and a kernel zeroing per
//! page: 20–40 % of a step on this workload (`docs/benchmarks.md`, "Profile of a training step").
//! [`keep_freed_memory`] turns that off (`M_MMAP_MAX = 0`: the heap serves every allocation;
//! `M_TRIM_THRESHOLD` high: the heap is not shrunk after each free), so the buffers of one step
//! are reused by the next. The cost is that the process keeps its peak heap until it exits,
//! which is what a trainer does anyway. Training calls it once; other allocators or C libraries
//! are left alone.
use std::sync::Once;

static ONCE: Once = Once::new();

/// Applies the settings above, once per process (no-op outside glibc).
pub fn keep_freed_memory() {
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes malloc's tuning parameters; it is safe to call at any
        // time, from any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}
