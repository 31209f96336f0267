//! rustls verifiers that authenticate peers by X509-SVID (feature `rustls`).
//!
//! SVIDs carry a SPIFFE ID, not a DNS name, so the stock webpki verifiers do not fit: these
//! verify the peer's chain with [`verify_chain`] against the bundle of the peer's own trust
//! domain (from a [`SharedBundles`] that can be updated while connections are open, e.g. after a
//! CA rotation), then authorize the peer's SPIFFE ID with an [`Authorizer`].
//!
//! Handshake signatures are checked with the ring provider's algorithms.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::x509_bundle::{X509Bundle, X509BundleSet};
use crate::x509_svid::{Authorizer, verify_chain};
use crate::{SpiffeId, TrustDomain};

/// X.509 bundles shared between verifiers and whoever keeps them current.
///
/// Cloning shares the same set; [`SharedBundles::replace`] changes what every verifier uses for
/// the next handshake.
#[derive(Clone, Default)]
pub struct SharedBundles {
    inner: Arc<RwLock<X509BundleSet>>,
}

/// Verifies a client's X509-SVID (server side).
///
/// Client authentication is offered; whether it is mandatory is a choice of the caller (the
/// Sigil server lets agents without an SVID connect to attest, and checks the identity of every
/// other call).
pub struct SpiffeClientVerifier {
    bundles: SharedBundles,
    authorizer: Authorizer,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Verifies a client certificate with the verifier of the trust domain in its SPIFFE ID (server
/// side), so that each trust domain's authorities vouch for that trust domain's IDs only: with
/// federated trust domains, a peer's chain is checked against its own trust domain's bundle,
/// never another's. A peer of a trust domain without a verifier is refused. The verifiers are
/// the caller's (webpki ones with the CRLs, say); the SPIFFE ID is authorized after the
/// handshake.
///
/// Handshake signatures are checked with the ring provider's algorithms (as every verifier of
/// this module does), whatever the verifiers are.
#[derive(Debug)]
pub struct ClientVerifierByTrustDomain {
    verifiers: Vec<(TrustDomain, Arc<dyn ClientCertVerifier>)>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The client side of [`ClientVerifierByTrustDomain`]: a server certificate is verified by the
/// verifier of the trust domain in its SPIFFE ID.
#[derive(Debug)]
pub struct ServerVerifierByTrustDomain {
    verifiers: Vec<(TrustDomain, Arc<dyn ServerCertVerifier>)>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Verifies a server's X509-SVID (client side), ignoring the TLS server name: the SPIFFE ID is
/// what is authorized.
pub struct SpiffeServerVerifier {
    bundles: SharedBundles,
    authorizer: Authorizer,
    algorithms: WebPkiSupportedAlgorithms,
}

// === impl SharedBundles ===

impl SharedBundles {
    /// A shared set holding `bundles`.
    pub fn new(bundles: X509BundleSet) -> Self {
        Self {
            inner: Arc::new(RwLock::new(bundles)),
        }
    }

    /// A shared set holding one bundle.
    pub fn from_bundle(bundle: X509Bundle) -> Self {
        let mut set = X509BundleSet::new();
        set.insert(bundle);
        Self::new(set)
    }

    /// Replaces the bundle of `bundle`'s trust domain.
    pub fn replace(&self, bundle: X509Bundle) {
        self.inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(bundle);
    }

    /// A copy of the bundle for `trust_domain`, if any.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<X509Bundle> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(trust_domain)
            .cloned()
    }

    /// Verifies an SVID chain (leaf first) against the current bundles at `now`.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<SpiffeId, crate::X509SvidError> {
        let set = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        verify_chain(chain, &*set, now).map(|verified| verified.into_spiffe_id())
    }
}

impl fmt::Debug for SharedBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("SharedBundles")
            .field("trust_domains", &set.len())
            .finish()
    }
}

// === impl SpiffeClientVerifier ===

impl SpiffeClientVerifier {
    /// A verifier that requires a client SVID authorized by `authorizer`.
    pub fn new(bundles: SharedBundles, authorizer: Authorizer) -> Self {
        Self {
            bundles,
            authorizer,
            mandatory: true,
            algorithms: ring_algorithms(),
        }
    }

    /// Lets clients connect without a certificate (a certificate that is presented is still
    /// verified in full). The application must then check the identity of every call that
    /// needs one.
    pub fn optional(mut self) -> Self {
        self.mandatory = false;
        self
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = verify_peer(&self.bundles, end_entity, intermediates, now)?;
        self.authorizer
            .authorize(&id)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === impl SpiffeServerVerifier ===

impl SpiffeServerVerifier {
    /// A verifier that accepts a server SVID authorized by `authorizer`.
    pub fn new(bundles: SharedBundles, authorizer: Authorizer) -> Self {
        Self {
            bundles,
            authorizer,
            algorithms: ring_algorithms(),
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = verify_peer(&self.bundles, end_entity, intermediates, now)?;
        self.authorizer
            .authorize(&id)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === impl ClientVerifierByTrustDomain ===

impl ClientVerifierByTrustDomain {
    /// One verifier per trust domain.
    pub fn new(verifiers: Vec<(TrustDomain, Arc<dyn ClientCertVerifier>)>) -> Self {
        Self {
            verifiers,
            algorithms: ring_algorithms(),
        }
    }
}

impl ClientCertVerifier for ClientVerifierByTrustDomain {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let td = leaf_trust_domain(end_entity)?;
        let (_, verifier) = self
            .verifiers
            .iter()
            .find(|(known, _)| *known == td)
            .ok_or_else(|| unknown_trust_domain(&td))?;
        verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === impl ServerVerifierByTrustDomain ===

impl ServerVerifierByTrustDomain {
    /// One verifier per trust domain.
    pub fn new(verifiers: Vec<(TrustDomain, Arc<dyn ServerCertVerifier>)>) -> Self {
        Self {
            verifiers,
            algorithms: ring_algorithms(),
        }
    }
}

impl ServerCertVerifier for ServerVerifierByTrustDomain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let td = leaf_trust_domain(end_entity)?;
        let (_, verifier) = self
            .verifiers
            .iter()
            .find(|(known, _)| *known == td)
            .ok_or_else(|| unknown_trust_domain(&td))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === helpers ===

/// The trust domain of the SPIFFE ID in `leaf`, for choosing the verifier.
fn leaf_trust_domain(leaf: &CertificateDer<'_>) -> Result<TrustDomain, rustls::Error> {
    crate::x509_svid::check_leaf_certificate(leaf)
        .map(|id| id.trust_domain().clone())
        .map_err(|e| rustls::Error::General(format!("not an X509-SVID: {e}")))
}

fn unknown_trust_domain(td: &TrustDomain) -> rustls::Error {
    rustls::Error::General(format!(
        "no bundle of {td}: the peer's trust domain is neither ours nor federated with us"
    ))
}

fn ring_algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn verify_peer(
    bundles: &SharedBundles,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<SpiffeId, rustls::Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
    bundles
        .verify(&chain, now)
        .map_err(|e| rustls::Error::General(format!("peer X509-SVID rejected: {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::*;

    struct TestCa {
        issuer: CertifiedIssuer<'static, KeyPair>,
        td: TrustDomain,
    }

    impl TestCa {
        fn new(td: &str) -> Self {
            let td = TrustDomain::new(td).unwrap();
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, td.name());
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.subject_alt_names = vec![SanType::URI(td.id_string().try_into().unwrap())];
            let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
            Self { issuer, td }
        }

        fn bundle(&self) -> X509Bundle {
            X509Bundle::new(self.td.clone(), vec![self.issuer.der().clone()]).unwrap()
        }

        /// (chain, key) for a leaf SVID with `path`.
        fn svid(&self, path: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let id = self.td.id_from_path(path).unwrap();
            p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            (vec![cert.der().clone()], key)
        }
    }

    fn exact(id: &str) -> Authorizer {
        Authorizer::exact(SpiffeId::new(id).unwrap())
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn server_config(
        server: &TestCa,
        bundles: &SharedBundles,
        client_auth: SpiffeClientVerifier,
    ) -> Arc<ServerConfig> {
        let _ = bundles;
        let (chain, key) = server.svid("/sigil/server");
        Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(Arc::new(client_auth))
                .with_single_cert(chain, key)
                .unwrap(),
        )
    }

    fn client_config(
        bundles: &SharedBundles,
        server_id: &str,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Arc<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                bundles.clone(),
                exact(server_id),
            )));
        Arc::new(match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
            None => builder.with_no_client_auth(),
        })
    }

    /// Runs a handshake in memory, then one application message from client to server (under
    /// TLS 1.3 the client learns of a rejected certificate only then).
    fn connect(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<(), rustls::Error> {
        let name = ServerName::try_from("sigil-server").unwrap();
        let mut c = ClientConnection::new(client, name).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        std::io::Write::write_all(&mut c.writer(), b"ping").unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            let mut got = [0u8; 4];
            if !c.is_handshaking()
                && !s.is_handshaking()
                && std::io::Read::read(&mut s.reader(), &mut got).is_ok_and(|n| n == 4)
            {
                assert_eq!(&got, b"ping");
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn mutual_tls_between_svids_of_one_trust_domain() {
        let ca = TestCa::new("example.org");
        let bundles = SharedBundles::from_bundle(ca.bundle());
        let server = server_config(
            &ca,
            &bundles,
            SpiffeClientVerifier::new(bundles.clone(), exact("spiffe://example.org/ns/a")),
        );
        let client = client_config(
            &bundles,
            "spiffe://example.org/sigil/server",
            Some(ca.svid("/ns/a")),
        );
        connect(client, server).unwrap();
    }

    #[test]
    fn xv_8_a_client_with_another_id_is_not_authorized() {
        let ca = TestCa::new("example.org");
        let bundles = SharedBundles::from_bundle(ca.bundle());
        let server = server_config(
            &ca,
            &bundles,
            SpiffeClientVerifier::new(bundles.clone(), exact("spiffe://example.org/ns/a")),
        );
        let client = client_config(
            &bundles,
            "spiffe://example.org/sigil/server",
            Some(ca.svid("/ns/b")),
        );
        let err = connect(client, server).unwrap_err();
        assert!(err.to_string().contains("not authorized"), "{err}");
    }

    #[test]
    fn xv_1_a_client_from_a_rogue_ca_with_the_same_name_is_rejected() {
        let ca = TestCa::new("example.org");
        let rogue = TestCa::new("example.org");
        let bundles = SharedBundles::from_bundle(ca.bundle());
        let server = server_config(
            &ca,
            &bundles,
            SpiffeClientVerifier::new(bundles.clone(), Authorizer::any()),
        );
        let client = client_config(
            &bundles,
            "spiffe://example.org/sigil/server",
            Some(rogue.svid("/ns/a")),
        );
        let err = connect(client, server).unwrap_err();
        assert!(err.to_string().contains("rejected"), "{err}");
    }

    #[test]
    fn the_client_checks_the_servers_spiffe_id_not_its_dns_name() {
        let ca = TestCa::new("example.org");
        let bundles = SharedBundles::from_bundle(ca.bundle());
        let verifier = || SpiffeClientVerifier::new(bundles.clone(), Authorizer::any());
        let client = client_config(&bundles, "spiffe://example.org/other", Some(ca.svid("/a")));
        let err = connect(client, server_config(&ca, &bundles, verifier())).unwrap_err();
        assert!(err.to_string().contains("not authorized"), "{err}");

        // A server SVID from another trust domain, whose bundle the client lacks (XV-7).
        let other = TestCa::new("other.org");
        let client = client_config(
            &bundles,
            "spiffe://other.org/sigil/server",
            Some(ca.svid("/a")),
        );
        let err = connect(client, server_config(&other, &bundles, verifier())).unwrap_err();
        assert!(err.to_string().contains("no bundle"), "{err}");
    }

    #[test]
    fn optional_client_auth_admits_clients_without_a_certificate() {
        let ca = TestCa::new("example.org");
        let bundles = SharedBundles::from_bundle(ca.bundle());
        let verifier = || SpiffeClientVerifier::new(bundles.clone(), Authorizer::any());
        let anonymous = client_config(&bundles, "spiffe://example.org/sigil/server", None);
        connect(
            anonymous.clone(),
            server_config(&ca, &bundles, verifier().optional()),
        )
        .unwrap();
        assert!(connect(anonymous, server_config(&ca, &bundles, verifier())).is_err());
    }

    #[test]
    fn replacing_the_bundle_takes_effect_for_the_next_handshake() {
        let old = TestCa::new("example.org");
        let new = TestCa::new("example.org");
        let bundles = SharedBundles::from_bundle(old.bundle());
        let server = server_config(
            &old,
            &bundles,
            SpiffeClientVerifier::new(bundles.clone(), Authorizer::any()),
        );
        let client_bundles = SharedBundles::from_bundle(old.bundle());
        let client = client_config(
            &client_bundles,
            "spiffe://example.org/sigil/server",
            Some(new.svid("/a")),
        );
        assert!(connect(client.clone(), server.clone()).is_err());
        bundles.replace(new.bundle());
        assert_eq!(bundles.get(&new.td), Some(new.bundle()));
        // The server now accepts the new CA's client; it still presents its old-CA certificate,
        // which the client trusts.
        connect(client, server).unwrap();
    }
}
