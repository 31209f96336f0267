//! The SPIFFE Workload API service (`SpiffeWorkloadAPI`), per spec sections 5 and 6.
//!
//! Order of checks on every call, as SPIRE: the `workload.spiffe.io: true` header
//! (`InvalidArgument`), the request's own fields (`InvalidArgument`), attestation of the caller
//! from its kernel credentials (`Unavailable` when the caller cannot be attested, or is no
//! longer the process that connected), then entitlement (`PermissionDenied` "no identity
//! issued"). Streams send the complete state at once and again on every change of what the
//! caller is entitled to (rotation, entry change, bundle change); when the caller's last
//! identity is withdrawn, `FetchX509SVID` ends with `PermissionDenied`.
//!
//! Privileged sessions: a `FetchX509SVID` stream of a workload that matches a session gets an
//! SVID minted for it alone, on demand (`NewSessionX509SVID`, carrying its pid, uid, gid and
//! selectors, which the server audits before it signs), renewed at half its life unless the
//! session's end caps it, and dropped from the stream as soon as the session leaves the
//! snapshot (close, revoke, expiry) or the agent loses the server. `FetchJWTSVID` does the same
//! per call, without caching. The CRLs of the snapshot fill the `crl` fields.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use sigil_attestors::unix::{Credentials, UnixAttestor};
use sigil_core::jwt::{JwtBundleSet, JwtSvid};
use sigil_core::{SelectorSet, SpiffeBundle, SpiffeId};
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::caller::{CallerIdentity, CallerLookup};
use super::sessions;
use crate::cache::{Grant, Inventory, SessionEntry, WorkloadSvid};
use crate::manager::{Caller, Minter};

/// The metadata key every Workload API request must carry with the value `true` (WE-5).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Why a Workload API call is refused. Each maps to the status code the spec gives it in one
/// place: its `From` conversion into a `tonic::Status`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The `workload.spiffe.io: true` header is missing (WE-5, WE-6): `InvalidArgument`.
    #[error("security header missing from request")]
    MissingHeader,
    /// A field of the request is missing or malformed: `InvalidArgument`.
    #[error("{0}")]
    InvalidRequest(String),
    /// The caller cannot be attested, or is no longer the process that connected:
    /// `Unavailable`.
    #[error("workload attestation failed{0}")]
    Attestation(&'static str),
    /// The caller's selectors grant nothing: `PermissionDenied`.
    #[error("no identity issued")]
    NoIdentity,
    /// The agent has no bundle yet: `Unavailable`.
    #[error("no bundle yet")]
    NoBundle,
    /// The server could not mint what the call needs now: `Unavailable`.
    #[error("cannot get a JWT-SVID from the server now; retry")]
    Upstream,
    /// WIT-SVIDs: `Unimplemented`.
    #[error("WIT-SVIDs are not supported")]
    Unsupported,
}

impl From<WorkloadError> for Status {
    fn from(error: WorkloadError) -> Self {
        let message = error.to_string();
        match error {
            WorkloadError::MissingHeader | WorkloadError::InvalidRequest(_) => {
                Status::invalid_argument(message)
            }
            WorkloadError::Attestation(_) | WorkloadError::NoBundle | WorkloadError::Upstream => {
                Status::unavailable(message)
            }
            WorkloadError::NoIdentity => Status::permission_denied(message),
            WorkloadError::Unsupported => Status::unimplemented(message),
        }
    }
}

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    snapshots: watch::Receiver<Arc<Inventory>>,
    minter: Minter,
    attestor: Arc<UnixAttestor>,
    caller: CallerLookup,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A `FetchX509SVID` stream's caller as attested when the stream began, and the means to mint
/// its session SVIDs and to attest it again before each.
pub(crate) struct StreamCaller {
    api: WorkloadApi,
    caller: Arc<dyn CallerIdentity>,
    selectors: SelectorSet,
    credentials: Credentials,
}

impl StreamCaller {
    /// The minter of session SVIDs.
    pub(crate) fn minter(&self) -> &Minter {
        &self.api.minter
    }

    /// The selectors read when the stream began.
    pub(crate) fn selectors(&self) -> &SelectorSet {
        &self.selectors
    }

    /// The kernel credentials read when the connection was accepted.
    pub(crate) fn credentials(&self) -> Credentials {
        self.credentials
    }

    /// Whether the caller is still the process (and executable) that connected, with the
    /// selectors it had when the stream began (read the same way: with the executable's hash
    /// if and only if they had it, so that entries added or removed meanwhile change nothing).
    pub(crate) async fn still_same(&self) -> bool {
        let with_sha256 = self.selectors.iter().any(|s| {
            s.kind() == sigil_attestors::unix::SELECTOR_TYPE && s.value().starts_with("sha256:")
        });
        self.api
            .attest_process(self.caller.clone(), Some(with_sha256))
            .await
            .is_ok_and(|now| now == self.selectors)
    }

    /// Whether the caller is still the process, and the executable, that connected (cheap: no
    /// attestation); checked before anything is sent on the stream.
    pub(crate) fn same_process(&self) -> bool {
        self.caller.is_same_process()
    }
}

// === impl WorkloadApi ===

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi").finish_non_exhaustive()
    }
}

impl WorkloadApi {
    /// The service, serving what `snapshots` publishes and minting JWT-SVIDs and session SVIDs
    /// through `minter`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Inventory>>,
        minter: Minter,
        attestor: Arc<UnixAttestor>,
        caller: CallerLookup,
    ) -> Self {
        Self {
            snapshots,
            minter,
            attestor,
            caller,
        }
    }

    /// Checks the security header, then attests the caller: its selectors.
    async fn attest<T>(&self, request: &Request<T>) -> Result<SelectorSet, Status> {
        self.attest_caller(request)
            .await
            .map(|(selectors, _, _)| selectors)
    }

    /// [`WorkloadApi::attest`], with the caller's kernel credentials and the caller itself (to
    /// attest it again later with [`WorkloadApi::attest_process`]).
    async fn attest_caller<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(SelectorSet, Credentials, Arc<dyn CallerIdentity>), Status> {
        check_header(request)?;
        let caller = (self.caller)(request.extensions()).ok_or_else(|| {
            Status::from(WorkloadError::Attestation(
                ": caller credentials unavailable",
            ))
        })?;
        let selectors = self.attest_process(caller.clone(), None).await?;
        Ok((selectors, caller.credentials(), caller))
    }

    /// The selectors of `caller`, read now; an error unless it is still the process (and the
    /// executable) that connected.
    /// `with_sha256`: hash the executable (`None`: when some entry of this node needs it).
    async fn attest_process(
        &self,
        caller: Arc<dyn CallerIdentity>,
        with_sha256: Option<bool>,
    ) -> Result<SelectorSet, Status> {
        let needs_sha256 = with_sha256.unwrap_or_else(|| self.snapshots.borrow().needs_sha256);
        let creds = caller.credentials();
        // Without hashing, attestation reads a few small files (/proc/PID, /etc/passwd,
        // /etc/group): done here, a hop to the blocking pool would cost more than the reads.
        // Hashing an executable can take long: that goes to the blocking pool.
        let attested = if needs_sha256 {
            let attestor = self.attestor.clone();
            tokio::task::spawn_blocking(move || attestor.attest(creds, true))
                .await
                .map_err(|_| Status::from(WorkloadError::Attestation("")))?
        } else {
            self.attestor.attest(creds, false)
        };
        let selectors = attested.map_err(|e| {
            debug!(error = %e, "workload attestation failed");
            Status::from(WorkloadError::Attestation(""))
        })?;
        // The pid may have been reused since connect, or the process may have exec'd another
        // program: give nothing unless it is the same process running the same executable.
        if !caller.is_same_process() {
            warn!(pid = ?creds.pid, "caller process exited or changed its executable since it connected; no identity");
            return Err(WorkloadError::Attestation(
                ": the calling process exited or runs another executable than when it connected",
            )
            .into());
        }
        Ok(selectors)
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;
    type FetchWITSVIDStream = ResponseStream<WitsvidResponse>;
    type FetchWITBundlesStream = ResponseStream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (selectors, creds, caller) = self.attest_caller(&request).await?;
        let mut snapshots = self.snapshots.clone();
        let mut held = BTreeMap::new();
        let snapshot = snapshots.borrow_and_update().clone();
        // Before every session mint, the caller must still be the process that connected,
        // with the same selectors: a stream outlives many mints.
        let stream_caller = StreamCaller {
            api: self.clone(),
            caller,
            selectors: selectors.clone(),
            credentials: creds,
        };
        sessions::refresh(&stream_caller, &snapshot, &mut held)
            .await
            .map_err(Status::from)?;
        let first = x509_response(&snapshot, &selectors, &held)
            .ok_or_else(|| Status::from(WorkloadError::NoIdentity))?;
        let (tx, rx) = mpsc::channel(2);
        let mut last = first.clone();
        tokio::spawn(async move {
            loop {
                let wake = sessions::wakeup(&held, &snapshots.borrow());
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    () = sleep_until(wake) => {}
                    () = tx.closed() => return,
                }
                // A client that has gone needs no more session SVIDs minted for it.
                if tx.is_closed() {
                    return;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                if let Err(changed) = sessions::refresh(&stream_caller, &snapshot, &mut held).await
                {
                    let _ = tx.send(Err(changed.into())).await;
                    return;
                }
                let next = x509_response(&snapshot, &selectors, &held);
                match next {
                    None => {
                        let _ = tx.send(Err(WorkloadError::NoIdentity.into())).await;
                        return;
                    }
                    Some(next) if next != last => {
                        // Nothing more for a caller that exited or exec'd since it connected.
                        if !stream_caller.same_process() {
                            let _ = tx
                                .send(Err(WorkloadError::Attestation(
                                    ": the calling process changed since it connected; reconnect",
                                )
                                .into()))
                                .await;
                            return;
                        }
                        last = next.clone();
                        if tx.send(Ok(next)).await.is_err() {
                            return;
                        }
                    }
                    Some(_) => {}
                }
            }
        });
        // The first message is ready in the body, so it leaves with the response headers
        // (one write) rather than after a hop through the stream task.
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(first)).chain(ReceiverStream::new(rx)),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let selectors = self.attest(&request).await?;
        let snapshots = self.snapshots.clone();
        stream_bundles(snapshots, selectors, |s, selectors| {
            let mut bundles: HashMap<String, Vec<u8>> =
                [(s.trust_domain.id_string(), s.bundle.x509_der())].into();
            for federated in s.federated_for_selectors(selectors, SystemTime::now()) {
                bundles.insert(federated.trust_domain().id_string(), federated.x509_der());
            }
            Some(X509BundlesResponse {
                crl: s.crls.clone(),
                bundles,
            })
        })
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let req = request.get_ref();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(
                WorkloadError::InvalidRequest("audience must be specified".to_owned()).into(),
            );
        }
        let wanted = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(SpiffeId::new(s).map_err(|e| {
                Status::from(WorkloadError::InvalidRequest(format!(
                    "invalid spiffe_id: {e}"
                )))
            })?),
        };
        let mut audience = req.audience.clone();
        audience.sort();
        audience.dedup();
        let (selectors, creds, _) = self.attest_caller(&request).await?;
        // What each identity grants and the revision it was minted for (not the SVID: its key
        // is not copied for a JWT).
        let (identities, sessions): (Vec<(Arc<Grant>, u64)>, Vec<SessionEntry>) = {
            let snapshot = self.snapshots.borrow();
            let now = SystemTime::now();
            (
                snapshot
                    .identities_for(&selectors, now)
                    .into_iter()
                    .filter(|w| wanted.as_ref().is_none_or(|id| *id == w.grant.spiffe_id))
                    .map(|w| (Arc::clone(&w.grant), w.revision))
                    .collect(),
                snapshot
                    .sessions_for(&selectors, now)
                    .into_iter()
                    .filter(|s| wanted.as_ref().is_none_or(|id| *id == s.spiffe_id))
                    .cloned()
                    .collect(),
            )
        };
        if identities.is_empty() && sessions.is_empty() {
            return Err(WorkloadError::NoIdentity.into());
        }
        let mut svids = Vec::with_capacity(identities.len());
        for (grant, revision) in identities {
            let token = self
                .minter
                .jwt(&grant, revision, &audience)
                .await
                .map_err(|error| {
                    warn!(%error, "cannot get a jwt-svid from the server");
                    Status::from(WorkloadError::Upstream)
                })?;
            svids.push(Jwtsvid {
                spiffe_id: grant.spiffe_id.to_string(),
                svid: token,
                hint: grant.hint.to_string(),
            });
        }
        for session in sessions {
            let caller = Caller {
                credentials: creds,
                selectors: &selectors,
            };
            let (spiffe_id, svid) = self
                .minter
                .session_jwt(&session, &audience, caller)
                .await
                .map_err(|error| {
                    warn!(session_id = %session.session_id, %error, "session jwt-svid refused");
                    Status::from(WorkloadError::Upstream)
                })?;
            svids.push(Jwtsvid {
                spiffe_id,
                svid,
                hint: session.hint.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let selectors = self.attest(&request).await?;
        stream_bundles(self.snapshots.clone(), selectors, |s, selectors| {
            let mut bundles: HashMap<String, Vec<u8>> =
                [(s.trust_domain.id_string(), s.bundle.jwt_bundle().to_jwks())].into();
            for federated in s.federated_for_selectors(selectors, SystemTime::now()) {
                bundles.insert(
                    federated.trust_domain().id_string(),
                    federated.jwt_bundle().to_jwks(),
                );
            }
            Some(JwtBundlesResponse { bundles })
        })
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let req = request.get_ref();
        if req.audience.is_empty() {
            return Err(
                WorkloadError::InvalidRequest("audience must be specified".to_owned()).into(),
            );
        }
        if req.svid.is_empty() {
            return Err(WorkloadError::InvalidRequest("svid must be specified".to_owned()).into());
        }
        // Validation needs a successful attestation, not an identity.
        let selectors = self.attest(&request).await?;
        let req = request.into_inner();
        // The own trust domain's keys, and those of the federated trust domains the caller's
        // entries federate with.
        let bundles: JwtBundleSet = {
            let snapshot = self.snapshots.borrow();
            std::iter::once(snapshot.bundle.jwt_bundle())
                .chain(
                    snapshot
                        .federated_for_selectors(&selectors, SystemTime::now())
                        .into_iter()
                        .map(SpiffeBundle::jwt_bundle),
                )
                .collect()
        };
        let svid =
            JwtSvid::parse_and_validate(&req.svid, &bundles, &req.audience, SystemTime::now())
                .map_err(|e| {
                    Status::from(WorkloadError::InvalidRequest(format!(
                        "invalid JWT-SVID: {e}"
                    )))
                })?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: svid.spiffe_id().to_string(),
            claims: Some(to_struct(svid.claims())),
        }))
    }

    async fn fetch_witsvid(
        &self,
        _request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(WorkloadError::Unsupported.into())
    }

    async fn fetch_wit_bundles(
        &self,
        _request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(WorkloadError::Unsupported.into())
    }
}

// === helpers ===

/// WE-5, WE-6: exactly one `workload.spiffe.io` value, `true`.
fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(WorkloadError::MissingHeader.into()),
    }
}

/// The full X509-SVID response for `selectors` (the caller's session SVIDs last), or `None`
/// when they grant nothing.
fn x509_response(
    snapshot: &Inventory,
    selectors: &SelectorSet,
    sessions: &BTreeMap<String, WorkloadSvid>,
) -> Option<X509svidResponse> {
    let bundle = snapshot.bundle.x509_der();
    let now = SystemTime::now();
    let held: Vec<&WorkloadSvid> = snapshot
        .identities_for(selectors, now)
        .into_iter()
        .chain(sessions.values().filter(|w| w.not_after() > now))
        .collect();
    // The federated bundles of the SVIDs in this response (WE: `federated_bundles`).
    let federated_bundles = snapshot
        .federated_for(held.iter().flat_map(|w| w.grant.federates_with.iter()))
        .into_iter()
        .map(|b| (b.trust_domain().id_string(), b.x509_der()))
        .collect();
    let svids: Vec<X509svid> = held
        .into_iter()
        .map(|w| X509svid {
            spiffe_id: w.grant.spiffe_id.to_string(),
            x509_svid: w.chain().to_vec(),
            x509_svid_key: std::mem::take(&mut *w.private_key()),
            bundle: bundle.clone(),
            hint: w.grant.hint.to_string(),
        })
        .collect();
    (!svids.is_empty()).then(|| X509svidResponse {
        svids,
        crl: snapshot.crls.clone(),
        federated_bundles,
    })
}

async fn sleep_until(at: tokio::time::Instant) {
    tokio::time::sleep_until(at).await;
}

/// A bundle stream: the caller must hold an identity; a message at once and on every change.
fn stream_bundles<T>(
    mut snapshots: watch::Receiver<Arc<Inventory>>,
    selectors: SelectorSet,
    build: fn(&Inventory, &SelectorSet) -> Option<T>,
) -> Result<Response<ResponseStream<T>>, Status>
where
    T: PartialEq + Clone + Send + 'static,
{
    let first = {
        let snapshot = snapshots.borrow_and_update();
        let now = SystemTime::now();
        if snapshot.identities_for(&selectors, now).is_empty()
            && snapshot.sessions_for(&selectors, now).is_empty()
        {
            return Err(WorkloadError::NoIdentity.into());
        }
        build(&snapshot, &selectors).ok_or_else(|| Status::from(WorkloadError::NoBundle))?
    };
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut last = first.clone();
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
            let next = build(&snapshots.borrow_and_update(), &selectors);
            if let Some(next) = next
                && next != last
            {
                last = next.clone();
                if tx.send(Ok(next)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// JSON claims as a protobuf Struct.
fn to_struct(claims: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .iter()
            .map(|(k, v)| (k.clone(), to_value(v)))
            .collect(),
    }
}

fn to_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}
