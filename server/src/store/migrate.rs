//! `sigil-server store migrate`: copies a (stopped) server's sled store into an empty
//! PostgreSQL database, in one database transaction.
//!
//! Everything is copied as it is, not replayed: entries keep their ids, revisions and creation
//! times; the feed counter takes the sled store's revision and the retained changes come along,
//! so an agent resuming its sync from a revision the old server gave it continues exactly where
//! it was; the audit chain keeps every record's sequence, time and hashes, with its checkpoints
//! and the brokers' source sequences, so `audit verify` checks the copy against the signatures
//! made before the move. CA journals, CRL numbers, sessions, revocations, nodes, join tokens
//! (hashed) and federated bundles come along too. The target must be empty (a fresh database or
//! one the server only migrated the schema of): a second run is refused, never merged.

use std::fmt;

use super::postgres::{Import, PostgresStore};
use super::sled::SledStore;
use super::{PageRequest, Store, StoreError};
use crate::audit::AuditFilter;
use crate::store::{MAX_PAGE_SIZE, SessionFilter};

/// What a migration copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    /// The feed revision the target continues from.
    pub revision: u64,
    /// Registration entries.
    pub entries: usize,
    /// Retained changes of the feed.
    pub changes: usize,
    /// Attested nodes.
    pub nodes: usize,
    /// Unused join tokens.
    pub join_tokens: usize,
    /// Federated bundles.
    pub bundles: usize,
    /// Federation relationships.
    pub federations: usize,
    /// CA journals.
    pub ca_journals: usize,
    /// Audit records.
    pub audit_records: usize,
    /// Signed audit checkpoints.
    pub audit_checkpoints: usize,
    /// Privileged sessions.
    pub sessions: usize,
    /// Revoked serials.
    pub revocations: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "revision {}: {} entries, {} feed changes, {} agents, {} join tokens, {} federated \
             bundles, {} federation relationships, {} CA journals, {} audit records, {} audit checkpoints, {} sessions, {} \
             revocations",
            self.revision,
            self.entries,
            self.changes,
            self.nodes,
            self.join_tokens,
            self.bundles,
            self.federations,
            self.ca_journals,
            self.audit_records,
            self.audit_checkpoints,
            self.sessions,
            self.revocations
        )
    }
}

/// Copies everything in `from` into the empty `to` (see the module docs). Nothing is written
/// to `to` unless everything is.
pub(crate) async fn sled_to_postgres(
    from: &SledStore,
    to: &PostgresStore,
) -> Result<Report, StoreError> {
    let mut import = to.begin_import().await?;
    let result = copy(from, &mut import).await;
    match result {
        Ok(report) => {
            import.commit(report.revision).await.map_err(|e| {
                StoreError::Unavailable(format!(
                    "the final commit failed ({e}): the migration may or may not have been \
                     written; run it again: it copies everything or is refused because the \
                     database holds the copy"
                ))
            })?;
            Ok(report)
        }
        Err(e) => {
            import.rollback().await;
            Err(e)
        }
    }
}

fn mismatch(reason: String) -> StoreError {
    StoreError::Corrupt {
        what: "migration",
        reason,
    }
}

async fn copy(from: &SledStore, import: &mut Import) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let extras = from.export_extras().await?;

    let snapshot = from.snapshot_entries().await?;
    report.revision = snapshot.revision;
    report.entries = snapshot.entries.len();
    import.entries(&snapshot.entries).await?;
    let changes: Vec<_> = extras
        .changes
        .into_iter()
        .filter(|c| c.revision <= snapshot.revision)
        .collect();
    report.changes = changes.len();
    import.changes(&changes).await?;

    let mut page = PageRequest::first(MAX_PAGE_SIZE);
    loop {
        let nodes = from.list_nodes(&page).await?;
        report.nodes += nodes.items.len();
        import.nodes(&nodes.items).await?;
        match nodes.next_page_token {
            Some(token) => page = PageRequest::after(MAX_PAGE_SIZE, token),
            None => break,
        }
    }
    report.join_tokens = extras.join_tokens.len();
    import.join_tokens(&extras.join_tokens).await?;
    let bundles = from.list_federated_bundles().await?;
    report.bundles = bundles.len();
    import.bundles(&bundles).await?;
    let federations = from.list_federations().await?;
    report.federations = federations.len();
    import.federations(&federations).await?;
    report.ca_journals = extras.ca_journals.len();
    import.ca_journals(&extras.ca_journals).await?;

    let mut page = PageRequest::first(MAX_PAGE_SIZE);
    loop {
        let records = from.list_audit(&AuditFilter::default(), &page).await?;
        report.audit_records += records.items.len();
        import.audit_records(&records.items).await?;
        match records.next_page_token {
            Some(token) => page = PageRequest::after(MAX_PAGE_SIZE, token),
            None => break,
        }
    }
    if let Some(head) = from.audit_head().await? {
        import.audit_head(&head).await?;
    }
    let checkpoints = from.list_audit_checkpoints(0, usize::MAX).await?;
    report.audit_checkpoints = checkpoints.len();
    import.audit_checkpoints(&checkpoints).await?;
    import.audit_sources(&extras.audit_sources).await?;

    let mut page = PageRequest::first(MAX_PAGE_SIZE);
    loop {
        let sessions = from.list_sessions(&SessionFilter::default(), &page).await?;
        report.sessions += sessions.items.len();
        import.sessions(&sessions.items).await?;
        match sessions.next_page_token {
            Some(token) => page = PageRequest::after(MAX_PAGE_SIZE, token),
            None => break,
        }
    }
    let revocations = from.list_revocations().await?;
    report.revocations = revocations.len();
    import.revocations(&revocations).await?;
    import.crl_numbers(&extras.crl_numbers).await?;

    // The copy is checked before it commits: the same entries as the source, an audit chain
    // that ends at the source's head, and a feed that ends at the revision it continues from.
    let copied = import.count_entries().await?;
    let expected = from.count_entries().await?;
    if copied != expected {
        return Err(mismatch(format!(
            "{copied} entries copied, the source has {expected}"
        )));
    }
    let head = from.audit_head().await?;
    let head_sequence = head.as_ref().map_or(0, |h| h.sequence);
    if report.audit_records as u64 != head_sequence {
        return Err(mismatch(format!(
            "{} audit records copied, the source's chain ends at record {head_sequence}",
            report.audit_records
        )));
    }
    let contiguous = changes
        .windows(2)
        .all(|w| w[1].revision == w[0].revision + 1)
        && changes.last().is_none_or(|c| c.revision == report.revision);
    if !contiguous {
        return Err(mismatch(
            "the source's change feed has a gap or does not end at its revision".to_owned(),
        ));
    }
    Ok(report)
}
