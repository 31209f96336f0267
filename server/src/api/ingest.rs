//! The audit ingest API (`sigil.audit.v1.AuditIngest`), served on the agent-facing port with
//! mTLS: authenticate the caller as a listed audit source on every call, convert, call
//! [`AuditIngest`](crate::service::ingest::AuditIngest).

use std::sync::Arc;
use std::time::SystemTime;

use sigil_proto::audit::audit_ingest_server::AuditIngest as AuditIngestApi;
use sigil_proto::audit::{AppendRequest, AppendResponse};
use tonic::{Request, Response, Status};

use super::status::ingest_status;
use crate::service::ingest::{AuditIngest, IngestEvent};
use crate::tls::PeerInfo;

/// The handler. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct AuditIngestService {
    ingest: Arc<AuditIngest>,
}

impl AuditIngestService {
    pub(crate) fn new(ingest: Arc<AuditIngest>) -> Self {
        Self { ingest }
    }
}

#[tonic::async_trait]
impl AuditIngestApi for AuditIngestService {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let chain = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.cert_chain.clone());
        let caller = self
            .ingest
            .authenticate(chain.as_deref().map(Vec::as_slice), SystemTime::now())
            .map_err(ingest_status)?;
        let req = request.into_inner();
        let events = req
            .events
            .into_iter()
            .map(|e| IngestEvent {
                sequence: e.sequence,
                observed_at_seconds: e.observed_at_seconds,
                observed_at_nanos: e.observed_at_nanos,
                action: e.action,
                subject: e.subject,
                details_json: e.details_json,
                peer_certificate: e.peer_certificate,
            })
            .collect();
        let done = self
            .ingest
            .append(&caller, &req.spool_id, events)
            .await
            .map_err(ingest_status)?;
        Ok(Response::new(AppendResponse {
            acknowledged_sequence: done.acknowledged,
            appended: u32::try_from(done.appended.len()).unwrap_or(u32::MAX),
        }))
    }
}
