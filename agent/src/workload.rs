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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil_attestors::unix::{Credentials, UnixAttestor};
use sigil_core::X509Bundle;
use sigil_core::jwt::{JwtBundleSet, JwtSvid};
use sigil_core::lifetime::Validity;
use sigil_core::{SelectorSet, SpiffeId};
use sigil_proto::node::{
    NewJwtsvidRequest, NewSessionJwtsvidRequest, NewSessionX509svidRequest, Workload,
};
use sigil_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::cache::{SessionEntry, Snapshot, WorkloadSvid};
use crate::node::{NodeConnection, csr, new_key};

/// The metadata key every Workload API request must carry with the value `true` (WE-5).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Who is calling, as the connection's listener learned it from the kernel.
pub trait CallerIdentity: Send + Sync + 'static {
    /// uid, gid and pid at connect time.
    fn credentials(&self) -> Credentials;
    /// True while the process that connected is still the one behind its pid (so a reused
    /// pid is never mistaken for it).
    fn is_same_process(&self) -> bool;
}

/// The caller as the front door recorded it at accept: SO_PEERCRED plus a handle on the process
/// (a pidfd where the kernel offers one), so a reused pid is never mistaken for the caller.
impl CallerIdentity for crate::workload_api::CallerProcess {
    fn credentials(&self) -> Credentials {
        Credentials {
            uid: self.uid(),
            gid: self.gid(),
            pid: self.pid().and_then(|pid| i32::try_from(pid).ok()),
        }
    }

    fn is_same_process(&self) -> bool {
        self.still_alive_and_same()
    }
}

/// Finds the caller in a request: a listener puts its connection info in the extensions.
pub type CallerLookup = fn(&tonic::Extensions) -> Option<Arc<dyn CallerIdentity>>;

/// The lookup for connections accepted by the front door
/// ([`WorkloadListener`](crate::workload_api::WorkloadListener)).
pub fn front_door_caller(extensions: &tonic::Extensions) -> Option<Arc<dyn CallerIdentity>> {
    extensions
        .get::<crate::workload_api::CallerProcess>()
        .map(|caller| Arc::new(caller.clone()) as Arc<dyn CallerIdentity>)
}

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    node: Arc<NodeConnection>,
    attestor: Arc<UnixAttestor>,
    caller: CallerLookup,
    jwt_cache: Arc<Mutex<HashMap<JwtKey, CachedJwt>>>,
}

/// (entry id, sorted audience).
type JwtKey = (String, Vec<String>);

/// A JWT-SVID with the time it was fetched and its expiry.
#[derive(Debug, Clone)]
struct CachedJwt {
    token: String,
    fetched: SystemTime,
    expires: SystemTime,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

// === impl WorkloadApi ===

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi").finish_non_exhaustive()
    }
}

impl WorkloadApi {
    /// The service, serving what `snapshots` publishes and asking `node` for JWT-SVIDs.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        node: Arc<NodeConnection>,
        attestor: Arc<UnixAttestor>,
        caller: CallerLookup,
    ) -> Self {
        Self {
            snapshots,
            node,
            attestor,
            caller,
            jwt_cache: Arc::default(),
        }
    }

    /// Checks the security header, then attests the caller: its selectors.
    async fn attest<T>(&self, request: &Request<T>) -> Result<SelectorSet, Status> {
        self.attest_caller(request)
            .await
            .map(|(selectors, _)| selectors)
    }

    /// [`WorkloadApi::attest`], with the caller's kernel credentials.
    async fn attest_caller<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(SelectorSet, Credentials), Status> {
        check_header(request)?;
        let caller = (self.caller)(request.extensions()).ok_or_else(|| {
            Status::unavailable("workload attestation failed: caller credentials unavailable")
        })?;
        let needs_sha256 = self.snapshots.borrow().needs_sha256;
        let attestor = self.attestor.clone();
        let creds = caller.credentials();
        let selectors = tokio::task::spawn_blocking(move || attestor.attest(creds, needs_sha256))
            .await
            .map_err(|_| Status::unavailable("workload attestation failed"))?
            .map_err(|e| {
                debug!(error = %e, "workload attestation failed");
                Status::unavailable("workload attestation failed")
            })?;
        // The pid may have been reused since connect: give nothing unless it is the same process.
        if !caller.is_same_process() {
            warn!(pid = ?creds.pid, "caller process changed during attestation; no identity");
            return Err(Status::unavailable(
                "workload attestation failed: the calling process is gone",
            ));
        }
        Ok((selectors, creds))
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
        let (selectors, creds) = self.attest_caller(&request).await?;
        let mut snapshots = self.snapshots.clone();
        let mut held = BTreeMap::new();
        let snapshot = snapshots.borrow_and_update().clone();
        self.refresh_sessions(&snapshot, &selectors, creds, &mut held)
            .await;
        let first = x509_response(&snapshot, &selectors, &held)
            .ok_or_else(|| Status::permission_denied("no identity issued"))?;
        let (tx, rx) = mpsc::channel(2);
        let api = self.clone();
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let wake = session_wakeup(&held, &snapshots.borrow());
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    () = sleep_until(wake) => {}
                    () = tx.closed() => return,
                }
                let snapshot = snapshots.borrow_and_update().clone();
                api.refresh_sessions(&snapshot, &selectors, creds, &mut held)
                    .await;
                let next = x509_response(&snapshot, &selectors, &held);
                match next {
                    None => {
                        let _ = tx
                            .send(Err(Status::permission_denied("no identity issued")))
                            .await;
                        return;
                    }
                    Some(next) if next != last => {
                        last = next.clone();
                        if tx.send(Ok(next)).await.is_err() {
                            return;
                        }
                    }
                    Some(_) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let selectors = self.attest(&request).await?;
        let snapshots = self.snapshots.clone();
        stream_bundles(snapshots, selectors, |s| {
            let bundle = s.bundle.x509_bundle().ok()?;
            Some(X509BundlesResponse {
                crl: s.crls.clone(),
                bundles: [(s.trust_domain.id_string(), bundle.to_der())].into(),
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
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let wanted = match req.spiffe_id.as_str() {
            "" => None,
            s => Some(
                SpiffeId::new(s)
                    .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id: {e}")))?,
            ),
        };
        let mut audience = req.audience.clone();
        audience.sort();
        audience.dedup();
        let (selectors, creds) = self.attest_caller(&request).await?;
        let (identities, sessions): (Vec<WorkloadSvid>, Vec<SessionEntry>) = {
            let snapshot = self.snapshots.borrow();
            let now = SystemTime::now();
            (
                snapshot
                    .identities_for(&selectors, now)
                    .into_iter()
                    .filter(|w| wanted.as_ref().is_none_or(|id| *id == w.spiffe_id))
                    .cloned()
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
            return Err(Status::permission_denied("no identity issued"));
        }
        let mut svids = Vec::with_capacity(identities.len());
        for identity in identities {
            let token = self.jwt(&identity, &audience).await?;
            svids.push(Jwtsvid {
                spiffe_id: identity.spiffe_id.to_string(),
                svid: token,
                hint: identity.hint.clone(),
            });
        }
        for session in sessions {
            let response = self
                .node
                .client()
                .new_session_jwtsvid(NewSessionJwtsvidRequest {
                    entry_id: session.entry_id.clone(),
                    audience: audience.clone(),
                    workload: Some(workload_message(creds, &selectors)),
                })
                .await
                .map_err(|status| {
                    warn!(session_id = %session.session_id, error = %status.message(), "session jwt-svid refused");
                    Status::unavailable("cannot get a JWT-SVID from the server now; retry")
                })?
                .into_inner();
            svids.push(Jwtsvid {
                spiffe_id: response.spiffe_id,
                svid: response.token,
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
        stream_bundles(self.snapshots.clone(), selectors, |s| {
            Some(JwtBundlesResponse {
                bundles: [(s.trust_domain.id_string(), s.bundle.jwt_bundle().to_jwks())].into(),
            })
        })
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let req = request.get_ref();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // Validation needs a successful attestation, not an identity.
        self.attest(&request).await?;
        let req = request.into_inner();
        let bundles: JwtBundleSet = {
            let snapshot = self.snapshots.borrow();
            std::iter::once(snapshot.bundle.jwt_bundle()).collect()
        };
        let svid =
            JwtSvid::parse_and_validate(&req.svid, &bundles, &req.audience, SystemTime::now())
                .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: svid.spiffe_id().to_string(),
            claims: Some(to_struct(svid.claims())),
        }))
    }

    async fn fetch_witsvid(
        &self,
        _request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }

    async fn fetch_wit_bundles(
        &self,
        _request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("WIT-SVIDs are not supported"))
    }
}

impl WorkloadApi {
    /// Brings `held` (this caller's session SVIDs, by entry id) in line with `snapshot`: drops
    /// those whose session is gone, ended or unreachable, and mints those missing, changed or
    /// due for renewal. A refused or failed mint leaves that session out.
    async fn refresh_sessions(
        &self,
        snapshot: &Snapshot,
        selectors: &SelectorSet,
        creds: Credentials,
        held: &mut BTreeMap<String, WorkloadSvid>,
    ) {
        let now = SystemTime::now();
        let sessions: Vec<SessionEntry> = snapshot
            .sessions_for(selectors, now)
            .into_iter()
            .cloned()
            .collect();
        held.retain(|id, svid| {
            sessions
                .iter()
                .any(|s| s.entry_id == *id && s.revision == svid.revision)
                && svid.not_after > now
        });
        for session in sessions {
            if let Some(svid) = held.get(&session.entry_id) {
                let validity = Validity::from_parts(svid.issued_at, svid.not_after);
                let ttl = Duration::from_secs(session.svid_ttl.max(1));
                if !validity.should_renew(now, ttl, &[session.ends_at]) {
                    continue;
                }
            }
            match self.mint_session(&session, creds, selectors).await {
                Ok(svid) => {
                    held.insert(session.entry_id.clone(), svid);
                }
                Err(error) => {
                    warn!(session_id = %session.session_id, %error, "no session svid for this workload");
                    held.remove(&session.entry_id);
                }
            }
        }
    }

    /// Mints one session SVID for the calling workload.
    async fn mint_session(
        &self,
        session: &SessionEntry,
        creds: Credentials,
        selectors: &SelectorSet,
    ) -> Result<WorkloadSvid, String> {
        let key = new_key().map_err(|e| e.to_string())?;
        let csr = csr(&key).map_err(|e| e.to_string())?;
        let svid = self
            .node
            .client()
            .new_session_x509svid(NewSessionX509svidRequest {
                entry_id: session.entry_id.clone(),
                csr,
                workload: Some(workload_message(creds, selectors)),
            })
            .await
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
            .into_inner();
        let spiffe_id = SpiffeId::new(&svid.spiffe_id).map_err(|e| e.to_string())?;
        if spiffe_id != session.spiffe_id {
            return Err(format!(
                "the server signed {spiffe_id} for {}",
                session.spiffe_id
            ));
        }
        let chain = X509Bundle::from_der(spiffe_id.trust_domain(), &svid.cert_chain)
            .map_err(|e| e.to_string())?
            .authorities()
            .to_vec();
        debug!(session_id = %session.session_id, "session svid minted");
        Ok(WorkloadSvid {
            entry_id: session.entry_id.clone(),
            spiffe_id,
            selectors: session.selectors.clone(),
            hint: session.hint.clone(),
            jwt_ttl: session.svid_ttl,
            revision: session.revision,
            issued_at: SystemTime::now(),
            chain,
            key: Arc::new(key),
            not_after: UNIX_EPOCH
                + Duration::from_secs(u64::try_from(svid.expires_at).unwrap_or(0)),
        })
    }

    /// A JWT-SVID for `identity` and `audience`: from the cache while it has more than half its
    /// life left, else from the server.
    async fn jwt(&self, identity: &WorkloadSvid, audience: &[String]) -> Result<String, Status> {
        let key = (identity.entry_id.clone(), audience.to_vec());
        let now = SystemTime::now();
        if let Some(cached) = self
            .jwt_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            let life = cached
                .expires
                .duration_since(cached.fetched)
                .unwrap_or(Duration::ZERO);
            if now < cached.fetched + life / 2 {
                return Ok(cached.token.clone());
            }
        }
        let response = self
            .node
            .client()
            .new_jwtsvid(NewJwtsvidRequest {
                entry_id: identity.entry_id.clone(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(|status| {
                warn!(error = %status.message(), "cannot get a jwt-svid from the server");
                Status::unavailable("cannot get a JWT-SVID from the server now; retry")
            })?
            .into_inner();
        let expires =
            UNIX_EPOCH + Duration::from_secs(u64::try_from(response.expires_at).unwrap_or(0));
        let mut cache = self
            .jwt_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(
            key,
            CachedJwt {
                token: response.token.clone(),
                fetched: now,
                expires,
            },
        );
        Ok(response.token)
    }
}

// === helpers ===

/// WE-5, WE-6: exactly one `workload.spiffe.io` value, `true`.
fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The full X509-SVID response for `selectors` (the caller's session SVIDs last), or `None`
/// when they grant nothing.
fn x509_response(
    snapshot: &Snapshot,
    selectors: &SelectorSet,
    sessions: &BTreeMap<String, WorkloadSvid>,
) -> Option<X509svidResponse> {
    let bundle = snapshot.bundle.x509_bundle().ok()?.to_der();
    let now = SystemTime::now();
    let svids: Vec<X509svid> = snapshot
        .identities_for(selectors, now)
        .into_iter()
        .chain(sessions.values().filter(|w| w.not_after > now))
        .map(|w| X509svid {
            spiffe_id: w.spiffe_id.to_string(),
            x509_svid: w.chain.iter().flat_map(|c| c.iter().copied()).collect(),
            x509_svid_key: w.key.to_vec(),
            bundle: bundle.clone(),
            hint: w.hint.clone(),
        })
        .collect();
    (!svids.is_empty()).then(|| X509svidResponse {
        svids,
        crl: snapshot.crls.clone(),
        federated_bundles: HashMap::new(),
    })
}

/// When a stream must look at its session SVIDs again: the earliest renewal that would gain
/// something, or expiry (at most a minute away).
fn session_wakeup(
    held: &BTreeMap<String, WorkloadSvid>,
    snapshot: &Snapshot,
) -> tokio::time::Instant {
    let now = SystemTime::now();
    let mut next = now + Duration::from_secs(60);
    for svid in held.values() {
        let validity = Validity::from_parts(svid.issued_at, svid.not_after);
        let renew = validity.renew_at();
        let capped = snapshot
            .sessions
            .get(&svid.entry_id)
            .is_none_or(|s| s.ends_at <= svid.not_after);
        next = next.min(svid.not_after);
        if !capped {
            next = next.min(renew);
        }
    }
    let wait = next.duration_since(now).unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + wait.max(Duration::from_millis(50))
}

async fn sleep_until(at: tokio::time::Instant) {
    tokio::time::sleep_until(at).await;
}

/// The workload a session SVID is for, as the server's request carries it.
fn workload_message(creds: Credentials, selectors: &SelectorSet) -> Workload {
    Workload {
        pid: creds.pid.unwrap_or(0),
        uid: creds.uid,
        gid: creds.gid,
        selectors: selectors.iter().map(ToString::to_string).collect(),
    }
}

/// A bundle stream: the caller must hold an identity; a message at once and on every change.
fn stream_bundles<T>(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    selectors: SelectorSet,
    build: fn(&Snapshot) -> Option<T>,
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
            return Err(Status::permission_denied("no identity issued"));
        }
        build(&snapshot).ok_or_else(|| Status::unavailable("no bundle yet"))?
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
            let next = build(&snapshots.borrow_and_update());
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
