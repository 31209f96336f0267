//! [`Authorizer`]: which authenticated SPIFFE IDs may proceed (XV-8).

use std::fmt;
use std::sync::Arc;

use super::X509SvidError;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Which authenticated SPIFFE IDs may proceed (XV-8), as go-spiffe's `tlsconfig.Authorize*`.
///
/// Authorization comes after [`verify_chain`](super::verify_chain): it only looks at the ID.
#[derive(Clone)]
pub struct Authorizer {
    rule: Rule,
}

#[derive(Clone)]
enum Rule {
    Any,
    OneOf(Vec<SpiffeId>),
    MemberOf(TrustDomain),
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

// === impl Authorizer ===

impl Authorizer {
    /// Allows any authenticated ID.
    pub fn any() -> Self {
        Self { rule: Rule::Any }
    }

    /// Allows exactly `id`.
    pub fn exact(id: SpiffeId) -> Self {
        Self::one_of([id])
    }

    /// Allows any of `ids`.
    pub fn one_of(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        Self {
            rule: Rule::OneOf(ids.into_iter().collect()),
        }
    }

    /// Allows any ID in `trust_domain`.
    pub fn member_of(trust_domain: TrustDomain) -> Self {
        Self {
            rule: Rule::MemberOf(trust_domain),
        }
    }

    /// Allows the IDs for which `predicate` returns true.
    pub fn predicate(predicate: impl Fn(&SpiffeId) -> bool + Send + Sync + 'static) -> Self {
        Self {
            rule: Rule::Predicate(Arc::new(predicate)),
        }
    }

    /// Checks `id` against the policy.
    ///
    /// # Errors
    ///
    /// [`X509SvidError::Unauthorized`] when the policy does not allow `id`.
    pub fn authorize(&self, id: &SpiffeId) -> Result<(), X509SvidError> {
        let allowed = match &self.rule {
            Rule::Any => true,
            Rule::OneOf(ids) => ids.contains(id),
            Rule::MemberOf(trust_domain) => id.is_member_of(trust_domain),
            Rule::Predicate(predicate) => predicate(id),
        };
        if !allowed {
            return Err(X509SvidError::Unauthorized { id: id.clone() });
        }
        Ok(())
    }
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Rule::Any => f.write_str("Authorizer::Any"),
            Rule::OneOf(ids) => f.debug_tuple("Authorizer::OneOf").field(ids).finish(),
            Rule::MemberOf(td) => f.debug_tuple("Authorizer::MemberOf").field(td).finish(),
            Rule::Predicate(_) => f.write_str("Authorizer::Predicate(..)"),
        }
    }
}
