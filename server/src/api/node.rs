//! The agent-facing API (`sigil.node.v1.Node`), served over TCP with mTLS.
//!
//! `AttestAgent` is the only call accepted without a client certificate. Every other call
//! authenticates the agent from its X509-SVID on **every call**
//! ([`Agents::authenticate`](crate::service::agents::Agents::authenticate)); a refusal is
//! `PermissionDenied` with a machine-readable reason in the `sigil-reason` response metadata
//! ([`DenyReason`]).
//!
//! Each handler authenticates, converts the request, calls one service and maps its error with
//! that service's one function in [`super::status`]. What an agent may ask for, what is
//! audited and in which order are the services' rules.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_attestors::join_token;
use sigil_attestors::node::{AttestError, Challenge, NoChallenge};
use sigil_core::time::unix_seconds;
use sigil_core::{Selector, SelectorSet};
use sigil_proto::node::node_server::Node;
use sigil_proto::node::{
    self as pb, AttestAgentRequest, AttestAgentResponse, AttestRequest, AttestResponse,
    BatchNewX509svidRequest, BatchNewX509svidResponse, GetBundleRequest, GetBundleResponse,
    NewJwtsvidRequest, NewJwtsvidResponse, NewSessionJwtsvidRequest, NewSessionX509svidRequest,
    RenewAgentRequest, RenewAgentResponse, SyncEntriesRequest, SyncEntriesResponse, attest_request,
    attest_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{debug, instrument};

use super::audit::{checkpoint_message, parse_checkpoint};
use super::status::{agent_status, session_status, svid_status, sync_status};
use crate::policy::TtlPolicy;
pub(crate) use crate::service::agents::DenyReason;
use crate::service::agents::{Agent, Agents};
use crate::service::authority::IssuedSvid;
use crate::service::federation::FederatedSet;
use crate::service::sessions::{SessionWorkload, Sessions};
use crate::service::svids::{SvidRequest, Svids};
use crate::service::sync::{BundleUpdate, EntrySync, Since, SyncChange, SyncMessage};
use crate::store::RegistrationEntry;
use crate::tls::PeerInfo;

/// The most audit checkpoints an agent's `SyncEntries` call is checked for (agents keep one per
/// chain; the rest are ignored, so that no agent can hold the audit log's lock for long).
const MAX_WITNESSED_CHECKPOINTS: usize = 16;

/// The metadata key carrying the reason of a `PermissionDenied`.
pub const REASON_METADATA_KEY: &str = "sigil-reason";

/// The node service. Cheap to clone: its parts are shared.
#[derive(Debug, Clone)]
pub(crate) struct NodeService {
    agents: Arc<Agents>,
    svids: Arc<Svids>,
    sessions: Arc<Sessions>,
    sync: EntrySync,
    ttls: TtlPolicy,
}

/// How long an agent has to send each attestation request (the first one, each challenge
/// response).
const ATTEST_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The challenges of an attestor, put to the agent on its attestation stream.
struct StreamChallenge {
    inbound: tonic::Streaming<AttestRequest>,
    outbound: mpsc::Sender<Result<AttestResponse, Status>>,
}

#[async_trait::async_trait]
impl Challenge for StreamChallenge {
    async fn exchange(&mut self, challenge: Vec<u8>) -> Result<Vec<u8>, AttestError> {
        let gone = || AttestError::Unavailable("the agent closed the attestation stream".into());
        self.outbound
            .send(Ok(AttestResponse {
                step: Some(attest_response::Step::Challenge(challenge)),
            }))
            .await
            .map_err(|_| gone())?;
        let answer = tokio::time::timeout(ATTEST_STEP_TIMEOUT, self.inbound.message())
            .await
            .map_err(|_| AttestError::Unavailable("no answer to the challenge in time".into()))?
            .map_err(|e| AttestError::Unavailable(format!("attestation stream: {}", e.message())))?
            .ok_or_else(gone)?;
        match answer.step {
            Some(attest_request::Step::ChallengeResponse(bytes)) => Ok(bytes),
            _ => Err(AttestError::Invalid(
                "expected a challenge_response on the attestation stream".into(),
            )),
        }
    }
}

// === impl DenyReason (wire) ===

impl DenyReason {
    /// Reads the reason of a `PermissionDenied` status, if it carries one.
    pub fn from_status(status: &Status) -> Option<Self> {
        Self::parse(status.metadata().get(REASON_METADATA_KEY)?.to_str().ok()?)
    }
}

// === impl NodeService ===

impl NodeService {
    /// Builds the service over the services it calls; `ttls` fills in entries' effective
    /// lifetimes for agents.
    pub(crate) fn new(
        agents: Arc<Agents>,
        svids: Arc<Svids>,
        sessions: Arc<Sessions>,
        sync: EntrySync,
        ttls: TtlPolicy,
    ) -> Self {
        Self {
            agents,
            svids,
            sessions,
            sync,
            ttls,
        }
    }

    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Agent, Status> {
        let chain = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.cert_chain.clone());
        self.agents
            .authenticate(chain.as_deref().map(Vec::as_slice), SystemTime::now())
            .await
            .map_err(agent_status)
    }

    fn bundle_message(&self, update: &BundleUpdate) -> pb::Bundle {
        pb::Bundle {
            trust_domain: update.bundle.trust_domain.name().to_owned(),
            spiffe_bundle: update.bundle.spiffe_json.clone(),
            sequence: update.bundle.sequence,
            crls: update.crls.ders(),
        }
    }

    fn entry_message(&self, entry: &RegistrationEntry) -> pb::Entry {
        pb::Entry {
            id: entry.id.as_str().to_owned(),
            spiffe_id: entry.spiffe_id.to_string(),
            parent_id: entry.parent_id.to_string(),
            selectors: entry.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: self.ttls.x509(entry.x509_svid_ttl).as_secs(),
            jwt_svid_ttl: self.ttls.jwt(entry.jwt_svid_ttl).as_secs(),
            dns_names: entry.dns_names.clone(),
            hint: entry.hint.clone(),
            expires_at: entry.expires_at.map_or(0, unix_seconds),
            revision: entry.revision,
            session: entry.session_id.as_ref().map(|id| pb::Session {
                id: id.as_str().to_owned(),
            }),
            federates_with: entry
                .federates_with
                .iter()
                .map(|td| td.name().to_owned())
                .collect(),
        }
    }

    /// The answer to a successful attestation: the SVID and the current bundle.
    fn attested(&self, svid: IssuedSvid) -> AttestAgentResponse {
        AttestAgentResponse {
            svid: Some(svid_message(svid)),
            bundle: Some(self.bundle_message(&self.sync.bundle())),
        }
    }

    fn sync_message(&self, message: SyncMessage) -> SyncEntriesResponse {
        use pb::sync_entries_response::Message;
        let entries =
            |list: &[Arc<RegistrationEntry>]| list.iter().map(|e| self.entry_message(e)).collect();
        let message = match message {
            SyncMessage::Snapshot {
                entries: list,
                revision,
                crls,
                bundle,
                federated,
            } => Message::Snapshot(pb::SnapshotPage {
                entries: entries(&list),
                revision,
                last: crls.is_some(),
                crls: crls.map(|c| c.ders()).unwrap_or_default(),
                bundle: bundle.map(|b| self.bundle_message(&b)),
                federated_bundles: federated.map(|f| federated_message(&f)),
                history: self.sync.history().to_vec(),
            }),
            SyncMessage::Resume {
                entries: list,
                unchanged,
                revision,
                bundle,
                federated,
            } => Message::Resume(pb::ResumePage {
                entries: entries(&list),
                unchanged_ids: unchanged
                    .iter()
                    .map(|(id, _)| id.as_str().to_owned())
                    .collect(),
                unchanged_revisions: unchanged.iter().map(|(_, revision)| *revision).collect(),
                revision,
                last: bundle.is_some(),
                bundle: bundle.map(|b| self.bundle_message(&b)),
                federated_bundles: federated.map(|f| federated_message(&f)),
                history: self.sync.history().to_vec(),
            }),
            SyncMessage::Changes(changes) => Message::Changes(pb::Changes {
                changes: changes
                    .into_iter()
                    .map(|change| match change {
                        SyncChange::Upsert(entry) => pb::Change {
                            revision: entry.revision,
                            change: Some(pb::change::Change::Upsert(self.entry_message(&entry))),
                        },
                        SyncChange::Delete { id, revision } => pb::Change {
                            revision,
                            change: Some(pb::change::Change::Delete(id.as_str().to_owned())),
                        },
                        SyncChange::Bundle { revision, update } => pb::Change {
                            revision,
                            change: Some(pb::change::Change::Bundle(self.bundle_message(&update))),
                        },
                        SyncChange::Federated { revision, set } => pb::Change {
                            revision,
                            change: Some(pb::change::Change::FederatedBundles(federated_message(
                                &set,
                            ))),
                        },
                    })
                    .collect(),
            }),
            SyncMessage::Checkpoint(cp) => Message::AuditCheckpoint(checkpoint_message(&cp)),
        };
        SyncEntriesResponse {
            message: Some(message),
        }
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    type SyncEntriesStream =
        Pin<Box<dyn Stream<Item = Result<SyncEntriesResponse, Status>> + Send>>;

    #[instrument(skip_all, fields(peer = ?request.remote_addr()))]
    async fn attest_agent(
        &self,
        request: Request<AttestAgentRequest>,
    ) -> Result<Response<AttestAgentResponse>, Status> {
        let req = request.into_inner();
        if req.join_token.is_empty() {
            return Err(Status::invalid_argument("join_token is required"));
        }
        let attestor = self
            .agents
            .attestor(join_token::NAME)
            .map_err(agent_status)?;
        let svid = self
            .agents
            .attest(
                &*attestor,
                req.join_token.as_bytes(),
                &req.csr,
                &mut NoChallenge,
                SystemTime::now(),
            )
            .await
            .map_err(agent_status)?;
        Ok(Response::new(self.attested(svid)))
    }

    type AttestStream = Pin<Box<dyn Stream<Item = Result<AttestResponse, Status>> + Send>>;

    #[instrument(skip_all)]
    async fn attest(
        &self,
        request: Request<tonic::Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(ATTEST_STEP_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no attestation request in time"))??
            .ok_or_else(|| {
                Status::invalid_argument("the attestation stream ended before its first request")
            })?;
        let Some(attest_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument(
                "the first attestation request must carry params",
            ));
        };
        let attestor = self
            .agents
            .attestor(&params.attestor)
            .map_err(agent_status)?;
        let (tx, rx) = mpsc::channel(2);
        let service = self.clone();
        tokio::spawn(async move {
            let mut challenge = StreamChallenge {
                inbound,
                outbound: tx.clone(),
            };
            // Each step the agent takes is bounded (ATTEST_STEP_TIMEOUT); the server's own
            // work (signing, the audit record, the store) is not cut short once the proof
            // passed.
            let attested = service
                .agents
                .attest(
                    &*attestor,
                    &params.payload,
                    &params.csr,
                    &mut challenge,
                    SystemTime::now(),
                )
                .await;
            let result = match attested {
                Ok(svid) => Ok(AttestResponse {
                    step: Some(attest_response::Step::Result(service.attested(svid))),
                }),
                Err(e) => Err(agent_status(e)),
            };
            let _ = tx.send(result).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(skip_all)]
    async fn renew_agent(
        &self,
        request: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let csr = request.into_inner().csr;
        let svid = self
            .agents
            .renew(&agent, &csr, SystemTime::now())
            .await
            .map_err(agent_status)?;
        Ok(Response::new(RenewAgentResponse {
            svid: Some(svid_message(svid)),
        }))
    }

    #[instrument(skip_all)]
    async fn sync_entries(
        &self,
        request: Request<SyncEntriesRequest>,
    ) -> Result<Response<Self::SyncEntriesStream>, Status> {
        let agent = self.authenticate(&request).await?;
        let req = request.into_inner();
        // A malformed checkpoint is dropped, not refused: witnessing must never cost an agent
        // its entries.
        let witnessed = req
            .audit_checkpoints
            .into_iter()
            .take(MAX_WITNESSED_CHECKPOINTS)
            .filter_map(|cp| {
                parse_checkpoint(cp)
                    .map_err(|problem| debug!(agent = %agent.id, %problem, "malformed audit checkpoint ignored"))
                    .ok()
            })
            .collect();
        let since = Since {
            revision: req.since_revision,
            history: req.since_history,
        };
        let (tx, rx) = mpsc::channel(4);
        let sync = self.sync.clone();
        tokio::spawn(async move {
            if let Err(error) = sync.run(agent, since, witnessed, &tx).await {
                let _ = tx.send(Err(error)).await;
            }
        });
        let service = self.clone();
        let stream = ReceiverStream::new(rx).map(move |message| match message {
            Ok(message) => Ok(service.sync_message(message)),
            Err(error) => Err(sync_status(error)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(skip_all)]
    async fn batch_new_x509svid(
        &self,
        request: Request<BatchNewX509svidRequest>,
    ) -> Result<Response<BatchNewX509svidResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let requests = request
            .into_inner()
            .params
            .into_iter()
            .map(|p| SvidRequest {
                entry_id: p.entry_id,
                csr: p.csr,
            })
            .collect();
        let signed = self
            .svids
            .batch_x509(&agent, requests, SystemTime::now())
            .await
            .map_err(svid_status)?;
        let results = signed
            .into_iter()
            .map(|(entry_id, outcome)| pb::X509svidResult {
                entry_id,
                result: Some(match outcome {
                    Ok(svid) => pb::x509svid_result::Result::Svid(svid_message(svid)),
                    Err(error) => {
                        let status = svid_status(error);
                        pb::x509svid_result::Result::Error(pb::Error {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        })
                    }
                }),
            })
            .collect();
        Ok(Response::new(BatchNewX509svidResponse { results }))
    }

    #[instrument(skip_all)]
    async fn new_jwtsvid(
        &self,
        request: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let req = request.into_inner();
        let (spiffe_id, jwt) = self
            .svids
            .jwt(&agent, &req.entry_id, &req.audience, SystemTime::now())
            .await
            .map_err(svid_status)?;
        Ok(Response::new(NewJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            token: jwt.token,
            expires_at: unix_seconds(jwt.expires_at),
        }))
    }

    #[instrument(skip_all)]
    async fn new_session_x509svid(
        &self,
        request: Request<NewSessionX509svidRequest>,
    ) -> Result<Response<pb::X509svid>, Status> {
        let agent = self.authenticate(&request).await?;
        let req = request.into_inner();
        let workload = session_workload(req.workload.as_ref())?;
        let svid = self
            .sessions
            .issue_x509(
                &agent,
                &req.entry_id,
                &workload,
                &req.csr,
                SystemTime::now(),
            )
            .await
            .map_err(session_status)?;
        Ok(Response::new(svid_message(svid)))
    }

    #[instrument(skip_all)]
    async fn new_session_jwtsvid(
        &self,
        request: Request<NewSessionJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let agent = self.authenticate(&request).await?;
        let req = request.into_inner();
        let workload = session_workload(req.workload.as_ref())?;
        let (spiffe_id, jwt) = self
            .sessions
            .issue_jwt(
                &agent,
                &req.entry_id,
                &workload,
                &req.audience,
                SystemTime::now(),
            )
            .await
            .map_err(session_status)?;
        Ok(Response::new(NewJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            token: jwt.token,
            expires_at: unix_seconds(jwt.expires_at),
        }))
    }

    #[instrument(skip_all)]
    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<GetBundleResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(GetBundleResponse {
            bundle: Some(self.bundle_message(&self.sync.bundle())),
        }))
    }
}

// === helpers ===

/// The workload a session SVID is for, as the agent reported it.
fn session_workload(workload: Option<&pb::Workload>) -> Result<SessionWorkload, Status> {
    let w = workload
        .ok_or_else(|| Status::invalid_argument("workload is required for a session svid"))?;
    if w.pid <= 0 {
        return Err(Status::invalid_argument("workload pid is required"));
    }
    let selectors = w
        .selectors
        .iter()
        .map(|s| Selector::parse(s))
        .collect::<Result<SelectorSet, _>>()
        .map_err(|e| Status::invalid_argument(format!("workload selector: {e}")))?;
    Ok(SessionWorkload {
        pid: w.pid,
        uid: w.uid,
        gid: w.gid,
        selectors,
    })
}

fn svid_message(svid: IssuedSvid) -> pb::X509svid {
    pb::X509svid {
        spiffe_id: svid.spiffe_id.to_string(),
        cert_chain: svid.chain_der,
        expires_at: unix_seconds(svid.not_after),
    }
}

/// Every federated bundle, as the agent gets them.
fn federated_message(set: &FederatedSet) -> pb::FederatedBundles {
    pb::FederatedBundles {
        bundles: set
            .bundles
            .iter()
            .map(|(td, entry)| pb::Bundle {
                trust_domain: td.name().to_owned(),
                spiffe_bundle: entry.json.clone(),
                sequence: entry.bundle.sequence().unwrap_or_default(),
                crls: vec![],
            })
            .collect(),
    }
}
