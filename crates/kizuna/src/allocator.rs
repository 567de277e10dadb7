//! The global allocator, mimalloc called through [`WordAligned`], and its settings that trade CPU
//! for memory: transparent huge pages off, and a purge delay changed while bulk exports stream.
//!
//! mimalloc hands freed pages back to the OS a while after they are freed (its purge delay,
//! 1,000 ms by default). `$export` frees pages many times a second: with the default, a second's
//! worth stayed resident and the export's peak RSS reached 258–305 MB at 1M resources, over the
//! 300 MB goal; with 10 ms it was 206 MB. Everywhere else the short delay costs CPU: pages given
//! back are faulted in and their free lists rebuilt moments later. Ingest with 16 clients spent
//! 245–253 µs of CPU a resource with 10 ms against 222–228 µs with 1,000 ms (alternated runs). So
//! the delay is short only while an export streams ([`export_streaming`]).
//!
//! mimalloc also asks the kernel for transparent huge pages, and this host's kernel grants them
//! on request (`madvise` mode): a 2 MiB page stays resident while any of it is in use, and a
//! purge must free all of it. With them the server idled at 169 MB after a 100k ingest and its
//! export peaked at 219–222 MB; without, 160 and 184–185 MB, at the same CPU per resource and
//! export rate (alternated runs). [`init`] turns them off for the process.

use std::alloc::{GlobalAlloc, Layout};
use std::os::raw::{c_long, c_void};
use std::sync::OnceLock;

/// mimalloc as the global allocator, asked the way Rust's `System` allocator asks libc: a plain
/// `mi_malloc` when every block already has the alignment, the aligned calls only otherwise.
///
/// The `mimalloc` crate's `MiMalloc`, used before, passed every request to `mi_malloc_aligned`.
/// Its fast path checks the block it would hand out against the alignment and, when the size
/// class has no free block at hand, falls back to a generic path. For the server's small JSON
/// nodes, whose alignment is at most a word, that was 53 instructions an allocation against about
/// 20 (callgrind, `kizuna bench store`): 7 % of all instructions went into the aligned entry
/// points.
pub struct WordAligned;

/// The alignment every mimalloc block has: block sizes are whole words, and pages start aligned.
const BLOCK_ALIGN: usize = std::mem::size_of::<usize>();

/// Whether a plain allocation of `size` bytes satisfies `align` (as `System` decides for libc:
/// also the alignment no larger than the size, so a tiny block is never asked for more).
fn plain(align: usize, size: usize) -> bool {
    align <= BLOCK_ALIGN && align <= size
}

// SAFETY: every call hands mimalloc a size and, where needed, a power-of-two alignment from a
// valid `Layout`; blocks are freed with `mi_free`, which takes aligned and plain blocks alike.
unsafe impl GlobalAlloc for WordAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe {
            if plain(layout.align(), layout.size()) {
                libmimalloc_sys::mi_malloc(layout.size()) as *mut u8
            } else {
                libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe {
            if plain(layout.align(), layout.size()) {
                libmimalloc_sys::mi_zalloc(layout.size()) as *mut u8
            } else {
                libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { libmimalloc_sys::mi_free(ptr as *mut c_void) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; the new block keeps its alignment.
        unsafe {
            if plain(layout.align(), new_size) {
                libmimalloc_sys::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                libmimalloc_sys::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align())
                    as *mut u8
            }
        }
    }
}

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Milliseconds before freed pages go back to the OS while an export streams.
pub const EXPORT_PURGE_DELAY_MS: c_long = 10;

/// The delay at start: mimalloc's default, or what `MIMALLOC_PURGE_DELAY` set. `None` when the
/// environment set it: the operator's choice then holds throughout.
static USUAL: OnceLock<Option<c_long>> = OnceLock::new();

/// Turns transparent huge pages off and reads the delay the process starts with; runs first in
/// `main`.
pub fn init() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE sets one flag of this process's memory map; the kernel checks it
    // at each later page fault. It fails harmlessly on kernels without it.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    USUAL.get_or_init(|| {
        // SAFETY: reads mimalloc's option table (initialising the option from the environment
        // on first read).
        let now = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        std::env::var_os("MIMALLOC_PURGE_DELAY")
            .is_none()
            .then_some(now)
    });
}

/// The hook of `ExportJobs::on_streaming`: the short delay while any export streams, the usual
/// one when the last has ended. Does nothing before [`init`] or when the environment chose.
pub fn export_streaming(active: bool) {
    let Some(Some(usual)) = USUAL.get() else {
        return;
    };
    let delay = if active {
        EXPORT_PURGE_DELAY_MS
    } else {
        *usual
    };
    // SAFETY: stores one aligned word in mimalloc's option table; mimalloc reads it without a
    // lock when it decides a purge, seeing the old or the new delay, both valid.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay) }
    if active {
        // A purge already scheduled keeps the long delay it was scheduled with, and new frees
        // join it: an export shorter than a second finished before anything went back (peak
        // RSS 243 MB against 196 at 100k). Purging what is pending now restarts the schedule.
        // SAFETY: `mi_collect` may be called from any thread at any time.
        unsafe { libmimalloc_sys::mi_collect(true) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size up to a few pages, at every alignment up to 4 KiB, come back aligned,
    /// zeroed when asked, and keep their bytes when they grow or shrink.
    #[test]
    fn every_block_has_its_alignment_and_keeps_its_bytes() {
        let a = WordAligned;
        for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
            for size in (1usize..=80).chain([100, 255, 256, 1000, 4095, 4096, 70_000]) {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: non-zero sizes; each block is freed once, with its layout.
                unsafe {
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null());
                    assert_eq!(z as usize % align, 0, "zeroed {size} at {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    a.dealloc(z, layout);
                    for new in [size, size / 2 + 1, size * 3 + 5] {
                        let p = a.alloc(layout);
                        assert_eq!(p as usize % align, 0, "{size} at {align}");
                        for i in 0..size {
                            *p.add(i) = (i % 251) as u8;
                        }
                        let q = a.realloc(p, layout, new);
                        assert_eq!(q as usize % align, 0, "{size} -> {new} at {align}");
                        assert!((0..size.min(new)).all(|i| *q.add(i) == (i % 251) as u8));
                        a.dealloc(q, Layout::from_size_align_unchecked(new, align));
                    }
                }
            }
        }
    }

    fn purge_delay() -> c_long {
        // SAFETY: reads mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    /// Option 15 is the purge delay: mimalloc 3's default for it is 1,000 ms (no other option has
    /// that default). An export shortens it and its end restores it.
    #[test]
    fn an_export_shortens_the_purge_delay_while_it_streams() {
        // Nothing else in this test binary touches option 15.
        assert_eq!(purge_delay(), 1000);
        export_streaming(true);
        assert_eq!(purge_delay(), 1000, "before init the hook does nothing");
        init();
        export_streaming(true);
        assert_eq!(purge_delay(), EXPORT_PURGE_DELAY_MS);
        export_streaming(false);
        assert_eq!(purge_delay(), 1000);
        #[cfg(target_os = "linux")]
        // SAFETY: reads this process's flag.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) },
            1,
            "huge pages are off"
        );
    }
}
