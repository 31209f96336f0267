//! The upstream authority (`upstream_authority = "disk"`): an enterprise CA whose certificate
//! and key are files, under which every X.509 authority Sigil rotates is an intermediate.
//!
//! `upstream_cert_path` holds the upstream CA's certificate, then any CAs between it and its
//! root, the root last (one self-signed certificate when the upstream CA is the root). The root
//! becomes the trust domain's X.509 bundle; SVID chains carry Sigil's intermediate and the
//! upstream's intermediates, never the root. Each Sigil intermediate has pathLen 0, the trust
//! domain's SPIFFE ID as URI SAN, an Authority Key Identifier, and a NotAfter within the
//! upstream CA's.

use std::time::SystemTime;

use rcgen::{Issuer, KeyPair, PKCS_RSA_SHA256};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use super::CaError;

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
        cert_pem: &[u8],
        key_pem: &str,
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
        check_can_sign_a_ca(ca)?;
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
        let not_after = sigil_core::time::from_unix_seconds(ca.validity().not_after.timestamp())
            .ok_or_else(|| upstream_error("the upstream CA's NotAfter is out of range"))?;

        let key = KeyPair::from_pem(key_pem)
            .or_else(|_| KeyPair::from_pkcs8_pem_and_sign_algo(key_pem, &PKCS_RSA_SHA256))
            .map_err(|e| {
                upstream_error(format!(
                    "upstream_key_path: no usable PKCS#8 key ({e}); an `EC PRIVATE KEY` or `RSA PRIVATE KEY` must be converted: openssl pkcs8 -topk8 -nocrypt"
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
        Ok(Self {
            certificates,
            issuer,
            not_after,
        })
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

/// The upstream CA must be a CA that may sign certificates and have a CA below it.
fn check_can_sign_a_ca(cert: &X509Certificate<'_>) -> Result<(), CaError> {
    let mut is_ca = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                is_ca = bc.ca;
                if bc.path_len_constraint == Some(0) {
                    return Err(upstream_error(format!(
                        "{} has pathLen 0: it may not sign Sigil's intermediate CAs",
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
