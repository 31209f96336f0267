//! Policy as code: each target's Cedar policies, validated against [`SCHEMA`] when loaded (a
//! policy that does not validate is refused, and a reload keeps the policies in force), and a
//! decision for every connection (`tcp`) and every request (`http`).
//!
//! The model (namespace `Sigil`):
//!
//! - principal `Sigil::Workload::"<SPIFFE ID>"`, attributes `trust_domain` and `path`, and, only
//!   for a session SVID, `session` (its id) and `ticket`;
//! - action `Sigil::Action::"connect"` (tcp) or `Sigil::Action::"<METHOD>"` (http: `GET`,
//!   `HEAD`, `POST`, `PUT`, `PATCH`, `DELETE`, `OPTIONS`); any other method is denied;
//! - resource `Sigil::Target::"<target name>"`;
//! - context `{ method, path }` for http requests, empty for tcp.
//!
//! A decision names the policies that made it (their `@id("...")` annotation when present,
//! else Cedar's `policy0`, `policy1`, ... in file order); the default deny names none.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use sigil_core::SpiffeId;

/// The schema every policy is validated against.
pub const SCHEMA: &str = r#"
namespace Sigil {
  entity Workload = {
    trust_domain: String,
    path: String,
    session?: String,
    ticket?: String,
  };
  entity Target;
  action connect appliesTo { principal: Workload, resource: Target };
  action "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS" appliesTo {
    principal: Workload,
    resource: Target,
    context: { method: String, path: String },
  };
}
"#;

/// The HTTP methods the schema knows; any other is denied without asking the policies.
pub(crate) const HTTP_METHODS: &[&str] =
    &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The policies do not parse or do not validate against the schema.
    #[error("policy file {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, as Cedar says it.
        reason: String,
    },
}

/// Who is asking, as the peer's certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Principal {
    /// The peer's SPIFFE ID.
    pub(crate) spiffe_id: SpiffeId,
    /// Its session's id and ticket, for a session SVID.
    pub(crate) session: Option<(String, String)>,
}

/// What was decided, and by which policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Allowed?
    pub(crate) allowed: bool,
    /// The ids of the policies that decided (empty for the default deny).
    pub(crate) policies: Vec<String>,
}

/// One target's policies, replaceable while the broker runs.
#[derive(Debug)]
pub(crate) struct TargetPolicy {
    target: String,
    path: PathBuf,
    schema: Arc<Schema>,
    policies: RwLock<Arc<PolicySet>>,
    authorizer: Authorizer,
}

impl TargetPolicy {
    /// Loads and validates `path` for `target`.
    ///
    /// # Errors
    ///
    /// [`PolicyError`].
    pub(crate) fn load(target: &str, path: &Path) -> Result<Self, PolicyError> {
        let schema = Arc::new(schema(path)?);
        let policies = read(path, &schema)?;
        Ok(Self {
            target: target.to_owned(),
            path: path.to_owned(),
            schema,
            policies: RwLock::new(Arc::new(policies)),
            authorizer: Authorizer::new(),
        })
    }

    /// Reads the file again; on any problem the policies in force stay and the error says why.
    ///
    /// # Errors
    ///
    /// [`PolicyError`].
    pub(crate) fn reload(&self) -> Result<usize, PolicyError> {
        let policies = read(&self.path, &self.schema)?;
        let count = policies.policies().count();
        *self
            .policies
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policies);
        Ok(count)
    }

    /// The policy file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Decides `action` (`connect`, or an HTTP method) by `principal` on this target, with the
    /// request's method and path for http. Anything Cedar cannot evaluate is a deny.
    pub(crate) fn decide(
        &self,
        principal: &Principal,
        action: &str,
        http: Option<(&str, &str)>,
    ) -> Verdict {
        let deny = Verdict {
            allowed: false,
            policies: Vec::new(),
        };
        if http.is_some() && !HTTP_METHODS.contains(&action) {
            return deny;
        }
        let Ok(request) = self.request(principal, action, http) else {
            return deny;
        };
        let Ok(entities) = self.entities(principal) else {
            return deny;
        };
        let policies = self
            .policies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let response = self
            .authorizer
            .is_authorized(&request, &policies, &entities);
        let mut ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        ids.sort();
        Verdict {
            allowed: response.decision() == Decision::Allow,
            policies: ids,
        }
    }

    fn request(
        &self,
        principal: &Principal,
        action: &str,
        http: Option<(&str, &str)>,
    ) -> Result<Request, Box<dyn std::error::Error>> {
        let context = match http {
            Some((method, path)) => Context::from_pairs([
                ("method".to_owned(), string(method)),
                ("path".to_owned(), string(path)),
            ])?,
            None => Context::empty(),
        };
        Ok(Request::new(
            uid("Sigil::Workload", principal.spiffe_id.as_str())?,
            uid("Sigil::Action", action)?,
            uid("Sigil::Target", &self.target)?,
            context,
            Some(&self.schema),
        )?)
    }

    fn entities(&self, principal: &Principal) -> Result<Entities, Box<dyn std::error::Error>> {
        let id = &principal.spiffe_id;
        let mut attrs = HashMap::from([
            ("trust_domain".to_owned(), string(id.trust_domain().name())),
            ("path".to_owned(), string(id.path())),
        ]);
        if let Some((session, ticket)) = &principal.session {
            attrs.insert("session".to_owned(), string(session));
            attrs.insert("ticket".to_owned(), string(ticket));
        }
        let workload = Entity::new(uid("Sigil::Workload", id.as_str())?, attrs, HashSet::new())?;
        let target = Entity::new_no_attrs(uid("Sigil::Target", &self.target)?, HashSet::new());
        Ok(Entities::from_entities(
            [workload, target],
            Some(&self.schema),
        )?)
    }
}

/// Loads and validates a policy file as the broker would; returns how many policies it holds.
///
/// # Errors
///
/// [`PolicyError`].
pub fn check_file(path: &Path) -> Result<usize, PolicyError> {
    let schema = schema(path)?;
    Ok(read(path, &schema)?.policies().count())
}

/// Decides `decisions` tcp connections of a session identity against the policy file, and
/// returns the decisions per second (for the benchmark harness, which must not link Cedar).
///
/// # Errors
///
/// [`PolicyError`].
pub fn decisions_per_second(path: &Path, decisions: u32) -> Result<f64, PolicyError> {
    let policy = TargetPolicy::load("bench", path)?;
    let principal = Principal {
        spiffe_id: SpiffeId::new("spiffe://bench.example/admin/db").map_err(|e| {
            PolicyError::Invalid {
                path: path.to_owned(),
                reason: e.to_string(),
            }
        })?,
        session: Some(("ab".repeat(16), "CHG-1".to_owned())),
    };
    let started = std::time::Instant::now();
    let mut allowed = 0u32;
    for _ in 0..decisions {
        allowed += u32::from(policy.decide(&principal, "connect", None).allowed);
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::debug!(allowed, decisions, "policy benchmark");
    Ok(f64::from(decisions) / seconds.max(f64::EPSILON))
}

fn schema(path: &Path) -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| PolicyError::Invalid {
            path: path.to_owned(),
            reason: format!("the built-in schema does not parse: {e}"),
        })
}

fn read(path: &Path, schema: &Schema) -> Result<PolicySet, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |reason: String| PolicyError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let parsed = PolicySet::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    // `@id("...")` names a policy in decisions and audit records.
    let mut policies = PolicySet::new();
    for policy in parsed.policies() {
        let id = policy
            .annotation("id")
            .map_or_else(|| policy.id().clone(), PolicyId::new);
        policies
            .add(policy.new_id(id))
            .map_err(|e| invalid(e.to_string()))?;
    }
    if parsed.templates().next().is_some() {
        return Err(invalid("templates are not supported".to_owned()));
    }
    let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
    if !result.validation_passed() {
        let errors: Vec<String> = result
            .validation_errors()
            .map(ToString::to_string)
            .collect();
        return Err(invalid(errors.join("; ")));
    }
    Ok(policies)
}

fn uid(kind: &str, id: &str) -> Result<EntityUid, Box<dyn std::error::Error>> {
    Ok(EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(kind)?,
        EntityId::new(id),
    ))
}

fn string(value: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(value.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("p.cedar");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn principal(id: &str, session: bool) -> Principal {
        Principal {
            spiffe_id: SpiffeId::new(id).unwrap(),
            session: session.then(|| ("ab".repeat(16), "CHG-1".to_owned())),
        }
    }

    #[test]
    fn the_schema_parses() {
        let (_schema, warnings) = Schema::from_cedarschema_str(SCHEMA).unwrap();
        assert_eq!(warnings.count(), 0);
    }

    #[test]
    fn decisions_follow_the_policies_and_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            r#"
@id("sessions-read")
permit(principal is Sigil::Workload, action == Sigil::Action::"GET", resource == Sigil::Target::"api")
when { principal has session && context.path like "/tables*" };
@id("no-drop")
forbid(principal, action == Sigil::Action::"DELETE", resource);
permit(principal, action == Sigil::Action::"connect", resource) when { principal has session };
"#,
        );
        let api = TargetPolicy::load("api", &path).unwrap();
        let session = principal("spiffe://example.org/admin/db", true);
        let standing = principal("spiffe://example.org/web", false);
        let get = api.decide(&session, "GET", Some(("GET", "/tables/1")));
        assert!(get.allowed);
        assert_eq!(get.policies, ["sessions-read"]);
        assert!(
            !api.decide(&standing, "GET", Some(("GET", "/tables/1")))
                .allowed
        );
        assert!(!api.decide(&session, "GET", Some(("GET", "/users"))).allowed);
        let drop = api.decide(&session, "DELETE", Some(("DELETE", "/tables")));
        assert!(!drop.allowed);
        assert_eq!(drop.policies, ["no-drop"]);
        // Outside the schema: denied without asking.
        assert!(!api.decide(&session, "BREW", Some(("BREW", "/pot"))).allowed);
        assert!(api.decide(&session, "connect", None).allowed);
        assert!(!api.decide(&standing, "connect", None).allowed);
    }

    #[test]
    fn a_bad_policy_is_refused_and_a_reload_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "permit(principal, action, resource);");
        let db = TargetPolicy::load("db", &path).unwrap();
        let anyone = principal("spiffe://example.org/web", false);
        assert!(db.decide(&anyone, "connect", None).allowed);
        for bad in [
            "permit(principal, action, resource",
            // Not in the schema: an attribute that does not exist.
            "permit(principal, action, resource) when { principal.colour == \"red\" };",
            // An unguarded optional attribute fails strict validation.
            "permit(principal, action, resource) when { principal.session == \"x\" };",
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = db.reload().unwrap_err();
            assert!(matches!(err, PolicyError::Invalid { .. }), "{bad}: {err}");
            assert!(
                db.decide(&anyone, "connect", None).allowed,
                "the old policy stays"
            );
            assert!(matches!(
                TargetPolicy::load("db", &path).unwrap_err(),
                PolicyError::Invalid { .. }
            ));
        }
        std::fs::write(&path, "forbid(principal, action, resource);").unwrap();
        assert_eq!(db.reload().unwrap(), 1);
        assert!(!db.decide(&anyone, "connect", None).allowed);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(db.reload().unwrap_err(), PolicyError::Read { .. }));
    }
}
