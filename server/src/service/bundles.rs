//! Bundles: the trust domain's own (published by the [`Authority`], with the CRLs) and the
//! federated trust domains' bundles an operator sets by hand.

use std::sync::Arc;

use sigil_core::x509_bundle::X509Bundle;
use sigil_core::{SpiffeBundle, TrustDomain};
use tracing::info;

use crate::audit::{NewAuditRecord, action, uid_actor};
use crate::service::audit::AuditLog;
use crate::service::authority::{Authority, BundleState};
use crate::service::crl::{CrlPublisher, CrlSet};
use crate::service::federation::FederatedBundles;
use crate::store::{FederatedBundle, Store, StoreError};

/// How a federated bundle is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BundleFormat {
    /// SPIFFE bundle JSON (a JWKS).
    Spiffe,
    /// PEM certificates: X.509 authorities only.
    Pem,
}

/// Reads a bundle of `trust_domain` written in `format`.
///
/// # Errors
///
/// Why it is not one, in words.
pub(crate) fn parse_bundle(
    trust_domain: &TrustDomain,
    format: BundleFormat,
    text: &[u8],
) -> Result<SpiffeBundle, String> {
    match format {
        BundleFormat::Spiffe => SpiffeBundle::parse(trust_domain.clone(), text)
            .map_err(|e| format!("not a valid SPIFFE bundle: {e}")),
        BundleFormat::Pem => {
            let x509 = X509Bundle::from_pem(trust_domain.clone(), text)
                .map_err(|e| format!("not a valid PEM bundle: {e}"))?;
            let mut bundle = SpiffeBundle::new(trust_domain.clone());
            for cert in x509.authorities() {
                bundle
                    .add_x509_authority(cert.clone())
                    .map_err(|e| e.to_string())?;
            }
            Ok(bundle)
        }
    }
}

/// A federated bundle as stored, with what could be read from it.
#[derive(Debug, Clone)]
pub(crate) struct Federated {
    /// The stored record.
    pub stored: FederatedBundle,
    /// The bundle, if it parses.
    pub parsed: Option<SpiffeBundle>,
}

/// Why a bundle call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BundleError {
    /// The bundle or trust domain is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The change was made but its audit record could not be written.
    #[error("the change was made, but its audit record could not be written: {0}")]
    AuditAfterChange(StoreError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The bundle service.
#[derive(Debug)]
pub(crate) struct Bundles {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    authority: Arc<Authority>,
    crls: Arc<CrlPublisher>,
    federated: Arc<FederatedBundles>,
}

// === impl Bundles ===

impl Bundles {
    /// The service.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        authority: Arc<Authority>,
        crls: Arc<CrlPublisher>,
        federated: Arc<FederatedBundles>,
    ) -> Self {
        Self {
            store,
            audit,
            authority,
            crls,
            federated,
        }
    }

    /// Publishes the federated bundles again after a change (the periodic refresh would, a
    /// little later).
    async fn republish(&self) {
        if let Err(error) = self.federated.refresh().await {
            tracing::warn!(%error, "cannot read the federated bundles again now; the next refresh will");
        }
    }

    /// The trust domain's own bundle and its CRLs, as last published.
    pub(crate) fn own(&self) -> (Arc<BundleState>, Arc<CrlSet>) {
        (self.authority.bundle(), self.crls.current())
    }

    /// Every federated bundle, in trust domain order.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn list_federated(&self) -> Result<Vec<Federated>, BundleError> {
        Ok(self
            .store
            .list_federated_bundles()
            .await?
            .into_iter()
            .map(|stored| {
                let parsed = stored.parsed();
                Federated { stored, parsed }
            })
            .collect())
    }

    /// Stores the bundle of federated trust domain `trust_domain` for admin `uid`.
    ///
    /// # Errors
    ///
    /// [`BundleError::Invalid`] for the server's own trust domain or a bundle that does not
    /// parse; the store's; [`BundleError::AuditAfterChange`].
    pub(crate) async fn set_federated(
        &self,
        uid: u32,
        trust_domain: &TrustDomain,
        format: BundleFormat,
        text: &[u8],
    ) -> Result<SpiffeBundle, BundleError> {
        if trust_domain == self.authority.trust_domain() {
            return Err(BundleError::Invalid(
                "the server's own bundle cannot be set; it is managed by the CA".to_owned(),
            ));
        }
        if self.store.get_federation(trust_domain).await?.is_some() {
            return Err(BundleError::Invalid(format!(
                "a federation relationship keeps the bundle of {trust_domain}: give the bundle \
                 with `federation update --id {} --trust-bundle FILE` (or delete the \
                 relationship)",
                trust_domain.name()
            )));
        }
        let bundle = parse_bundle(trust_domain, format, text).map_err(BundleError::Invalid)?;
        let json = bundle.to_json();
        self.store
            .set_federated_bundle(trust_domain, json.clone())
            .await?;
        self.republish().await;
        let record = NewAuditRecord::new(uid_actor(uid), action::BUNDLE_SET, trust_domain.name())
            .detail("sha256", sigil_core::hex::sha256(&json))
            .detail(
                "x509_authorities",
                bundle.x509_bundle().map_or(0, |x| x.authorities().len()),
            )
            .detail("sequence", bundle.sequence().unwrap_or_default());
        self.audit
            .after_change(vec![record])
            .await
            .map_err(BundleError::AuditAfterChange)?;
        info!(uid, trust_domain = %trust_domain, "federated bundle set");
        Ok(bundle)
    }

    /// Deletes the bundle of `trust_domain` for admin `uid`; returns it.
    ///
    /// # Errors
    ///
    /// The store's (not found); [`BundleError::AuditAfterChange`].
    pub(crate) async fn delete_federated(
        &self,
        uid: u32,
        trust_domain: &TrustDomain,
    ) -> Result<FederatedBundle, BundleError> {
        let deleted = self.store.delete_federated_bundle(trust_domain).await?;
        self.republish().await;
        let record =
            NewAuditRecord::new(uid_actor(uid), action::BUNDLE_DELETE, trust_domain.name())
                .detail("sha256", sigil_core::hex::sha256(&deleted.bundle));
        self.audit
            .after_change(vec![record])
            .await
            .map_err(BundleError::AuditAfterChange)?;
        info!(uid, trust_domain = %trust_domain, "federated bundle deleted");
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditFilter;
    use crate::service::testing::Fixture;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn federated_bundles_are_checked_stored_audited_and_deleted() {
        let fx = Fixture::new().await;
        let other = Fixture::new_in("other.org").await;
        let td = TrustDomain::new("other.org").unwrap();
        let pem = other.authority.bundle().x509.to_pem();
        let set = fx
            .bundles
            .set_federated(0, &td, BundleFormat::Pem, pem.as_bytes())
            .await
            .unwrap();
        assert_eq!(set.x509_bundle().unwrap().authorities().len(), 1);
        let listed = fx.bundles.list_federated().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].stored.trust_domain, td);
        assert!(listed[0].parsed.is_some());

        let own = fx.authority.trust_domain().clone();
        assert!(matches!(
            fx.bundles
                .set_federated(0, &own, BundleFormat::Pem, pem.as_bytes())
                .await,
            Err(BundleError::Invalid(m)) if m.contains("own bundle")
        ));
        assert!(matches!(
            fx.bundles
                .set_federated(0, &td, BundleFormat::Spiffe, b"{not json")
                .await,
            Err(BundleError::Invalid(_))
        ));
        let deleted = fx.bundles.delete_federated(0, &td).await.unwrap();
        assert_eq!(deleted.trust_domain, td);
        assert!(matches!(
            fx.bundles.delete_federated(0, &td).await,
            Err(BundleError::Store(StoreError::NotFound { .. }))
        ));
        let actions = fx
            .audit_actions(AuditFilter {
                action: Some("bundle".to_owned()),
                ..AuditFilter::default()
            })
            .await;
        assert_eq!(actions, [action::BUNDLE_SET, action::BUNDLE_DELETE]);
        let (state, crls) = fx.bundles.own();
        assert_eq!(state.trust_domain, own);
        assert!(crls.generation > 0);
    }
}
