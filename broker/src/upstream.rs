//! The broker's outgoing connections and its TLS server side, all from the current
//! [`Credentials`]: the channel to the server's audit ingest (the server must present
//! `spiffe://TD/sigil/server`), the connection to a target's upstream (plain, or TLS with the
//! broker's SVID to exactly `upstream_spiffe_id`), and the rustls server configuration that
//! clients meet (client SVIDs required, chained to the bundle and not on a CRL).

use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sigil_core::SpiffeId;
use sigil_core::tls::ClientVerifierByTrustDomain;
use sigil_core::tls::{SharedBundles, SpiffeServerVerifier};
use sigil_core::x509_svid::Authorizer;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::Upstream;
use crate::credentials::Credentials;

/// A stream to an upstream, whatever carries it.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn key(credentials: &Credentials) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        credentials.svid.private_key().pkcs8_der().to_vec(),
    ))
}

/// A client configuration presenting the broker's SVID to a peer that must be exactly `peer`.
fn client_config(
    credentials: &Credentials,
    peer: SpiffeId,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            SharedBundles::from_bundle(credentials.bundle.clone()),
            Authorizer::exact(peer),
        )))
        .with_client_auth_cert(credentials.svid.cert_chain().to_vec(), key(credentials))?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A channel to the server's agent-facing port at `address`, which must present
/// `spiffe://TD/sigil/server`, with the broker's SVID as client certificate.
///
/// # Errors
///
/// When the configuration cannot be built or the address is malformed.
pub(crate) fn server_channel(address: &str, credentials: &Credentials) -> anyhow::Result<Channel> {
    let server_id = credentials
        .svid
        .spiffe_id()
        .trust_domain()
        .id(["sigil", "server"])?;
    let mut config = client_config(credentials, server_id)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let address = address.to_owned();
    Ok(Endpoint::try_from("http://sigil-server")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let (connector, address) = (connector.clone(), address.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&address).await?;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from("sigil-server")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })))
}

/// Connects to `upstream`, over TLS with the broker's SVID when `tls_peer` names the SPIFFE ID
/// it must present.
///
/// # Errors
///
/// When the upstream cannot be reached or its TLS handshake fails.
pub(crate) async fn connect(
    upstream: &Upstream,
    tls_peer: Option<&SpiffeId>,
    credentials: &Credentials,
) -> anyhow::Result<Box<dyn Stream>> {
    let plain: Box<dyn Stream> = match upstream {
        Upstream::Tcp(address) => {
            let tcp = tokio::net::TcpStream::connect(address).await?;
            let _ = tcp.set_nodelay(true);
            Box::new(tcp)
        }
        Upstream::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
    };
    match tls_peer {
        None => Ok(plain),
        Some(peer) => {
            let config = client_config(credentials, peer.clone())?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let name = ServerName::try_from("upstream")?;
            Ok(Box::new(connector.connect(name, plain).await?))
        }
    }
}

/// The configuration clients meet: the broker's SVID; client SVIDs required, chained to the
/// bundle and not on a CRL the verifier holds (the SPIFFE ID, the serials of the CRLs only
/// x509-parser reads and the CRL's freshness are checked after the handshake).
///
/// # Errors
///
/// When rustls refuses the credentials.
pub(crate) fn server_config(credentials: &Credentials) -> anyhow::Result<Arc<ServerConfig>> {
    let roots = |bundle: &sigil_core::X509Bundle| -> anyhow::Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        for root in bundle.authorities() {
            roots.add(root.clone())?;
        }
        Ok(Arc::new(roots))
    };
    let own = WebPkiClientVerifier::builder_with_provider(roots(&credentials.bundle)?, provider())
        .with_crls(credentials.crls.clone())
        .only_check_end_entity_revocation()
        // A CRL of a just-created authority may not have reached the broker yet, and one the
        // verifier cannot parse is not given to it; a missing or stale one is decided by
        // `stale_crl` after the handshake.
        .allow_unknown_revocation_status()
        .build()?;
    // Each peer is verified against the bundle of its own SPIFFE ID's trust domain: ours (with
    // our CRLs), or an accepted federated one's.
    let mut verifiers: Vec<(sigil_core::TrustDomain, Arc<dyn ClientCertVerifier>)> =
        vec![(credentials.bundle.trust_domain().clone(), own)];
    // A federated bundle that cannot make a verifier is left out (its peers are refused); it
    // never holds up our own trust domain's roots and CRLs.
    for bundle in &credentials.federated {
        let verifier = roots(bundle).and_then(|roots| {
            Ok(WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?)
        });
        match verifier {
            Ok(verifier) => verifiers.push((bundle.trust_domain().clone(), verifier)),
            Err(error) => tracing::warn!(
                trust_domain = %bundle.trust_domain(),
                %error,
                "an unusable federated bundle; its peers are refused"
            ),
        }
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ClientVerifierByTrustDomain::new(verifiers)))
        .with_single_cert(credentials.svid.cert_chain().to_vec(), key(credentials))?;
    // Every connection is a full handshake, checked against the CRLs of that moment.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}
