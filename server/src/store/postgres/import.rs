//! Bulk import into an empty database, in one transaction (`store migrate`).

use deadpool_postgres::ClientWrapper;

use super::{PostgresStore, col, db_error, encode, millis, nanos, to_i64, to_u64};
use crate::audit::{AuditCheckpoint, AuditHead, AuditRecord, AuditSource};
use crate::store::{
    AttestedNode, Change, FederatedBundle, JoinToken, RegistrationEntry, Revocation, Session,
    StoreError,
};

/// Every table a migration fills; all locked for the import.
const TABLES: &str = "feed_head, entries, entry_changes, nodes, join_tokens, federated_bundles, \
                      federations, ca_journals, audit_heads, audit_records, audit_checkpoints, audit_sources, \
                      sessions, revocations, crl_numbers";

/// An import under way: one open transaction on a connection of its own (taken out of the
/// pool, so an import that is dropped half-way never hands a connection in a transaction to
/// anyone; the connection closes with it and PostgreSQL rolls back).
pub(crate) struct Import {
    client: ClientWrapper,
}

impl std::fmt::Debug for Import {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Import").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Starts an import: locks every table and checks that the database holds nothing (the
    /// feed at revision 0, no row in any table). Refuses a database that holds anything.
    pub(crate) async fn begin_import(&self) -> Result<Import, StoreError> {
        let client = deadpool_postgres::Object::take(self.client().await?);
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL SERIALIZABLE; LOCK TABLE {TABLES} IN EXCLUSIVE MODE"
            ))
            .await
            .map_err(db_error)?;
        let row = client
            .query_one(
                "SELECT (SELECT revision FROM feed_head WHERE id = 1), \
                 (SELECT count(*) FROM entries) + (SELECT count(*) FROM entry_changes) \
                 + (SELECT count(*) FROM nodes) + (SELECT count(*) FROM join_tokens) \
                 + (SELECT count(*) FROM federated_bundles) + (SELECT count(*) FROM federations) \
                 + (SELECT count(*) FROM ca_journals) \
                 + (SELECT count(*) FROM audit_records) + (SELECT count(*) FROM audit_heads) \
                 + (SELECT count(*) FROM audit_checkpoints) \
                 + (SELECT count(*) FROM audit_sources) + (SELECT count(*) FROM sessions) \
                 + (SELECT count(*) FROM revocations) + (SELECT count(*) FROM crl_numbers)",
                &[],
            )
            .await
            .map_err(db_error)?;
        let counts = |i: usize| {
            row.try_get::<_, Option<i64>>(i)
                .map_err(db_error)?
                .ok_or_else(|| StoreError::Corrupt {
                    what: "feed head",
                    reason: "the counter row is missing".to_owned(),
                })
        };
        let revision = counts(0)?;
        let rows = counts(1)?;
        if revision != 0 || rows != 0 {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(StoreError::Config(format!(
                "the target database is not empty (feed revision {revision}, {rows} rows): \
                 migrate into a new, empty database (a server that ran on it already wrote \
                 there; nothing was changed)"
            )));
        }
        Ok(Import { client })
    }
}

impl Import {
    pub(crate) async fn entries(
        &mut self,
        entries: &[RegistrationEntry],
    ) -> Result<(), StoreError> {
        let statement = self
            .client
            .prepare(
                "INSERT INTO entries \
                 (id, identity_key, spiffe_id, parent_id, selectors, revision, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await
            .map_err(db_error)?;
        for entry in entries {
            let identity = entry.to_new().identity_key();
            let selectors: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
            self.client
                .execute(
                    &statement,
                    &[
                        &entry.id.as_str(),
                        &identity.as_slice(),
                        &entry.spiffe_id.as_str(),
                        &entry.parent_id.as_str(),
                        &selectors,
                        &to_i64("revision", entry.revision)?,
                        &encode("entry", entry)?,
                    ],
                )
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    pub(crate) async fn changes(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let mut revisions = Vec::with_capacity(changes.len());
        let mut bodies = Vec::with_capacity(changes.len());
        for change in changes {
            revisions.push(to_i64("revision", change.revision)?);
            bodies.push(encode("change", change)?);
        }
        self.client
            .execute(
                "INSERT INTO entry_changes (revision, body) \
                 SELECT * FROM unnest($1::bigint[], $2::text[])",
                &[&revisions, &bodies],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn nodes(&mut self, nodes: &[AttestedNode]) -> Result<(), StoreError> {
        let mut keys = Vec::with_capacity(nodes.len());
        let mut bodies = Vec::with_capacity(nodes.len());
        for node in nodes {
            keys.push(node.spiffe_id.as_str().to_owned());
            bodies.push(encode("node", node)?);
        }
        self.client
            .execute(
                "INSERT INTO nodes (spiffe_id, body) SELECT * FROM unnest($1::text[], $2::text[])",
                &[&keys, &bodies],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn join_tokens(&mut self, tokens: &[JoinToken]) -> Result<(), StoreError> {
        let mut hashes = Vec::with_capacity(tokens.len());
        let mut expiries = Vec::with_capacity(tokens.len());
        let mut bodies = Vec::with_capacity(tokens.len());
        for token in tokens {
            hashes.push(token.token_hash.clone());
            expiries.push(nanos(token.expires_at));
            bodies.push(encode("join token", token)?);
        }
        self.client
            .execute(
                "INSERT INTO join_tokens (token_hash, expires_at_ns, body) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])",
                &[&hashes, &expiries, &bodies],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn bundles(&mut self, bundles: &[FederatedBundle]) -> Result<(), StoreError> {
        let mut names = Vec::with_capacity(bundles.len());
        let mut bodies = Vec::with_capacity(bundles.len());
        for bundle in bundles {
            names.push(bundle.trust_domain.name().to_owned());
            bodies.push(encode("federated bundle", bundle)?);
        }
        self.client
            .execute(
                "INSERT INTO federated_bundles (trust_domain, body) \
                 SELECT * FROM unnest($1::text[], $2::text[])",
                &[&names, &bodies],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn federations(
        &mut self,
        relationships: &[crate::store::FederationRelationship],
    ) -> Result<(), StoreError> {
        let mut names = Vec::with_capacity(relationships.len());
        let mut bodies = Vec::with_capacity(relationships.len());
        for relationship in relationships {
            names.push(relationship.trust_domain.name().to_owned());
            bodies.push(encode("federation relationship", relationship)?);
        }
        self.client
            .execute(
                "INSERT INTO federations (trust_domain, body) \
                 SELECT * FROM unnest($1::text[], $2::text[])",
                &[&names, &bodies],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn ca_journals(
        &mut self,
        journals: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        for (server_id, journal) in journals {
            self.client
                .execute(
                    "INSERT INTO ca_journals (server_id, journal) VALUES ($1, $2)",
                    &[server_id, journal],
                )
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    /// Audit records exactly as sealed (sequence, time and hashes kept).
    pub(crate) async fn audit_records(
        &mut self,
        records: &[AuditRecord],
    ) -> Result<(), StoreError> {
        let mut chains = Vec::with_capacity(records.len());
        let mut sequences = Vec::with_capacity(records.len());
        let mut times = Vec::with_capacity(records.len());
        let mut bodies = Vec::with_capacity(records.len());
        for record in records {
            chains.push(record.chain_id.clone());
            sequences.push(to_i64("audit sequence", record.sequence)?);
            times.push(millis(record.time));
            bodies.push(encode("audit record", record)?);
        }
        self.client
            .execute(
                "INSERT INTO audit_records (chain_id, sequence, time_ms, body) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[])",
                &[&chains, &sequences, &times, &bodies],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn audit_head(&mut self, head: &AuditHead) -> Result<(), StoreError> {
        self.client
            .execute(
                "INSERT INTO audit_heads (chain_id, sequence, body) VALUES ($1, $2, $3)",
                &[
                    &head.chain_id,
                    &to_i64("audit sequence", head.sequence)?,
                    &encode("audit head", head)?,
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn audit_checkpoints(
        &mut self,
        checkpoints: &[AuditCheckpoint],
    ) -> Result<(), StoreError> {
        for checkpoint in checkpoints {
            self.client
                .execute(
                    "INSERT INTO audit_checkpoints (chain_id, sequence, body) VALUES ($1, $2, $3)",
                    &[
                        &checkpoint.chain_id,
                        &to_i64("audit checkpoint", checkpoint.sequence)?,
                        &encode("audit checkpoint", checkpoint)?,
                    ],
                )
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    pub(crate) async fn audit_sources(
        &mut self,
        sources: &[(AuditSource, u64)],
    ) -> Result<(), StoreError> {
        for (source, last) in sources {
            self.client
                .execute(
                    "INSERT INTO audit_sources (spiffe_id, spool_id, last_sequence) \
                     VALUES ($1, $2, $3)",
                    &[
                        &source.spiffe_id,
                        &source.spool_id,
                        &to_i64("audit source", *last)?,
                    ],
                )
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    pub(crate) async fn sessions(&mut self, sessions: &[Session]) -> Result<(), StoreError> {
        let mut ids = Vec::with_capacity(sessions.len());
        let mut bodies = Vec::with_capacity(sessions.len());
        for session in sessions {
            ids.push(session.id.as_str().to_owned());
            bodies.push(encode("session", session)?);
        }
        self.client
            .execute(
                "INSERT INTO sessions (id, body) SELECT * FROM unnest($1::text[], $2::text[])",
                &[&ids, &bodies],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn revocations(
        &mut self,
        revocations: &[Revocation],
    ) -> Result<(), StoreError> {
        let (serials, not_afters, bodies) = super::store::revocation_columns(revocations)?;
        self.client
            .execute(
                "INSERT INTO revocations (serial, not_after_ns, body) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])",
                &[&serials, &not_afters, &bodies],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    pub(crate) async fn crl_numbers(
        &mut self,
        numbers: &[(String, u64)],
    ) -> Result<(), StoreError> {
        for (authority, last) in numbers {
            self.client
                .execute(
                    "INSERT INTO crl_numbers (authority_id, last_number) VALUES ($1, $2)",
                    &[authority, &to_i64("crl number", *last)?],
                )
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    /// The entries imported so far.
    pub(crate) async fn count_entries(&mut self) -> Result<u64, StoreError> {
        let row = self
            .client
            .query_one("SELECT count(*) FROM entries", &[])
            .await
            .map_err(db_error)?;
        to_u64("entry count", col(&row, 0)?)
    }

    /// Sets the feed counter to `revision` and commits everything.
    pub(crate) async fn commit(self, revision: u64) -> Result<(), StoreError> {
        self.client
            .execute(
                "UPDATE feed_head SET revision = $1 WHERE id = 1",
                &[&to_i64("revision", revision)?],
            )
            .await
            .map_err(db_error)?;
        self.client.batch_execute("COMMIT").await.map_err(db_error)
    }

    /// Abandons the import: nothing was written.
    pub(crate) async fn rollback(self) {
        let _ = self.client.batch_execute("ROLLBACK").await;
    }
}
