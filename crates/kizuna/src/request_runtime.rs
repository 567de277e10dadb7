//! The runtime that serves requests, with its threads a step below the SQLite writer.
//!
//! Every write on SQLite queues on one writer thread. On a small machine the request threads
//! (parsing, validation, index extraction) compete with it for the same cores: during a
//! 16-client ingest on 2 cores the writer was busy 95 % of the wall time but on a CPU only
//! two thirds of it, waiting the rest behind request work, while every request waited on it.
//! Request threads therefore run at a nicer priority than the writer; an unprivileged process
//! may lower its own threads' priority, never raise it. The writer and SQLite's own
//! threads keep the default.

/// How much nicer (lower priority) request threads run than the rest of the process. At +5 the
/// writer still spent 15 % of a 100k ingest runnable but waiting for a core
/// (`/proc/<pid>/task/<tid>/schedstat`); +10 took back 5.5 % of ingest throughput (mean of six
/// alternated pairs) and 2–3 % of registration's, +19 was no better than +10.
pub const REQUEST_NICENESS: i32 = 10;

/// A multi-threaded runtime whose worker and blocking threads run at [`REQUEST_NICENESS`].
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(yield_to_writer)
        .build()
}

/// Lowers the calling thread's priority (Linux nice values are per thread).
fn yield_to_writer() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take plain integers; failure leaves the thread as it was.
        let rc = unsafe {
            let tid = libc::gettid();
            let now = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
            libc::setpriority(
                libc::PRIO_PROCESS,
                tid as libc::id_t,
                now.saturating_add(REQUEST_NICENESS),
            )
        };
        if rc != 0 {
            tracing::debug!("request thread priority unchanged");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's nice value.
    fn own_niceness() -> i32 {
        // SAFETY: plain integer calls about the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn worker_and_blocking_threads_run_nicer_than_the_thread_that_built_the_runtime() {
        let base = own_niceness();
        // Nice values stop at 19.
        let expected = (base + REQUEST_NICENESS).min(19);
        let rt = build().unwrap();
        let worker = rt.block_on(async { tokio::spawn(async { own_niceness() }).await.unwrap() });
        let blocking =
            rt.block_on(async { tokio::task::spawn_blocking(own_niceness).await.unwrap() });
        assert_eq!(worker, expected);
        assert_eq!(blocking, expected);
        // The building thread (where `serve` opens the store and starts its writer) keeps its own.
        assert_eq!(own_niceness(), base);
    }
}
