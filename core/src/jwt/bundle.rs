//! JWT bundles: [`JwtBundle`] (one trust domain's keys by `kid`), [`JwtBundleSet`] (one bundle
//! per trust domain) and [`JwtBundleSource`], where a validator finds them.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{JwtPublicKey, JwtSvidError, MAX_JWKS_LEN, parse_json_strict};
use crate::spiffe_id::TrustDomain;

/// One trust domain's JWT-SVID keys, by `kid` (B-9, BJ-1, BJ-2).
///
/// An empty bundle is valid: the trust domain has no JWT keys (revoked, B-2), and every token
/// from it fails with [`JwtSvidError::UnknownKeyId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: BTreeMap<String, JwtPublicKey>,
}

/// Where a validator finds the JWT bundle of a token's trust domain (J-10, B-9).
pub trait JwtBundleSource {
    /// The bundle of `trust_domain`, or `None` when that trust domain is not trusted. An
    /// implementation must never answer with another trust domain's bundle.
    fn jwt_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle>;
}

/// JWT bundles of several trust domains: at most one per trust domain, never merged (B-10).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundleSet {
    bundles: BTreeMap<TrustDomain, JwtBundle>,
}

// === impl JwtBundle ===

impl JwtBundle {
    /// An empty bundle for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            keys: BTreeMap::new(),
        }
    }

    /// A bundle with the given keys. Every `kid` must be non-empty (BJ-1).
    pub fn from_keys(
        trust_domain: TrustDomain,
        keys: BTreeMap<String, JwtPublicKey>,
    ) -> Result<Self, JwtSvidError> {
        if keys.contains_key("") {
            return Err(JwtSvidError::EmptyKeyId);
        }
        Ok(Self { trust_domain, keys })
    }

    /// Parses a JWKS (`{"keys": [...]}`) as the keys of `trust_domain`: the plain JWKS of the
    /// Workload API's `FetchJWTBundles`, or a SPIFFE bundle, whose `x509-svid` keys are skipped.
    ///
    /// `keys` is required and may be empty (B-1, B-2). A JWK is skipped when its `use` is present
    /// and not `jwt-svid` (BJ-2), when its `kty` or `crv` is unsupported (B-6), or when it has no
    /// `kid` (it could never be selected, since tokens without `kid` are rejected; BJ-1). Unknown
    /// top-level members are ignored (B-5).
    ///
    /// # Errors
    ///
    /// Input over [`MAX_JWKS_LEN`] bytes, invalid JSON (duplicate member names included), a
    /// missing `keys` array, a malformed key of a supported type, or a repeated `kid`.
    pub fn from_jwks(trust_domain: TrustDomain, jwks: &[u8]) -> Result<Self, JwtSvidError> {
        let invalid = |reason: String| JwtSvidError::InvalidJwks { reason };
        if jwks.len() > MAX_JWKS_LEN {
            return Err(invalid(format!(
                "jwks is {} bytes long; the maximum is {MAX_JWKS_LEN}",
                jwks.len()
            )));
        }
        let value = parse_json_strict(jwks).map_err(|e| invalid(e.to_string()))?;
        let Value::Object(set) = value else {
            return Err(invalid("not a json object".to_owned()));
        };
        let keys = match set.get("keys") {
            Some(Value::Array(keys)) => keys,
            Some(_) => return Err(invalid("keys is not an array".to_owned())),
            None => return Err(invalid("keys is missing".to_owned())),
        };
        let mut bundle = Self::new(trust_domain);
        for (index, jwk) in keys.iter().enumerate() {
            let Value::Object(jwk) = jwk else {
                return Err(invalid(format!("key {index} is not a json object")));
            };
            if jwk.get("use").is_some_and(|u| u != "jwt-svid") {
                continue;
            }
            let Some(key) = JwtPublicKey::from_jwk_if_supported(jwk)
                .map_err(|e| invalid(format!("key {index}: {e}")))?
            else {
                continue;
            };
            let kid = match jwk.get("kid") {
                Some(Value::String(kid)) if !kid.is_empty() => kid,
                None | Some(Value::String(_)) => continue,
                Some(_) => return Err(invalid(format!("key {index}: kid is not a string"))),
            };
            bundle.insert_new_key(kid, key)?;
        }
        Ok(bundle)
    }

    /// Adds or replaces the key `kid`, returning the key it replaced. `kid` must be non-empty
    /// (BJ-1).
    pub fn insert_key(
        &mut self,
        kid: impl Into<String>,
        key: JwtPublicKey,
    ) -> Result<Option<JwtPublicKey>, JwtSvidError> {
        let kid = kid.into();
        if kid.is_empty() {
            return Err(JwtSvidError::EmptyKeyId);
        }
        Ok(self.keys.insert(kid, key))
    }

    /// Removes the key `kid`, returning it.
    pub fn remove_key(&mut self, kid: &str) -> Option<JwtPublicKey> {
        self.keys.remove(kid)
    }

    /// The trust domain these keys belong to (B-9).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The keys, by `kid`.
    pub fn keys(&self) -> &BTreeMap<String, JwtPublicKey> {
        &self.keys
    }

    /// The key with this `kid`.
    pub fn key(&self, kid: &str) -> Option<&JwtPublicKey> {
        self.keys.get(kid)
    }

    /// True when the bundle has no keys: every token from this trust domain fails (B-2).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The plain JWKS the Workload API's `FetchJWTBundles` sends (section 6.3):
    /// `{"keys":[{"kty":..,"kid":..,"crv":..,"x":..,"y":..}]}`, or `n`/`e` for RSA. No `use`
    /// and no `spiffe_*` members, as SPIRE sends it. Keys are in `kid` order.
    pub fn to_jwks(&self) -> Vec<u8> {
        let keys = self
            .keys
            .iter()
            .map(|(kid, key)| {
                let mut jwk = key.to_jwk();
                jwk.insert("kid".to_owned(), kid.as_str().into());
                Value::Object(jwk)
            })
            .collect::<Vec<_>>();
        let mut set = Map::new();
        set.insert("keys".to_owned(), Value::Array(keys));
        Value::Object(set).to_string().into_bytes()
    }

    /// A bundle from keys whose `kid`s the caller has already checked to be non-empty.
    pub(crate) fn from_checked_keys(
        trust_domain: TrustDomain,
        keys: BTreeMap<String, JwtPublicKey>,
    ) -> Self {
        Self { trust_domain, keys }
    }

    /// Adds a key whose `kid` must not be taken yet.
    pub(crate) fn insert_new_key(
        &mut self,
        kid: &str,
        key: JwtPublicKey,
    ) -> Result<(), JwtSvidError> {
        if kid.is_empty() {
            return Err(JwtSvidError::EmptyKeyId);
        }
        if self.keys.contains_key(kid) {
            return Err(JwtSvidError::DuplicateKeyId {
                kid: kid.to_owned(),
            });
        }
        self.keys.insert(kid.to_owned(), key);
        Ok(())
    }
}

impl JwtBundleSource for JwtBundle {
    /// This bundle, only when asked for its own trust domain.
    fn jwt_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        (self.trust_domain == *trust_domain).then_some(self)
    }
}

// === impl JwtBundleSet ===

impl JwtBundleSet {
    /// An empty set: every token is untrusted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bundle`, replacing (never merging with, B-10) any bundle of the same trust domain,
    /// which is returned.
    pub fn insert(&mut self, bundle: JwtBundle) -> Option<JwtBundle> {
        self.bundles.insert(bundle.trust_domain.clone(), bundle)
    }

    /// Removes the bundle of `trust_domain`, returning it.
    pub fn remove(&mut self, trust_domain: &TrustDomain) -> Option<JwtBundle> {
        self.bundles.remove(trust_domain)
    }

    /// The bundle of `trust_domain`.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        self.bundles.get(trust_domain)
    }

    /// The bundles, in trust domain order.
    pub fn iter(&self) -> impl Iterator<Item = &JwtBundle> {
        self.bundles.values()
    }

    /// How many trust domains have a bundle.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// True when the set holds no bundle.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

impl JwtBundleSource for JwtBundleSet {
    fn jwt_bundle_for(&self, trust_domain: &TrustDomain) -> Option<&JwtBundle> {
        self.bundles.get(trust_domain)
    }
}

impl FromIterator<JwtBundle> for JwtBundleSet {
    /// Collects bundles; a later bundle of the same trust domain replaces an earlier one.
    fn from_iter<I: IntoIterator<Item = JwtBundle>>(iter: I) -> Self {
        let mut set = Self::new();
        for bundle in iter {
            set.insert(bundle);
        }
        set
    }
}
