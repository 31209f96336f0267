//! Certificate revocation lists: one per X.509 authority, signed by that authority.

use std::time::SystemTime;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};

use super::{Ca, CaError};

/// Why a serial is listed (RFC 5280 section 5.3.1 `CRLReason`), as far as Sigil says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RevocationReason {
    /// The task is over: a closed session's SVIDs (`cessationOfOperation`).
    CessationOfOperation,
    /// The grant was taken back: a revoked session's SVIDs (`privilegeWithdrawn`).
    PrivilegeWithdrawn,
    /// No reason given (no reasonCode extension): a banned or evicted agent's SVIDs. Also what
    /// a reason written by a later build reads as, so a downgrade still publishes CRLs.
    #[default]
    #[serde(other)]
    Unspecified,
}

impl RevocationReason {
    /// The reasonCode extension of the CRL entry, if any.
    fn code(self) -> Option<rcgen::RevocationReason> {
        match self {
            Self::Unspecified => None,
            Self::CessationOfOperation => Some(rcgen::RevocationReason::CessationOfOperation),
            Self::PrivilegeWithdrawn => Some(rcgen::RevocationReason::PrivilegeWithdrawn),
        }
    }
}

/// A serial to list, and which authority's CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RevokedSerial {
    /// The serial number, lowercase hex.
    pub serial: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// The authority that signed the certificate; `None` lists it on every authority's CRL.
    pub authority_id: Option<String>,
    /// Why.
    pub reason: RevocationReason,
}

/// A CRL just signed (by this server, or by another one sharing the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SignedCrl {
    /// The signing authority's id.
    pub authority_id: String,
    /// The CRL, DER.
    pub der: Vec<u8>,
    /// Its CRL number.
    pub crl_number: u64,
    /// thisUpdate.
    pub this_update: SystemTime,
    /// nextUpdate.
    pub next_update: SystemTime,
    /// The serials it lists, lowercase hex.
    pub revoked_serials: Vec<String>,
}

// === impl Ca ===

impl Ca {
    /// The ids of the X.509 authorities in the bundle (those [`Ca::sign_crls`] signs for).
    pub(crate) fn x509_authority_ids(&self) -> Vec<String> {
        self.snapshot()
            .x509
            .iter()
            .map(|slot| slot.authority.id.clone())
            .collect()
    }

    /// Signs one CRL per X.509 authority in the bundle, each listing the serials revoked under
    /// it (and those with no authority), numbered as `crl_numbers` says for its id (an
    /// authority that appeared since the numbers were taken: `fallback`), valid from `now` to
    /// `next_update`.
    ///
    /// # Errors
    ///
    /// [`CaError::Certificate`] when a serial is not hex or signing fails.
    pub(crate) fn sign_crls(
        &self,
        revoked: &[RevokedSerial],
        crl_numbers: &std::collections::BTreeMap<String, u64>,
        fallback: u64,
        now: SystemTime,
        next_update: SystemTime,
    ) -> Result<Vec<SignedCrl>, CaError> {
        let authorities = self.snapshot();
        let mut out = Vec::with_capacity(authorities.x509.len());
        for slot in &authorities.x509 {
            let authority = &slot.authority;
            let crl_number = crl_numbers.get(&authority.id).copied().unwrap_or(fallback);
            let mine: Vec<&RevokedSerial> = revoked
                .iter()
                .filter(|r| {
                    r.authority_id
                        .as_deref()
                        .is_none_or(|id| id == authority.id)
                })
                .collect();
            let mut revoked_certs = Vec::with_capacity(mine.len());
            for r in &mine {
                let bytes =
                    sigil_core::hex::decode(&r.serial).ok_or_else(|| CaError::Certificate {
                        reason: format!("revoked serial {:?} is not lowercase hex", r.serial),
                    })?;
                revoked_certs.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: r.revoked_at.into(),
                    reason_code: r.reason.code(),
                    invalidity_date: None,
                });
            }
            let params = CertificateRevocationListParams {
                this_update: now.into(),
                next_update: next_update.into(),
                crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
                issuing_distribution_point: None,
                revoked_certs,
                key_identifier_method: KeyIdMethod::Sha256,
            };
            let crl = params
                .signed_by(&authority.issuer)
                .map_err(|e| CaError::Certificate {
                    reason: format!("crl of authority {}: {e}", authority.id),
                })?;
            out.push(SignedCrl {
                authority_id: authority.id.clone(),
                der: crl.der().to_vec(),
                crl_number,
                this_update: now,
                next_update,
                revoked_serials: mine.iter().map(|r| r.serial.clone()).collect(),
            });
        }
        tracing::debug!(crls = out.len(), "crls signed");
        Ok(out)
    }
}
