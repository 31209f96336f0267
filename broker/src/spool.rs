//! The durable local spool: every event is written here **before** what it describes goes
//! upstream, then forwarded to the server's audit ingest (`sigil.audit.v1`) and resent until
//! the server acknowledges it. A server outage delays events, never drops them; a crash of the
//! broker loses none that was recorded (`record = "sync"`: fsync before forwarding) or at most
//! the last 10 ms of them (`record = "async"`: one fsync every 10 ms; only synced events are
//! forwarded, so the server never holds an event the spool could lose).
//!
//! Writing and syncing are apart: an event is appended to the log on the caller's task (one
//! `write`, no thread hand-off), and one syncer thread makes the log durable. In `sync` mode it
//! syncs as soon as there is something to sync, and every event written while one `fdatasync`
//! ran is made durable by the next (group commit), so concurrent connections share fsyncs
//! instead of queueing for one each. An event that describes something still to happen
//! ([`Spool::record`]: a connection or request about to go upstream) waits for that in `sync`
//! mode; one that describes what already happened ([`Spool::note`]: a close, a response) never
//! waits, and is durable with the next sync.
//!
//! Layout of `spool_dir` (0700, files 0600):
//!
//! - `spool.id`: the spool's id, 32 random lowercase hex characters. The server counts
//!   sequences per (broker SPIFFE ID, spool id).
//! - `events.log`: one JSON object a line, sequences 1, 2, 3, ... A torn last line (a crash
//!   mid-write) is dropped at start; a malformed line before the last stops the broker (the log
//!   was damaged: move the directory aside). The log is rewritten with only the events still
//!   pending once it exceeds 1 MiB.
//! - `acked`: the last sequence the server acknowledged.
//!
//! The spool fails closed: a failed write or fsync marks it broken, and every later event, hence
//! every later connection and request, is refused until the broker is restarted. More than
//! [`MAX_PENDING`] events waiting for the server refuses new ones too.
//!
//! When the server's answer shows that the spool's numbering cannot continue (the server holds
//! more events of this spool than the broker sent, as when a copy of the spool directory runs in
//! another broker, or fewer than the broker already forgot, as after the server's database was
//! restored from a backup), the broker starts a new spool: a new id, the pending events
//! renumbered from 1, and an error in the log.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use crate::config::RecordMode;
use crate::credentials::Credentials;
use crate::upstream::server_channel;

/// The most events one `Append` carries.
const BATCH: usize = 500;

/// The most bytes (details and certificates, before encoding) one `Append` carries: well under
/// the server's 4 MiB message limit.
const BATCH_BYTES: usize = 2 * 1024 * 1024;

/// The server's limit on an event's details.
const MAX_DETAILS: usize = 16 * 1024;

/// The server's limit on an event's peer certificate.
const MAX_PEER: usize = 16 * 1024;

/// Events waiting for the server beyond which new ones are refused (fail closed: a broker that
/// cannot record refuses the traffic).
pub(crate) const MAX_PENDING: usize = 1_000_000;

/// How long an event nobody waits for may stay unsynced: every event in `async` mode, and the
/// events that follow traffic (closes, responses, refusals) in both modes.
const SYNC_WITHIN: Duration = Duration::from_millis(10);

/// How long the forwarder lets events gather before it sends a batch that is not full: under
/// steady traffic the server gets one `Append` per 20 ms, not one per event (each costs it a
/// commit, and costs the machine the cores and the disk the traffic is using).
const FORWARD_LINGER: Duration = Duration::from_millis(20);

/// The longest wait between two attempts to reach a server.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// The log is rewritten with only its pending events once it is larger than this.
const COMPACT_AT: u64 = 1024 * 1024;

/// One event, as spooled and forwarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Event {
    /// Its sequence in the spool.
    #[serde(rename = "seq")]
    pub(crate) sequence: u64,
    /// When it was observed: seconds since the Unix epoch.
    #[serde(rename = "s")]
    pub(crate) seconds: i64,
    /// And nanoseconds.
    #[serde(rename = "n")]
    pub(crate) nanos: u32,
    /// `broker.*`.
    pub(crate) action: String,
    /// The target's name.
    pub(crate) subject: String,
    /// Facts, a JSON object.
    pub(crate) details: Map<String, Value>,
    /// The peer's leaf certificate, base64 (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) peer: String,
}

/// What an event says, before the spool numbers it.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub(crate) action: &'static str,
    pub(crate) subject: String,
    pub(crate) details: Map<String, Value>,
    pub(crate) peer: Option<Vec<u8>>,
}

/// An event in the log, perhaps not durable yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Written {
    sequence: u64,
    generation: u64,
}

/// Why the spool failed: the connection or request it was about is refused.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading or writing the spool failed.
    #[error("spool {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The spool directory is not private, a file in it is malformed, or the spool is broken
    /// or full.
    #[error("spool {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

struct Inner {
    id: String,
    /// Shared with the syncer, which syncs it outside the lock.
    log: Arc<File>,
    log_len: u64,
    /// The next sequence to hand out.
    next: u64,
    /// Every event up to this sequence is on disk.
    synced: u64,
    pending: VecDeque<Event>,
    /// Why the spool refuses to record, after a failed write or fsync.
    broken: Option<String>,
    /// The spool is closing: the syncer syncs what is left and ends.
    closing: bool,
    /// Raised when the spool starts over (its events renumbered, all of them durable).
    generation: u64,
    /// The highest sequence a [`Spool::record`] waits for: the syncer syncs at once.
    wanted: u64,
    /// When the oldest event not yet durable was written: the syncer syncs within 10 ms of it.
    unsynced_since: Option<Instant>,
}

/// How far the log is durable, as the syncer publishes it.
#[derive(Debug, Clone, Copy, Default)]
struct Durable {
    /// Every event up to this sequence is on disk.
    through: u64,
    /// A write or fsync failed: nothing more will be.
    broken: bool,
    /// The spool's generation: an event written in an earlier one is durable.
    generation: u64,
}

/// What the spool and its syncer thread share.
struct Shared {
    inner: Mutex<Inner>,
    /// Signalled on every append and on close.
    written: Condvar,
    durable: watch::Sender<Durable>,
    /// Wakes the forwarder when events become durable.
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the events up to `through` durable (never lowering the mark) and tells whoever
    /// waits for them.
    fn set_synced(&self, inner: &mut Inner, through: u64) {
        if through > inner.synced {
            inner.synced = through;
            if inner.next - 1 <= through {
                inner.unsynced_since = None;
            }
            self.publish(inner);
        }
    }

    fn publish(&self, inner: &Inner) {
        self.durable.send_replace(Durable {
            through: inner.synced,
            broken: inner.broken.is_some(),
            generation: inner.generation,
        });
        self.wake.notify_one();
    }

    /// Makes every event written so far durable, with the lock released during the fsync so
    /// that appends go on (they are made durable by the next call).
    fn sync_now(&self) {
        let started = Instant::now();
        let Some((written, log)) = self.to_sync() else {
            return;
        };
        // Everything up to `written` is in this file (or in an older one whose events a
        // compaction rewrote into it, durably).
        let result = log.sync_data();
        self.synced_to(written, &log, result, started);
    }

    /// What a sync now would cover: the last event written and the file it is in.
    fn to_sync(&self) -> Option<(u64, Arc<File>)> {
        let inner = self.lock();
        (inner.broken.is_none() && inner.next - 1 > inner.synced)
            .then(|| (inner.next - 1, Arc::clone(&inner.log)))
    }

    /// Takes the result of an fsync of `log` that began at `started` covering up to `written`.
    fn synced_to(
        &self,
        written: u64,
        log: &Arc<File>,
        result: std::io::Result<()>,
        started: Instant,
    ) {
        let mut inner = self.lock();
        if !Arc::ptr_eq(log, &inner.log) {
            // A rewrite replaced the file meanwhile and made every pending event durable in the
            // new one, perhaps under new numbers (a start over): `written` means nothing now.
            return;
        }
        match result {
            Ok(()) => {
                self.set_synced(&mut inner, written);
                // What was written during the fsync is due 10 ms after it started.
                inner.unsynced_since = (inner.next - 1 > inner.synced).then_some(started);
            }
            Err(e) => {
                // Nobody can tell what reached the disk: refuse from now on.
                error!(error = %e, "spool fsync failed; refusing every event until restarted");
                inner.broken = Some(format!("a failed fsync: {e}"));
                self.publish(&inner);
            }
        }
    }

    /// The syncer thread. Syncs at once when a [`Spool::record`] waits (sync mode), else
    /// within 10 ms of the first unsynced write; syncs what is left and returns once the spool
    /// closes.
    fn run_syncer(&self) {
        let mut inner = self.lock();
        loop {
            if inner.closing {
                drop(inner);
                self.sync_now();
                return;
            }
            if inner.broken.is_some() || inner.next - 1 <= inner.synced {
                inner = self
                    .written
                    .wait(inner)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let due = inner
                .unsynced_since
                .map_or_else(Instant::now, |since| since + SYNC_WITHIN);
            let now = Instant::now();
            if inner.wanted > inner.synced || now >= due {
                drop(inner);
                self.sync_now();
                inner = self.lock();
                continue;
            }
            inner = self
                .written
                .wait_timeout(inner, due - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The spool. Shared by every connection of every target.
pub(crate) struct Spool {
    dir: PathBuf,
    mode: RecordMode,
    shared: Arc<Shared>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the server said to one `Append`.
enum Answer {
    /// Every event up to this sequence is in the chain (an answer, or the sequence before the
    /// one the server expects next).
    Acknowledged(u64),
    /// An event of the batch was refused as malformed.
    Rejected {
        sequence: Option<u64>,
        reason: String,
    },
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.stop_syncer();
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering what a crash left.
    ///
    /// # Errors
    ///
    /// [`SpoolError`].
    pub(crate) fn open(dir: &Path, mode: RecordMode) -> Result<Self, SpoolError> {
        sigil_daemon::check_private_dir(dir, 0o700).map_err(|e| invalid(dir, e.to_string()))?;
        let id_path = dir.join("spool.id");
        let id = match std::fs::read_to_string(&id_path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_id(dir)?,
            Err(e) => return Err(io(&id_path, e)),
        };
        if !is_spool_id(&id) {
            return Err(invalid(&id_path, "not 32 lowercase hex characters"));
        }
        let acked_path = dir.join("acked");
        let acked = match std::fs::read_to_string(&acked_path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|e| invalid(&acked_path, e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&acked_path, e)),
        };
        let log_path = dir.join("events.log");
        let mut log = open_log(&log_path)?;
        let (events, good_len) = read_log(&log, &log_path)?;
        let file_len = log.metadata().map_err(|e| io(&log_path, e))?.len();
        if good_len < file_len {
            warn!(
                dropped_bytes = file_len - good_len,
                "the spool's last event was torn by a crash; dropped"
            );
            log.set_len(good_len)
                .and_then(|()| log.sync_data())
                .map_err(|e| io(&log_path, e))?;
        }
        log.seek(SeekFrom::End(0)).map_err(|e| io(&log_path, e))?;
        let last = events.last().map_or(0, |e| e.sequence).max(acked);
        let pending: VecDeque<Event> = events.into_iter().filter(|e| e.sequence > acked).collect();
        info!(spool = %id, pending = pending.len(), next = last + 1, "spool open");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                id,
                log: Arc::new(log),
                log_len: good_len,
                next: last + 1,
                synced: last,
                pending,
                broken: None,
                closing: false,
                generation: 0,
                wanted: 0,
                unsynced_since: None,
            }),
            written: Condvar::new(),
            durable: watch::Sender::new(Durable {
                through: last,
                broken: false,
                generation: 0,
            }),
            wake: Notify::new(),
        });
        let syncer = std::thread::Builder::new()
            .name("spool-syncer".to_owned())
            .spawn({
                let shared = Arc::clone(&shared);
                move || shared.run_syncer()
            })
            .map_err(|e| io(dir, e))?;
        Ok(Self {
            dir: dir.to_owned(),
            mode,
            shared,
            syncer: Mutex::new(Some(syncer)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    /// Records `event`, which describes something about to go upstream, and returns its
    /// sequence once it is durable as the mode says (`sync`: on disk; `async`: written, on
    /// disk within 10 ms). The caller lets what it describes go upstream only once this
    /// returned `Ok`.
    ///
    /// # Errors
    ///
    /// [`SpoolError`]: nothing may go upstream.
    pub(crate) async fn record(&self, event: NewEvent) -> Result<u64, SpoolError> {
        let written = self.write(event)?;
        self.durable(written).await
    }

    /// The first half of [`Spool::record`]: appends `event` to the log; what it describes may
    /// go upstream once [`Spool::durable`] returned `Ok` for it.
    ///
    /// # Errors
    ///
    /// [`SpoolError`]: nothing may go upstream.
    pub(crate) fn write(&self, event: NewEvent) -> Result<Written, SpoolError> {
        self.append(event, self.mode == RecordMode::Sync)
    }

    /// The second half of [`Spool::record`]: waits until the event is durable as the mode says
    /// (in `sync` mode, the syncer thread syncs at once when somebody waits).
    ///
    /// Measured and not kept: the waiter running the fsync itself on its worker thread
    /// (`block_in_place`) instead of waking the syncer was slower on two busy cores (about
    /// 620 µs added per HTTP request instead of 430 µs in `sigil-bench --quick`): the runtime
    /// hands the worker's other tasks to another thread and back for each fsync.
    ///
    /// # Errors
    ///
    /// [`SpoolError`]: the fsync failed, nothing may go upstream.
    pub(crate) async fn durable(&self, written: Written) -> Result<u64, SpoolError> {
        let Written {
            sequence,
            generation,
        } = written;
        if self.mode == RecordMode::Async {
            return Ok(sequence);
        }
        let mut durable = self.shared.durable.subscribe();
        let on_disk = |d: &Durable| d.through >= sequence || d.generation != generation;
        let reached = durable
            .wait_for(|d| on_disk(d) || d.broken)
            .await
            .map(|d| on_disk(&d))
            .unwrap_or(false);
        if !reached {
            return Err(invalid(
                &self.dir.join("events.log"),
                "the fsync of the event failed; restart the broker",
            ));
        }
        Ok(sequence)
    }

    /// Records `event`, which describes what already happened (a close, a response), without
    /// waiting for the disk: it is durable with the next sync (at once in `sync` mode, within
    /// 10 ms in `async` mode).
    ///
    /// # Errors
    ///
    /// [`SpoolError`]: the spool is broken or full.
    pub(crate) fn note(&self, event: NewEvent) -> Result<u64, SpoolError> {
        self.append(event, false).map(|w| w.sequence)
    }

    /// Makes every event written so far durable now.
    #[cfg(test)]
    fn sync_now(&self) {
        self.shared.sync_now();
    }

    /// Tells the syncer to sync what was written and end; from now on no event is taken.
    fn stop_syncer(&self) {
        self.lock().closing = true;
        self.shared.written.notify_all();
    }

    /// Stops the syncer after it synced what was written (at shutdown), and waits for it.
    pub(crate) fn close(&self) {
        self.stop_syncer();
        let handle = self
            .syncer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            error!("the spool's syncer thread panicked");
        }
    }

    /// Appends `event` to the log (not synced); `urgent`: somebody waits for it to be durable.
    fn append(&self, event: NewEvent, urgent: bool) -> Result<Written, SpoolError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let path = self.dir.join("events.log");
        let mut inner = self.lock();
        if let Some(why) = &inner.broken {
            return Err(invalid(
                &path,
                format!("broken since {why}; restart the broker"),
            ));
        }
        if inner.closing {
            // The final sync may have run: nothing written now would be made durable.
            return Err(invalid(&path, "the spool is closed"));
        }
        if inner.pending.len() >= MAX_PENDING {
            return Err(invalid(
                &path,
                format!("{MAX_PENDING} events wait for the server; refusing more"),
            ));
        }
        let event = bounded(Event {
            sequence: inner.next,
            seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            nanos: now.subsec_nanos(),
            action: event.action.to_owned(),
            subject: event.subject,
            details: event.details,
            peer: event
                .peer
                .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
                .unwrap_or_default(),
        });
        let mut line = serde_json::to_vec(&event).map_err(|e| invalid(&path, e.to_string()))?;
        line.push(b'\n');
        let before = inner.log_len;
        if let Err(e) = (&*inner.log).write_all(&line) {
            // Leave no partial line for the next event to be glued to.
            if inner.log.set_len(before).is_err() {
                inner.broken = Some(format!("a failed write: {e}"));
                self.shared.publish(&inner);
            }
            return Err(io(&path, e));
        }
        let sequence = event.sequence;
        inner.log_len = before + line.len() as u64;
        inner.next += 1;
        inner.pending.push_back(event);
        let generation = inner.generation;
        let first = inner.unsynced_since.is_none();
        if first {
            inner.unsynced_since = Some(Instant::now());
        }
        if urgent {
            inner.wanted = sequence;
        }
        drop(inner);
        // The syncer sleeps until the first unsynced event, or sleeps until one is due: only a
        // waiter or a first event changes what it waits for.
        if urgent || first {
            self.shared.written.notify_one();
        }
        Ok(Written {
            sequence,
            generation,
        })
    }

    /// Up to [`BATCH`] synced events not acknowledged yet, oldest first, within
    /// [`BATCH_BYTES`].
    fn batch(&self) -> (String, Vec<Event>) {
        let inner = self.lock();
        let mut bytes = 0usize;
        let mut batch = Vec::new();
        for event in inner
            .pending
            .iter()
            .take_while(|e| e.sequence <= inner.synced)
            .take(BATCH)
        {
            let size = event.peer.len() + json_len(&event.details);
            if !batch.is_empty() && bytes + size > BATCH_BYTES {
                break;
            }
            bytes += size;
            batch.push(event.clone());
        }
        (inner.id.clone(), batch)
    }

    /// Forgets the events up to `acknowledged` (which the caller checked), records it, and
    /// rewrites the log with only the pending events once it is large.
    fn acknowledge(&self, acknowledged: u64) -> Result<(), SpoolError> {
        let acked_path = self.dir.join("acked");
        sigil_daemon::write_private(&acked_path, acknowledged.to_string().as_bytes())
            .map_err(|e| io(&acked_path, e))?;
        let mut inner = self.lock();
        while inner
            .pending
            .front()
            .is_some_and(|e| e.sequence <= acknowledged)
        {
            inner.pending.pop_front();
        }
        if inner.log_len > COMPACT_AT {
            self.rewrite(&mut inner)?;
        }
        Ok(())
    }

    /// Writes the pending events to a new log and puts it in place (fsynced, then renamed).
    fn rewrite(&self, inner: &mut Inner) -> Result<(), SpoolError> {
        let path = self.dir.join("events.log");
        let temp = self.dir.join("events.log.new");
        let mut bytes = Vec::new();
        for event in &inner.pending {
            let mut line = serde_json::to_vec(event).map_err(|e| invalid(&path, e.to_string()))?;
            line.push(b'\n');
            bytes.extend_from_slice(&line);
        }
        sigil_daemon::write_private(&temp, &bytes).map_err(|e| io(&temp, e))?;
        std::fs::rename(&temp, &path).map_err(|e| io(&path, e))?;
        // From here the log in use is no longer `events.log`: a failure would leave events
        // written to a file no restart reads, so the spool refuses from then on.
        let reopened = File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))
            .and_then(|()| open_log(&path))
            .and_then(|mut log| {
                log.seek(SeekFrom::End(0)).map_err(|e| io(&path, e))?;
                Ok(log)
            });
        let log = match reopened {
            Ok(log) => log,
            Err(e) => {
                error!(error = %e, "the spool's log could not be put back after compaction; refusing every event until restarted");
                inner.broken = Some(format!("a failed compaction: {e}"));
                self.shared.publish(inner);
                return Err(e);
            }
        };
        inner.log = Arc::new(log);
        inner.log_len = bytes.len() as u64;
        // Every pending event is in the new log, durably.
        let written = inner.next - 1;
        self.shared.set_synced(inner, written);
        Ok(())
    }

    /// Starts a new spool: a new id, the pending events renumbered from 1 (see the module docs).
    fn start_over(&self, why: &str) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let old = inner.id.clone();
        let id = new_id(&self.dir)?;
        let acked_path = self.dir.join("acked");
        sigil_daemon::write_private(&acked_path, b"0").map_err(|e| io(&acked_path, e))?;
        for (event, sequence) in inner.pending.iter_mut().zip(1u64..) {
            event.sequence = sequence;
        }
        inner.next = inner.pending.len() as u64 + 1;
        inner.id = id.clone();
        inner.synced = 0;
        if let Err(e) = self.rewrite(&mut inner) {
            // The id and numbering changed but the log did not: nothing can be trusted.
            inner.broken = Some(format!("a failed rewrite: {e}"));
            self.shared.publish(&inner);
            return Err(e);
        }
        // Every event is durable in the rewritten log; whoever waits for one under the old
        // numbering is told by the new generation.
        inner.generation += 1;
        self.shared.publish(&inner);
        error!(old_spool = %old, new_spool = %id, pending = inner.pending.len(), "{why}: the spool starts over under a new id");
        Ok(())
    }

    /// Replaces the details of event `sequence` (which the server refused as malformed) with
    /// the server's reason, and drops its peer certificate, so that the record still lands.
    fn quarantine(&self, sequence: u64, reason: &str) {
        let mut inner = self.lock();
        if let Some(event) = inner.pending.iter_mut().find(|e| e.sequence == sequence) {
            let mut details = Map::new();
            details.insert(
                "rejected_by_server".to_owned(),
                Value::from(reason.chars().take(512).collect::<String>()),
            );
            event.details = details;
            event.peer.clear();
        }
    }

    /// The events waiting for the server (tests look at what was recorded).
    #[cfg(test)]
    pub(crate) fn events_for_test(&self) -> Vec<Event> {
        self.lock().pending.iter().cloned().collect()
    }

    /// How many events wait for the server.
    pub(crate) fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Forwards pending events to the servers (tried in turn) until `stop`, retrying at least
    /// every 5 s; each batch is resent until acknowledged.
    pub(crate) async fn run_forwarder(
        self: Arc<Self>,
        servers: Vec<String>,
        credentials: watch::Receiver<Option<Arc<Credentials>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut server = 0usize;
        let mut backoff = Duration::from_millis(200);
        let mut channel: Option<(usize, Arc<Credentials>, Channel)> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            let (id, batch) = self.batch();
            let Some(first) = batch.first().map(|e| e.sequence) else {
                tokio::select! {
                    () = self.shared.wake.notified() => {
                        // Let more events gather: one `Append` for a burst, not one each.
                        tokio::select! {
                            () = tokio::time::sleep(FORWARD_LINGER) => {}
                            _ = stop.changed() => {}
                        }
                    }
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            };
            let full = batch.len() >= BATCH;
            let last = batch.last().map_or(first, |e| e.sequence);
            let current = credentials.borrow().clone();
            let Some(current) = current else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let index = server % servers.len().max(1);
            let address = servers.get(index).cloned().unwrap_or_default();
            // One channel per (server, credentials), reused while both stay.
            let reuse = channel
                .as_ref()
                .filter(|(i, c, _)| *i == index && Arc::ptr_eq(c, &current))
                .map(|(_, _, ch)| ch.clone());
            let ch = match reuse {
                Some(ch) => Ok(ch),
                None => server_channel(&address, &current).inspect(|ch| {
                    channel = Some((index, Arc::clone(&current), ch.clone()));
                }),
            };
            let answer = match ch {
                Ok(ch) => send(ch, id, batch).await,
                Err(e) => Err(e),
            };
            let spool = Arc::clone(&self);
            let handled = match answer {
                Ok(Answer::Acknowledged(ack)) => {
                    tokio::task::spawn_blocking(move || spool.settle(ack, first, last))
                        .await
                        .unwrap_or_else(|e| Err(invalid(Path::new("spool"), e.to_string())))
                }
                Ok(Answer::Rejected { sequence, reason }) => {
                    match sequence {
                        Some(sequence) => {
                            warn!(sequence, %reason, "the server refused a spooled event; forwarding it with the reason in place of its details");
                            self.quarantine(sequence, &reason);
                        }
                        None => error!(%reason, "the server refused a batch of spooled events"),
                    }
                    Err(invalid(Path::new("spool"), reason))
                }
                Err(e) => {
                    warn!(error = %e, server = %address, "cannot forward audit events; retrying");
                    channel = None;
                    server = server.wrapping_add(1);
                    Err(invalid(Path::new("spool"), e.to_string()))
                }
            };
            match handled {
                Ok(()) => {
                    backoff = Duration::from_millis(200);
                    if !full {
                        tokio::select! {
                            () = tokio::time::sleep(FORWARD_LINGER) => {}
                            _ = stop.changed() => {}
                        }
                    }
                }
                Err(_) => {
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// Applies the server's word that it holds this spool's events up to `acknowledged`, for a
    /// batch `first..=last`: forgets them, or starts over when the numbering cannot continue.
    fn settle(&self, acknowledged: u64, first: u64, last: u64) -> Result<(), SpoolError> {
        if acknowledged > last {
            // Events this broker never sent: another writer uses this spool's id.
            return self.start_over(&format!(
                "the server holds event {acknowledged} of this spool, but this broker sent only up to {last} (is a copy of the spool directory running elsewhere?)"
            ));
        }
        if acknowledged + 1 < first {
            // The server lacks events this broker already forgot (its database was restored?).
            return self.start_over(&format!(
                "the server expects event {} of this spool, which this broker no longer has",
                acknowledged + 1
            ));
        }
        self.acknowledge(acknowledged)
    }
}

async fn send(channel: Channel, spool_id: String, batch: Vec<Event>) -> anyhow::Result<Answer> {
    use sigil_proto::audit::audit_ingest_client::AuditIngestClient;
    let mut client = AuditIngestClient::new(channel);
    let events = batch
        .into_iter()
        .map(|e| sigil_proto::audit::Event {
            sequence: e.sequence,
            observed_at_seconds: e.seconds,
            observed_at_nanos: e.nanos,
            action: e.action,
            subject: e.subject,
            details_json: Value::Object(e.details).to_string(),
            peer_certificate: base64::engine::general_purpose::STANDARD
                .decode(e.peer)
                .unwrap_or_default(),
        })
        .collect();
    let request = sigil_proto::audit::AppendRequest { spool_id, events };
    let response = tokio::time::timeout(Duration::from_secs(10), client.append(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?;
    match response {
        Ok(answer) => {
            let answer = answer.into_inner();
            debug!(
                appended = answer.appended,
                acknowledged = answer.acknowledged_sequence,
                "audit events forwarded"
            );
            Ok(Answer::Acknowledged(answer.acknowledged_sequence))
        }
        Err(status) if status.code() == tonic::Code::FailedPrecondition => status
            .metadata()
            .get("sigil-next-sequence")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|next| Answer::Acknowledged(next.saturating_sub(1)))
            .ok_or_else(|| anyhow::anyhow!("{}", status.message())),
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            let message = status.message().to_owned();
            // "event N: ..." names the event.
            let sequence = message
                .strip_prefix("event ")
                .and_then(|rest| rest.split(':').next())
                .and_then(|n| n.parse::<u64>().ok());
            Ok(Answer::Rejected {
                sequence,
                reason: message,
            })
        }
        Err(status) => Err(anyhow::anyhow!("{:?}: {}", status.code(), status.message())),
    }
}

/// Keeps an event within the server's limits: oversized details are replaced by their size,
/// an oversized certificate is dropped (and said so).
fn bounded(mut event: Event) -> Event {
    let size = json_len(&event.details);
    if size > MAX_DETAILS - 512 {
        let mut details = Map::new();
        details.insert("oversized_details_bytes".to_owned(), Value::from(size));
        event.details = details;
    }
    if event.peer.len() > MAX_PEER * 4 / 3 {
        event.peer.clear();
        event
            .details
            .insert("peer_certificate_dropped".to_owned(), Value::from(true));
    }
    event
}

/// The length of `details` as JSON.
fn json_len(details: &Map<String, Value>) -> usize {
    serde_json::to_vec(details).map_or(usize::MAX, |bytes| bytes.len())
}

fn new_id(dir: &Path) -> Result<String, SpoolError> {
    let id_path = dir.join("spool.id");
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| invalid(&id_path, "the system random number generator failed"))?;
    let id = sigil_core::hex::encode(&bytes);
    sigil_daemon::write_private(&id_path, id.as_bytes()).map_err(|e| io(&id_path, e))?;
    Ok(id)
}

fn is_spool_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn open_log(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode_0600()
        .open(path)
        .map_err(|e| io(path, e))
}

/// Reads the log's events and the length of its well-formed prefix; only the last line may be
/// malformed (torn by a crash), and sequences must increase by one.
fn read_log(file: &File, path: &Path) -> Result<(Vec<Event>, u64), SpoolError> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0)).map_err(|e| io(path, e))?;
    let mut events: Vec<Event> = Vec::new();
    let mut good = 0u64;
    let mut line = Vec::new();
    let mut torn = false;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        if torn {
            return Err(invalid(
                path,
                format!(
                    "a malformed line follows event {}: the log was damaged; move the spool directory aside",
                    events.last().map_or(0, |e| e.sequence)
                ),
            ));
        }
        match serde_json::from_slice::<Event>(&line) {
            Ok(event) if line.last() == Some(&b'\n') => {
                if let Some(previous) = events.last()
                    && event.sequence != previous.sequence + 1
                {
                    return Err(invalid(
                        path,
                        format!(
                            "event {} follows event {}: the log was damaged; move the spool directory aside",
                            event.sequence, previous.sequence
                        ),
                    ));
                }
                good += n as u64;
                events.push(event);
            }
            _ => torn = true,
        }
    }
    Ok((events, good))
}

fn io(path: &Path, source: std::io::Error) -> SpoolError {
    SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> SpoolError {
    SpoolError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

trait OpenOptionsExt {
    fn mode_0600(&mut self) -> &mut Self;
}

impl OpenOptionsExt for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn event(n: u64) -> NewEvent {
        NewEvent {
            action: "broker.request",
            subject: "db".to_owned(),
            details: Map::from_iter([("n".to_owned(), Value::from(n))]),
            peer: n.is_multiple_of(2).then(|| vec![1, 2, 3]),
        }
    }

    /// Appends `event` and syncs the log at once.
    fn recorded(spool: &Spool, event: NewEvent) -> u64 {
        let sequence = spool.note(event).unwrap();
        spool.sync_now();
        sequence
    }

    fn sequences(spool: &Spool) -> Vec<u64> {
        spool.batch().1.iter().map(|e| e.sequence).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_survive_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let spool = Arc::new(Spool::open(&path, RecordMode::Sync).unwrap());
        for n in 1..=3 {
            assert_eq!(spool.record(event(n)).await.unwrap(), n);
        }
        let id = spool.batch().0;
        assert!(is_spool_id(&id));
        spool.settle(1, 1, 3).unwrap();
        drop(spool);
        // A crash mid-write leaves half a line.
        let mut log = OpenOptions::new()
            .append(true)
            .open(path.join("events.log"))
            .unwrap();
        log.write_all(br#"{"seq":4,"s":1,"#).unwrap();
        drop(log);

        let spool = Arc::new(Spool::open(&path, RecordMode::Sync).unwrap());
        let (same_id, pending) = spool.batch();
        assert_eq!(same_id, id, "the spool keeps its id");
        assert_eq!(sequences(&spool), [2, 3]);
        assert_eq!(
            pending[0].peer,
            base64::engine::general_purpose::STANDARD.encode([1, 2, 3])
        );
        assert_eq!(spool.record(event(4)).await.unwrap(), 4);
        spool.settle(4, 2, 4).unwrap();
        assert_eq!(spool.pending(), 0);
        let mode = std::fs::metadata(path.join("events.log")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        drop(spool);
        let spool = Arc::new(Spool::open(&path, RecordMode::Sync).unwrap());
        assert_eq!(spool.pending(), 0);
        assert_eq!(
            spool.record(event(5)).await.unwrap(),
            5,
            "sequences never go back"
        );
    }

    #[test]
    fn a_damaged_log_stops_the_broker_rather_than_renumbering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let spool = Spool::open(&path, RecordMode::Sync).unwrap();
        for n in 1..=3 {
            recorded(&spool, event(n));
        }
        drop(spool);
        let log = path.join("events.log");
        let text = std::fs::read_to_string(&log).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "garbage";
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        let err = Spool::open(&path, RecordMode::Sync).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_mode_forwards_only_synced_events() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), RecordMode::Async).unwrap();
        spool.record(event(1)).await.unwrap();
        // As if the syncer had not come round yet: nothing past the durable mark is forwarded.
        spool.lock().synced = 0;
        assert!(sequences(&spool).is_empty(), "not on disk yet");
        spool.sync_now();
        assert_eq!(sequences(&spool), [1]);
        // The syncer makes an event durable by itself within its 10 ms.
        spool.record(event(2)).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sequences(&spool) != [1, 2] {
            assert!(std::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_share_fsyncs_and_each_returns_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let spool = Arc::new(Spool::open(&path, RecordMode::Sync).unwrap());
        let tasks: Vec<_> = (1..=64)
            .map(|n| {
                let spool = Arc::clone(&spool);
                tokio::spawn(async move {
                    let sequence = spool.record(event(n)).await.unwrap();
                    // Durable when it returns: at or under the syncer's mark.
                    assert!(spool.lock().synced >= sequence);
                    sequence
                })
            })
            .collect();
        let mut sequences = Vec::new();
        for task in tasks {
            sequences.push(task.await.unwrap());
        }
        sequences.sort_unstable();
        assert_eq!(sequences, (1..=64).collect::<Vec<_>>());
        // A note is durable without anyone waiting for it, and closing syncs what is left.
        assert_eq!(spool.note(event(65)).unwrap(), 65);
        spool.close();
        assert_eq!(spool.lock().synced, 65);
        let reopened = Spool::open(&path, RecordMode::Sync).unwrap();
        assert_eq!(reopened.pending(), 65);
    }

    #[tokio::test]
    async fn records_on_a_single_threaded_runtime_are_made_durable_by_the_syncer() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), RecordMode::Sync).unwrap();
        for n in 1..=3 {
            let sequence = tokio::time::timeout(Duration::from_secs(5), spool.record(event(n)))
                .await
                .unwrap()
                .unwrap();
            assert!(spool.lock().synced >= sequence);
        }
    }

    #[test]
    fn an_fsync_that_ends_after_a_start_over_does_not_mark_the_new_numbering_durable() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), RecordMode::Sync).unwrap();
        for n in 1..=5 {
            recorded(&spool, event(n));
        }
        spool.settle(3, 1, 5).unwrap();
        spool.note(event(6)).unwrap();
        // The syncer takes event 6 and its file, and fsyncs outside the lock; meanwhile the
        // server's answer makes the spool start over (events 4, 5, 6 become 1, 2, 3).
        let (written, log) = spool.shared.to_sync().unwrap();
        assert_eq!(written, 6);
        spool.settle(9, 4, 6).unwrap();
        spool.note(event(7)).unwrap();
        spool
            .shared
            .synced_to(written, &log, Ok(()), Instant::now());
        // Event 4 of the new numbering (written after the rewrite) is not durable.
        assert_eq!(spool.lock().synced, 3);
        assert_eq!(sequences(&spool), [1, 2, 3]);
    }

    #[test]
    fn a_closed_spool_takes_no_more_events() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), RecordMode::Sync).unwrap();
        spool.note(event(1)).unwrap();
        spool.close();
        assert_eq!(spool.lock().synced, 1, "closing synced what was written");
        let err = spool.note(event(2)).unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_waiting_across_a_start_over_returns() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), RecordMode::Sync).unwrap();
        for n in 1..=3 {
            recorded(&spool, event(n));
        }
        // Event 4 is written but the syncer has not made it durable yet when the server's
        // answer renumbers the spool (the rewrite makes it durable as event 4 of 4).
        let written = spool.write(event(4)).unwrap();
        spool.settle(9, 1, 3).unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(5), spool.durable(written)).await;
        assert_eq!(waited.unwrap().unwrap(), 4);
        assert_eq!(sequences(&spool), [1, 2, 3, 4]);
    }

    #[test]
    fn answers_that_break_the_numbering_start_a_new_spool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let spool = Spool::open(&path, RecordMode::Sync).unwrap();
        for n in 1..=4 {
            recorded(&spool, event(n));
        }
        let (old, _) = spool.batch();
        // The server holds more than was sent: another writer.
        spool.settle(9, 1, 4).unwrap();
        let (new, batch) = spool.batch();
        assert_ne!(new, old);
        assert_eq!(
            batch.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(batch[3].details["n"], 4, "the same events, renumbered");
        assert_eq!(recorded(&spool, event(5)), 5);
        // The server lacks what was forgotten.
        spool.settle(2, 1, 5).unwrap();
        assert_eq!(sequences(&spool), [3, 4, 5]);
        let (before, _) = spool.batch();
        spool.settle(0, 3, 5).unwrap();
        let (after, batch) = spool.batch();
        assert_ne!(before, after);
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[0].sequence, 1);
        drop(spool);
        // The new numbering and id survive a restart.
        let spool = Spool::open(&path, RecordMode::Sync).unwrap();
        assert_eq!(spool.batch().0, after);
        assert_eq!(sequences(&spool), [1, 2, 3]);
    }

    #[test]
    fn events_stay_within_the_servers_limits_and_the_log_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let spool = Spool::open(&path, RecordMode::Sync).unwrap();
        let mut big = event(1);
        big.details
            .insert("policies".to_owned(), Value::from("p".repeat(MAX_DETAILS)));
        big.peer = Some(vec![0; MAX_PEER + 1]);
        recorded(&spool, big);
        let (_, batch) = spool.batch();
        assert!(batch[0].details.contains_key("oversized_details_bytes"));
        assert_eq!(batch[0].details["peer_certificate_dropped"], true);
        assert!(batch[0].peer.is_empty());
        spool.quarantine(1, "event 1: something");
        assert_eq!(
            spool.batch().1[0].details["rejected_by_server"],
            "event 1: something"
        );

        // Past 1 MiB, an acknowledgement rewrites the log with only what is pending.
        let mut n = 2;
        while spool.lock().log_len <= COMPACT_AT {
            let mut e = event(n);
            e.details
                .insert("pad".to_owned(), Value::from("x".repeat(8 * 1024)));
            recorded(&spool, e);
            n += 1;
        }
        let last = n - 1;
        spool.settle(last - 2, 1, last).unwrap();
        assert!(std::fs::metadata(path.join("events.log")).unwrap().len() < 64 * 1024);
        drop(spool);
        let spool = Spool::open(&path, RecordMode::Sync).unwrap();
        assert_eq!(sequences(&spool), [last - 1, last]);
        assert_eq!(recorded(&spool, event(0)), last + 1);
    }
}
