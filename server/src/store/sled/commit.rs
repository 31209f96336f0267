//! Group commit: writers take tickets, one flusher thread covers every ticket issued before its
//! flush with one `Db::flush` (see "Group commit" in the `sled` module docs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use ::sled::{Db, Tree};
use tokio::sync::watch;

use super::{StoreError, lock, read_revision};

/// What writers and the flusher thread share (see "Group commit" in the `sled` module docs).
pub(super) struct GroupCommit {
    queue: Mutex<Queue>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
    pub(super) durable_revision: watch::Sender<u64>,
    pub(super) flushes: AtomicU64,
}

/// Flush requests, guarded by [`GroupCommit::queue`].
#[derive(Debug, Default)]
struct Queue {
    /// The last ticket handed to a writer.
    requested: u64,
    /// Set when the store is dropped: the flusher covers what is pending and exits.
    shutdown: bool,
    /// Tests hold the flusher to make group commit observable without timing.
    paused: bool,
}

/// What the flusher has done, published to waiting writers.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every ticket up to this one is durable.
    flushed: u64,
    /// Set once a flush fails; sticky.
    failure: Option<String>,
}

// === impl GroupCommit ===

impl GroupCommit {
    pub(super) fn new(revision: u64) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            progress: watch::Sender::new(Progress::default()),
            durable_revision: watch::Sender::new(revision),
            flushes: AtomicU64::new(0),
        }
    }

    /// Takes a ticket and waits until a flush covers it. Call it after the write is done.
    pub(super) async fn commit(&self) -> Result<(), StoreError> {
        let ticket = {
            let mut queue = lock(&self.queue);
            queue.requested += 1;
            queue.requested
        };
        self.wake.notify_one();
        let mut progress = self.progress.subscribe();
        let (flushed, failure) = {
            let seen = progress
                .wait_for(|p| p.flushed >= ticket || p.failure.is_some())
                .await
                .map_err(|_| StoreError::Closed)?;
            (seen.flushed, seen.failure.clone())
        };
        if flushed >= ticket {
            Ok(())
        } else {
            Err(StoreError::FlushFailed(failure.unwrap_or_default()))
        }
    }

    /// The flusher thread's loop (see "Group commit" in the `sled` module docs).
    pub(super) fn run_flusher(&self, db: &Db, meta: &Tree) {
        let mut flushed = 0;
        loop {
            let target = {
                let mut queue = lock(&self.queue);
                loop {
                    if queue.requested > flushed && (!queue.paused || queue.shutdown) {
                        break queue.requested;
                    }
                    if queue.shutdown {
                        return;
                    }
                    queue = self
                        .wake
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            // Read before flushing: every transaction up to this revision has committed, so
            // the flush covers it.
            let result = read_revision(meta).and_then(|revision| {
                db.flush()?;
                Ok(revision)
            });
            self.flushes.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(revision) => {
                    // The revision first: a writer that wakes must see its own revision.
                    self.durable_revision.send_if_modified(|durable| {
                        let newer = revision > *durable;
                        if newer {
                            *durable = revision;
                        }
                        newer
                    });
                    self.progress.send_modify(|p| p.flushed = target);
                    flushed = target;
                }
                Err(error) => {
                    tracing::error!(%error, "store flush failed; refusing every later write");
                    self.progress
                        .send_modify(|p| p.failure = Some(error.to_string()));
                    return;
                }
            }
        }
    }

    pub(super) fn shut_down(&self) {
        lock(&self.queue).shutdown = true;
        self.wake.notify_all();
    }

    #[cfg(test)]
    pub(super) fn set_paused(&self, paused: bool) {
        lock(&self.queue).paused = paused;
        self.wake.notify_all();
    }

    #[cfg(test)]
    pub(super) fn requested(&self) -> u64 {
        lock(&self.queue).requested
    }
}
