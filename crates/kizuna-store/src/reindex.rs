//! Reindexing after an upgrade, in the background. When a new schema changes what some types'
//! resources index (schema 10: the resource inside a Bundle), opening an older store records the
//! types in `kz_meta` and returns at once; a task rebuilds their rows a page at a time beside the
//! store's other work, recording each finished page, so a restart resumes where it stopped. Until
//! it is done, searches that may depend on those rows say so ([`SearchResult::reindexing`]).
//! Reindexing inside `Store::open` held a server's start for about 4½ minutes per million
//! resources of the affected types.
//!
//! [`SearchResult::reindexing`]: crate::SearchResult::reindexing

use std::sync::RwLock;

use sqlx::Row;

use crate::write::Bind;
use crate::{SearchQuery, Store, StoreError};

/// The `kz_meta` key of the types still to reindex, comma-separated, in order; `*` is every type.
pub(crate) const PENDING_KEY: &str = "reindex_pending";
/// The `kz_meta` key of the last row id reindexed of the first pending type.
pub(crate) const AFTER_KEY: &str = "reindex_after";
/// Every type.
const ALL: &str = "*";
/// Consecutive failed pages after which the task stops (logged; the next open resumes).
const MAX_FAILURES: u32 = 10;

/// What a store knows of its background reindex, shared by its clones.
#[derive(Debug)]
pub(crate) struct ReindexState {
    /// The types still pending (`*` for every type); empty when none.
    pending: RwLock<Vec<String>>,
    /// True once nothing is pending (or the task gave up).
    idle: tokio::sync::watch::Sender<bool>,
    /// Whether this store's task runs. Held while scheduling and while the task decides to end,
    /// so types recorded as it finishes are not left for the next open.
    running: tokio::sync::Mutex<bool>,
}

impl Default for ReindexState {
    fn default() -> Self {
        ReindexState {
            pending: RwLock::new(Vec::new()),
            idle: tokio::sync::watch::Sender::new(true),
            running: tokio::sync::Mutex::new(false),
        }
    }
}

/// The types of a `kz_meta` list.
fn parse_list(v: &str) -> Vec<String> {
    v.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// `old` followed by the types of `new` it lacks; `*` alone if either has it.
fn merged(old: &[String], new: &[String]) -> Vec<String> {
    if old.iter().chain(new).any(|t| t == ALL) {
        return vec![ALL.to_string()];
    }
    let mut out = old.to_vec();
    for t in new {
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    out
}

impl Store {
    /// The resource types whose search index is being rebuilt in the background after an
    /// upgrade (`*`: every type); empty when the index is complete.
    pub fn reindexing(&self) -> Vec<String> {
        self.reindex
            .pending
            .read()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    /// Waits until no background reindex is under way (at once when none is).
    pub async fn reindexed(&self) {
        let mut rx = self.reindex.idle.subscribe();
        // An error means the state is gone with the store: nothing left to wait for.
        let _ = rx.wait_for(|idle| *idle).await;
    }

    /// Whether a search of `rt` with `q` may miss matches because of a background reindex: the
    /// type is pending, or the search follows references (chains, `_has`) while any type is.
    pub(crate) fn search_may_be_incomplete(&self, rt: &str, q: &SearchQuery) -> bool {
        let pending = self.reindexing();
        if pending.is_empty() {
            return false;
        }
        pending.iter().any(|t| t == ALL || t == rt)
            || q.params
                .iter()
                .any(|p| p.key().contains('.') || p.name.starts_with("_has"))
    }

    /// Records types to reindex (merged with any still pending), inside the migration's
    /// transaction: the schema version and the work it implies are committed together.
    pub(crate) async fn schedule_reindex(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        types: &[String],
    ) -> Result<(), StoreError> {
        if types.is_empty() {
            return Ok(());
        }
        let old = sqlx::query(&self.sql(crate::schema::META_GET))
            .bind(PENDING_KEY)
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| r.try_get::<String, _>(0))
            .transpose()?
            .map(|v| parse_list(&v))
            .unwrap_or_default();
        let list = merged(&old, types);
        let upsert = self.sql(crate::schema::META_UPSERT);
        // The first type's progress stays unless `*` replaced the list.
        let keep_progress = !old.is_empty() && old.first() == list.first();
        let mut pairs = vec![(PENDING_KEY, list.join(","))];
        if !keep_progress {
            pairs.push((AFTER_KEY, "0".to_string()));
        }
        for (k, v) in pairs {
            sqlx::query(&upsert)
                .bind(k)
                .bind(v)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// The pending list and the first type's progress, as recorded.
    async fn recorded_reindex(&self) -> Result<(Vec<String>, i64), StoreError> {
        let get = |k: &'static str| async move {
            let v: Option<String> = sqlx::query(&self.sql(crate::schema::META_GET))
                .bind(k)
                .fetch_optional(self.pool())
                .await?
                .map(|r| r.try_get::<String, _>(0))
                .transpose()?;
            Ok::<_, StoreError>(v)
        };
        let list = get(PENDING_KEY)
            .await?
            .map(|v| parse_list(&v))
            .unwrap_or_default();
        let after = get(AFTER_KEY)
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok((list, after))
    }

    /// Starts the background reindex when one is recorded and none runs (called by `Store::open`
    /// and [`Store::reindex_in_background`]); either way, searches see the recorded list.
    pub(crate) async fn resume_reindex(&self) -> Result<(), StoreError> {
        let mut running = self.reindex.running.lock().await;
        let (list, after) = self.recorded_reindex().await?;
        if list.is_empty() {
            return Ok(());
        }
        let types = list.len();
        // A task already running reads the list before each page; the searches' view follows.
        self.set_pending(list);
        if *running {
            return Ok(());
        }
        tracing::info!(types, after, "background reindex resumed");
        *running = true;
        let store = self.clone();
        tokio::spawn(async move { store.run_reindex().await });
        Ok(())
    }

    /// Rebuilds the search index of some types (`*`: every type) in the background, as after an
    /// upgrade: for an operator who loaded SearchParameters the stored resources predate. The
    /// types join any still pending; the work is recorded first, so if the process ends before
    /// it is done, the next open of the store resumes it. [`Store::reindexed`] waits for it.
    pub async fn reindex_in_background(&self, types: &[String]) -> Result<(), StoreError> {
        {
            let mut tx = self.pool().begin().await?;
            self.schedule_reindex(&mut tx, types).await?;
            tx.commit().await?;
        }
        self.resume_reindex().await
    }

    fn set_pending(&self, list: Vec<String>) {
        let idle = list.is_empty();
        if let Ok(mut p) = self.reindex.pending.write() {
            *p = list;
        }
        self.reindex.idle.send_replace(idle);
    }

    /// Works through the recorded list, a page at a time, until it is empty.
    async fn run_reindex(&self) {
        let (mut done, mut failures) = (0u64, 0u32);
        let started = std::time::Instant::now();
        loop {
            match self.reindex_step().await {
                Ok(Some(n)) => {
                    done += n;
                    failures = 0;
                }
                Ok(None) => {
                    // Ends unless types were recorded meanwhile (scheduling holds this lock).
                    let mut running = self.reindex.running.lock().await;
                    match self.recorded_reindex().await {
                        Ok((list, _)) if !list.is_empty() => continue,
                        _ => {}
                    }
                    *running = false;
                    tracing::info!(
                        resources = done,
                        seconds = started.elapsed().as_secs(),
                        "background reindex finished"
                    );
                    self.set_pending(Vec::new());
                    return;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "background reindex page failed");
                    if failures >= MAX_FAILURES {
                        tracing::error!(
                            resources = done,
                            "background reindex stopped; it resumes when the store is next opened"
                        );
                        // Searches keep saying the index may be incomplete; waiters go on.
                        *self.reindex.running.lock().await = false;
                        self.reindex.idle.send_replace(true);
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One page of the first pending type, or moving past a finished type. `None` when nothing
    /// is left; otherwise the resources reindexed.
    async fn reindex_step(&self) -> Result<Option<u64>, StoreError> {
        let (list, after) = self.recorded_reindex().await?;
        let Some(first) = list.first() else {
            return Ok(None);
        };
        let rtype = (first != ALL).then_some(first.as_str());
        if let Some(page) = self.reindex_page(rtype, after, true).await? {
            return Ok(Some(page.reindexed));
        }
        // The type is done: the rest of the list, its progress from the start.
        let rest: Vec<String> = list[1..].to_vec();
        let _serial = self.writer_lock().await;
        let mut tx = self.begin_write().await?;
        if rest.is_empty() {
            for k in [PENDING_KEY, AFTER_KEY] {
                tx.execute(
                    &self.sql("DELETE FROM kz_meta WHERE key = ?"),
                    &[Bind::S(k.to_string())],
                )
                .await?;
            }
        } else {
            self.set_meta(&mut tx, PENDING_KEY, &rest.join(",")).await?;
            self.set_meta(&mut tx, AFTER_KEY, "0").await?;
        }
        tx.commit().await?;
        tracing::info!(done = %first, left = rest.len(), "type reindexed");
        let finished = rest.is_empty();
        self.set_pending(rest);
        Ok(if finished { None } else { Some(0) })
    }
}

#[cfg(test)]
mod tests {
    use super::merged;
    use crate::{SearchQuery, Store};

    fn query(pairs: &[(&str, &str)]) -> SearchQuery {
        let p: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SearchQuery::from_pairs(&p)
    }

    /// While types are pending, searches of them, or through references while any is, say
    /// that matches may be missing; a finished reindex lets waiters go.
    #[tokio::test]
    async fn searches_say_when_a_reindex_may_leave_matches_out() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let url = format!("sqlite://{}", d.path().join("k.db").display());
        let s = Store::open(&url, kizuna_fhir::Registry::builtin())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let flag = |rt: &'static str, q: &'static [(&'static str, &'static str)]| {
            let s = s.clone();
            async move {
                s.search(rt, &query(q))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
                    .reindexing
            }
        };
        assert!(s.reindexing().is_empty());
        assert!(!flag("Bundle", &[("type", "document")]).await);
        s.set_pending(vec!["Bundle".into()]);
        assert_eq!(s.reindexing(), ["Bundle"]);
        assert!(flag("Bundle", &[("type", "document")]).await);
        assert!(!flag("Patient", &[("gender", "male")]).await);
        assert!(flag("Observation", &[("subject.name", "x")]).await);
        assert!(flag("Observation", &[("subject:Patient.name", "x")]).await);
        assert!(flag("Patient", &[("_has:Observation:subject:code", "x")]).await);
        s.set_pending(vec!["*".into()]);
        assert!(flag("Patient", &[("gender", "male")]).await);
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.reindexed().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.set_pending(Vec::new());
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .unwrap_or_else(|e| panic!("the waiter is still waiting: {e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!flag("Patient", &[("gender", "male")]).await);
    }

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn pending_lists_merge_in_order_and_star_takes_all() {
        assert_eq!(merged(&[], &v(&["Bundle"])), v(&["Bundle"]));
        assert_eq!(
            merged(&v(&["Observation", "Bundle"]), &v(&["Bundle", "Patient"])),
            v(&["Observation", "Bundle", "Patient"])
        );
        assert_eq!(merged(&v(&["Bundle"]), &v(&["*"])), v(&["*"]));
        assert_eq!(merged(&v(&["*"]), &v(&["Bundle"])), v(&["*"]));
    }
}
