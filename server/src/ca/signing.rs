//! One signing method per credential kind: [`Ca::sign_agent_x509_svid`],
//! [`Ca::sign_workload_x509_svid`], [`Ca::sign_server_x509_svid`] and [`Ca::sign_jwt_svid`],
//! with the checks of the IDs they are asked for. CRLs are signed in `crl.rs`.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value};
use sigil_core::lifetime::LifetimeError;
use sigil_core::session::SessionClaims;
use sigil_core::x509_svid::check_leaf_certificate;
use sigil_core::{JwtSvid, SpiffeId, Validity};

use super::template::{self, P256PublicKey, floor_to_second, random_serial};
use super::{Ca, CaError, authority, hex, keys};

/// What to put in a workload X509-SVID ([`Ca::sign_workload_x509_svid`]), from its
/// registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkloadX509SvidParams {
    /// The entry's SPIFFE ID: the one URI SAN.
    pub spiffe_id: SpiffeId,
    /// The entry's DNS names, as DNS SANs after the URI SAN.
    pub dns_names: Vec<String>,
    /// The TTL asked for; NotAfter is capped by the authority and by `caps`.
    pub ttl: Duration,
    /// Further NotAfter caps, such as a privileged session's end.
    pub caps: Vec<SystemTime>,
    /// The privileged session it is issued under, carried in the session extension.
    pub session: Option<SessionClaims>,
}

impl WorkloadX509SvidParams {
    /// An SVID for `spiffe_id` living `ttl`, with no DNS names, caps or session.
    fn bare(spiffe_id: SpiffeId, ttl: Duration) -> Self {
        Self {
            spiffe_id,
            dns_names: Vec::new(),
            ttl,
            caps: Vec::new(),
            session: None,
        }
    }
}

/// An X509-SVID certificate just signed, with what audit records need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IssuedX509Svid {
    spiffe_id: SpiffeId,
    certificate: CertificateDer<'static>,
    /// The signing authority's chain (empty under a self-signed root).
    intermediates: Vec<CertificateDer<'static>>,
    serial: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
    authority_id: String,
}

// === impl IssuedX509Svid ===

impl IssuedX509Svid {
    /// The SPIFFE ID in the certificate.
    pub(crate) fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The certificate (DER), the leaf of [`IssuedX509Svid::into_chain`].
    #[cfg(test)]
    pub(crate) fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// The chain: the certificate, then what follows it up to (not including) the bundle's
    /// root: nothing when a self-signed authority signed it; the intermediate and the
    /// upstream's intermediates under an upstream CA.
    pub(crate) fn into_chain(self) -> Vec<CertificateDer<'static>> {
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(self.certificate);
        chain.extend(self.intermediates);
        chain
    }

    /// The chain's DER, back to back (what the node and Workload APIs send).
    pub(crate) fn chain_der(&self) -> Vec<u8> {
        let mut der = self.certificate.to_vec();
        for cert in &self.intermediates {
            der.extend_from_slice(cert);
        }
        der
    }

    #[cfg(test)]
    /// The serial number, big-endian (16 bytes).
    pub(crate) fn serial(&self) -> &[u8] {
        &self.serial
    }

    /// The serial number in lowercase hex.
    pub(crate) fn serial_hex(&self) -> String {
        hex(&self.serial)
    }

    #[cfg(test)]
    /// NotBefore (the issuing time, backdated).
    pub(crate) fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// NotAfter.
    pub(crate) fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The id of the X.509 authority that signed it (its serial number in hex).
    pub(crate) fn authority_id(&self) -> &str {
        &self.authority_id
    }
}

// === impl Ca ===

impl Ca {
    /// Signs an agent's X509-SVID for `agent_id` (under `spiffe://<td>/sigil/agent/`) and the
    /// P-256 key of `csr_der`, valid for `ttl` from `now`, capped at the authority's NotAfter.
    ///
    /// # Errors
    ///
    /// [`CaError::NotAgentId`] or [`CaError::ForeignTrustDomain`] for the ID; the CSR errors
    /// ([`CaError::MalformedCsr`], [`CaError::CsrTooLarge`], [`CaError::CsrSignatureInvalid`],
    /// [`CaError::UnsupportedKey`]); [`CaError::TtlTooShort`] and [`CaError::Lifetime`].
    pub(crate) fn sign_agent_x509_svid(
        &self,
        agent_id: &SpiffeId,
        csr_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        self.check_member(agent_id)?;
        if !crate::policy::is_agent_id(&self.trust_domain, agent_id) {
            return Err(CaError::NotAgentId {
                id: agent_id.clone(),
            });
        }
        let public_key = P256PublicKey::from_csr(csr_der)?;
        self.sign_x509(
            &WorkloadX509SvidParams::bare(agent_id.clone(), ttl),
            &public_key,
            now,
        )
    }

    /// Signs a workload's X509-SVID from its registration entry (`params`) and the P-256 key of
    /// `csr_der`. The identity comes from `params` only; the CSR proves possession of the key.
    ///
    /// # Errors
    ///
    /// [`CaError::ForeignTrustDomain`], [`CaError::RootId`] or [`CaError::ReservedId`] for the
    /// ID; [`CaError::InvalidDnsName`]; the CSR errors; [`CaError::TtlTooShort`] and
    /// [`CaError::Lifetime`] (a cap in `params.caps` that has passed).
    pub(crate) fn sign_workload_x509_svid(
        &self,
        params: &WorkloadX509SvidParams,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        self.check_workload_id(&params.spiffe_id)?;
        let public_key = P256PublicKey::from_csr(csr_der)?;
        self.sign_x509(params, &public_key, now)
    }

    /// Signs the server's own X509-SVID, `spiffe://<td>/sigil/server`, for the P-256 key given
    /// as a DER SubjectPublicKeyInfo (the server generates the key itself).
    ///
    /// # Errors
    ///
    /// [`CaError::MalformedPublicKey`] or [`CaError::UnsupportedKey`] for the key;
    /// [`CaError::TtlTooShort`] and [`CaError::Lifetime`].
    pub(crate) fn sign_server_x509_svid(
        &self,
        public_key_spki_der: &[u8],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        let public_key = P256PublicKey::from_spki_der(public_key_spki_der)?;
        self.sign_x509(
            &WorkloadX509SvidParams::bare(self.server_id(), ttl),
            &public_key,
            now,
        )
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audience` with the active JWT key: ES256, `kid`
    /// in the header, `sub`, `aud` (always an array), `iat` = `now`, `exp` = `now + ttl` capped
    /// at the key's NotAfter, and `iss` when `issuer` is given and not empty. The token is
    /// validated with sigil-core against the CA's JWT bundle before it is returned.
    ///
    /// # Errors
    ///
    /// [`CaError::ForeignTrustDomain`], [`CaError::RootId`] or [`CaError::ReservedId`] for the
    /// ID; [`CaError::EmptyAudience`]; [`CaError::TtlTooShort`] and [`CaError::Lifetime`];
    /// [`CaError::JwtSigning`] when the key fails to sign.
    #[cfg(test)]
    pub(crate) fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        issuer: Option<&str>,
    ) -> Result<JwtSvid, CaError> {
        self.sign_jwt_svid_in(spiffe_id, audience, ttl, now, issuer, None)
    }

    /// [`Ca::sign_jwt_svid`], with the claims of the privileged session it is issued under.
    ///
    /// # Errors
    ///
    /// As [`Ca::sign_jwt_svid`].
    pub(crate) fn sign_jwt_svid_in(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
        issuer: Option<&str>,
        session: Option<&SessionClaims>,
    ) -> Result<JwtSvid, CaError> {
        self.check_workload_id(spiffe_id)?;
        let Some(first_audience) = audience.first() else {
            return Err(CaError::EmptyAudience);
        };
        if audience.iter().any(String::is_empty) {
            return Err(CaError::EmptyAudience);
        }
        check_ttl(ttl)?;
        let authorities = self.snapshot();
        let key = authorities.active_jwt()?;
        let now = floor_to_second(now);
        let validity = Validity::issue(now, ttl, &[key.not_after])?;
        let iat = authority::unix_seconds(now);
        let exp = authority::unix_seconds(floor_to_second(validity.not_after()));

        let mut header = Map::new();
        header.insert("alg".to_owned(), "ES256".into());
        header.insert("kid".to_owned(), key.kid.as_str().into());
        header.insert("typ".to_owned(), "JWT".into());
        let mut claims = Map::new();
        claims.insert("sub".to_owned(), spiffe_id.as_str().into());
        claims.insert("aud".to_owned(), audience.to_vec().into());
        claims.insert("exp".to_owned(), exp.into());
        claims.insert("iat".to_owned(), iat.into());
        // A unique id (127 random bits), so that each token can be named in the audit log, on
        // its session, and in a relying party's deny list. (Not a nonce: the agent hands the
        // same cached token to every caller of an entry.)
        claims.insert("jti".to_owned(), hex(&random_serial()?).into());
        if let Some(session) = session {
            claims.extend(session.jwt_claims());
        }
        if let Some(issuer) = issuer.filter(|issuer| !issuer.is_empty()) {
            claims.insert("iss".to_owned(), issuer.into());
        }
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(Value::Object(header).to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string())
        );
        let signature =
            keys::jws_signature(key.key.as_ref(), token.as_bytes()).map_err(CaError::JwtSigning)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));

        // Check what was signed, as a relying party would.
        let svid =
            JwtSvid::parse_and_validate(&token, &authorities.jwt_bundle, first_audience, now)
                .map_err(CaError::IssuedJwtSvidInvalid)?;
        if svid.spiffe_id() != spiffe_id || svid.audience() != audience {
            return Err(CaError::IssuedSvidMismatch {
                what: "jwt-svid subject or audience",
            });
        }
        tracing::debug!(spiffe_id = %spiffe_id, kid = %key.kid, exp, "jwt-svid signed");
        Ok(svid)
    }

    // --- private ---

    /// Builds, signs and checks an X509-SVID leaf for `params` over `public_key`.
    fn sign_x509(
        &self,
        params: &WorkloadX509SvidParams,
        public_key: &P256PublicKey,
        now: SystemTime,
    ) -> Result<IssuedX509Svid, CaError> {
        let WorkloadX509SvidParams {
            spiffe_id,
            dns_names,
            ttl,
            caps,
            session,
        } = params;
        let ttl = *ttl;
        check_ttl(ttl)?;
        let authorities = self.snapshot();
        let authority = authorities.active_x509()?;
        let now = floor_to_second(now);
        let mut all_caps = Vec::with_capacity(1 + caps.len());
        all_caps.push(authority.not_after);
        all_caps.extend_from_slice(caps);
        let validity = Validity::issue(now, ttl, &all_caps)?;
        let not_before = validity.not_before();
        let not_after = floor_to_second(validity.not_after());
        if not_after <= now {
            // A cap less than a second away.
            return Err(CaError::Lifetime(LifetimeError::CapPassed));
        }
        let serial = random_serial()?;
        let mut params =
            template::leaf_params(spiffe_id, dns_names, &serial, not_before, not_after)?;
        if let Some(session) = session {
            // Non-critical: relying parties that do not know it ignore it (SPIFFE X509-SVID
            // section 4.5 allows further non-critical extensions).
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &sigil_core::session::SESSION_EXTENSION_OID,
                    session.extension_value(),
                ));
        }
        let certificate = params
            .signed_by(public_key, &authority.issuer)
            .map_err(|e| CaError::Certificate {
                reason: e.to_string(),
            })?
            .der()
            .clone();

        // Check what was signed: the leaf profile and the identity. The signature itself is not
        // verified again here (that second ECDSA verify was a third of the issuance cost): the
        // active authority's key is checked against its certificate when the journal is loaded,
        // and the tests verify every credential kind with openssl and `verify_chain`.
        let issued_id =
            check_leaf_certificate(&certificate).map_err(CaError::IssuedX509SvidInvalid)?;
        if issued_id != *spiffe_id {
            return Err(CaError::IssuedSvidMismatch {
                what: "x509-svid spiffe id",
            });
        }

        tracing::debug!(
            spiffe_id = %spiffe_id,
            serial = %hex(&serial),
            authority_id = %authority.id,
            "x509-svid signed"
        );
        Ok(IssuedX509Svid {
            spiffe_id: spiffe_id.clone(),
            certificate,
            intermediates: authority.chain.clone(),
            serial: serial.to_vec(),
            not_before,
            not_after,
            authority_id: authority.id.clone(),
        })
    }

    fn check_member(&self, id: &SpiffeId) -> Result<(), CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        Ok(())
    }

    fn check_workload_id(&self, id: &SpiffeId) -> Result<(), CaError> {
        self.check_member(id)?;
        if id.is_root() {
            return Err(CaError::RootId { id: id.clone() });
        }
        if crate::policy::is_reserved(id) {
            return Err(CaError::ReservedId { id: id.clone() });
        }
        Ok(())
    }
}

fn check_ttl(ttl: Duration) -> Result<(), CaError> {
    if ttl < Duration::from_secs(1) {
        return Err(CaError::TtlTooShort { ttl });
    }
    Ok(())
}
