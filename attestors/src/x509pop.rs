//! x509pop node attestation: proof of possession of a host certificate's key.
//!
//! As SPIRE's `x509pop`: the agent sends its host certificate chain (leaf first, DER back to
//! back) with its CSR; the server checks the chain against the CAs it trusts for x509pop
//! (`x509pop_ca_bundle_path`), the leaf's usage (not a CA; `digitalSignature` if Key Usage is
//! present; `clientAuth` if Extended Key Usage is present) and validity, then sends a 32-byte
//! nonce; the agent signs [`challenge_message`] (a context string, the nonce and the SHA-256 of
//! its CSR) with the host key; the server checks that signature with the certificate's key.
//! The proof is bound to the CSR, so a captured answer cannot get an SVID for another key.
//!
//! The agent ID is `spiffe://TD/sigil/agent/` followed by a [`Template`] (default
//! [`DEFAULT_TEMPLATE`], `x509pop/{fingerprint}`). The node selectors are
//! `x509pop:subject:cn:CN`, `x509pop:ca:fingerprint:HEX` (each CA of the verified path, root
//! included), `x509pop:san:dns:NAME`, `x509pop:san:uri:URI` and `x509pop:serialnumber:HEX`.
//! A host certificate can be presented again, so a node that lost its data directory attests
//! again and keeps its ID (the server refuses a banned one).

use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::SecureRandom;
use ring::signature;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls_pki_types::{SignatureVerificationAlgorithm, TrustAnchor};
use sigil_core::{Selector, SpiffeId, TrustDomain};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::node::{AttestError, Attestation, Challenge, NodeAttestor};

/// The attestor's name.
pub const NAME: &str = "x509pop";

/// The default agent path template: the SHA-256 of the host certificate's DER, hex.
pub const DEFAULT_TEMPLATE: &str = "x509pop/{fingerprint}";

/// The nonce's length.
pub const NONCE_LEN: usize = 32;

/// The most certificates a host chain may hold (leaf and intermediates).
pub const MAX_CHAIN: usize = 8;

/// What the signed message starts with, so no other protocol's signature is a valid proof.
const CONTEXT: &[u8] = b"sigil x509pop v1\0";

/// The signature algorithms a proof may use: one per key type (ECDSA P-256 with SHA-256,
/// P-384 with SHA-384, Ed25519, RSA PKCS#1 v1.5 with SHA-256).
static PROOF_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
];

/// What an x509pop step found wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X509PopError {
    /// The server's configuration (CA bundle, template) is unusable.
    #[error("x509pop configuration: {0}")]
    Config(String),
    /// The host certificate or its chain is not acceptable.
    #[error("host certificate refused: {0}")]
    Certificate(String),
    /// The host key cannot be used.
    #[error("host key: {0}")]
    Key(String),
    /// The proof does not verify.
    #[error("proof of possession failed: {0}")]
    Proof(String),
}

impl From<X509PopError> for AttestError {
    fn from(e: X509PopError) -> Self {
        match e {
            X509PopError::Config(_) => Self::Unavailable(e.to_string()),
            _ => Self::Refused(e.to_string()),
        }
    }
}

/// The message the agent signs: the context `sigil x509pop v1\0`, the nonce, and the SHA-256
/// of `binding` (the CSR's DER).
pub fn challenge_message(nonce: &[u8], binding: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, binding);
    [CONTEXT, nonce, digest.as_ref()].concat()
}

/// Splits DER certificates written back to back.
///
/// # Errors
///
/// When the bytes are not a sequence of whole DER certificates.
pub fn split_chain(der: &[u8]) -> Result<Vec<CertificateDer<'static>>, X509PopError> {
    let mut rest = der;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if out.len() == MAX_CHAIN {
            return Err(X509PopError::Certificate(format!(
                "the chain has more than {MAX_CHAIN} certificates"
            )));
        }
        let (next, _) = X509Certificate::from_der(rest)
            .map_err(|e| X509PopError::Certificate(format!("malformed certificate: {e}")))?;
        let len = rest.len() - next.len();
        out.push(CertificateDer::from(rest[..len].to_vec()));
        rest = next;
    }
    Ok(out)
}

// === the agent's side ===

/// A host key and certificate chain, as the agent reads them from `x509pop_key_path` and
/// `x509pop_cert_path` (PEM).
pub struct HostCredentials {
    chain: Vec<CertificateDer<'static>>,
    key: HostKey,
}

enum HostKey {
    Ecdsa(signature::EcdsaKeyPair),
    Ed25519(signature::Ed25519KeyPair),
    Rsa(signature::RsaKeyPair),
}

impl std::fmt::Debug for HostCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCredentials")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl HostCredentials {
    /// Reads a PEM certificate chain (host certificate first, then any intermediates) and a
    /// PEM private key (PKCS#8 of ECDSA P-256/P-384, Ed25519 or RSA; or PKCS#1 RSA), and checks
    /// that the key is the certificate's.
    ///
    /// # Errors
    ///
    /// Unparseable PEM, an unsupported key type (a SEC1 `EC PRIVATE KEY` must be converted:
    /// `openssl pkcs8 -topk8 -nocrypt`), or a key that does not match the certificate.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, X509PopError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| X509PopError::Certificate(format!("unreadable PEM: {e}")))?;
        if chain.is_empty() {
            return Err(X509PopError::Certificate(
                "no CERTIFICATE block in the certificate file".to_owned(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| X509PopError::Key(format!("no usable private key in PEM: {e}")))?;
        let key = HostKey::parse(&key)?;
        let credentials = Self { chain, key };
        // The key must be the certificate's: say so here, not as a refusal from the server.
        let probe = challenge_message(&[0; NONCE_LEN], b"self-check");
        let sig = credentials.sign(&probe)?;
        verify_proof(&credentials.chain[0], &probe, &sig).map_err(|_| {
            X509PopError::Key("the private key does not belong to the host certificate".to_owned())
        })?;
        Ok(credentials)
    }

    /// The payload to send: the chain's DER, back to back.
    pub fn payload(&self) -> Vec<u8> {
        self.chain.iter().flat_map(|c| c.iter().copied()).collect()
    }

    /// The host certificate (leaf).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// Answers a challenge: signs [`challenge_message`] of `nonce` and `binding`.
    ///
    /// # Errors
    ///
    /// When the nonce has the wrong length or signing fails.
    pub fn answer(&self, nonce: &[u8], binding: &[u8]) -> Result<Vec<u8>, X509PopError> {
        if nonce.len() != NONCE_LEN {
            return Err(X509PopError::Proof(format!(
                "the server's nonce has {} bytes, not {NONCE_LEN}",
                nonce.len()
            )));
        }
        self.sign(&challenge_message(nonce, binding))
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, X509PopError> {
        let rng = ring::rand::SystemRandom::new();
        let failed = |_| X509PopError::Key("signing failed".to_owned());
        match &self.key {
            HostKey::Ecdsa(key) => Ok(key.sign(&rng, message).map_err(failed)?.as_ref().to_vec()),
            HostKey::Ed25519(key) => Ok(key.sign(message).as_ref().to_vec()),
            HostKey::Rsa(key) => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .map_err(failed)?;
                Ok(sig)
            }
        }
    }
}

impl HostKey {
    fn parse(key: &PrivateKeyDer<'_>) -> Result<Self, X509PopError> {
        let rng = ring::rand::SystemRandom::new();
        match key {
            PrivateKeyDer::Pkcs8(der) => {
                let der = der.secret_pkcs8_der();
                for alg in [
                    &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                ] {
                    if let Ok(key) = signature::EcdsaKeyPair::from_pkcs8(alg, der, &rng) {
                        return Ok(Self::Ecdsa(key));
                    }
                }
                if let Ok(key) = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                    return Ok(Self::Ed25519(key));
                }
                signature::RsaKeyPair::from_pkcs8(der)
                    .map(Self::Rsa)
                    .map_err(|e| {
                        X509PopError::Key(format!(
                            "unsupported PKCS#8 key ({e}): use ECDSA P-256/P-384, Ed25519 or RSA (2048 bits or more)"
                        ))
                    })
            }
            PrivateKeyDer::Pkcs1(der) => signature::RsaKeyPair::from_der(der.secret_pkcs1_der())
                .map(Self::Rsa)
                .map_err(|e| X509PopError::Key(format!("unusable RSA key: {e}"))),
            PrivateKeyDer::Sec1(_) => Err(X509PopError::Key(
                "an `EC PRIVATE KEY` (SEC1) is not read: convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
                    .to_owned(),
            )),
            _ => Err(X509PopError::Key("unsupported private key format".to_owned())),
        }
    }
}

// === the server's side ===

/// A host certificate whose chain the server verified.
#[derive(Debug, Clone)]
pub struct VerifiedHost {
    leaf: CertificateDer<'static>,
    /// The DER of each CA on the verified path, root last.
    cas: Vec<Vec<u8>>,
}

/// The x509pop attestor as the server runs it.
#[derive(Debug)]
pub struct X509Pop {
    trust_domain: TrustDomain,
    anchors: Vec<CertificateDer<'static>>,
    template: Template,
}

impl X509Pop {
    /// The attestor for `trust_domain`, trusting the CA certificates in `ca_bundle_pem`, naming
    /// agents by `template` (`None`: [`DEFAULT_TEMPLATE`]).
    ///
    /// # Errors
    ///
    /// [`X509PopError::Config`] when the bundle holds no usable CA certificate or the template
    /// is invalid.
    pub fn new(
        trust_domain: TrustDomain,
        ca_bundle_pem: &[u8],
        template: Option<&str>,
    ) -> Result<Self, X509PopError> {
        let anchors = CertificateDer::pem_slice_iter(ca_bundle_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| X509PopError::Config(format!("CA bundle: unreadable PEM: {e}")))?;
        if anchors.is_empty() {
            return Err(X509PopError::Config(
                "CA bundle: no CERTIFICATE block".to_owned(),
            ));
        }
        for (i, anchor) in anchors.iter().enumerate() {
            webpki::anchor_from_trusted_cert(anchor).map_err(|e| {
                X509PopError::Config(format!("CA bundle: certificate {} unusable: {e}", i + 1))
            })?;
        }
        let template = Template::parse(template.unwrap_or(DEFAULT_TEMPLATE))?;
        Ok(Self {
            trust_domain,
            anchors,
            template,
        })
    }

    /// Checks the chain (see the module docs) at `now`.
    ///
    /// # Errors
    ///
    /// [`X509PopError::Certificate`] saying what is wrong.
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'static>],
        now: SystemTime,
    ) -> Result<VerifiedHost, X509PopError> {
        let refuse = |m: String| X509PopError::Certificate(m);
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| refuse("no host certificate was sent".to_owned()))?;
        if chain.len() > MAX_CHAIN {
            return Err(refuse(format!(
                "the chain has {} certificates, more than {MAX_CHAIN}",
                chain.len()
            )));
        }
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let anchors: Vec<(TrustAnchor<'_>, &CertificateDer<'_>)> = self
            .anchors
            .iter()
            .filter_map(|der| Some((webpki::anchor_from_trusted_cert(der).ok()?, der)))
            .collect();
        let trust: Vec<TrustAnchor<'_>> = anchors.iter().map(|(a, _)| a.clone()).collect();
        let end_entity = EndEntityCert::try_from(leaf)
            .map_err(|e| refuse(format!("malformed host certificate: {e}")))?;
        let path = end_entity
            .verify_for_usage(
                sigil_core::x509_svid::SUPPORTED_SIG_ALGS,
                &trust,
                intermediates,
                UnixTime::since_unix_epoch(since_epoch),
                KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| refuse(describe(&e)))?;
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|e| refuse(format!("malformed host certificate: {e}")))?;
        check_usage(&parsed)?;
        let mut cas: Vec<Vec<u8>> = path
            .intermediate_certificates()
            .map(|c| c.der().to_vec())
            .collect();
        let root = path.anchor();
        if let Some((_, der)) = anchors.iter().find(|(a, _)| {
            a.subject == root.subject && a.subject_public_key_info == root.subject_public_key_info
        }) {
            cas.push(der.to_vec());
        }
        Ok(VerifiedHost {
            leaf: leaf.clone(),
            cas,
        })
    }

    /// The agent ID and node selectors of a verified host.
    ///
    /// # Errors
    ///
    /// When the template names a field the certificate lacks, or whose value cannot be a path
    /// segment.
    pub fn identify(&self, host: &VerifiedHost) -> Result<(SpiffeId, Vec<Selector>), X509PopError> {
        let (_, cert) = X509Certificate::from_der(&host.leaf)
            .map_err(|e| X509PopError::Certificate(format!("malformed host certificate: {e}")))?;
        let fields = Fields::of(&host.leaf, &cert);
        let path = self.template.render(&fields)?;
        let mut segments = vec!["sigil", "agent"];
        segments.extend(path.split('/'));
        let id = self
            .trust_domain
            .id(segments)
            .map_err(|e| X509PopError::Certificate(format!("agent ID from the template: {e}")))?;
        Ok((id, selectors(&fields, &host.cas)))
    }
}

#[async_trait::async_trait]
impl NodeAttestor for X509Pop {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn attest(
        &self,
        payload: &[u8],
        binding: &[u8],
        challenge: &mut dyn Challenge,
        now: SystemTime,
    ) -> Result<Attestation, AttestError> {
        let chain = split_chain(payload)?;
        let host = self.verify_chain(&chain, now)?;
        let mut nonce = vec![0; NONCE_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| AttestError::Unavailable("random number generator failed".to_owned()))?;
        let answer = challenge.exchange(nonce.clone()).await?;
        verify_proof(&host.leaf, &challenge_message(&nonce, binding), &answer)?;
        let (agent_id, selectors) = self.identify(&host)?;
        Ok(Attestation {
            agent_id,
            selectors,
            reattestable: true,
            alias: None,
        })
    }
}

/// Checks `signature` over `message` with the key of `leaf`.
fn verify_proof(
    leaf: &CertificateDer<'_>,
    message: &[u8],
    signature: &[u8],
) -> Result<(), X509PopError> {
    let cert = EndEntityCert::try_from(leaf)
        .map_err(|e| X509PopError::Certificate(format!("malformed host certificate: {e}")))?;
    if PROOF_ALGS
        .iter()
        .any(|alg| cert.verify_signature(*alg, message, signature).is_ok())
    {
        Ok(())
    } else {
        Err(X509PopError::Proof(
            "the signature does not verify with the host certificate's key".to_owned(),
        ))
    }
}

/// The leaf must be an end entity usable for signatures.
fn check_usage(cert: &X509Certificate<'_>) -> Result<(), X509PopError> {
    let refuse = |m: &str| Err(X509PopError::Certificate(m.to_owned()));
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return refuse("the host certificate is a CA certificate (basicConstraints cA)");
            }
            ParsedExtension::KeyUsage(ku) if !ku.digital_signature() => {
                return refuse("the host certificate's Key Usage lacks digitalSignature");
            }
            ParsedExtension::ExtendedKeyUsage(eku) if !eku.any && !eku.client_auth => {
                return refuse("the host certificate's Extended Key Usage lacks clientAuth");
            }
            // One of the three that cannot be read is not skipped: it could say anything.
            ParsedExtension::ParseError { .. }
                if [
                    x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS,
                    x509_parser::oid_registry::OID_X509_EXT_KEY_USAGE,
                    x509_parser::oid_registry::OID_X509_EXT_EXTENDED_KEY_USAGE,
                ]
                .contains(&ext.oid) =>
            {
                return refuse("the host certificate has a malformed usage extension");
            }
            _ => {}
        }
    }
    Ok(())
}

/// webpki's error in the operator's words.
fn describe(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => "the host certificate (or a CA in its chain) has expired".into(),
        E::CertNotValidYet { .. } => "the host certificate is not valid yet".into(),
        E::UnknownIssuer => "not issued by a CA in the server's x509pop_ca_bundle_path".into(),
        E::RequiredEkuNotFoundContext(_) => {
            "the host certificate's Extended Key Usage lacks clientAuth".into()
        }
        E::CaUsedAsEndEntity => "the host certificate is a CA certificate".into(),
        other => format!("chain verification failed: {other}"),
    }
}

// === identity ===

/// The certificate fields a template may name and selectors use.
struct Fields {
    fingerprint: String,
    serial: String,
    subject_cn: Option<String>,
    san_dns: Vec<String>,
    san_uri: Vec<String>,
}

impl Fields {
    fn of(der: &[u8], cert: &X509Certificate<'_>) -> Self {
        let subject_cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let (mut san_dns, mut san_uri) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => san_dns.push((*n).to_owned()),
                    GeneralName::URI(u) => san_uri.push((*u).to_owned()),
                    _ => {}
                }
            }
        }
        Self {
            fingerprint: sigil_core::hex::sha256(der),
            serial: sigil_core::hex::encode(cert.raw_serial()),
            subject_cn,
            san_dns,
            san_uri,
        }
    }
}

/// The node selectors of a host (values too long for a selector are left out).
fn selectors(fields: &Fields, cas: &[Vec<u8>]) -> Vec<Selector> {
    let mut values = Vec::new();
    if let Some(cn) = &fields.subject_cn {
        values.push(format!("subject:cn:{cn}"));
    }
    for ca in cas {
        values.push(format!("ca:fingerprint:{}", sigil_core::hex::sha256(ca)));
    }
    values.extend(fields.san_dns.iter().map(|n| format!("san:dns:{n}")));
    values.extend(fields.san_uri.iter().map(|u| format!("san:uri:{u}")));
    values.push(format!("serialnumber:{}", fields.serial));
    values
        .iter()
        .filter_map(|v| Selector::new(NAME, v).ok())
        .collect()
}

/// An agent path template: literal path text and placeholders, rendered after
/// `spiffe://TD/sigil/agent/`.
///
/// Placeholders: `{fingerprint}` (SHA-256 of the host certificate's DER, hex), `{serial}`
/// (its serial number, hex), `{subject_cn}` (its subject's common name), `{san_dns}` (its
/// first DNS name). A placeholder's value must be one path segment (letters, digits, `.`, `-`,
/// `_`); a certificate whose value is not, or that lacks the field, is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Fingerprint,
    Serial,
    SubjectCn,
    SanDns,
}

impl Template {
    /// Parses and checks a template: `/`-separated segments, each a literal (letters, digits,
    /// `.`, `-`, `_`; not `.` or `..`) or exactly one placeholder. The first segment is a
    /// literal other than `join_token`, so x509pop agents never share a namespace with
    /// join-token agents, and whole-segment placeholders cannot run into each other (with
    /// `{subject_cn}{serial}`, two certificates could render alike).
    ///
    /// # Errors
    ///
    /// [`X509PopError::Config`] saying what is wrong.
    pub fn parse(template: &str) -> Result<Self, X509PopError> {
        let bad = |m: String| {
            X509PopError::Config(format!("x509pop_agent_path_template {template:?}: {m}"))
        };
        let mut parts = Vec::new();
        for (i, segment) in template.split('/').enumerate() {
            if i > 0 {
                parts.push(Part::Literal("/".to_owned()));
            }
            if let Some(name) = segment.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if i == 0 {
                    return Err(bad(
                        "the first segment must be literal text (e.g. x509pop/{fingerprint})"
                            .to_owned(),
                    ));
                }
                parts.push(match name {
                    "fingerprint" => Part::Fingerprint,
                    "serial" => Part::Serial,
                    "subject_cn" => Part::SubjectCn,
                    "san_dns" => Part::SanDns,
                    other => {
                        return Err(bad(format!(
                            "unknown placeholder {{{other}}} (known: {{fingerprint}}, {{serial}}, {{subject_cn}}, {{san_dns}})"
                        )));
                    }
                });
                continue;
            }
            if segment.contains(['{', '}']) {
                return Err(bad(format!(
                    "{segment:?}: a placeholder must be a whole path segment"
                )));
            }
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(bad(format!(
                    "{segment:?} is not a path segment (no leading, trailing or doubled `/`, no `.` or `..`)"
                )));
            }
            if let Some(c) = segment
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            {
                return Err(bad(format!("{c:?} cannot be part of a SPIFFE ID path")));
            }
            if i == 0 && segment == crate::join_token::AGENT_PATH[2] {
                return Err(bad(
                    "join_token/ is the join-token agents' namespace".to_owned()
                ));
            }
            parts.push(Part::Literal(segment.to_owned()));
        }
        if !parts.iter().any(|p| !matches!(p, Part::Literal(_))) {
            return Err(bad(
                "it names no placeholder, so every host would get one ID".to_owned(),
            ));
        }
        Ok(Self { parts })
    }

    fn render(&self, fields: &Fields) -> Result<String, X509PopError> {
        let mut out = String::new();
        for part in &self.parts {
            let (name, value) = match part {
                Part::Literal(text) => {
                    out.push_str(text);
                    continue;
                }
                Part::Fingerprint => ("fingerprint", Some(fields.fingerprint.as_str())),
                Part::Serial => ("serial", Some(fields.serial.as_str())),
                Part::SubjectCn => ("subject_cn", fields.subject_cn.as_deref()),
                Part::SanDns => ("san_dns", fields.san_dns.first().map(String::as_str)),
            };
            let value = value.ok_or_else(|| {
                X509PopError::Certificate(format!(
                    "the agent path template names {{{name}}}, which the host certificate lacks"
                ))
            })?;
            let segment_ok = !value.is_empty()
                && value != "."
                && value != ".."
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !segment_ok {
                return Err(X509PopError::Certificate(format!(
                    "{{{name}}} of the host certificate ({value:?}) cannot be a SPIFFE ID path segment"
                )));
            }
            out.push_str(value);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };

    use super::*;

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn new_ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn host(ca: &Ca, cn: &str, edit: impl FnOnce(&mut CertificateParams)) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![format!("{cn}.example.org")]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .subject_alt_names
            .push(SanType::URI("urn:host:1".try_into().unwrap()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        edit(&mut params);
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    struct Answer<'a>(&'a HostCredentials, Vec<u8>);

    #[async_trait::async_trait]
    impl Challenge for Answer<'_> {
        async fn exchange(&mut self, nonce: Vec<u8>) -> Result<Vec<u8>, AttestError> {
            Ok(self.0.answer(&nonce, &self.1).unwrap())
        }
    }

    async fn attest(
        pop: &X509Pop,
        creds: &HostCredentials,
        csr: &[u8],
        sent_csr: &[u8],
    ) -> Result<Attestation, AttestError> {
        pop.attest(
            &creds.payload(),
            sent_csr,
            &mut Answer(creds, csr.to_vec()),
            SystemTime::now(),
        )
        .await
    }

    #[tokio::test]
    async fn a_host_with_its_key_attests_and_gets_its_fingerprint_id_and_selectors() {
        let ca = new_ca("x509pop CA");
        let (cert, key) = host(&ca, "node-1", |_| {});
        let creds = HostCredentials::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        let pop = X509Pop::new(td(), ca.pem.as_bytes(), None).unwrap();
        let got = attest(&pop, &creds, b"csr", b"csr").await.unwrap();
        let fingerprint = sigil_core::hex::sha256(creds.certificate());
        assert_eq!(
            got.agent_id.as_str(),
            format!("spiffe://example.org/sigil/agent/x509pop/{fingerprint}")
        );
        assert!(got.reattestable);
        let selectors: Vec<String> = got.selectors.iter().map(ToString::to_string).collect();
        let ca_der = CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap();
        for wanted in [
            "x509pop:subject:cn:node-1".to_owned(),
            "x509pop:san:dns:node-1.example.org".to_owned(),
            "x509pop:san:uri:urn:host:1".to_owned(),
            format!(
                "x509pop:ca:fingerprint:{}",
                sigil_core::hex::sha256(&ca_der)
            ),
        ] {
            assert!(selectors.contains(&wanted), "{wanted} not in {selectors:?}");
        }
        assert!(
            selectors
                .iter()
                .any(|s| s.starts_with("x509pop:serialnumber:"))
        );
    }

    #[tokio::test]
    async fn the_proof_is_bound_to_the_csr_and_to_the_host_key() {
        let ca = new_ca("x509pop CA");
        let (cert, key) = host(&ca, "node-1", |_| {});
        let creds = HostCredentials::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        let pop = X509Pop::new(td(), ca.pem.as_bytes(), None).unwrap();
        // A proof made for another CSR does not attest this one.
        let err = attest(&pop, &creds, b"csr A", b"csr B").await.unwrap_err();
        assert!(matches!(err, AttestError::Refused(m) if m.contains("proof of possession")));
        // Another host's key does not answer for this certificate.
        let (_, other_key) = host(&ca, "node-2", |_| {});
        let err = HostCredentials::from_pem(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[tokio::test]
    async fn untrusted_expired_and_wrong_usage_certificates_are_refused_with_the_reason() {
        let ca = new_ca("x509pop CA");
        let other = new_ca("another CA");
        let pop = X509Pop::new(td(), ca.pem.as_bytes(), None).unwrap();
        let cases: Vec<(&str, (String, String))> = vec![
            ("x509pop_ca_bundle_path", host(&other, "node-1", |_| {})),
            (
                "expired",
                host(&ca, "node-1", |p| {
                    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
                }),
            ),
            (
                "clientAuth",
                host(&ca, "node-1", |p| {
                    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                }),
            ),
            (
                "digitalSignature",
                host(&ca, "node-1", |p| {
                    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
                }),
            ),
            (
                "CA certificate",
                host(&ca, "node-1", |p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                    p.key_usages = vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ];
                }),
            ),
        ];
        for (why, (cert, key)) in cases {
            let creds = HostCredentials::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
            let err = attest(&pop, &creds, b"csr", b"csr").await.unwrap_err();
            assert!(
                matches!(&err, AttestError::Refused(m) if m.contains(why)),
                "{why}: {err}"
            );
        }
    }

    #[test]
    fn templates_name_known_fields_only_and_values_must_be_segments() {
        let ca = new_ca("x509pop CA");
        for bad in [
            "",
            "x509pop",
            "x/{nope}",
            "/x/{fingerprint}",
            "x/{fingerprint}/",
            "x//{fingerprint}",
            "a b/{fingerprint}",
            "x/{fingerprint",
            "{fingerprint}",
            "join_token/{fingerprint}",
            "x/{subject_cn}{serial}",
            "x/a{fingerprint}",
            "./{fingerprint}",
            "x/../{fingerprint}",
        ] {
            assert!(
                matches!(Template::parse(bad), Err(X509PopError::Config(_))),
                "{bad:?} accepted"
            );
        }
        let pop = X509Pop::new(
            td(),
            ca.pem.as_bytes(),
            Some("hosts/{subject_cn}/{san_dns}"),
        )
        .unwrap();
        let (cert, _) = host(&ca, "node-7", |_| {});
        let chain = split_chain(&CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()).unwrap();
        let verified = pop.verify_chain(&chain, SystemTime::now()).unwrap();
        let (id, _) = pop.identify(&verified).unwrap();
        assert_eq!(
            id.as_str(),
            "spiffe://example.org/sigil/agent/hosts/node-7/node-7.example.org"
        );
        // A common name that would inject a path segment is refused, not split.
        let (cert, _) = host(&ca, "a/b", |p| p.subject_alt_names.clear());
        let chain = split_chain(&CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()).unwrap();
        let verified = pop.verify_chain(&chain, SystemTime::now()).unwrap();
        let err = pop.identify(&verified).unwrap_err();
        assert!(err.to_string().contains("path segment"), "{err}");
        // A field the certificate lacks.
        let pop = X509Pop::new(td(), ca.pem.as_bytes(), Some("x/{san_dns}")).unwrap();
        let err = pop.identify(&verified).unwrap_err();
        assert!(err.to_string().contains("lacks"), "{err}");
    }

    #[test]
    fn a_sec1_key_gets_the_conversion_command() {
        let ca = new_ca("x509pop CA");
        let (cert, _) = host(&ca, "node-1", |_| {});
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBYr\n-----END EC PRIVATE KEY-----\n";
        let err = HostCredentials::from_pem(cert.as_bytes(), sec1.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("openssl pkcs8"), "{err}");
    }
}
