//! The upstream authority (`upstream_authority = "disk"`): an enterprise CA whose certificate
//! and key are files, under which every X.509 authority Sigil rotates is an intermediate.
//!
//! `upstream_cert_path` holds the upstream CA's certificate, then any CAs between it and its
//! root, the root last (one self-signed certificate when the upstream CA is the root). The root
//! becomes the trust domain's X.509 bundle; SVID chains carry Sigil's intermediate and the
//! upstream's intermediates, never the root. Each Sigil intermediate has pathLen 0, the trust
//! domain's SPIFFE ID as URI SAN, an Authority Key Identifier, and a NotAfter within the
//! upstream CA's.

use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair, PKCS_RSA_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sigil_core::x509_svid::verify_chain;
use sigil_core::{TrustDomain, X509Bundle};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
use zeroize::Zeroizing;

use super::CaError;
use super::template::{floor_to_second, intermediate_params, leaf_params, random_serial};

/// The upstream CA: its certificates and its signing key.
pub(crate) struct UpstreamAuthority {
    /// The upstream CA first, the root last.
    certificates: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl std::fmt::Debug for UpstreamAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuthority")
            .field("certificates", &self.certificates.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn upstream_error(reason: impl Into<String>) -> CaError {
    CaError::Upstream {
        reason: reason.into(),
    }
}

impl UpstreamAuthority {
    /// Reads the upstream CA from PEM: `cert_pem` (the CA, then its chain up to the root) and
    /// `key_pem` (the CA's PKCS#8 key: ECDSA P-256/P-384, Ed25519 or RSA), checked at `now`.
    ///
    /// # Errors
    ///
    /// [`CaError::Upstream`] naming what is wrong: no certificate, a certificate that is not a
    /// CA (or may not sign certificates, or allows no CA below it), a chain whose last
    /// certificate is not self-signed or whose links do not name each other, a key that is not
    /// the CA's, an upstream CA not valid at `now`.
    pub(crate) fn from_pem(
        trust_domain: &TrustDomain,
        cert_pem: &[u8],
        key_pem: &[u8],
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let certificates = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| upstream_error(format!("upstream_cert_path: unreadable PEM: {e}")))?;
        let first = certificates
            .first()
            .ok_or_else(|| upstream_error("upstream_cert_path holds no CERTIFICATE block"))?;
        let parsed: Vec<X509Certificate<'_>> = certificates
            .iter()
            .enumerate()
            .map(|(i, der)| {
                X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| {
                    upstream_error(format!("upstream_cert_path: certificate {}: {e}", i + 1))
                })
            })
            .collect::<Result<_, _>>()?;
        let ca = &parsed[0];
        // Below the certificate at index i come the i certificates before it and Sigil's
        // intermediate: each must be a CA allowed that many CAs below it.
        for (i, cert) in parsed.iter().enumerate() {
            check_can_sign_cas(cert, i + 1)?;
        }
        for pair in parsed.windows(2) {
            if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
                return Err(upstream_error(format!(
                    "upstream_cert_path: {} is not issued by the next certificate, {}",
                    pair[0].subject(),
                    pair[1].subject()
                )));
            }
        }
        let root = &parsed[parsed.len() - 1];
        if root.issuer().as_raw() != root.subject().as_raw() {
            return Err(upstream_error(format!(
                "upstream_cert_path must end with the root (self-signed); it ends with {}, issued by {}",
                root.subject(),
                root.issuer()
            )));
        }
        let since_epoch = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        };
        for cert in &parsed {
            let validity = cert.validity();
            if validity.not_before.timestamp() > since_epoch(now)
                || validity.not_after.timestamp() <= since_epoch(now)
            {
                return Err(upstream_error(format!(
                    "{} is not valid now (valid from {} to {})",
                    cert.subject(),
                    validity.not_before,
                    validity.not_after
                )));
            }
        }
        // No intermediate may outlive any certificate of its path.
        let not_after = parsed
            .iter()
            .map(|c| c.validity().not_after.timestamp())
            .min()
            .and_then(sigil_core::time::from_unix_seconds)
            .ok_or_else(|| upstream_error("the upstream chain's NotAfter is out of range"))?;

        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| upstream_error(format!("upstream_key_path: no private key: {e}")))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(upstream_error(
                "upstream_key_path: not PKCS#8; an `EC PRIVATE KEY` or `RSA PRIVATE KEY` must be converted: openssl pkcs8 -topk8 -nocrypt",
            ));
        };
        let der = Zeroizing::new(pkcs8.secret_pkcs8_der().to_vec());
        let key = KeyPair::try_from(der.as_slice())
            .or_else(|_| KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_RSA_SHA256))
            .map_err(|e| {
                upstream_error(format!(
                    "upstream_key_path: unusable key ({e}): use ECDSA P-256/P-384, Ed25519 or RSA"
                ))
            })?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != ca.public_key().raw {
            return Err(upstream_error(
                "upstream_key_path is not the key of the first certificate in upstream_cert_path",
            ));
        }
        let issuer = Issuer::from_ca_cert_der(first, key)
            .map_err(|e| upstream_error(format!("upstream_cert_path: {e}")))?;
        drop(parsed);
        let upstream = Self {
            certificates,
            issuer,
            not_after,
        };
        upstream.probe(trust_domain, now)?;
        Ok(upstream)
    }

    /// Signs a throwaway intermediate and a leaf under it, and verifies that chain against the
    /// root as relying parties will (signatures of every link, path lengths, validity): an
    /// upstream chain that would make every SVID unverifiable stops the server at start.
    fn probe(&self, trust_domain: &TrustDomain, now: SystemTime) -> Result<(), CaError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            upstream_error(format!(
                "a chain under this upstream CA does not verify against its root ({what}: {e})"
            ))
        };
        let now = floor_to_second(now);
        let until = floor_to_second(self.not_after.min(now + Duration::from_secs(60)));
        let ca_key = KeyPair::generate().map_err(|e| failed("key", &e))?;
        let ca = intermediate_params(trust_domain, &random_serial()?, now, until)?
            .signed_by(&ca_key, &self.issuer)
            .map_err(|e| failed("intermediate", &e))?;
        let ca_issuer =
            Issuer::from_ca_cert_der(ca.der(), ca_key).map_err(|e| failed("intermediate", &e))?;
        let leaf_key = KeyPair::generate().map_err(|e| failed("key", &e))?;
        let id = crate::policy::server_id(trust_domain).map_err(|e| failed("id", &e))?;
        let leaf = leaf_params(&id, &[], &random_serial()?, now, until)?
            .signed_by(&leaf_key, &ca_issuer)
            .map_err(|e| failed("leaf", &e))?;
        let (root, between) = self
            .certificates
            .split_last()
            .ok_or_else(|| upstream_error("no upstream certificate"))?;
        let mut chain = vec![leaf.der().clone(), ca.der().clone()];
        chain.extend(between.iter().cloned());
        let bundle = X509Bundle::new(trust_domain.clone(), vec![root.clone()])
            .map_err(|e| failed("root", &e))?;
        verify_chain(&chain, &bundle, now + Duration::from_secs(1))
            .map_err(|e| failed("verification", &e))?;
        Ok(())
    }

    /// The upstream CA first, the root last.
    pub(crate) fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// Signs with the upstream CA's key.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The upstream CA's NotAfter: no intermediate outlives it.
    pub(crate) fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// Each certificate of the upstream chain must be a CA that may sign certificates and have
/// `below` CAs under it.
fn check_can_sign_cas(cert: &X509Certificate<'_>, below: usize) -> Result<(), CaError> {
    let mut is_ca = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                is_ca = bc.ca;
                if let Some(len) = bc.path_len_constraint
                    && usize::try_from(len).unwrap_or(usize::MAX) < below
                {
                    return Err(upstream_error(format!(
                        "{} has pathLen {len}: it allows fewer CAs below it than the {below} it would have (Sigil's intermediates included)",
                        cert.subject()
                    )));
                }
            }
            ParsedExtension::KeyUsage(ku) if !ku.key_cert_sign() => {
                return Err(upstream_error(format!(
                    "{}'s Key Usage lacks keyCertSign",
                    cert.subject()
                )));
            }
            _ => {}
        }
    }
    if !is_ca {
        return Err(upstream_error(format!(
            "{} is not a CA certificate (basicConstraints cA is not set)",
            cert.subject()
        )));
    }
    Ok(())
}
