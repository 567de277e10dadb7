//! Injected time: retention periods, consent periods and inbox deadlines read a [`Clock`], so tests
//! run years in milliseconds and a replay gives the same answers.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

/// The service's notion of now.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until moved (tests, replays).
#[derive(Debug)]
pub struct FixedClock {
    ms: AtomicI64,
}

impl FixedClock {
    /// A clock at `t`.
    pub fn at(t: DateTime<Utc>) -> FixedClock {
        FixedClock {
            ms: AtomicI64::new(t.timestamp_millis()),
        }
    }

    /// Moves the clock to `t`.
    pub fn set(&self, t: DateTime<Utc>) {
        self.ms.store(t.timestamp_millis(), Ordering::SeqCst);
    }

    /// Moves the clock forward.
    pub fn advance(&self, d: chrono::Duration) {
        self.ms.fetch_add(d.num_milliseconds(), Ordering::SeqCst);
    }
}

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.ms.load(Ordering::SeqCst)).unwrap_or_default()
    }
}
