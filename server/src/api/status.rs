//! How each service's errors become gRPC statuses: one function per service, used by both APIs.
//!
//! Callers' mistakes are `InvalidArgument`, `NotFound`, `AlreadyExists` or
//! `FailedPrecondition` with a message that says what to fix; refusals of an agent are
//! `PermissionDenied` (with `sigil-reason` metadata when the agent must act); failures of the
//! server itself are logged here and answered `Unavailable` (retry) or `Internal`, without
//! internal detail.

use tonic::Status;
use tonic::metadata::MetadataValue;
use tracing::warn;

use super::node::REASON_METADATA_KEY;
use crate::service::agents::{AgentError, DenyReason};
use crate::service::audit::AuditError;
use crate::service::authority::SignError;
use crate::service::bundles::BundleError;
use crate::service::entries::EntryError;
use crate::service::entry_cache::EntryCacheError;
use crate::service::ingest::IngestError;
use crate::service::sessions::SessionError;
use crate::service::svids::SvidError;
use crate::service::sync::SyncError;
use crate::store::StoreError;

/// A store error: not-found and already-exists name the record; the rest are the server's.
pub(crate) fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound { resource, key } => {
            Status::not_found(format!("{resource} not found: {key}"))
        }
        StoreError::AlreadyExists { resource, key } => {
            Status::already_exists(format!("{resource} already exists: {key}"))
        }
        StoreError::InvalidPageToken => Status::invalid_argument("invalid page token"),
        StoreError::StateChanged { resource, key } => {
            Status::aborted(format!("{resource} {key} changed meanwhile; read it again"))
        }
        StoreError::InUse {
            resource,
            key,
            reason,
        } => Status::failed_precondition(format!("{resource} {key} is in use: {reason}")),
        other => {
            warn!(error = %other, "store call failed");
            Status::unavailable("the server's store is unavailable; retry")
        }
    }
}

/// The metadata key of an out-of-order `Append`'s `FailedPrecondition`: the sequence the spool
/// must resume from.
pub(crate) const NEXT_SEQUENCE_METADATA_KEY: &str = "sigil-next-sequence";

/// The audit ingest's errors: a caller that is not a listed source is refused, a malformed
/// request is the caller's to fix, and a store failure is retried (nothing was acknowledged).
pub(crate) fn ingest_status(error: IngestError) -> Status {
    match error {
        IngestError::NotASource(message) => Status::permission_denied(message),
        IngestError::Invalid(message) => Status::invalid_argument(message),
        IngestError::OutOfOrder { expected } => {
            let mut status =
                Status::failed_precondition(IngestError::OutOfOrder { expected }.to_string());
            status
                .metadata_mut()
                .insert(NEXT_SEQUENCE_METADATA_KEY, MetadataValue::from(expected));
            status
        }
        IngestError::Store(_) => Status::unavailable(
            "the audit record could not be written, nothing was acknowledged; retry",
        ),
    }
}

/// A refusal of an agent, with the reason it acts on.
pub(crate) fn deny_status(reason: DenyReason, message: impl Into<String>) -> Status {
    let mut status = Status::permission_denied(message);
    status.metadata_mut().insert(
        REASON_METADATA_KEY,
        MetadataValue::from_static(reason.as_str()),
    );
    status
}

pub(crate) fn sign_status(error: SignError) -> Status {
    match error {
        SignError::InvalidRequest(message) => Status::invalid_argument(message),
        SignError::Internal(message) => {
            warn!(error = %message, "signing failed");
            Status::internal("signing failed")
        }
    }
}

/// Nothing was handed out or granted because its audit record could not be written (the
/// audit log service has logged why; the store's detail stays in the server's log).
fn audit_withheld() -> Status {
    Status::unavailable("the audit record could not be written, so nothing was issued; retry")
}

/// The change stands, unaudited: the operator (admin API only) is told, with the detail.
fn audit_after_change(error: &StoreError) -> Status {
    Status::unavailable(format!(
        "the change was made, but its audit record could not be written: {error}"
    ))
}

fn cache_status(error: EntryCacheError) -> Status {
    warn!(%error, "authorization refused");
    Status::unavailable("the server cannot read its entries now; retry")
}

pub(crate) fn entry_status(error: EntryError) -> Status {
    match error {
        EntryError::Invalid(m) => Status::invalid_argument(m),
        e @ EntryError::TooMany { .. } => Status::invalid_argument(e.to_string()),
        e @ EntryError::NotFound(_) => Status::not_found(e.to_string()),
        e @ EntryError::SessionEntry { .. } => Status::failed_precondition(e.to_string()),
        EntryError::AuditAfterChange(e) => audit_after_change(&e),
        EntryError::Store(e) => store_status(e),
    }
}

pub(crate) fn agent_status(error: AgentError) -> Status {
    match error {
        AgentError::Denied { reason, message } => deny_status(reason, message),
        AgentError::Invalid(m) => Status::invalid_argument(m),
        e @ AgentError::NotFound(_) => Status::not_found(e.to_string()),
        e @ AgentError::EvictBanned(_) => Status::failed_precondition(e.to_string()),
        AgentError::Sign(e) => sign_status(e),
        AgentError::AuditFailed(_) => audit_withheld(),
        AgentError::AuditAfterChange(e) => audit_after_change(&e),
        AgentError::Random => Status::internal("random number generator failed"),
        AgentError::AttestorUnavailable => {
            Status::unavailable("attestation could not complete on the server; retry")
        }
        AgentError::Store(e) => store_status(e),
    }
}

pub(crate) fn svid_status(error: SvidError) -> Status {
    match error {
        SvidError::Invalid(m) => Status::invalid_argument(m),
        e @ SvidError::NotAuthorized => Status::permission_denied(e.to_string()),
        e @ SvidError::SessionEntry(_) => Status::failed_precondition(e.to_string()),
        SvidError::Sign(e) => sign_status(e),
        SvidError::Entries(e) => cache_status(e),
        SvidError::AuditFailed(_) => audit_withheld(),
        SvidError::Task(e) => {
            warn!(error = %e, "signing task failed");
            Status::internal("signing failed")
        }
    }
}

pub(crate) fn session_status(error: SessionError) -> Status {
    match error {
        SessionError::Invalid(m) => Status::invalid_argument(m),
        SessionError::NotFound(id) => Status::not_found(format!("no session with id {id}")),
        SessionError::Refused(m) => Status::failed_precondition(m),
        SessionError::Denied(m) => Status::permission_denied(m),
        SessionError::AuditFailed(_) => audit_withheld(),
        SessionError::AuditAfterChange(e) => audit_after_change(&e),
        SessionError::Sign(e) => sign_status(e),
        SessionError::Entries(e) => cache_status(e),
        SessionError::Store(e) => store_status(e),
    }
}

/// The federation service's errors.
pub(crate) fn federation_status(error: crate::service::federation::FederationError) -> Status {
    use crate::service::federation::FederationError;
    match error {
        FederationError::Invalid(m) => Status::invalid_argument(m),
        FederationError::AuditAfterChange(e) => audit_after_change(&e),
        FederationError::Store(e) => store_status(e),
    }
}

pub(crate) fn bundle_status(error: BundleError) -> Status {
    match error {
        BundleError::Invalid(m) => Status::invalid_argument(m),
        BundleError::AuditAfterChange(e) => audit_after_change(&e),
        BundleError::Store(e) => store_status(e),
    }
}

pub(crate) fn sync_status(error: SyncError) -> Status {
    match error {
        e @ SyncError::Expired => deny_status(DenyReason::Expired, e.to_string()),
        e @ SyncError::ShuttingDown => Status::unavailable(e.to_string()),
        e @ SyncError::Removed(reason) => deny_status(reason, e.to_string()),
        SyncError::Entries(e) => cache_status(e),
    }
}

/// An audit log error: a chain that cannot be vouched for is a precondition the operator must
/// fix; a bad acknowledgement is the caller's mistake.
pub(crate) fn audit_status(error: AuditError) -> Status {
    match error {
        AuditError::Store(error) => store_status(error),
        e @ (AuditError::Diverged { .. }
        | AuditError::ChainBroken(_)
        | AuditError::NoCheckpoint
        | AuditError::NotDiverged) => Status::failed_precondition(e.to_string()),
        AuditError::Acknowledge(message) => Status::invalid_argument(message),
        other => {
            warn!(error = %other, "audit log operation failed");
            Status::internal("the audit log operation failed; see the server's log")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EntryId;

    #[test]
    fn callers_mistakes_and_server_failures_get_distinct_codes() {
        use tonic::Code;
        assert_eq!(
            entry_status(EntryError::Invalid("x".into())).code(),
            Code::InvalidArgument
        );
        let id = EntryId::parse("0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(
            entry_status(EntryError::NotFound(id)).code(),
            Code::NotFound
        );
        assert_eq!(
            entry_status(EntryError::Store(StoreError::Closed)).code(),
            Code::Unavailable
        );
        assert_eq!(
            svid_status(SvidError::Sign(SignError::Internal("k".into()))).code(),
            Code::Internal
        );
        assert_eq!(
            svid_status(SvidError::Sign(SignError::InvalidRequest("csr".into()))).code(),
            Code::InvalidArgument
        );
        let denied = agent_status(AgentError::Denied {
            reason: DenyReason::Banned,
            message: "agent is banned".into(),
        });
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(DenyReason::from_status(&denied), Some(DenyReason::Banned));
        let expired = sync_status(SyncError::Expired);
        assert_eq!(DenyReason::from_status(&expired), Some(DenyReason::Expired));
        // A store failure's detail stays in the server's log, also when it stopped an
        // issuance (agents reach these over the network, unauthenticated for attestation).
        let status = store_status(StoreError::FlushFailed("disk on fire".into()));
        assert!(!status.message().contains("disk on fire"));
        for status in [
            agent_status(AgentError::AuditFailed(StoreError::FlushFailed(
                "disk on fire".into(),
            ))),
            session_status(SessionError::AuditFailed(StoreError::FlushFailed(
                "disk on fire".into(),
            ))),
            svid_status(SvidError::AuditFailed(StoreError::FlushFailed(
                "disk on fire".into(),
            ))),
        ] {
            assert_eq!(status.code(), Code::Unavailable);
            assert!(!status.message().contains("disk on fire"), "{status:?}");
        }
    }
}
