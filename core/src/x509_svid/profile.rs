//! The X509-SVID certificate rules: the leaf profile (X-1, X-2, XL-1 to XL-8) and the signing
//! certificate rules (XC-1, XC-3), shared by parsing and verification, and
//! [`check_leaf_certificate`] for issuers.

use std::fmt;

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, KeyUsage, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
};

use super::X509SvidError;
use crate::spiffe_id::SpiffeId;

/// Checks one leaf certificate against the whole X509-SVID leaf profile, without a private key
/// or a bundle, and returns its SPIFFE ID: what an issuer checks on a certificate it just signed.
///
/// The rules are those of [`X509Svid::from_parts`] for the leaf: exactly one URI SAN holding a
/// SPIFFE ID with a path (X-1, X-2, XV-4, XL-1), not a CA (XL-2), a critical Key Usage with
/// `digitalSignature` and neither `keyCertSign` nor `cRLSign` (XL-3, XL-4, XL-6), an EKU, if
/// present, with both `serverAuth` and `clientAuth` (XL-7), and a critical SAN extension when
/// the subject is empty (XL-8). Signatures and validity dates are not checked: that is
/// [`verify_chain`]'s job.
///
/// # Errors
///
/// The [`X509SvidError`] variant of the first rule broken.
///
/// [`X509Svid::from_parts`]: super::X509Svid::from_parts
/// [`verify_chain`]: super::verify_chain
pub fn check_leaf_certificate(leaf: &CertificateDer<'_>) -> Result<SpiffeId, X509SvidError> {
    let leaf = parse_certificate(leaf, 0)?;
    let spiffe_id = leaf_spiffe_id(&leaf)?;
    check_leaf(&leaf, &spiffe_id)?;
    check_leaf_profile(&leaf)?;
    Ok(spiffe_id)
}

// === checks ===

/// Parses one certificate of the chain, refusing trailing bytes.
pub(super) fn parse_certificate<'a>(
    der: &'a CertificateDer<'_>,
    index: usize,
) -> Result<X509Certificate<'a>, X509SvidError> {
    match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(X509SvidError::BadCertificate {
            index,
            reason: format!("{} bytes follow the certificate", rest.len()),
        }),
        Err(e) => Err(X509SvidError::BadCertificate {
            index,
            reason: e.to_string(),
        }),
    }
}

/// The leaf's single URI SAN as a SPIFFE ID (X-1, X-2, XV-4, XV-6).
pub(super) fn leaf_spiffe_id(leaf: &X509Certificate<'_>) -> Result<SpiffeId, X509SvidError> {
    let uris = uri_sans(leaf, 0)?;
    match uris.as_slice() {
        [] => Err(X509SvidError::MissingUriSan),
        [uri] => SpiffeId::new(uri).map_err(|source| X509SvidError::BadSpiffeId {
            uri: (*uri).to_owned(),
            source,
        }),
        _ => Err(X509SvidError::MultipleUriSans { count: uris.len() }),
    }
}

/// The leaf rules checked both when parsing and when verifying: XL-2/XV-2, XL-6/XV-3, XL-4
/// (section 9 item 7) and XL-1/XV-5, in that order.
pub(super) fn check_leaf(leaf: &X509Certificate<'_>, id: &SpiffeId) -> Result<(), X509SvidError> {
    if is_ca(leaf, 0)? {
        return Err(X509SvidError::LeafIsCa);
    }
    let (_, key_usage) = key_usage(leaf, 0)?.ok_or(X509SvidError::MissingKeyUsage)?;
    if key_usage.key_cert_sign() {
        return Err(X509SvidError::LeafCanSign {
            usage: "keyCertSign",
        });
    }
    if key_usage.crl_sign() {
        return Err(X509SvidError::LeafCanSign { usage: "cRLSign" });
    }
    if !key_usage.digital_signature() {
        return Err(X509SvidError::MissingDigitalSignature);
    }
    if id.is_root() {
        return Err(X509SvidError::LeafHasRootId { id: id.clone() });
    }
    Ok(())
}

/// The leaf rules checked only when parsing an SVID: XL-3 criticality, XL-7 and XL-8.
pub(super) fn check_leaf_profile(leaf: &X509Certificate<'_>) -> Result<(), X509SvidError> {
    if let Some((critical, _)) = key_usage(leaf, 0)?
        && !critical
    {
        return Err(X509SvidError::KeyUsageNotCritical);
    }
    let eku = leaf
        .extended_key_usage()
        .map_err(|e| bad_extension(0, "extended key usage", e))?;
    if let Some(eku) = eku
        && !(eku.value.server_auth && eku.value.client_auth)
    {
        return Err(X509SvidError::MissingServerOrClientAuth);
    }
    if leaf.subject().iter().next().is_none() {
        let san = leaf
            .get_extension_unique(&OID_X509_EXT_SUBJECT_ALT_NAME)
            .map_err(|e| bad_extension(0, "subject alternative name", e))?;
        if san.is_some_and(|san| !san.critical) {
            return Err(X509SvidError::SanNotCritical);
        }
    }
    Ok(())
}

/// The rules for a signing certificate in a chain: XC-1 and XC-3.
pub(super) fn check_signing_cert(
    cert: &X509Certificate<'_>,
    index: usize,
) -> Result<(), X509SvidError> {
    if !is_ca(cert, index)? {
        return Err(X509SvidError::SigningCertNotCa { index });
    }
    let problem = match key_usage(cert, index)? {
        None => Some("key usage is missing"),
        Some((false, _)) => Some("key usage is not critical"),
        Some((true, usage)) if !usage.key_cert_sign() => Some("key usage lacks keyCertSign"),
        Some(_) => None,
    };
    if let Some(problem) = problem {
        return Err(X509SvidError::SigningCertKeyUsage { index, problem });
    }
    for uri in uri_sans(cert, index)? {
        if let Ok(id) = SpiffeId::new(uri)
            && !id.is_root()
        {
            return Err(X509SvidError::SigningCertHasPath { index, id });
        }
    }
    Ok(())
}

/// Whether Basic Constraints say `cA = true`; an absent extension means `false` (RFC 5280).
fn is_ca(cert: &X509Certificate<'_>, index: usize) -> Result<bool, X509SvidError> {
    let ext = cert
        .get_extension_unique(&OID_X509_EXT_BASIC_CONSTRAINTS)
        .map_err(|e| bad_extension(index, "basic constraints", e))?;
    match ext.map(|ext| ext.parsed_extension()) {
        None => Ok(false),
        Some(ParsedExtension::BasicConstraints(bc)) => Ok(bc.ca),
        Some(other) => Err(X509SvidError::BadExtension {
            index,
            extension: "basic constraints",
            reason: format!("{other:?}"),
        }),
    }
}

/// The Key Usage extension, as (critical, usage), if present.
fn key_usage<'a>(
    cert: &'a X509Certificate<'_>,
    index: usize,
) -> Result<Option<(bool, &'a KeyUsage)>, X509SvidError> {
    let ext = cert
        .get_extension_unique(&OID_X509_EXT_KEY_USAGE)
        .map_err(|e| bad_extension(index, "key usage", e))?;
    match ext {
        None => Ok(None),
        Some(ext) => match ext.parsed_extension() {
            ParsedExtension::KeyUsage(usage) => Ok(Some((ext.critical, usage))),
            other => Err(X509SvidError::BadExtension {
                index,
                extension: "key usage",
                reason: format!("{other:?}"),
            }),
        },
    }
}

/// Every URI in the Subject Alternative Name extension.
fn uri_sans<'a>(
    cert: &'a X509Certificate<'_>,
    index: usize,
) -> Result<Vec<&'a str>, X509SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad_extension(index, "subject alternative name", e))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn bad_extension(index: usize, extension: &'static str, e: impl fmt::Display) -> X509SvidError {
    X509SvidError::BadExtension {
        index,
        extension,
        reason: e.to_string(),
    }
}
