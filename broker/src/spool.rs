//! The durable local spool: every event is written here **before** what it describes goes
//! upstream, then forwarded to the server's audit ingest (`sigil.audit.v1`) and resent until
//! the server acknowledges it. A server outage delays events, never drops them; a crash of the
//! broker loses none that was recorded (`record = "sync"`: fsync before forwarding) or at most
//! the last 10 ms of them (`record = "async"`: one fsync every 10 ms).
//!
//! Layout of `spool_dir` (0700, files 0600):
//!
//! - `spool.id`: the spool's id, 32 random hex characters, made when the spool is created. The
//!   server counts sequences per (broker SPIFFE ID, spool id), so a new spool (its directory
//!   lost) starts again at 1 without clashing with the old one.
//! - `events.log`: one JSON object a line, in sequence order (1, 2, 3, ...). A torn last line
//!   (a crash mid-write) is dropped at start.
//! - `acked`: the last sequence the server acknowledged. Once every event is acknowledged, the
//!   log is emptied.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::config::RecordMode;
use crate::credentials::Credentials;
use crate::upstream::server_channel;

/// The most events one `Append` carries.
const BATCH: usize = 500;

/// How long the async mode may leave events unsynced.
const ASYNC_FLUSH: Duration = Duration::from_millis(10);

/// The longest wait between two attempts to reach a server.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Once every event is acknowledged, the log is emptied when it is larger than this.
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
    /// The spool directory is not private or a file in it is malformed.
    #[error("spool {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

struct Inner {
    log: File,
    next: u64,
    pending: VecDeque<Event>,
}

/// The spool. Shared by every connection of every target.
pub(crate) struct Spool {
    dir: PathBuf,
    id: String,
    mode: RecordMode,
    inner: Mutex<Inner>,
    dirty: AtomicBool,
    wake: Notify,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("id", &self.id)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering what a crash left.
    ///
    /// # Errors
    ///
    /// [`SpoolError`].
    pub(crate) fn open(dir: &Path, mode: RecordMode) -> Result<Self, SpoolError> {
        sigil_daemon::check_private_dir(dir, 0o700).map_err(|e| SpoolError::Invalid {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SpoolError::Io { path, source }
        };
        let id_path = dir.join("spool.id");
        let id = match std::fs::read_to_string(&id_path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 16];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| SpoolError::Invalid {
                        path: id_path.clone(),
                        reason: "the system random number generator failed".to_owned(),
                    })?;
                let id = sigil_core::hex::encode(&bytes);
                sigil_daemon::write_private(&id_path, id.as_bytes()).map_err(io(&id_path))?;
                id
            }
            Err(e) => return Err(io(&id_path)(e)),
        };
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SpoolError::Invalid {
                path: id_path,
                reason: "not 32 hex characters".to_owned(),
            });
        }
        let acked_path = dir.join("acked");
        let acked = match std::fs::read_to_string(&acked_path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|e| SpoolError::Invalid {
                    path: acked_path.clone(),
                    reason: e.to_string(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&acked_path)(e)),
        };
        let log_path = dir.join("events.log");
        let mut log = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode_0600()
            .open(&log_path)
            .map_err(io(&log_path))?;
        let (events, good_len) = read_log(&log).map_err(io(&log_path))?;
        let file_len = log.metadata().map_err(io(&log_path))?.len();
        if good_len < file_len {
            warn!(
                dropped_bytes = file_len - good_len,
                "the spool's last event was torn by a crash; dropped"
            );
            log.set_len(good_len).map_err(io(&log_path))?;
            log.sync_data().map_err(io(&log_path))?;
        }
        log.seek(SeekFrom::End(0)).map_err(io(&log_path))?;
        let last = events.last().map_or(0, |e| e.sequence).max(acked);
        let pending: VecDeque<Event> = events.into_iter().filter(|e| e.sequence > acked).collect();
        info!(spool = %id, pending = pending.len(), next = last + 1, "spool open");
        Ok(Self {
            dir: dir.to_owned(),
            id,
            mode,
            inner: Mutex::new(Inner {
                log,
                next: last + 1,
                pending,
            }),
            dirty: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    /// Records `event`, durably as the mode says, and returns its sequence. The caller lets
    /// what it describes go upstream only once this returned `Ok`.
    ///
    /// # Errors
    ///
    /// [`SpoolError`]: nothing may go upstream.
    pub(crate) async fn record(self: &Arc<Self>, event: NewEvent) -> Result<u64, SpoolError> {
        let spool = Arc::clone(self);
        let sequence = tokio::task::spawn_blocking(move || spool.append(event))
            .await
            .map_err(|e| SpoolError::Invalid {
                path: self.dir.clone(),
                reason: format!("spool task failed: {e}"),
            })??;
        self.wake.notify_one();
        Ok(sequence)
    }

    fn append(&self, event: NewEvent) -> Result<u64, SpoolError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let event = Event {
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
        };
        let path = self.dir.join("events.log");
        let io = |source| SpoolError::Io {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(&event).map_err(|e| SpoolError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        inner.log.write_all(&line).map_err(io)?;
        match self.mode {
            RecordMode::Sync => inner.log.sync_data().map_err(io)?,
            RecordMode::Async => self.dirty.store(true, Ordering::Release),
        }
        let sequence = event.sequence;
        inner.next += 1;
        inner.pending.push_back(event);
        Ok(sequence)
    }

    /// In `async` mode, syncs what was written every 10 ms until `stop` turns true.
    pub(crate) async fn run_flusher(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        if self.mode == RecordMode::Sync {
            return;
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(ASYNC_FLUSH) => {}
                _ = stop.changed() => {}
            }
            if self.dirty.swap(false, Ordering::AcqRel) {
                let spool = Arc::clone(&self);
                let synced = tokio::task::spawn_blocking(move || {
                    let inner = spool.inner.lock().unwrap_or_else(PoisonError::into_inner);
                    inner.log.sync_data()
                })
                .await;
                if !matches!(synced, Ok(Ok(()))) {
                    error!("spool fsync failed; events of the last 10 ms may not be durable");
                }
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// Up to [`BATCH`] events not acknowledged yet, oldest first.
    fn batch(&self) -> Vec<Event> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.pending.iter().take(BATCH).cloned().collect()
    }

    /// Forgets the events up to `acknowledged`, records it, and empties the log once nothing is
    /// pending.
    fn acknowledge(&self, acknowledged: u64) -> Result<(), SpoolError> {
        let acked_path = self.dir.join("acked");
        sigil_daemon::write_private(&acked_path, acknowledged.to_string().as_bytes()).map_err(
            |source| SpoolError::Io {
                path: acked_path.clone(),
                source,
            },
        )?;
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        while inner
            .pending
            .front()
            .is_some_and(|e| e.sequence <= acknowledged)
        {
            inner.pending.pop_front();
        }
        let len = inner.log.metadata().map(|m| m.len()).unwrap_or(0);
        if inner.pending.is_empty() && len > COMPACT_AT {
            let path = self.dir.join("events.log");
            inner
                .log
                .set_len(0)
                .and_then(|()| inner.log.sync_data())
                .map_err(|source| SpoolError::Io { path, source })?;
        }
        Ok(())
    }

    /// How many events wait for the server.
    pub(crate) fn pending(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
            .len()
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
        loop {
            if *stop.borrow() {
                return;
            }
            let batch = self.batch();
            if batch.is_empty() {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let current = credentials.borrow().clone();
            let Some(current) = current else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let address = servers
                .get(server % servers.len().max(1))
                .cloned()
                .unwrap_or_default();
            match self.send(&address, &current, batch).await {
                Ok(acknowledged) => {
                    backoff = Duration::from_millis(200);
                    if let Err(error) = self.acknowledge(acknowledged) {
                        error!(%error, "cannot record the server's acknowledgement; events will be resent");
                    }
                }
                Err(error) => {
                    warn!(%error, server = %address, pending = self.pending(), "cannot forward audit events; retrying");
                    server = server.wrapping_add(1);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_RETRY);
                }
            }
        }
    }

    async fn send(
        &self,
        address: &str,
        credentials: &Credentials,
        batch: Vec<Event>,
    ) -> anyhow::Result<u64> {
        use sigil_proto::audit::audit_ingest_client::AuditIngestClient;
        let channel = server_channel(address, credentials)?;
        let mut client = AuditIngestClient::new(channel);
        let first = batch.first().map_or(0, |e| e.sequence);
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
        let request = sigil_proto::audit::AppendRequest {
            spool_id: self.id.clone(),
            events,
        };
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
                Ok(answer.acknowledged_sequence)
            }
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                let next = status
                    .metadata()
                    .get("sigil-next-sequence")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| anyhow::anyhow!("{}", status.message()))?;
                if next > first {
                    // The server has more than we thought (an acknowledgement we lost).
                    Ok(next - 1)
                } else {
                    Err(anyhow::anyhow!(
                        "the server expects event {next} of this spool, which is no longer here: \
                         {}",
                        status.message()
                    ))
                }
            }
            Err(status) => Err(anyhow::anyhow!("{:?}: {}", status.code(), status.message())),
        }
    }
}

/// Reads the log's events and the length of its well-formed prefix.
fn read_log(file: &File) -> std::io::Result<(Vec<Event>, u64)> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0))?;
    let mut events = Vec::new();
    let mut good = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        match serde_json::from_slice::<Event>(&line) {
            Ok(event) => events.push(event),
            Err(_) => break,
        }
        good += n as u64;
    }
    Ok((events, good))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_survive_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let spool = Arc::new(Spool::open(&path, RecordMode::Sync).unwrap());
        for n in 1..=3 {
            assert_eq!(spool.record(event(n)).await.unwrap(), n);
        }
        let id = spool.id.clone();
        spool.acknowledge(1).unwrap();
        drop(spool);
        // A crash mid-write leaves half a line.
        let mut log = OpenOptions::new()
            .append(true)
            .open(path.join("events.log"))
            .unwrap();
        log.write_all(br#"{"seq":4,"s":1,"#).unwrap();
        drop(log);

        let spool = Arc::new(Spool::open(&path, RecordMode::Sync).unwrap());
        assert_eq!(spool.id, id, "the spool keeps its id");
        let pending = spool.batch();
        assert_eq!(
            pending.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(
            pending[0].peer,
            base64::engine::general_purpose::STANDARD.encode([1, 2, 3])
        );
        assert_eq!(spool.record(event(4)).await.unwrap(), 4);
        spool.acknowledge(4).unwrap();
        assert_eq!(spool.pending(), 0);
        let mode = std::fs::metadata(path.join("events.log")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        drop(spool);
        let spool = Spool::open(&path, RecordMode::Async).unwrap();
        assert_eq!(spool.pending(), 0);
        assert_eq!(
            spool.inner.lock().unwrap().next,
            5,
            "sequences never go back"
        );
    }
}
