//! SQLite's own page cache, wrapped so that one B-tree rebalancing step no longer makes the next
//! commit walk every cached page.
//!
//! When SQLite's `balance_nonroot` swaps two sibling pages, it parks one of them for an instant
//! under the page number of the lock-byte page (1 GiB ÷ page size + 1: page 262,145 with 4 KiB
//! pages). The default cache (`pcache1`) remembers that number as the largest key it has held.
//! On a database smaller than 1 GiB, every commit then truncates the cache above the database's
//! end, and because the remembered key lies far beyond it, the truncation visits every page in the
//! cache: about 10 ms per commit for the writer's 64 MiB cache, 12 % of the writer's time while
//! registering (SQLite 3.46 up to at least 3.54).
//!
//! The wrapper parks such pages under key 0 instead, a page number SQLite never uses, and hands
//! every call on to the default cache. The page that carries the parked key is rekeyed away again
//! within the same rebalancing step, so no truncation ever sees it there.

use rusqlite::ffi;
use std::os::raw::{c_int, c_uint};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The default cache's methods, saved when the wrapper is installed.
static DEFAULT: OnceLock<Methods> = OnceLock::new();

/// The default cache's method table: function pointers and the argument SQLite passes to its
/// `xInit`, never changed once saved.
struct Methods(ffi::sqlite3_pcache_methods2);

// SAFETY: the table is written once, before it is shared, and only read after; the default
// cache's methods are thread-safe (SQLite guards its caches with its own mutexes).
unsafe impl Send for Methods {}
// SAFETY: as above.
unsafe impl Sync for Methods {}

/// Whether [`install`] took effect, decided once per process.
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Pages parked by a rebalancing step since the process started (for tests and diagnostics).
static PARKED: AtomicU64 = AtomicU64::new(0);

/// One cache: the default cache's object and the key the B-tree parks pages under.
struct Wrapped {
    inner: *mut ffi::sqlite3_pcache,
    parked: c_uint,
}

/// Installs the wrapper. SQLite accepts a page cache only before it first initialises, so this
/// must run before any connection opens; later it changes nothing and returns `false` (SQLite then
/// keeps its default cache, which is slower but correct). Idempotent; callers may race each other,
/// but no other thread may be opening SQLite connections while the first call runs (the store
/// calls it before it opens its first).
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        // No memory statistics: with them every SQLite allocation takes a global mutex (1.4 % of
        // the writer's instructions). Nothing here reads them.
        // SAFETY: like GETPCACHE2 below, accepted only before SQLite initialises, else a no-op.
        unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int) };
        let mut default = std::mem::MaybeUninit::<ffi::sqlite3_pcache_methods2>::zeroed();
        // SAFETY: GETPCACHE2 writes one `sqlite3_pcache_methods2` through the pointer; it fails
        // (SQLITE_MISUSE, nothing written) once SQLite is initialised.
        let rc =
            unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, default.as_mut_ptr()) };
        if rc != ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite already initialised: default page cache kept");
            return false;
        }
        // SAFETY: SQLite filled the struct (rc == SQLITE_OK); an all-zero struct is valid too.
        let default = unsafe { default.assume_init() };
        if default.xCreate.is_none() || DEFAULT.set(Methods(default)).is_err() {
            return false;
        }
        let wrapper = ffi::sqlite3_pcache_methods2 {
            iVersion: default.iVersion,
            pArg: default.pArg,
            xInit: default.xInit,
            xShutdown: default.xShutdown,
            xCreate: Some(create),
            xCachesize: Some(cachesize),
            xPagecount: Some(pagecount),
            xFetch: Some(fetch),
            xUnpin: Some(unpin),
            xRekey: Some(rekey),
            xTruncate: Some(truncate),
            xDestroy: Some(destroy),
            xShrink: Some(shrink),
        };
        // SAFETY: PCACHE2 copies the struct; every method it names is defined below and only
        // runs once DEFAULT is set (above).
        let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &wrapper) };
        rc == ffi::SQLITE_OK
    })
}

/// Pages parked by B-tree rebalancing under key 0 so far in this process.
pub fn parked_pages() -> u64 {
    PARKED.load(Ordering::Relaxed)
}

/// The key a page number is cached under: the parking number and 0 trade places.
fn key(w: &Wrapped, pgno: c_uint) -> c_uint {
    if pgno == w.parked {
        0
    } else if pgno == 0 {
        w.parked
    } else {
        pgno
    }
}

/// The wrapped cache behind SQLite's handle.
///
/// # Safety
/// `p` must be a handle returned by [`create`] and not yet destroyed.
unsafe fn wrapped<'a>(p: *mut ffi::sqlite3_pcache) -> &'a Wrapped {
    // SAFETY: per the contract, `p` is a live `Box<Wrapped>` made by `create`.
    unsafe { &*(p as *const Wrapped) }
}

fn defaults() -> Option<&'static ffi::sqlite3_pcache_methods2> {
    DEFAULT.get().map(|m| &m.0)
}

unsafe extern "C" fn create(
    sz_page: c_int,
    sz_extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(f) = defaults().and_then(|d| d.xCreate) else {
        return std::ptr::null_mut();
    };
    // SAFETY: the default cache's own constructor, called with SQLite's arguments.
    let inner = unsafe { f(sz_page, sz_extra, purgeable) };
    if inner.is_null() {
        return inner;
    }
    // SQLite's lock-byte page: PENDING_BYTE (1 GiB) / page size + 1.
    let parked = match u32::try_from(sz_page) {
        Ok(sz) if sz > 0 => (1u32 << 30) / sz + 1,
        _ => c_uint::MAX,
    };
    Box::into_raw(Box::new(Wrapped { inner, parked })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn cachesize(p: *mut ffi::sqlite3_pcache, n: c_int) {
    if let Some(f) = defaults().and_then(|d| d.xCachesize) {
        // SAFETY: `p` came from `create`; the inner handle is the default cache's.
        unsafe { f(wrapped(p).inner, n) }
    }
}

unsafe extern "C" fn pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    match defaults().and_then(|d| d.xPagecount) {
        // SAFETY: as in `cachesize`.
        Some(f) => unsafe { f(wrapped(p).inner) },
        None => 0,
    }
}

unsafe extern "C" fn fetch(
    p: *mut ffi::sqlite3_pcache,
    pgno: c_uint,
    create_flag: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    match defaults().and_then(|d| d.xFetch) {
        Some(f) => {
            // SAFETY: as in `cachesize`.
            let w = unsafe { wrapped(p) };
            // SAFETY: the default cache's method on its own handle.
            unsafe { f(w.inner, key(w, pgno), create_flag) }
        }
        None => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    if let Some(f) = defaults().and_then(|d| d.xUnpin) {
        // SAFETY: as in `cachesize`; `page` belongs to the inner cache.
        unsafe { f(wrapped(p).inner, page, discard) }
    }
}

unsafe extern "C" fn rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    if let Some(f) = defaults().and_then(|d| d.xRekey) {
        // SAFETY: as in `cachesize`.
        let w = unsafe { wrapped(p) };
        if new == w.parked {
            PARKED.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as in `unpin`.
        unsafe { f(w.inner, page, key(w, old), key(w, new)) }
    }
}

unsafe extern "C" fn truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    if let Some(f) = defaults().and_then(|d| d.xTruncate) {
        // SAFETY: as in `cachesize`.
        unsafe { f(wrapped(p).inner, limit) }
    }
}

unsafe extern "C" fn destroy(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: `p` came from `create` and SQLite destroys each cache once.
    let w = unsafe { Box::from_raw(p as *mut Wrapped) };
    if let Some(f) = defaults().and_then(|d| d.xDestroy) {
        // SAFETY: the default cache's destructor on its own handle, once.
        unsafe { f(w.inner) }
    }
}

unsafe extern "C" fn shrink(p: *mut ffi::sqlite3_pcache) {
    if let Some(f) = defaults().and_then(|d| d.xShrink) {
        // SAFETY: as in `cachesize`.
        unsafe { f(wrapped(p).inner) }
    }
}
