//! What the mTLS example server and client share: credentials from the SPIFFE Workload API
//! (the X509-SVID, the bundle and the CRLs, reloaded on every update), rustls configurations
//! built from them (ring provider, revoked serials refused), and authorization of the peer by
//! SPIFFE ID.
//!
//! Peers of a federated trust domain are accepted when the Workload API hands the workload
//! that trust domain's bundle (its entry federates with it) and `--allow-id` or
//! `--allow-trust-domain` names them: each peer's chain is verified against the bundle of the
//! trust domain in its own SPIFFE ID, never another's (a federated CA cannot vouch for this
//! trust domain's IDs, nor the other way round). The CRLs are this trust domain's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
    UnixTime,
};
use sigil_core::tls::{ClientVerifierByTrustDomain, ServerVerifierByTrustDomain};
use sigil_core::{SpiffeId, TrustDomain, X509Bundle, X509Svid};
use sigil_proto::workload::X509svidRequest;
use tokio::sync::watch;

/// The credentials of one moment, from one Workload API message.
#[derive(Clone)]
pub(crate) struct Credentials {
    /// Our SPIFFE ID.
    pub(crate) spiffe_id: SpiffeId,
    /// Our chain, leaf first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// Our key, PKCS#8.
    pub(crate) key: Vec<u8>,
    /// The trust domain's authorities.
    pub(crate) roots: Vec<CertificateDer<'static>>,
    /// The CRLs.
    pub(crate) crls: Vec<CertificateRevocationListDer<'static>>,
    /// The federated trust domains' authorities, by trust domain.
    pub(crate) federated: Vec<(TrustDomain, Vec<CertificateDer<'static>>)>,
}

/// Which peers are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Allow {
    /// Exactly this SPIFFE ID.
    Id(SpiffeId),
    /// Any SPIFFE ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_id", &self.spiffe_id)
            .field("crls", &self.crls.len())
            .finish_non_exhaustive()
    }
}

// === impl Allow ===

impl Allow {
    /// From `--allow-id` or `--allow-trust-domain`.
    pub(crate) fn from_args(id: Option<&str>, trust_domain: Option<&str>) -> anyhow::Result<Self> {
        match (id, trust_domain) {
            (Some(id), None) => Ok(Self::Id(SpiffeId::new(id)?)),
            (None, Some(td)) => Ok(Self::TrustDomain(TrustDomain::new(td)?)),
            _ => Err(anyhow!(
                "give exactly one of --allow-id ID or --allow-trust-domain TD"
            )),
        }
    }

    /// Whether `peer` is accepted.
    pub(crate) fn permits(&self, peer: &SpiffeId) -> bool {
        match self {
            Self::Id(id) => id == peer,
            Self::TrustDomain(td) => peer.is_member_of(td),
        }
    }
}

// === Workload API ===

/// The socket from `--socket-path` or `SPIFFE_ENDPOINT_SOCKET` (`unix:` prefix allowed).
pub(crate) fn socket_path(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = arg {
        return Ok(path);
    }
    let value = std::env::var("SPIFFE_ENDPOINT_SOCKET")
        .context("give --socket-path or set SPIFFE_ENDPOINT_SOCKET")?;
    Ok(PathBuf::from(
        value
            .strip_prefix("unix://")
            .or_else(|| value.strip_prefix("unix:"))
            .unwrap_or(&value),
    ))
}

/// Keeps `tx` current from a `FetchX509SVID` stream: every message replaces the credentials
/// (the SVID named `want`, or the first), `None` when the workload has no such identity. A
/// broken stream is reopened after a second; the last credentials stay until then.
pub(crate) async fn watch_credentials(
    socket: PathBuf,
    want: Option<SpiffeId>,
    tx: watch::Sender<Option<Arc<Credentials>>>,
) {
    loop {
        if let Err(error) = follow(&socket, want.as_ref(), &tx).await {
            tracing::warn!(%error, "workload api stream ended; reconnecting");
            if error.to_string().contains("PermissionDenied") {
                tx.send_replace(None);
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow(
    socket: &Path,
    want: Option<&SpiffeId>,
    tx: &watch::Sender<Option<Arc<Credentials>>>,
) -> anyhow::Result<()> {
    let mut client = sigil_proto::client::workload_api(socket).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    while let Some(message) = stream
        .message()
        .await
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
    {
        let chosen = message
            .svids
            .iter()
            .find(|s| want.is_none_or(|w| w.as_str() == s.spiffe_id));
        let credentials = match chosen {
            None => None,
            Some(svid) => {
                let parsed = X509Svid::parse(&svid.x509_svid, &svid.x509_svid_key)
                    .context("the workload api sent an unusable svid")?;
                let spiffe_id = parsed.spiffe_id().clone();
                let bundle = X509Bundle::from_der(spiffe_id.trust_domain().clone(), &svid.bundle)
                    .context("the workload api sent an unusable bundle")?;
                let mut federated = Vec::new();
                // An unusable federated bundle is left out (its peers are refused); it never
                // holds up our own credentials.
                for (id, der) in &message.federated_bundles {
                    let parsed = TrustDomain::new(id)
                        .map_err(anyhow::Error::from)
                        .and_then(|td| Ok((td.clone(), X509Bundle::from_der(td, der)?)));
                    match parsed {
                        Ok((td, bundle)) if !bundle.authorities().is_empty() => {
                            federated.push((td, bundle.authorities().to_vec()));
                        }
                        Ok(_) => {}
                        Err(error) => tracing::warn!(
                            trust_domain = %id,
                            %error,
                            "an unusable federated bundle; its peers are refused"
                        ),
                    }
                }
                federated.sort_by(|a, b| a.0.cmp(&b.0));
                Some(Arc::new(Credentials {
                    spiffe_id,
                    chain: parsed.cert_chain().to_vec(),
                    key: svid.x509_svid_key.clone(),
                    roots: bundle.authorities().to_vec(),
                    crls: message
                        .crl
                        .iter()
                        .map(|c| CertificateRevocationListDer::from(c.clone()))
                        .collect(),
                    federated,
                }))
            }
        };
        let identity = credentials.as_ref().map(|c| c.spiffe_id.to_string());
        tx.send_replace(credentials);
        // Logged once the watch holds them: the client's next call uses them, the server
        // builds its TLS configuration from them next.
        tracing::info!(
            identity,
            crls = message.crl.len(),
            federated = message.federated_bundles.len(),
            "credentials updated"
        );
    }
    Ok(())
}

// === rustls ===

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(certificates: &[CertificateDer<'static>]) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for root in certificates {
        roots.add(root.clone())?;
    }
    Ok(Arc::new(roots))
}

/// Every trust domain a peer may come from, with its authorities and (our own only) the CRLs.
fn trust_domains(
    credentials: &Credentials,
) -> impl Iterator<
    Item = (
        TrustDomain,
        &[CertificateDer<'static>],
        Vec<CertificateRevocationListDer<'static>>,
    ),
> {
    std::iter::once((
        credentials.spiffe_id.trust_domain().clone(),
        credentials.roots.as_slice(),
        credentials.crls.clone(),
    ))
    .chain(
        credentials
            .federated
            .iter()
            .map(|(td, roots)| (td.clone(), roots.as_slice(), Vec::new())),
    )
}

fn key(credentials: &Credentials) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(credentials.key.clone()))
}

/// The verifier of the `n`th trust domain of [`trust_domains`]: ours (the first) must build;
/// a federated one that does not is left out with a warning (its peers are refused).
fn usable<V>(n: usize, td: &TrustDomain, verifier: anyhow::Result<V>) -> anyhow::Result<Option<V>> {
    match verifier {
        Ok(verifier) => Ok(Some(verifier)),
        Err(error) if n > 0 => {
            tracing::warn!(trust_domain = %td, %error, "an unusable federated bundle; its peers are refused");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// A server configuration: our SVID, client certificates required, chained to the bundle and
/// not on a CRL. The peer's SPIFFE ID is authorized after the handshake ([`peer_id`]).
pub(crate) fn server_config(
    credentials: &Credentials,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut by_trust_domain = Vec::new();
    for (n, (td, roots, crls)) in trust_domains(credentials).enumerate() {
        let verifier = root_store(roots).and_then(|roots| {
            Ok(
                WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .with_crls(crls)
                    .only_check_end_entity_revocation()
                    // A CRL of a just-created authority may not have reached us yet.
                    .allow_unknown_revocation_status()
                    .build()?,
            )
        });
        if let Some(verifier) = usable(n, &td, verifier)? {
            by_trust_domain.push((td, verifier as Arc<dyn ClientCertVerifier>));
        }
    }
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ClientVerifierByTrustDomain::new(by_trust_domain)))
        .with_single_cert(credentials.chain.clone(), key(credentials))?;
    Ok(Arc::new(config))
}

/// A client configuration: our SVID; the server's chained to the bundle and not on a CRL, its
/// name ignored (an SVID has a SPIFFE ID, not a DNS name; [`peer_id`] authorizes it).
pub(crate) fn client_config(
    credentials: &Credentials,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut by_trust_domain = Vec::new();
    for (n, (td, roots, crls)) in trust_domains(credentials).enumerate() {
        let webpki = root_store(roots).and_then(|roots| {
            Ok(
                WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .with_crls(crls)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status()
                    .build()?,
            )
        });
        if let Some(webpki) = usable(n, &td, webpki)? {
            by_trust_domain.push((
                td,
                Arc::new(IgnoreName(webpki)) as Arc<dyn ServerCertVerifier>,
            ));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifierByTrustDomain::new(
            by_trust_domain,
        )))
        .with_client_auth_cert(credentials.chain.clone(), key(credentials))?;
    Ok(Arc::new(config))
}

/// The SPIFFE ID of the peer's leaf certificate.
pub(crate) fn peer_id(
    certificates: Option<&[CertificateDer<'static>]>,
) -> anyhow::Result<SpiffeId> {
    let leaf = certificates
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("the peer presented no certificate"))?;
    Ok(sigil_core::x509_svid::check_leaf_certificate(leaf)?)
}

/// The stock webpki server verifier (chain, validity, CRLs), minus the DNS name check: webpki
/// checks the name last, so a name mismatch means everything else passed.
#[derive(Debug)]
struct IgnoreName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
