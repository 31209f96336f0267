//! Registration entries: what an operator may register, written to the store and audited in
//! one place.
//!
//! An entry grants a workload ID ([`policy::check_workload_id`]) to workloads that present its
//! selectors under its parent. Every problem with an entry is reported at once, as sentences
//! for the operator. Entries that carry a privileged session change only through the session
//! calls. Every change is audited once it is made (actor `uid:N`); if that append fails the
//! caller is told that the change stands unaudited.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use sigil_core::TrustDomain;
use tracing::info;

use crate::audit::{NewAuditRecord, action, uid_actor};
use crate::policy::{self, SessionOnly};
use crate::service::audit::AuditLog;
use crate::store::{
    EntryFilter, EntryId, NewEntry, Page, PageRequest, RegistrationEntry, SessionId, Store,
    StoreError,
};

/// The longest entry hint (WA-9).
pub(crate) const MAX_HINT_LEN: usize = 1024;

/// Most entries one create call may carry.
pub(crate) const MAX_ENTRIES_PER_CALL: usize = 10_000;

/// Federated trust domains one entry may name.
pub(crate) const MAX_FEDERATES_WITH: usize = 16;

/// Why an entry call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum EntryError {
    /// The entry breaks a rule; the message lists every problem.
    #[error("{0}")]
    Invalid(String),
    /// Too many entries in one call.
    #[error("{count} entries in one call; the maximum is {MAX_ENTRIES_PER_CALL}")]
    TooMany {
        /// How many were sent.
        count: usize,
    },
    /// No entry with this id.
    #[error("no entry with id {0}")]
    NotFound(EntryId),
    /// The entry carries a privileged session.
    #[error(
        "entry {entry} belongs to privileged session {session}: use `session close` or `session revoke`"
    )]
    SessionEntry {
        /// The entry.
        entry: EntryId,
        /// Its session.
        session: SessionId,
    },
    /// The change was made but its audit record could not be written.
    #[error("the change was made, but its audit record could not be written: {0}")]
    AuditAfterChange(StoreError),
    /// The store failed (or refused: a duplicate, an unknown id).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The entry service.
#[derive(Debug)]
pub(crate) struct Entries {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    trust_domain: TrustDomain,
    session_only: SessionOnly,
}

// === impl Entries ===

impl Entries {
    /// The service for `trust_domain`'s entries in `store`, audited to `audit`; no entry may
    /// name an ID under `session_only`.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        trust_domain: TrustDomain,
        session_only: SessionOnly,
    ) -> Self {
        Self {
            store,
            audit,
            trust_domain,
            session_only,
        }
    }

    /// Creates `entries` for admin `uid` with one durable write; one result per input, in
    /// order. The created ones are audited with one append.
    ///
    /// # Errors
    ///
    /// [`EntryError::TooMany`]; a store failure that leaves the batch unknown;
    /// [`EntryError::AuditAfterChange`].
    pub(crate) async fn create(
        &self,
        uid: u32,
        entries: Vec<NewEntry>,
        now: SystemTime,
    ) -> Result<Vec<Result<RegistrationEntry, EntryError>>, EntryError> {
        if entries.len() > MAX_ENTRIES_PER_CALL {
            return Err(EntryError::TooMany {
                count: entries.len(),
            });
        }
        let known = self.federated_trust_domains(&entries).await?;
        let checked: Vec<Result<NewEntry, EntryError>> = entries
            .into_iter()
            .map(|e| {
                self.check(&e, now)?;
                check_federated(&e, &known)?;
                Ok(e)
            })
            .collect();
        let valid: Vec<NewEntry> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok().cloned())
            .collect();
        let mut stored = self.store.create_entries(valid).await?.into_iter();
        let mut results = Vec::with_capacity(checked.len());
        let mut records = Vec::new();
        for outcome in checked {
            results.push(match outcome {
                Err(e) => Err(e),
                Ok(_) => match stored.next() {
                    Some(Ok(entry)) => {
                        records.push(entry_record(uid, action::ENTRY_CREATE, &entry));
                        Ok(entry)
                    }
                    Some(Err(e)) => Err(EntryError::Store(e)),
                    None => Err(EntryError::Store(StoreError::Corrupt {
                        what: "entry batch",
                        reason: "the store returned fewer results than entries".to_owned(),
                    })),
                },
            });
        }
        let created = records.len();
        self.audit
            .after_change(records)
            .await
            .map_err(EntryError::AuditAfterChange)?;
        info!(uid, requested = results.len(), created, "entries created");
        Ok(results)
    }

    /// One page of the entries that pass `filter`.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn list(
        &self,
        filter: &EntryFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationEntry>, EntryError> {
        Ok(self.store.list_entries(filter, page).await?)
    }

    /// The entry `id`.
    ///
    /// # Errors
    ///
    /// [`EntryError::NotFound`]; the store's.
    pub(crate) async fn get(&self, id: &EntryId) -> Result<RegistrationEntry, EntryError> {
        self.store
            .get_entry(id)
            .await?
            .ok_or_else(|| EntryError::NotFound(id.clone()))
    }

    /// The number of entries.
    ///
    /// # Errors
    ///
    /// The store's.
    pub(crate) async fn count(&self) -> Result<u64, EntryError> {
        Ok(self.store.count_entries().await?)
    }

    /// Replaces the operator-set fields of entry `id` for admin `uid`.
    ///
    /// # Errors
    ///
    /// [`EntryError::Invalid`]; [`EntryError::SessionEntry`]; the store's (not found,
    /// duplicate); [`EntryError::AuditAfterChange`].
    pub(crate) async fn update(
        &self,
        uid: u32,
        id: &EntryId,
        entry: NewEntry,
        now: SystemTime,
    ) -> Result<RegistrationEntry, EntryError> {
        self.check(&entry, now)?;
        let known = self
            .federated_trust_domains(std::slice::from_ref(&entry))
            .await?;
        check_federated(&entry, &known)?;
        self.refuse_session_entry(id).await?;
        let entry = self.store.update_entry(id, entry).await?;
        self.audit
            .after_change(vec![entry_record(uid, action::ENTRY_UPDATE, &entry)])
            .await
            .map_err(EntryError::AuditAfterChange)?;
        info!(uid, entry_id = %id.as_str(), "entry updated");
        Ok(entry)
    }

    /// Deletes entry `id` for admin `uid`; returns its last version.
    ///
    /// # Errors
    ///
    /// [`EntryError::SessionEntry`]; the store's; [`EntryError::AuditAfterChange`].
    pub(crate) async fn delete(
        &self,
        uid: u32,
        id: &EntryId,
    ) -> Result<RegistrationEntry, EntryError> {
        self.refuse_session_entry(id).await?;
        let entry = self.store.delete_entry(id).await?;
        self.audit
            .after_change(vec![entry_record(uid, action::ENTRY_DELETE, &entry)])
            .await
            .map_err(EntryError::AuditAfterChange)?;
        info!(uid, entry_id = %id.as_str(), "entry deleted");
        Ok(entry)
    }

    /// Every rule an entry must obey, all problems at once.
    fn check(&self, entry: &NewEntry, now: SystemTime) -> Result<(), EntryError> {
        let mut problems = Vec::new();
        if let Err(e) = policy::check_workload_id(&self.trust_domain, &entry.spiffe_id) {
            problems.push(format!("spiffe_id {e}"));
        }
        if let Err(e) = self.session_only.refuse(&entry.spiffe_id, "an entry") {
            problems.push(e);
        }
        if !entry.parent_id.is_member_of(&self.trust_domain) {
            problems.push(format!(
                "parent_id {} is not in trust domain {}",
                entry.parent_id, self.trust_domain
            ));
        }
        if entry.selectors.is_empty() {
            problems.push("at least one selector is required".to_owned());
        }
        // Parented to the server: a node alias, for every agent whose node has its selectors.
        if policy::server_id(&self.trust_domain).is_ok_and(|server| server == entry.parent_id) {
            let not_node: Vec<String> = entry
                .selectors
                .iter()
                .filter(|s| !policy::NODE_SELECTOR_TYPES.contains(&s.kind()))
                .map(ToString::to_string)
                .collect();
            if !not_node.is_empty() {
                problems.push(format!(
                    "an entry parented to the server ({}) is a node alias: its selectors must be node selectors ({}:...), not {}",
                    entry.parent_id,
                    policy::NODE_SELECTOR_TYPES.join(":..., "),
                    not_node.join(", ")
                ));
            }
        }
        for name in &entry.dns_names {
            if let Err(e) = policy::check_dns_name(name) {
                problems.push(e.to_string());
            }
        }
        let size = policy::entry_wire_size(
            &entry.spiffe_id,
            &entry.parent_id,
            &entry.selectors,
            &entry.dns_names,
            &entry.hint,
        );
        if size > policy::MAX_ENTRY_WIRE_BYTES {
            problems.push(format!(
                "the entry takes about {size} bytes; the maximum is {} (fewer or shorter \
                 selectors and DNS names)",
                policy::MAX_ENTRY_WIRE_BYTES
            ));
        }
        if entry.hint.len() > MAX_HINT_LEN {
            problems.push(format!(
                "hint is {} bytes; the maximum is {MAX_HINT_LEN}",
                entry.hint.len()
            ));
        }
        if entry.expires_at.is_some_and(|at| at <= now) {
            problems.push("expires_at is in the past".to_owned());
        }
        if entry.session_id.is_some() {
            problems.push("session entries are made by `session open` only".to_owned());
        }
        let mut federated = std::collections::BTreeSet::new();
        for td in &entry.federates_with {
            if td == &self.trust_domain {
                problems.push(format!(
                    "federates_with {td}: the entry's own trust domain is always trusted"
                ));
            } else if !federated.insert(td) {
                problems.push(format!("federates_with {td} is given twice"));
            }
        }
        if entry.federates_with.len() > MAX_FEDERATES_WITH {
            problems.push(format!(
                "federates_with names {} trust domains; the maximum is {MAX_FEDERATES_WITH}",
                entry.federates_with.len()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(EntryError::Invalid(problems.join("; ")))
        }
    }

    /// The federated trust domains the store knows (a relationship or a bundle), when any of
    /// `entries` federates with one (else no store call).
    async fn federated_trust_domains(
        &self,
        entries: &[NewEntry],
    ) -> Result<BTreeSet<TrustDomain>, EntryError> {
        let mut known = BTreeSet::new();
        if entries.iter().all(|e| e.federates_with.is_empty()) {
            return Ok(known);
        }
        for relationship in self.store.list_federations().await? {
            known.insert(relationship.trust_domain);
        }
        for bundle in self.store.list_federated_bundles().await? {
            known.insert(bundle.trust_domain);
        }
        Ok(known)
    }

    /// Session entries change only through the session calls.
    async fn refuse_session_entry(&self, id: &EntryId) -> Result<(), EntryError> {
        if let Some(entry) = self.store.get_entry(id).await?
            && let Some(session) = entry.session_id
        {
            return Err(EntryError::SessionEntry {
                entry: id.clone(),
                session,
            });
        }
        Ok(())
    }
}

/// The audit record of an entry change.
/// Refuses an entry that federates with a trust domain the server has neither a relationship
/// with nor a bundle of (a typo would otherwise give its workloads nothing, silently).
fn check_federated(entry: &NewEntry, known: &BTreeSet<TrustDomain>) -> Result<(), EntryError> {
    let unknown: Vec<String> = entry
        .federates_with
        .iter()
        .filter(|td| !known.contains(*td))
        .map(ToString::to_string)
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(EntryError::Invalid(format!(
            "federates_with names trust domains this server has no federation relationship \
             with and no bundle of: {} (sigil-server federation create, or bundle set)",
            unknown.join(", ")
        )))
    }
}

fn entry_record(uid: u32, action: &str, entry: &RegistrationEntry) -> NewAuditRecord {
    let record = NewAuditRecord::new(uid_actor(uid), action, entry.id.as_str())
        .detail("spiffe_id", entry.spiffe_id.to_string())
        .detail("parent_id", entry.parent_id.to_string())
        .detail(
            "selectors",
            entry
                .selectors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )
        .detail("revision", entry.revision);
    if entry.federates_with.is_empty() {
        record
    } else {
        record.detail(
            "federates_with",
            entry
                .federates_with
                .iter()
                .map(TrustDomain::to_string)
                .collect::<Vec<_>>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sigil_core::{SelectorSet, SpiffeId};

    use super::*;
    use crate::audit::AuditFilter;
    use crate::service::testing::{Fixture, bulky_entry, entry};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_too_large_for_a_sync_page_is_refused() {
        let fx = Fixture::new().await;
        let agent = SpiffeId::new("spiffe://example.org/sigil/agent/join_token/a").unwrap();
        let results = fx
            .entries
            .create(
                0,
                vec![
                    bulky_entry("spiffe://example.org/big", &agent, 70),
                    bulky_entry("spiffe://example.org/fits", &agent, 60),
                ],
                SystemTime::now(),
            )
            .await
            .unwrap();
        let refused = results[0].as_ref().unwrap_err().to_string();
        assert!(refused.contains("the maximum is 262144"), "{refused}");
        assert!(results[1].is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_parented_to_the_server_are_node_aliases_with_node_selectors_only() {
        let fx = Fixture::new().await;
        let server = SpiffeId::new("spiffe://example.org/sigil/server").unwrap();
        let sel = |s: &str| sigil_core::Selector::parse(s).unwrap();
        let alias = |selectors: &[&str]| {
            NewEntry::new(
                SpiffeId::new("spiffe://example.org/nodes/web").unwrap(),
                server.clone(),
                selectors.iter().map(|s| sel(s)).collect(),
            )
        };
        let results = fx
            .entries
            .create(
                0,
                vec![
                    alias(&["x509pop:subject:cn:web", "unix:uid:0"]),
                    alias(&["x509pop:subject:cn:web"]),
                ],
                SystemTime::now(),
            )
            .await
            .unwrap();
        let refused = results[0].as_ref().unwrap_err().to_string();
        assert!(
            refused.contains("is a node alias") && refused.contains("not unix:uid:0"),
            "{refused}"
        );
        assert!(results[1].is_ok());
    }

    fn new_entry(id: &str) -> NewEntry {
        let agent = SpiffeId::new("spiffe://example.org/sigil/agent/join_token/a").unwrap();
        entry(id, &agent)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_checks_each_entry_stores_the_valid_ones_and_audits_them() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let mut bad = new_entry("spiffe://other.org/web");
        bad.dns_names = vec!["a*b.example.org".to_owned()];
        bad.hint = "h".repeat(MAX_HINT_LEN + 1);
        bad.selectors = SelectorSet::new();
        bad.expires_at = Some(now - Duration::from_secs(1));
        let reserved = new_entry("spiffe://example.org/sigil/server");
        let results = fx
            .entries
            .create(
                0,
                vec![new_entry("spiffe://example.org/web"), bad, reserved],
                now,
            )
            .await
            .unwrap();
        assert_eq!(results.len(), 3);
        let created = results[0].as_ref().unwrap();
        let Err(EntryError::Invalid(message)) = &results[1] else {
            panic!("{:?}", results[1]);
        };
        for problem in [
            "not in trust domain example.org",
            "a*b.example.org",
            "hint is 1025 bytes",
            "at least one selector",
            "expires_at is in the past",
        ] {
            assert!(message.contains(problem), "{problem}: {message}");
        }
        assert!(matches!(&results[2], Err(EntryError::Invalid(m)) if m.contains("reserved")));
        assert_eq!(fx.entries.count().await.unwrap(), 1);
        assert_eq!(fx.entries.get(&created.id).await.unwrap(), *created);

        let audited = fx
            .audit_records(AuditFilter {
                action: Some(action::ENTRY_CREATE.to_owned()),
                ..AuditFilter::default()
            })
            .await;
        assert_eq!(audited.len(), 1);
        assert_eq!(audited[0].subject, created.id.as_str());
        assert_eq!(audited[0].actor, "uid:0");

        // A duplicate is refused by the store, per entry.
        let again = fx
            .entries
            .create(0, vec![new_entry("spiffe://example.org/web")], now)
            .await
            .unwrap();
        assert!(matches!(
            &again[0],
            Err(EntryError::Store(StoreError::AlreadyExists { .. }))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn too_many_entries_in_one_call_are_refused_whole() {
        let fx = Fixture::new().await;
        let many = vec![new_entry("spiffe://example.org/web"); MAX_ENTRIES_PER_CALL + 1];
        let err = fx
            .entries
            .create(0, many, SystemTime::now())
            .await
            .unwrap_err();
        assert!(matches!(err, EntryError::TooMany { count } if count == MAX_ENTRIES_PER_CALL + 1));
        assert_eq!(fx.entries.count().await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn update_and_delete_are_audited_and_unknown_ids_are_not_found() {
        let fx = Fixture::new().await;
        let now = SystemTime::now();
        let created = fx
            .entries
            .create(7, vec![new_entry("spiffe://example.org/web")], now)
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        let mut changed = created.to_new();
        changed.hint = "web".to_owned();
        let updated = fx
            .entries
            .update(7, &created.id, changed, now)
            .await
            .unwrap();
        assert_eq!(updated.hint, "web");
        assert!(updated.revision > created.revision);
        let invalid = new_entry("spiffe://example.org");
        assert!(matches!(
            fx.entries.update(7, &created.id, invalid, now).await,
            Err(EntryError::Invalid(_))
        ));
        let deleted = fx.entries.delete(7, &created.id).await.unwrap();
        assert_eq!(deleted.id, created.id);
        assert!(matches!(
            fx.entries.get(&created.id).await,
            Err(EntryError::NotFound(_))
        ));
        assert!(matches!(
            fx.entries.delete(7, &created.id).await,
            Err(EntryError::Store(StoreError::NotFound { .. }))
        ));
        let actions = fx
            .audit_actions(AuditFilter {
                actor: Some("uid:7".to_owned()),
                ..AuditFilter::default()
            })
            .await;
        assert_eq!(
            actions,
            [
                action::ENTRY_CREATE,
                action::ENTRY_UPDATE,
                action::ENTRY_DELETE
            ]
        );
    }
}
