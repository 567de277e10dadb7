//! A VFS for the SQLite writer's connection that hands each commit's write-ahead log to the kernel
//! in a few large `pwrite`s instead of two per page.
//!
//! SQLite writes every WAL frame as two system calls, its 24-byte header and then the page, and
//! the frames (4,120 bytes with 4 KiB pages) straddle the kernel's pages, so each of those is
//! written two or three times. While ingesting, that was 387,000 `pwrite`s in 15 s and a fifth of
//! the writer thread's time, spent in system-call entry, file checks and partial-page writes.
//! Here a commit's frames go out in 64 KiB pieces.
//!
//! The VFS wraps the default one and changes nothing but the WAL file's writes:
//! - a write that continues the previous one (the frames of a transaction, or the log header that
//!   starts the file over at offset 0) is gathered in memory;
//! - the run is written out as soon as the page of a commit frame (a frame header naming the
//!   database size) has been added, inside that page's `xWrite`. SQLite publishes a commit in
//!   the shared WAL index only after all its frames are written, so readers and checkpoints never
//!   see a commit whose frames are still in memory, and a failed write fails the commit as before;
//! - anything else (an overwrite of an earlier frame, a read, a size query, a truncation, a sync,
//!   a file control, closing) first writes the run out, so it sees the file SQLite expects.
//!
//! Frames of a transaction that are not yet committed may stay in memory (at most [`MAX_RUN`]):
//! a crash then loses them, as it would have lost the uncommitted transaction anyway. Other files
//! (the database, its shared memory) are the default VFS's own, opened in place.

use rusqlite::ffi;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The name the VFS is registered under (for [`rusqlite::Connection::open_with_flags_and_vfs`]).
pub const VFS_NAME: &str = "kizuna-walbuf";
const VFS_NAME_C: &CStr = c"kizuna-walbuf";

/// A gathered run is written out once it reaches this size, committed or not.
pub const MAX_RUN: usize = 16 << 20;

/// The most a run hands the default VFS in one call: its `unixWrite` masks a length to 17 bits.
const CHUNK: usize = 64 << 10;

/// The size of a WAL frame header; bytes 4..8 hold the database size in a commit frame, else 0.
const FRAME_HEADER: usize = 24;

/// The size of the WAL file header, written at offset 0 whenever the log starts over.
const WAL_HEADER: usize = 32;

/// Where the default VFS's file object starts inside ours.
const INNER_OFFSET: usize = std::mem::size_of::<WalFile>().next_multiple_of(16);

/// Whether [`register`] succeeded, decided once per process.
static REGISTERED: OnceLock<bool> = OnceLock::new();

/// Runs written out so far in this process (for tests and diagnostics).
static RUNS_WRITTEN: AtomicU64 = AtomicU64::new(0);
/// Writes gathered into runs so far in this process (for tests and diagnostics).
static WRITES_GATHERED: AtomicU64 = AtomicU64::new(0);

/// Registers the VFS (not as the default: only connections that name it use it). Idempotent;
/// returns whether it is available. It initialises SQLite, so [`crate::page_cache::install`] must
/// run first.
pub fn register() -> bool {
    *REGISTERED.get_or_init(|| {
        // SAFETY: finding the default VFS has no preconditions (it initialises SQLite if needed).
        let inner = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
        if inner.is_null() {
            return false;
        }
        // SAFETY: a registered VFS object lives as long as the process.
        let base = unsafe { &*inner };
        let Ok(inner_size) = usize::try_from(base.szOsFile) else {
            return false;
        };
        let Ok(size) = c_int::try_from(INNER_OFFSET + inner_size) else {
            return false;
        };
        let vfs = Box::into_raw(Box::new(ffi::sqlite3_vfs {
            iVersion: 2,
            szOsFile: size,
            mxPathname: base.mxPathname,
            pNext: std::ptr::null_mut(),
            zName: VFS_NAME_C.as_ptr(),
            pAppData: inner as *mut c_void,
            xOpen: Some(open),
            xDelete: Some(delete),
            xAccess: Some(access),
            xFullPathname: Some(full_pathname),
            // Loadable extensions are not enabled; the default VFS ignores its first argument here.
            xDlOpen: base.xDlOpen,
            xDlError: base.xDlError,
            xDlSym: base.xDlSym,
            xDlClose: base.xDlClose,
            xRandomness: Some(randomness),
            xSleep: Some(sleep),
            xCurrentTime: Some(current_time),
            xGetLastError: Some(last_error),
            xCurrentTimeInt64: Some(current_time_int64),
            xSetSystemCall: None,
            xGetSystemCall: None,
            xNextSystemCall: None,
        }));
        // SAFETY: `vfs` is a complete, leaked VFS object whose methods are defined below.
        let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
        if rc != ffi::SQLITE_OK {
            tracing::warn!(
                rc,
                "WAL write buffer VFS not registered; the default VFS is used"
            );
            // SAFETY: SQLite did not keep the pointer.
            drop(unsafe { Box::from_raw(vfs) });
            return false;
        }
        // The object stays registered, and so allocated, for the life of the process.
        true
    })
}

/// Runs of WAL writes written out so far in this process.
pub fn runs_written() -> u64 {
    RUNS_WRITTEN.load(Ordering::Relaxed)
}

/// WAL writes gathered into runs so far in this process.
pub fn writes_gathered() -> u64 {
    WRITES_GATHERED.load(Ordering::Relaxed)
}

/// A WAL file: our methods in front, the default VFS's file object at [`INNER_OFFSET`].
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    run: *mut Run,
}

/// The writes gathered since the last one written out.
#[derive(Default)]
struct Run {
    /// File offset of `data[0]`.
    start: i64,
    data: Vec<u8>,
    /// Where the last write (gathered or not) ended: a write starting here continues it.
    last_end: i64,
    /// The last gathered write was a commit frame's header: its page completes the commit (kept
    /// across a write-out at [`MAX_RUN`] between the two).
    commit_next: bool,
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(wal_close),
    xRead: Some(wal_read),
    xWrite: Some(wal_write),
    xTruncate: Some(wal_truncate),
    xSync: Some(wal_sync),
    xFileSize: Some(wal_file_size),
    xLock: Some(wal_lock),
    xUnlock: Some(wal_unlock),
    xCheckReservedLock: Some(wal_check_reserved_lock),
    xFileControl: Some(wal_file_control),
    xSectorSize: Some(wal_sector_size),
    xDeviceCharacteristics: Some(wal_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// The default VFS behind ours.
///
/// # Safety
/// `vfs` must be the object [`register`] registered.
unsafe fn inner_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: per the contract, `pAppData` holds the default VFS.
    unsafe { (*vfs).pAppData as *mut ffi::sqlite3_vfs }
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite calls this on the registered object.
    let inner = unsafe { inner_vfs(vfs) };
    // SAFETY: the default VFS lives as long as the process.
    let Some(inner_open) = (unsafe { (*inner).xOpen }) else {
        return ffi::SQLITE_ERROR;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // SAFETY: `file` has room for the default VFS's object (szOsFile covers it).
        return unsafe { inner_open(inner, name, file, flags, out_flags) };
    }
    let wal = file as *mut WalFile;
    // SAFETY: `file` has `INNER_OFFSET + inner szOsFile` bytes, 8-aligned like every SQLite
    // allocation; the default VFS's object goes after ours.
    let inner_file = unsafe { (file as *mut u8).add(INNER_OFFSET) } as *mut ffi::sqlite3_file;
    // SAFETY: as above; our methods stay unset until the inner file is open, so a failed open is
    // never closed through them.
    unsafe {
        std::ptr::write(
            wal,
            WalFile {
                base: ffi::sqlite3_file {
                    pMethods: std::ptr::null(),
                },
                inner: inner_file,
                run: std::ptr::null_mut(),
            },
        );
        (*inner_file).pMethods = std::ptr::null();
    }
    // SAFETY: the default VFS's open on its own object.
    let rc = unsafe { inner_open(inner, name, inner_file, flags, out_flags) };
    if rc != ffi::SQLITE_OK {
        // SAFETY: a failed open that left methods set must still be closed (SQLite's rule).
        unsafe {
            let m = (*inner_file).pMethods;
            if !m.is_null() {
                if let Some(close) = (*m).xClose {
                    close(inner_file);
                }
            }
        }
        return rc;
    }
    // SAFETY: `wal` was initialised above.
    unsafe {
        (*wal).run = Box::into_raw(Box::default());
        (*wal).base.pMethods = &WAL_METHODS;
    }
    ffi::SQLITE_OK
}

/// VFS methods handed on to the default VFS, with its own object in place of ours.
macro_rules! delegate {
    ($(fn $name:ident => $method:ident($($arg:ident: $ty:ty),*) else $missing:expr;)*) => {$(
        unsafe extern "C" fn $name(vfs: *mut ffi::sqlite3_vfs, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite calls this on the registered object.
            let inner = unsafe { inner_vfs(vfs) };
            // SAFETY: the default VFS's own method on its own object, with SQLite's arguments.
            match unsafe { (*inner).$method } {
                Some(f) => unsafe { f(inner, $($arg),*) },
                None => $missing,
            }
        }
    )*};
}

delegate! {
    fn delete => xDelete(name: *const c_char, sync: c_int) else ffi::SQLITE_ERROR;
    fn access => xAccess(name: *const c_char, flags: c_int, out: *mut c_int) else ffi::SQLITE_ERROR;
    fn full_pathname => xFullPathname(name: *const c_char, n: c_int, out: *mut c_char)
        else ffi::SQLITE_ERROR;
    fn randomness => xRandomness(n: c_int, out: *mut c_char) else 0;
    fn sleep => xSleep(micros: c_int) else 0;
    fn current_time => xCurrentTime(out: *mut f64) else ffi::SQLITE_ERROR;
    fn last_error => xGetLastError(n: c_int, out: *mut c_char) else 0;
    fn current_time_int64 => xCurrentTimeInt64(out: *mut i64) else ffi::SQLITE_ERROR;
}

/// Our WAL file object behind SQLite's handle.
///
/// # Safety
/// `f` must be a file opened by [`open`] with the WAL flag and not yet closed.
unsafe fn wal<'a>(f: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    // SAFETY: per the contract, `f` points at a live `WalFile`; SQLite calls a file's methods
    // from one thread at a time.
    unsafe { &mut *(f as *mut WalFile) }
}

/// The default VFS's methods for the inner file.
fn methods(w: &WalFile) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the inner file is open (its methods were set by its own open) until `wal_close`.
    unsafe { &*(*w.inner).pMethods }
}

/// The file's gathered run (a separate allocation from the file object).
fn run_of<'a>(w: &WalFile) -> &'a mut Run {
    // SAFETY: `run` is set by `open` and freed only by `wal_close`; one thread at a time.
    unsafe { &mut *w.run }
}

/// Writes the gathered run out through the default VFS. The run is emptied either way: SQLite
/// fails the statement on an error and writes those frames again if it retries.
fn write_run(w: &WalFile, run: &mut Run) -> c_int {
    if run.data.is_empty() {
        return ffi::SQLITE_OK;
    }
    let Some(write) = methods(w).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut rc = ffi::SQLITE_OK;
    let mut done = 0;
    while done < run.data.len() && rc == ffi::SQLITE_OK {
        let at = run.start + done as i64;
        // Pieces end on CHUNK boundaries of the file (the default VFS takes < 128 KiB a call).
        let n = (CHUNK - (at as usize % CHUNK)).min(run.data.len() - done);
        // SAFETY: the default VFS's write of `n` bytes of our buffer at the offset they belong
        // to; `n` ≤ CHUNK fits a c_int.
        rc = unsafe {
            write(
                w.inner,
                run.data[done..].as_ptr() as *const c_void,
                n as c_int,
                at,
            )
        };
        done += n;
    }
    run.data.clear();
    RUNS_WRITTEN.fetch_add(1, Ordering::Relaxed);
    rc
}

unsafe extern "C" fn wal_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls this on a file `open` made.
    let w = unsafe { wal(f) };
    let Ok(len) = usize::try_from(amt) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    // SAFETY: SQLite passes `amt` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
    let run = run_of(w);
    let continues = offset == run.last_end || (offset == 0 && len == WAL_HEADER);
    run.last_end = offset + amt as i64;
    if run.data.is_empty() || offset != run.start + run.data.len() as i64 {
        // Not an extension of the run: what was gathered goes out first.
        let rc = write_run(w, run);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if !continues {
            let Some(write) = methods(w).xWrite else {
                return ffi::SQLITE_IOERR_WRITE;
            };
            // SAFETY: the default VFS's write with SQLite's own arguments.
            return unsafe { write(w.inner, buf, amt, offset) };
        }
        run.start = offset;
    }
    run.data.extend_from_slice(bytes);
    WRITES_GATHERED.fetch_add(1, Ordering::Relaxed);
    let completes_commit = run.commit_next;
    run.commit_next = len == FRAME_HEADER && bytes[4..8] != [0; 4];
    if completes_commit || run.data.len() >= MAX_RUN {
        return write_run(w, run);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn wal_close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this once on a file `open` made.
    let w = unsafe { wal(f) };
    let written = write_run(w, run_of(w));
    // SAFETY: `run` came from `Box::into_raw` in `open` and is freed here only.
    drop(unsafe { Box::from_raw(w.run) });
    w.run = std::ptr::null_mut();
    let closed = match methods(w).xClose {
        // SAFETY: the default VFS's close of its own object, once.
        Some(close) => unsafe { close(w.inner) },
        None => ffi::SQLITE_OK,
    };
    if written != ffi::SQLITE_OK {
        written
    } else {
        closed
    }
}

/// WAL file methods that write the run out, then hand the call to the default VFS's file.
macro_rules! after_run {
    ($(fn $name:ident => $method:ident($($arg:ident: $ty:ty),*) else $missing:expr;)*) => {$(
        unsafe extern "C" fn $name(f: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite calls this on a file `open` made.
            let w = unsafe { wal(f) };
            let rc = write_run(w, run_of(w));
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            match methods(w).$method {
                // SAFETY: the default VFS's own method on its own object, with SQLite's arguments.
                Some(m) => unsafe { m(w.inner, $($arg),*) },
                None => $missing,
            }
        }
    )*};
}

after_run! {
    fn wal_read => xRead(buf: *mut c_void, amt: c_int, offset: i64) else ffi::SQLITE_IOERR_READ;
    fn wal_truncate => xTruncate(size: i64) else ffi::SQLITE_IOERR_TRUNCATE;
    fn wal_sync => xSync(flags: c_int) else ffi::SQLITE_IOERR_FSYNC;
    fn wal_file_size => xFileSize(out: *mut i64) else ffi::SQLITE_IOERR_FSTAT;
    fn wal_file_control => xFileControl(op: c_int, arg: *mut c_void) else ffi::SQLITE_NOTFOUND;
    fn wal_lock => xLock(level: c_int) else ffi::SQLITE_OK;
    fn wal_unlock => xUnlock(level: c_int) else ffi::SQLITE_OK;
    fn wal_check_reserved_lock => xCheckReservedLock(out: *mut c_int) else ffi::SQLITE_OK;
}

unsafe extern "C" fn wal_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this on a file `open` made.
    let w = unsafe { wal(f) };
    match methods(w).xSectorSize {
        // SAFETY: the default VFS's own method on its own object.
        Some(m) => unsafe { m(w.inner) },
        None => 4096,
    }
}

unsafe extern "C" fn wal_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this on a file `open` made.
    let w = unsafe { wal(f) };
    match methods(w).xDeviceCharacteristics {
        // SAFETY: the default VFS's own method on its own object.
        Some(m) => unsafe { m(w.inner) },
        None => 0,
    }
}
