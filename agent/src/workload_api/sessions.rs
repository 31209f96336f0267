//! A caller's session SVIDs: minted for it alone through the
//! [`Minter`](crate::manager::Minter) when its selectors match a privileged session, renewed at
//! half their life unless the session's end caps them, and dropped as soon as the session leaves
//! the inventory (close, revoke, expiry) or the agent loses the server.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use sigil_core::lifetime::Validity;
use tracing::warn;

use crate::cache::{Inventory, SessionEntry, WorkloadSvid};
use crate::manager::Caller;
use crate::workload_api::service::{StreamCaller, WorkloadError};

/// Brings `held` (this caller's session SVIDs, by entry id) in line with `inventory`: drops
/// those whose session is gone, ended or unreachable, and mints those missing, changed or due
/// for renewal. A refused or failed mint leaves that session out.
///
/// Before the first mint, `caller` must still be the process that connected, with the
/// selectors it had then; otherwise every session SVID is dropped and the stream must end.
///
/// # Errors
///
/// [`WorkloadError::Attestation`] when the caller changed.
pub(crate) async fn refresh(
    caller: &StreamCaller,
    inventory: &Inventory,
    held: &mut BTreeMap<String, WorkloadSvid>,
) -> Result<(), WorkloadError> {
    let (selectors, credentials) = (caller.selectors(), caller.credentials());
    let mut rechecked = false;
    let now = SystemTime::now();
    let sessions: Vec<SessionEntry> = inventory
        .sessions_for(selectors, now)
        .into_iter()
        .cloned()
        .collect();
    held.retain(|id, svid| {
        sessions
            .iter()
            .any(|s| s.entry_id == *id && s.revision == svid.revision)
            && svid.not_after() > now
    });
    for session in sessions {
        if let Some(svid) = held.get(&session.entry_id) {
            let validity = Validity::from_parts(svid.issued_at(), svid.not_after());
            let ttl = Duration::from_secs(session.svid_ttl.max(1));
            if !validity.should_renew(now, ttl, &[session.ends_at]) {
                continue;
            }
        }
        if !rechecked {
            if !caller.still_same().await {
                warn!(pid = ?credentials.pid, "caller changed since it connected; its session svids are dropped");
                held.clear();
                return Err(WorkloadError::Attestation(
                    ": the calling process changed since it connected; reconnect",
                ));
            }
            rechecked = true;
        }
        let who = Caller {
            credentials,
            selectors,
        };
        match caller.minter().session_x509(&session, who).await {
            Ok(svid) => {
                held.insert(session.entry_id.clone(), svid);
            }
            Err(error) => {
                warn!(session_id = %session.session_id, %error, "no session svid for this workload");
                held.remove(&session.entry_id);
            }
        }
    }
    Ok(())
}

/// When a stream must look at its session SVIDs again: the earliest renewal that would gain
/// something, or expiry (at most a minute away).
pub(crate) fn wakeup(
    held: &BTreeMap<String, WorkloadSvid>,
    inventory: &Inventory,
) -> tokio::time::Instant {
    let now = SystemTime::now();
    let mut next = now + Duration::from_secs(60);
    for svid in held.values() {
        // A session no longer held: nothing to renew it for.
        let end = inventory
            .sessions
            .get(&*svid.grant.entry_id)
            .map_or(svid.not_after(), |s| s.ends_at);
        next = next.min(svid.next_look(Some(end)));
    }
    let wait = next.duration_since(now).unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + wait.max(Duration::from_millis(50))
}
