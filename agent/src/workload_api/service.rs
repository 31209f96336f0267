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
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::SystemTime;

use bytes::Bytes;
use prost::Message as _;

use sigil_attestors::unix::{Credentials, UnixAttestor, UnixAttestorError};
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
use zeroize::{Zeroize as _, Zeroizing};

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
    shared: Arc<Mutex<SharedResponses>>,
}

pub(crate) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `FetchX509SVID` messages of one snapshot, encoded once and shared by every stream whose
/// caller gets the same SVIDs and has no session SVID of its own (a rotation pushed to a
/// thousand workloads of one kind is built and encoded once, not a thousand times).
#[derive(Default)]
struct SharedResponses {
    /// The snapshot they were built from (weak: an old snapshot is not kept alive by this; its
    /// allocation is, so that its address cannot name another while this compares with it).
    snapshot: Weak<Inventory>,
    /// By the entry ids of the SVIDs in the message, in its order: in one snapshot, they
    /// decide the whole message (each SVID, the federated bundles of their entries, the bundle
    /// and the CRLs). Keyed by what the callers get rather than by their selectors, so there
    /// are at most as many as the kinds of workload the entries name, whatever callers send.
    by_identities: HashMap<Box<[Arc<str>]>, Bytes>,
    /// Which message of `by_identities` a caller's selectors get in this snapshot, so that
    /// the streams of callers alike do not each match every SVID of the snapshot against their
    /// selectors again (an agent with 10,000 SVIDs and 1,000 streams would make ten million
    /// matches per rotation). Callers choose some of their selectors (a `unix:path` is where
    /// they run from, up to 4 KiB), so at most [`MAX_SELECTOR_SETS`] sets and
    /// [`MAX_SELECTOR_BYTES`] of selectors are kept; a caller beyond them is matched as before.
    by_selectors: HashMap<SelectorSet, Matched>,
    /// The bytes of the selectors in `by_selectors` (kinds and values).
    selector_bytes: usize,
}

/// The most selector sets [`SharedResponses`] remembers for one snapshot.
const MAX_SELECTOR_SETS: usize = 4096;

/// The most bytes of selectors [`SharedResponses`] remembers for one snapshot.
const MAX_SELECTOR_BYTES: usize = 1 << 20;

/// What a caller's selectors get in one snapshot: the key of the message in
/// `SharedResponses::by_identities`, from when it was matched until the first of its SVIDs
/// expires (the match leaves out expired SVIDs, so it must be made again then, and again if the
/// clock is set back before the match: an SVID it left out as expired may be valid again).
struct Matched {
    identities: Box<[Arc<str>]>,
    at: SystemTime,
    until: SystemTime,
}

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

// === impl SharedResponses ===

impl SharedResponses {
    /// The encoded `FetchX509SVID` message for `selectors` in `snapshot` with the caller's
    /// session SVIDs `held`, or `None` when they grant nothing. Without session SVIDs, the
    /// message is kept and shared with every caller that gets the same SVIDs, and the match of
    /// `selectors` is kept with it, while `snapshot` is the one kept: the first stream on a
    /// newly `published` snapshot replaces what was kept, and a stream late on an older one
    /// gets a message of its own.
    fn message(
        shared: &Mutex<Self>,
        published: &watch::Receiver<Arc<Inventory>>,
        snapshot: &Arc<Inventory>,
        selectors: &SelectorSet,
        held: &BTreeMap<String, WorkloadSvid>,
    ) -> Option<Bytes> {
        let now = SystemTime::now();
        if held.is_empty()
            && let Some(message) = Self::matched(shared, snapshot, selectors, now)
        {
            return Some(message);
        }
        let identities = snapshot.identities_for(selectors, now);
        if !held.is_empty() {
            let sessions = held.values().filter(|w| w.not_after() > now);
            return x509_response(snapshot, identities.into_iter().chain(sessions).collect())
                .map(encode);
        }
        let key: Box<[Arc<str>]> = identities
            .iter()
            .map(|w| Arc::clone(&w.grant.entry_id))
            .collect();
        let matched = identities
            .iter()
            .map(|w| w.not_after())
            .min()
            .map(|until| Matched {
                identities: key.clone(),
                at: now,
                until,
            });
        let stale = {
            let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
            if std::ptr::eq(shared.snapshot.as_ptr(), Arc::as_ptr(snapshot)) {
                if let Some(message) = shared.by_identities.get(&key).cloned() {
                    shared.remember(selectors, matched);
                    return Some(message);
                }
                None
            } else if Arc::ptr_eq(&published.borrow(), snapshot) {
                // The first stream on a newly published snapshot: what was kept is of an older
                // one (dropped below, outside the lock: its messages are wiped as they go).
                Some(std::mem::replace(
                    &mut *shared,
                    Self {
                        snapshot: Arc::downgrade(snapshot),
                        by_identities: HashMap::new(),
                        by_selectors: HashMap::new(),
                        selector_bytes: 0,
                    },
                ))
            } else {
                // A stream late on an older snapshot: built for it alone, so that it does not
                // throw away the messages of the newer one.
                return x509_response(snapshot, identities).map(encode);
            }
        };
        drop(stale);
        // Built outside the lock: other streams' lookups need not wait for it.
        let message = encode(x509_response(snapshot, identities)?);
        let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if std::ptr::eq(shared.snapshot.as_ptr(), Arc::as_ptr(snapshot)) {
            shared.by_identities.insert(key, message.clone());
            shared.remember(selectors, matched);
        }
        Some(message)
    }

    /// The message `selectors` got in `snapshot` when they were last matched against it, if
    /// `snapshot` is the one kept and none of its SVIDs has expired since (nor the clock gone
    /// back before the match).
    fn matched(
        shared: &Mutex<Self>,
        snapshot: &Arc<Inventory>,
        selectors: &SelectorSet,
        now: SystemTime,
    ) -> Option<Bytes> {
        let shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if !std::ptr::eq(shared.snapshot.as_ptr(), Arc::as_ptr(snapshot)) {
            return None;
        }
        let matched = shared.by_selectors.get(selectors)?;
        if now < matched.at || matched.until <= now {
            return None;
        }
        shared.by_identities.get(&matched.identities).cloned()
    }

    /// Remembers what `selectors` get in the kept snapshot (nothing for a caller that gets
    /// nothing, and no new set beyond [`MAX_SELECTOR_SETS`] or [`MAX_SELECTOR_BYTES`]).
    fn remember(&mut self, selectors: &SelectorSet, matched: Option<Matched>) {
        let Some(matched) = matched else { return };
        if let Some(kept) = self.by_selectors.get_mut(selectors) {
            *kept = matched;
            return;
        }
        let bytes: usize = selectors
            .iter()
            .map(|s| s.kind().len() + s.value().len())
            .sum();
        if self.by_selectors.len() < MAX_SELECTOR_SETS
            && self.selector_bytes + bytes <= MAX_SELECTOR_BYTES
        {
            self.selector_bytes += bytes;
            self.by_selectors.insert(selectors.clone(), matched);
        }
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
    /// through `minter`, to callers `attestor` attests.
    ///
    /// # Errors
    ///
    /// What [`UnixAttestor::check_proc`] finds: the proc filesystem `attestor` reads is missing
    /// or another PID namespace's, where a caller's pid would name another process. The service
    /// is never built there, whoever embeds it.
    pub fn new(
        snapshots: watch::Receiver<Arc<Inventory>>,
        minter: Minter,
        attestor: Arc<UnixAttestor>,
        caller: CallerLookup,
    ) -> Result<Self, UnixAttestorError> {
        attestor.check_proc()?;
        Ok(Self {
            snapshots,
            minter,
            attestor,
            caller,
            shared: Arc::default(),
        })
    }

    /// A `FetchX509SVID` stream, each message already encoded (protobuf): the first at once, then
    /// one on every change of what the caller gets, until it has nothing or is no longer the
    /// process that connected. The stream is polled by the connection's own task (no task or
    /// channel of its own); dropping it (the client went away) stops it.
    pub(crate) async fn x509_stream(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<ResponseStream<Bytes>>, Status> {
        let (selectors, creds, caller) = self.attest_caller(&request).await?;
        let mut snapshots = self.snapshots.clone();
        let mut held = BTreeMap::new();
        let snapshot = snapshots.borrow_and_update().clone();
        // Before every session mint, the caller must still be the process that connected,
        // with the same selectors: a stream outlives many mints.
        let caller = StreamCaller {
            api: self.clone(),
            caller,
            selectors,
            credentials: creds,
        };
        sessions::refresh(&caller, &snapshot, &mut held)
            .await
            .map_err(Status::from)?;
        let first = self
            .encoded_x509(&snapshot, &caller.selectors, &held)
            .ok_or_else(|| Status::from(WorkloadError::NoIdentity))?;
        let follow = Follow {
            caller,
            snapshots,
            held,
            last: first.clone(),
        };
        let rest = futures_util::stream::unfold(Some(follow), |follow| async move {
            let mut follow = follow?;
            let next = follow.next().await?;
            // After an error the stream ends.
            let more = next.is_ok().then_some(follow);
            Some((next, more))
        });
        // The first message is ready in the body, so it leaves with the response headers
        // (one write).
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(first)).chain(rest),
        )))
    }

    /// The encoded `FetchX509SVID` message for `selectors` in `snapshot` with the caller's
    /// session SVIDs `held`, or `None` when they grant nothing (see [`SharedResponses::message`]).
    fn encoded_x509(
        &self,
        snapshot: &Arc<Inventory>,
        selectors: &SelectorSet,
        held: &BTreeMap<String, WorkloadSvid>,
    ) -> Option<Bytes> {
        SharedResponses::message(&self.shared, &self.snapshots, snapshot, selectors, held)
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
            self.attestor.attest_in(creds, caller.proc_dir(), false)
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

    /// Served by [`WorkloadApiServer`](super::WorkloadApiServer) with the messages sent as
    /// encoded (`WorkloadApi::x509_stream`); here (a caller of the trait itself, or the
    /// generated server) they are decoded again.
    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let stream = self.x509_stream(request).await?.into_inner();
        Ok(Response::new(Box::pin(stream.map(|message| {
            X509svidResponse::decode(message?)
                .map_err(|_| Status::internal("cannot decode an X509-SVID message"))
        }))))
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

/// The full X509-SVID response holding `held` (the caller's identities, then its session
/// SVIDs), or `None` when that is nothing.
fn x509_response(snapshot: &Inventory, held: Vec<&WorkloadSvid>) -> Option<X509svidResponse> {
    if held.is_empty() {
        return None;
    }
    let bundle = snapshot.bundle.x509_der();
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
    Some(X509svidResponse {
        svids,
        crl: snapshot.crls.clone(),
        federated_bundles,
    })
}

/// What a `FetchX509SVID` stream follows after its first message.
struct Follow {
    caller: StreamCaller,
    snapshots: watch::Receiver<Arc<Inventory>>,
    /// The caller's session SVIDs, by entry id.
    held: BTreeMap<String, WorkloadSvid>,
    /// The last message sent: an unchanged message is not sent again.
    last: Bytes,
}

impl Follow {
    /// The next message to send, once what the caller gets has changed; an error ends the
    /// stream, and `None` ends it without one (the agent is stopping).
    async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        loop {
            let wake = sessions::wakeup(&self.held, &self.snapshots.borrow());
            tokio::select! {
                changed = self.snapshots.changed() => if changed.is_err() { return None },
                () = sleep_until(wake) => {}
            }
            let snapshot = self.snapshots.borrow_and_update().clone();
            if let Err(changed) = sessions::refresh(&self.caller, &snapshot, &mut self.held).await {
                return Some(Err(changed.into()));
            }
            let api = &self.caller.api;
            match api.encoded_x509(&snapshot, &self.caller.selectors, &self.held) {
                None => return Some(Err(WorkloadError::NoIdentity.into())),
                // The same shared bytes (the usual case) need no comparison.
                Some(next) if !same_bytes(&next, &self.last) => {
                    // Nothing more for a caller that exited or exec'd since it connected.
                    if !self.caller.same_process() {
                        return Some(Err(WorkloadError::Attestation(
                            ": the calling process changed since it connected; reconnect",
                        )
                        .into()));
                    }
                    self.last = next.clone();
                    return Some(Ok(next));
                }
                Some(_) => {}
            }
        }
    }
}

/// Whether two messages are the same bytes: the same buffer, or equal contents.
fn same_bytes(a: &Bytes, b: &Bytes) -> bool {
    (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b
}

/// A message's protobuf encoding, wiped when the last stream holding it lets it go (it carries
/// private keys). tonic copies it into the connection's buffers, which it does not wipe.
fn encode(mut response: X509svidResponse) -> Bytes {
    let message = Bytes::from_owner(Zeroizing::new(response.encode_to_vec()));
    for svid in &mut response.svids {
        svid.x509_svid_key.zeroize();
    }
    message
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sigil_core::{Selector, TrustDomain};

    use super::*;

    fn selectors(uid: u32) -> SelectorSet {
        [Selector::parse(&format!("unix:uid:{uid}")).unwrap()]
            .into_iter()
            .collect()
    }

    fn svid(entry: &str, uid: u32, not_after: SystemTime) -> WorkloadSvid {
        WorkloadSvid::unsigned(
            Arc::new(Grant {
                entry_id: entry.into(),
                spiffe_id: SpiffeId::new(&format!("spiffe://example.org/{entry}")).unwrap(),
                selectors: selectors(uid),
                hint: Box::default(),
                x509_ttl: 3600,
                expires_at: None,
                federates_with: Box::default(),
            }),
            1,
            not_after,
        )
    }

    /// An inventory holding `svids`.
    fn inventory(svids: Vec<WorkloadSvid>) -> Arc<Inventory> {
        let td = TrustDomain::new("example.org").unwrap();
        let mut inventory = Inventory::new(td.clone(), SpiffeBundle::new(td));
        let map = Arc::make_mut(&mut inventory.svids);
        for w in svids {
            map.insert(w.grant.entry_id.clone(), Arc::new(w));
        }
        Arc::new(inventory)
    }

    /// The service is never built over a proc filesystem where a caller's pid would name
    /// another process, whoever embeds it (the agent checks before this, at its start).
    #[tokio::test]
    async fn the_service_is_not_built_over_the_proc_of_another_pid_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let node = Arc::new(crate::node::tests::offline_connection(dir.path()));
        let (_publish, snapshots) = watch::channel(inventory(Vec::new()));
        let build = |attestor: UnixAttestor| {
            WorkloadApi::new(
                snapshots.clone(),
                Minter::new(Arc::clone(&node)),
                Arc::new(attestor),
                super::super::caller::front_door_caller,
            )
        };
        // A proc filesystem whose `self` is another process: this process seen from the
        // outside, or the outside seen from in here.
        let foreign = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            (std::process::id() + 1).to_string(),
            foreign.path().join("self"),
        )
        .unwrap();
        let refused = build(UnixAttestor::with_roots(foreign.path(), "/etc")).unwrap_err();
        assert!(
            matches!(refused, UnixAttestorError::ForeignProc { .. }),
            "{refused:?}"
        );
        let missing = build(UnixAttestor::with_roots(dir.path().join("none"), "/etc"));
        assert!(
            matches!(missing, Err(UnixAttestorError::NoProc { .. })),
            "{missing:?}"
        );
        build(UnixAttestor::new()).unwrap();
    }

    fn ids(message: &Bytes) -> Vec<String> {
        X509svidResponse::decode(message.clone())
            .unwrap()
            .svids
            .into_iter()
            .map(|s| s.spiffe_id)
            .collect()
    }

    #[test]
    fn callers_of_one_kind_share_one_encoding_of_the_published_snapshot() {
        let later = SystemTime::now() + Duration::from_secs(3600);
        let first = inventory(vec![svid("a", 1, later), svid("b", 2, later)]);
        let (publish, published) = watch::channel(Arc::clone(&first));
        let shared = Mutex::default();
        let none = BTreeMap::new();
        let message = |snapshot: &Arc<Inventory>, uid| {
            SharedResponses::message(&shared, &published, snapshot, &selectors(uid), &none)
        };

        let one = message(&first, 1).unwrap();
        assert_eq!(ids(&one), ["spiffe://example.org/a"]);
        // Another kind of caller that gets the same SVIDs gets the same bytes too.
        let both: SelectorSet = [
            Selector::parse("unix:uid:1").unwrap(),
            Selector::parse("unix:path:/bin/w").unwrap(),
        ]
        .into_iter()
        .collect();
        let same = SharedResponses::message(&shared, &published, &first, &both, &none).unwrap();
        assert_eq!(same.as_ptr(), one.as_ptr());
        // The same bytes, not an equal copy.
        assert_eq!(message(&first, 1).unwrap().as_ptr(), one.as_ptr());
        let other = message(&first, 2).unwrap();
        assert_eq!(ids(&other), ["spiffe://example.org/b"]);
        assert_eq!(message(&first, 2).unwrap().as_ptr(), other.as_ptr());
        assert!(message(&first, 3).is_none(), "uid 3 is granted nothing");

        // A new snapshot is built anew, and replaces the kept messages.
        let second = inventory(vec![svid("a", 1, later), svid("c", 1, later)]);
        publish.send(Arc::clone(&second)).unwrap();
        let two = message(&second, 1).unwrap();
        assert_eq!(
            ids(&two),
            ["spiffe://example.org/a", "spiffe://example.org/c"]
        );
        assert_eq!(message(&second, 1).unwrap().as_ptr(), two.as_ptr());
        // A stream late on the first snapshot gets its message, and does not displace the
        // second's.
        let late = message(&first, 2).unwrap();
        assert_eq!(ids(&late), ["spiffe://example.org/b"]);
        assert_eq!(message(&second, 1).unwrap().as_ptr(), two.as_ptr());
    }

    #[test]
    fn a_kept_message_is_not_served_once_an_svid_in_it_has_expired() {
        let now = SystemTime::now();
        let snapshot = inventory(vec![
            svid("a", 1, now + Duration::from_secs(1)),
            svid("b", 1, now + Duration::from_secs(3600)),
        ]);
        let (_publish, published) = watch::channel(Arc::clone(&snapshot));
        let shared = Mutex::default();
        let none = BTreeMap::new();
        let message =
            || SharedResponses::message(&shared, &published, &snapshot, &selectors(1), &none);
        let before = message().unwrap();
        assert_eq!(
            ids(&before),
            ["spiffe://example.org/a", "spiffe://example.org/b"]
        );
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(ids(&message().unwrap()), ["spiffe://example.org/b"]);
    }

    #[test]
    fn callers_alike_are_not_matched_against_every_svid_again() {
        let later = SystemTime::now() + Duration::from_secs(3600);
        let first = inventory(vec![svid("a", 1, later), svid("b", 2, later)]);
        let (publish, published) = watch::channel(Arc::clone(&first));
        let shared = Mutex::<SharedResponses>::default();
        let none = BTreeMap::new();
        let message = |snapshot: &Arc<Inventory>, selectors: &SelectorSet| {
            SharedResponses::message(&shared, &published, snapshot, selectors, &none)
        };
        let remembered = || shared.lock().unwrap().by_selectors.len();

        let one = message(&first, &selectors(1)).unwrap();
        assert_eq!(remembered(), 1);
        assert!(message(&first, &selectors(3)).is_none());
        assert_eq!(
            remembered(),
            1,
            "a caller granted nothing is not remembered"
        );
        // What is remembered is what is served: a set planted with `a`'s message gets it,
        // although matching uid 3 against the snapshot would grant nothing.
        let planted = Matched {
            identities: [Arc::from("a")].into(),
            at: SystemTime::now(),
            until: later,
        };
        shared
            .lock()
            .unwrap()
            .by_selectors
            .insert(selectors(3), planted);
        assert_eq!(
            message(&first, &selectors(3)).unwrap().as_ptr(),
            one.as_ptr()
        );
        // Not with the clock set back before the match: an SVID it left out as expired may be
        // valid again.
        shared
            .lock()
            .unwrap()
            .by_selectors
            .get_mut(&selectors(3))
            .unwrap()
            .at = later;
        assert!(message(&first, &selectors(3)).is_none());
        // A caller with session SVIDs gets its own message, whatever its selectors got.
        let held = BTreeMap::from([("s".to_owned(), svid("s", 1, later))]);
        let own = SharedResponses::message(&shared, &published, &first, &selectors(1), &held);
        assert_eq!(
            ids(&own.unwrap()),
            ["spiffe://example.org/a", "spiffe://example.org/s"]
        );

        // At most MAX_SELECTOR_SETS sets; callers beyond them are matched as before.
        let path = |n: usize| -> SelectorSet {
            [
                Selector::parse("unix:uid:2").unwrap(),
                Selector::parse(&format!("unix:path:/bin/w{n}")).unwrap(),
            ]
            .into_iter()
            .collect()
        };
        for n in 0..MAX_SELECTOR_SETS + 10 {
            let got = message(&first, &path(n)).unwrap();
            assert_eq!(ids(&got), ["spiffe://example.org/b"]);
        }
        assert_eq!(remembered(), MAX_SELECTOR_SETS);
        // One already remembered is still served at the bound.
        assert_eq!(
            ids(&message(&first, &selectors(1)).unwrap()),
            ["spiffe://example.org/a"]
        );
        assert_eq!(remembered(), MAX_SELECTOR_SETS);

        // A new snapshot forgets them all: uid 3 gets what matching gives it there.
        let second = inventory(vec![svid("a", 1, later)]);
        publish.send(Arc::clone(&second)).unwrap();
        assert!(message(&second, &selectors(3)).is_none());
        assert_eq!(remembered(), 0);
        assert_eq!(
            ids(&message(&second, &selectors(1)).unwrap()),
            ["spiffe://example.org/a"]
        );
        assert_eq!(remembered(), 1);
        // A stream late on the first snapshot is matched there, and what it got is not
        // remembered for the second, where uid 2 gets nothing.
        assert_eq!(
            ids(&message(&first, &selectors(2)).unwrap()),
            ["spiffe://example.org/b"]
        );
        assert_eq!(remembered(), 1);
        assert!(message(&second, &selectors(2)).is_none());
    }

    #[test]
    fn the_selectors_remembered_are_bounded_in_bytes() {
        let later = SystemTime::now() + Duration::from_secs(3600);
        let snapshot = inventory(vec![svid("a", 1, later)]);
        let (_publish, published) = watch::channel(Arc::clone(&snapshot));
        let shared = Mutex::<SharedResponses>::default();
        let none = BTreeMap::new();
        // Sets of about 3 KiB each (a caller's path is its to choose): the byte bound stops them
        // long before the count does.
        let long = "x".repeat(3000);
        for n in 0..400 {
            let set: SelectorSet = [
                Selector::parse("unix:uid:1").unwrap(),
                Selector::parse(&format!("unix:path:/{long}/{n}")).unwrap(),
            ]
            .into_iter()
            .collect();
            let got = SharedResponses::message(&shared, &published, &snapshot, &set, &none);
            assert_eq!(ids(&got.unwrap()), ["spiffe://example.org/a"]);
        }
        let kept = shared.lock().unwrap();
        assert!(kept.selector_bytes <= MAX_SELECTOR_BYTES);
        assert!(
            kept.by_selectors.len() < 400 && kept.by_selectors.len() > 300,
            "{} sets kept",
            kept.by_selectors.len()
        );
    }

    #[test]
    fn a_caller_with_session_svids_gets_a_message_of_its_own() {
        let later = SystemTime::now() + Duration::from_secs(3600);
        let snapshot = inventory(vec![svid("a", 1, later)]);
        let (_publish, published) = watch::channel(Arc::clone(&snapshot));
        let shared = Mutex::default();
        let held = BTreeMap::from([("s".to_owned(), svid("s", 1, later))]);
        let message = |held| {
            SharedResponses::message(&shared, &published, &snapshot, &selectors(1), held).unwrap()
        };
        let own = message(&held);
        assert_eq!(
            ids(&own),
            ["spiffe://example.org/a", "spiffe://example.org/s"]
        );
        assert_ne!(message(&held).as_ptr(), own.as_ptr(), "not kept");
        // Nor does it fill what callers without sessions share.
        let plain = message(&BTreeMap::new());
        assert_eq!(ids(&plain), ["spiffe://example.org/a"]);
    }

    #[test]
    fn one_response_always_encodes_to_the_same_bytes() {
        // Streams send a message only when its encoding changed: a map in random order would
        // send the same federated bundles again on every snapshot.
        let response = || X509svidResponse {
            svids: Vec::new(),
            crl: Vec::new(),
            federated_bundles: (0..20)
                .map(|i| (format!("spiffe://td{i}.example"), vec![i]))
                .collect(),
        };
        assert_eq!(encode(response()), encode(response()));
    }
}
