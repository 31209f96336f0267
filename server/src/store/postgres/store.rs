//! [`Store`] on PostgreSQL: each call is one statement or one transaction (see the module docs
//! for the feed counter, snapshots and lock order).

use std::time::SystemTime;

use async_trait::async_trait;
use sigil_core::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::{
    FEED_CHANNEL, PostgresStore, col, db_error, decode, encode, is_unique_violation, millis, nanos,
    page_token, to_i64, to_u64, token_key,
};
use crate::audit::{
    AuditCheckpoint, AuditFilter, AuditHead, AuditRecord, AuditSource, GENESIS_HASH,
    NewAuditRecord, SourceAppend, SourceEvent,
};
use crate::store::{
    AttestedNode, Change, ChangeKind, ChangesSince, CrlCounters, EntryFilter, EntryId,
    EntrySnapshot, FederatedBundle, FederationRelationship, FetchStatus, JobWork, JoinToken,
    MAX_CHANGES_PER_CALL, NewEntry, Page, PageRequest, Put, RegistrationEntry, Revocation,
    ServerBundles, Session, SessionCredential, SessionEntryOp, SessionFilter, SessionId,
    SessionUpdate, Store, StoreError, entry_after,
};

/// Rows fetched per round trip when a listing filters in Rust (audit records, sessions).
const SCAN_BATCH: i64 = 500;

/// An entry written in a transaction, waiting for its revision.
struct Pending {
    entry: RegistrationEntry,
    deleted: bool,
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_entry(&self, entry: NewEntry) -> Result<RegistrationEntry, StoreError> {
        let mut results = self.create_entries(vec![entry]).await?;
        results.pop().unwrap_or(Err(StoreError::Closed))
    }

    async fn create_entries(
        &self,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<Result<RegistrationEntry, StoreError>>, StoreError> {
        let mut items = Vec::with_capacity(entries.len());
        for entry in entries {
            items.push((EntryId::generate()?, entry));
        }
        let now = SystemTime::now();
        let items = &items;
        let (results, revision) = self
            .retrying(move || async move {
                let mut client = self.client().await?;
                let tx = begin(&mut client).await?;
                // Rows are inserted in identity order, so that two batches with common
                // identities wait for each other instead of deadlocking; duplicates within the
                // batch keep input order (the first one wins). Revisions follow input order.
                let mut order: Vec<usize> = (0..items.len()).collect();
                order.sort_by_key(|&i| items[i].1.identity_key());
                let mut inserted: Vec<Option<Result<RegistrationEntry, StoreError>>> =
                    (0..items.len()).map(|_| None).collect();
                for i in order {
                    let (id, new) = &items[i];
                    inserted[i] = Some(insert_entry(&tx, id, new, now).await?);
                }
                let mut results = Vec::with_capacity(items.len());
                let mut pending = Vec::new();
                for result in inserted {
                    match result.ok_or(StoreError::Closed)? {
                        Ok(entry) => {
                            results.push(Ok(()));
                            pending.push(Pending {
                                entry,
                                deleted: false,
                            });
                        }
                        Err(existing) => results.push(Err(existing)),
                    }
                }
                let written = self.take_revisions(&tx, &mut pending).await?;
                self.commit(tx).await?;
                let mut written = written.into_iter();
                let results: Vec<Result<RegistrationEntry, StoreError>> = results
                    .into_iter()
                    .map(|r| r.and_then(|()| written.next().ok_or(StoreError::Closed)))
                    .collect();
                let revision = pending.last().map(|p| p.entry.revision);
                Ok((results, revision))
            })
            .await?;
        if let Some(revision) = revision {
            self.published(revision);
        }
        Ok(results)
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, StoreError> {
        self.fetch_opt(
            "entry",
            "SELECT body FROM entries WHERE id = $1",
            &[&id.as_str()],
        )
        .await
    }

    async fn update_entry(
        &self,
        id: &EntryId,
        entry: NewEntry,
    ) -> Result<RegistrationEntry, StoreError> {
        let entry = &entry;
        let updated = self
            .retrying(move || async move {
                let mut client = self.client().await?;
                let tx = begin(&mut client).await?;
                let row = tx
                    .query_opt(
                        "SELECT body FROM entries WHERE id = $1 FOR UPDATE",
                        &[&id.as_str()],
                    )
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| entry_not_found(id))?;
                let old: RegistrationEntry = decode("entry", col(&row, 0)?)?;
                let identity = entry.identity_key();
                if let Some(existing) = duplicate_of(&tx, &identity, id).await? {
                    return Err(existing);
                }
                let new = RegistrationEntry::from_new(id.clone(), entry.clone(), old.created_at, 0);
                // A concurrent create may take the identity after the check above; the
                // savepoint keeps the transaction usable to name that entry.
                tx.batch_execute("SAVEPOINT identity")
                    .await
                    .map_err(db_error)?;
                let result = tx
                    .execute(
                        "UPDATE entries SET identity_key = $2, spiffe_id = $3, parent_id = $4, \
                         selectors = $5 WHERE id = $1",
                        &[
                            &id.as_str(),
                            &identity.as_slice(),
                            &new.spiffe_id.as_str(),
                            &new.parent_id.as_str(),
                            &selector_strings(&new),
                        ],
                    )
                    .await;
                if let Err(e) = result {
                    if is_unique_violation(&e) {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT identity")
                            .await
                            .map_err(db_error)?;
                        return Err(duplicate_of(&tx, &identity, id)
                            .await?
                            .unwrap_or_else(concurrent_duplicate));
                    }
                    return Err(db_error(e));
                }
                let mut pending = vec![Pending {
                    entry: new,
                    deleted: false,
                }];
                let mut written = self.take_revisions(&tx, &mut pending).await?;
                self.commit(tx).await?;
                written.pop().ok_or(StoreError::Closed)
            })
            .await?;
        self.published(updated.revision);
        Ok(updated)
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<RegistrationEntry, StoreError> {
        let (deleted, revision) = self
            .retrying(move || async move {
                let mut client = self.client().await?;
                let tx = begin(&mut client).await?;
                let old = delete_entry_row(&tx, id)
                    .await?
                    .ok_or_else(|| entry_not_found(id))?;
                let mut pending = vec![Pending {
                    entry: old.clone(),
                    deleted: true,
                }];
                self.take_revisions(&tx, &mut pending).await?;
                self.commit(tx).await?;
                let revision = pending.last().map_or(0, |p| p.entry.revision);
                Ok((old, revision))
            })
            .await?;
        self.published(revision);
        Ok(deleted)
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
        page: &PageRequest,
    ) -> Result<Page<RegistrationEntry>, StoreError> {
        let after = entry_after(page.token.as_deref())?.map(|id| id.as_str().to_owned());
        let size = page.effective_size();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT body FROM entries \
                 WHERE ($1::text IS NULL OR id > $1) \
                   AND ($2::text IS NULL OR parent_id = $2) \
                   AND ($3::text IS NULL OR spiffe_id = $3) \
                   AND ($4::text IS NULL OR selectors @> ARRAY[$4::text]) \
                 ORDER BY id LIMIT $5",
                &[
                    &after,
                    &filter.parent_id.as_ref().map(SpiffeId::as_str),
                    &filter.spiffe_id.as_ref().map(SpiffeId::as_str),
                    &filter.selector.as_ref().map(ToString::to_string),
                    &limit_plus_one(size),
                ],
            )
            .await
            .map_err(db_error)?;
        let items = rows
            .iter()
            .map(|row| decode::<RegistrationEntry>("entry", col(row, 0)?))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page_of(items, size, |e| e.id.as_str().as_bytes().to_vec()))
    }

    async fn count_entries(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT count(*) FROM entries", &[])
            .await
            .map_err(db_error)?;
        to_u64("entry count", col(&row, 0)?)
    }

    async fn snapshot_entries(&self) -> Result<EntrySnapshot, StoreError> {
        let mut client = self.client().await?;
        let tx = begin_snapshot(&mut client).await?;
        let row = tx
            .query_one("SELECT revision FROM feed_head WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        let revision = to_u64("revision", col(&row, 0)?)?;
        let rows = tx
            .query("SELECT body FROM entries ORDER BY id", &[])
            .await
            .map_err(db_error)?;
        end_snapshot(tx).await?;
        let entries = rows
            .iter()
            .map(|row| decode("entry", col(row, 0)?))
            .collect::<Result<Vec<_>, _>>()?;
        self.published(revision);
        Ok(EntrySnapshot { revision, entries })
    }

    async fn current_revision(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT revision FROM feed_head WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        let revision = to_u64("revision", col(&row, 0)?)?;
        self.published(revision);
        Ok(revision)
    }

    async fn changes_since(&self, revision: u64, limit: usize) -> Result<ChangesSince, StoreError> {
        let limit = limit.clamp(1, MAX_CHANGES_PER_CALL);
        let Ok(after) = i64::try_from(revision) else {
            // Newer than any revision a bigint can hold: this store never issued it.
            return Ok(ChangesSince::Expired);
        };
        let client = self.client().await?;
        let head = client
            .query_one("SELECT revision FROM feed_head WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        let head: i64 = col(&head, 0)?;
        if after > head {
            return Ok(ChangesSince::Expired);
        }
        if after == head {
            return Ok(ChangesSince::Changes(Vec::new()));
        }
        // Every revision up to the head read above has committed (revision order is commit
        // order); later ones that committed meanwhile are just as complete.
        let rows = client
            .query(
                "SELECT body FROM entry_changes WHERE revision > $1 ORDER BY revision LIMIT $2",
                &[&after, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(db_error)?;
        let changes = rows
            .iter()
            .map(|row| decode::<Change>("change", col(row, 0)?))
            .collect::<Result<Vec<_>, _>>()?;
        match changes.first() {
            Some(first) if first.revision == revision + 1 => Ok(ChangesSince::Changes(changes)),
            _ => Ok(ChangesSince::Expired),
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revision.subscribe()
    }

    async fn create_node(&self, mut node: AttestedNode) -> Result<AttestedNode, StoreError> {
        let now = SystemTime::now();
        node.created_at = now;
        node.updated_at = now;
        let body = encode("node", &node)?;
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO nodes (spiffe_id, body) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&node.spiffe_id.as_str(), &body],
            )
            .await
            .map_err(db_error)?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists {
                resource: "node",
                key: node.spiffe_id.to_string(),
            });
        }
        Ok(node)
    }

    async fn get_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>, StoreError> {
        self.fetch_opt(
            "node",
            "SELECT body FROM nodes WHERE spiffe_id = $1",
            &[&spiffe_id.as_str()],
        )
        .await
    }

    async fn update_node(
        &self,
        expected: &AttestedNode,
        node: AttestedNode,
    ) -> Result<AttestedNode, StoreError> {
        let now = SystemTime::now();
        let node = &node;
        self.retrying(move || async move {
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            let key = node.spiffe_id.as_str();
            let row = tx
                .query_opt(
                    "SELECT body FROM nodes WHERE spiffe_id = $1 FOR UPDATE",
                    &[&key],
                )
                .await
                .map_err(db_error)?
                .ok_or_else(|| StoreError::NotFound {
                    resource: "node",
                    key: key.to_owned(),
                })?;
            let old: AttestedNode = decode("node", col(&row, 0)?)?;
            if old != *expected {
                return Err(StoreError::StateChanged {
                    resource: "node",
                    key: key.to_owned(),
                });
            }
            let mut updated = node.clone();
            updated.created_at = old.created_at;
            updated.updated_at = now;
            tx.execute(
                "UPDATE nodes SET body = $2 WHERE spiffe_id = $1",
                &[&key, &encode("node", &updated)?],
            )
            .await
            .map_err(db_error)?;
            self.commit(tx).await?;
            Ok(updated)
        })
        .await
    }

    async fn delete_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "DELETE FROM nodes WHERE spiffe_id = $1 RETURNING body",
                &[&spiffe_id.as_str()],
            )
            .await
            .map_err(db_error)?
            .ok_or_else(|| StoreError::NotFound {
                resource: "node",
                key: spiffe_id.to_string(),
            })?;
        decode("node", col(&row, 0)?)
    }

    async fn list_nodes(&self, page: &PageRequest) -> Result<Page<AttestedNode>, StoreError> {
        let after = token_key(page.token.as_deref(), |s| SpiffeId::new(s).is_ok())?;
        let size = page.effective_size();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT body FROM nodes WHERE ($1::text IS NULL OR spiffe_id > $1) \
                 ORDER BY spiffe_id LIMIT $2",
                &[&after, &limit_plus_one(size)],
            )
            .await
            .map_err(db_error)?;
        let items = rows
            .iter()
            .map(|row| decode::<AttestedNode>("node", col(row, 0)?))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page_of(items, size, |n| {
            n.spiffe_id.as_str().as_bytes().to_vec()
        }))
    }

    async fn create_join_token(&self, token: JoinToken) -> Result<(), StoreError> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO join_tokens (token_hash, expires_at_ns, body) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[
                    &token.token_hash,
                    &nanos(token.expires_at),
                    &encode("join token", &token)?,
                ],
            )
            .await
            .map_err(db_error)?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists {
                resource: "join token",
                key: "<redacted>".to_owned(),
            });
        }
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: SystemTime,
    ) -> Result<JoinToken, StoreError> {
        let client = self.client().await?;
        // One statement: among concurrent consumers (of any server), one deletes the row.
        let row = client
            .query_opt(
                "DELETE FROM join_tokens WHERE token_hash = $1 RETURNING body",
                &[&token_hash],
            )
            .await
            .map_err(db_error)?
            .ok_or(StoreError::TokenNotFound)?;
        let token: JoinToken = decode("join token", col(&row, 0)?)?;
        if token.expires_at <= now {
            return Err(StoreError::TokenExpired);
        }
        Ok(token)
    }

    async fn prune_join_tokens(&self, now: SystemTime) -> Result<u64, StoreError> {
        self.singleton(
            "prune_join_tokens",
            "DELETE FROM join_tokens WHERE expires_at_ns <= $1",
            &[&nanos(now)],
        )
        .await
    }

    fn commit_latency(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.inner.commits.clone()
    }

    async fn run_job<'w>(
        &self,
        job: &'static str,
        work: JobWork<'w>,
    ) -> Result<Option<usize>, StoreError> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        if !try_job_lock(&tx, job).await? {
            return Ok(None);
        }
        let done = work.await;
        // The work is done (and each of its writes committed on its own); ending the lock's
        // transaction only lets the next server in. Should this fail, the connection is gone
        // and the lock with it.
        if let Err(e) = tx.commit().await {
            tracing::warn!(job, error = %db_error(e), "cannot end a job's lock transaction; the lock ends with its connection");
        }
        Ok(Some(done))
    }

    async fn set_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
        bundle: Vec<u8>,
    ) -> Result<FederatedBundle, StoreError> {
        let record = FederatedBundle {
            trust_domain: trust_domain.clone(),
            bundle,
            updated_at: SystemTime::now(),
        };
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO federated_bundles (trust_domain, body) VALUES ($1, $2) \
                 ON CONFLICT (trust_domain) DO UPDATE SET body = EXCLUDED.body",
                &[&trust_domain.name(), &encode("federated bundle", &record)?],
            )
            .await
            .map_err(db_error)?;
        Ok(record)
    }

    async fn get_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederatedBundle>, StoreError> {
        self.fetch_opt(
            "federated bundle",
            "SELECT body FROM federated_bundles WHERE trust_domain = $1",
            &[&trust_domain.name()],
        )
        .await
    }

    async fn delete_federated_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<FederatedBundle, StoreError> {
        self.retrying(move || async move {
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            // A relationship being created for the trust domain meanwhile waits for this (and
            // this for it): both take the trust domain's lock.
            lock_federation(&tx, trust_domain).await?;
            let related = tx
                .query_opt(
                    "SELECT 1 FROM federations WHERE trust_domain = $1",
                    &[&trust_domain.name()],
                )
                .await
                .map_err(db_error)?;
            if related.is_some() {
                return Err(StoreError::InUse {
                    resource: "federated bundle",
                    key: trust_domain.name().to_owned(),
                    reason: "a federation relationship keeps it; delete the relationship \
                             (sigil-server federation delete), which deletes its bundle",
                });
            }
            let row = tx
                .query_opt(
                    "DELETE FROM federated_bundles WHERE trust_domain = $1 RETURNING body",
                    &[&trust_domain.name()],
                )
                .await
                .map_err(db_error)?
                .ok_or_else(|| StoreError::NotFound {
                    resource: "federated bundle",
                    key: trust_domain.name().to_owned(),
                })?;
            let deleted = decode("federated bundle", col(&row, 0)?)?;
            self.commit(tx).await?;
            Ok(deleted)
        })
        .await
    }

    async fn put_federation(
        &self,
        relationship: FederationRelationship,
        bundle: Option<Vec<u8>>,
        put: Put,
    ) -> Result<FederationRelationship, StoreError> {
        let relationship = &relationship;
        let bundle = &bundle;
        self.retrying(move || async move {
            let now = SystemTime::now();
            let key = relationship.trust_domain.name();
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            lock_federation(&tx, &relationship.trust_domain).await?;
            let current: Option<FederationRelationship> = match tx
                .query_opt(
                    "SELECT body FROM federations WHERE trust_domain = $1 FOR UPDATE",
                    &[&key],
                )
                .await
                .map_err(db_error)?
            {
                Some(row) => Some(decode("federation relationship", col(&row, 0)?)?),
                None => None,
            };
            let exists = current.is_some();
            let record = crate::store::federation::put_relationship(
                current,
                relationship.clone(),
                put,
                now,
            )?;
            let body = encode("federation relationship", &record)?;
            let written = if exists {
                tx.execute(
                    "UPDATE federations SET body = $2 WHERE trust_domain = $1",
                    &[&key, &body],
                )
                .await
            } else {
                tx.execute(
                    "INSERT INTO federations (trust_domain, body) VALUES ($1, $2)",
                    &[&key, &body],
                )
                .await
            };
            match written {
                Err(e) if is_unique_violation(&e) => {
                    return Err(StoreError::AlreadyExists {
                        resource: "federation relationship",
                        key: relationship.trust_domain.to_string(),
                    });
                }
                other => other.map_err(db_error)?,
            };
            if let Some(bundle) = bundle {
                upsert_bundle(&tx, &record.trust_domain, bundle.clone(), now).await?;
            }
            self.commit(tx).await?;
            Ok(record)
        })
        .await
    }

    async fn get_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StoreError> {
        self.fetch_opt(
            "federation relationship",
            "SELECT body FROM federations WHERE trust_domain = $1",
            &[&trust_domain.name()],
        )
        .await
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>, StoreError> {
        self.fetch_all(
            "federation relationship",
            "SELECT body FROM federations ORDER BY trust_domain",
            &[],
        )
        .await
    }

    async fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<(FederationRelationship, Option<FederatedBundle>), StoreError> {
        self.retrying(move || async move {
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            lock_federation(&tx, trust_domain).await?;
            let row = tx
                .query_opt(
                    "DELETE FROM federations WHERE trust_domain = $1 RETURNING body",
                    &[&trust_domain.name()],
                )
                .await
                .map_err(db_error)?
                .ok_or_else(|| StoreError::NotFound {
                    resource: "federation relationship",
                    key: trust_domain.to_string(),
                })?;
            let relationship = decode("federation relationship", col(&row, 0)?)?;
            let bundle = match tx
                .query_opt(
                    "DELETE FROM federated_bundles WHERE trust_domain = $1 RETURNING body",
                    &[&trust_domain.name()],
                )
                .await
                .map_err(db_error)?
            {
                Some(row) => Some(decode("federated bundle", col(&row, 0)?)?),
                None => None,
            };
            self.commit(tx).await?;
            Ok((relationship, bundle))
        })
        .await
    }

    async fn record_federation_fetch(
        &self,
        trust_domain: &TrustDomain,
        generation: u64,
        status: FetchStatus,
        bundle: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let status = &status;
        let bundle = &bundle;
        self.retrying(move || async move {
            let key = trust_domain.name();
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            let Some(row) = tx
                .query_opt(
                    "SELECT body FROM federations WHERE trust_domain = $1 FOR UPDATE",
                    &[&key],
                )
                .await
                .map_err(db_error)?
            else {
                return Ok(false);
            };
            let mut current: FederationRelationship =
                decode("federation relationship", col(&row, 0)?)?;
            if current.generation != generation {
                return Ok(false);
            }
            current.status = status.clone();
            tx.execute(
                "UPDATE federations SET body = $2 WHERE trust_domain = $1",
                &[&key, &encode("federation relationship", &current)?],
            )
            .await
            .map_err(db_error)?;
            if let Some(bundle) = bundle {
                upsert_bundle(&tx, trust_domain, bundle.clone(), SystemTime::now()).await?;
            }
            self.commit(tx).await?;
            Ok(true)
        })
        .await
    }

    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>, StoreError> {
        self.fetch_all(
            "federated bundle",
            "SELECT body FROM federated_bundles ORDER BY trust_domain",
            &[],
        )
        .await
    }

    async fn load_ca_journal(&self, server_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT journal FROM ca_journals WHERE server_id = $1",
                &[&server_id],
            )
            .await
            .map_err(db_error)?;
        row.map(|row| col(&row, 0)).transpose()
    }

    async fn save_ca_journal(&self, server_id: &str, journal: Vec<u8>) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO ca_journals (server_id, journal) VALUES ($1, $2) \
                 ON CONFLICT (server_id) DO UPDATE SET journal = EXCLUDED.journal",
                &[&server_id, &journal],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let updated = client
            .execute(
                "UPDATE servers SET heartbeat_at = now() \
                 WHERE server_id = $1 AND instance_id = $2",
                &[&self.inner.server_id, &self.inner.instance_id],
            )
            .await
            .map_err(db_error)?;
        if updated == 1 {
            Ok(())
        } else {
            Err(self.superseded(&client).await)
        }
    }

    async fn publish_server_bundle(
        &self,
        server_id: &str,
        bundle: Vec<u8>,
        at_least: u64,
    ) -> Result<u64, StoreError> {
        let text = String::from_utf8(bundle).map_err(|e| StoreError::Encode {
            what: "server bundle",
            reason: e.to_string(),
        })?;
        let at_least = to_i64("bundle sequence", at_least)?;
        let text = &text;
        self.retrying(move || async move {
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            self.fence(&tx, server_id).await?;
            tx.execute(
                "INSERT INTO server_bundles (server_id, bundle, updated_at) \
                 VALUES ($1, $2, now()) ON CONFLICT (server_id) \
                 DO UPDATE SET bundle = EXCLUDED.bundle, updated_at = now()",
                &[&server_id, text],
            )
            .await
            .map_err(db_error)?;
            // Last, as the feed counter: readers of the sequence see the bundle with it.
            let row = tx
                .query_one(
                    "UPDATE bundle_head SET sequence = greatest(sequence + 1, $1) \
                     WHERE id = 1 RETURNING sequence",
                    &[&at_least],
                )
                .await
                .map_err(db_error)?;
            let sequence = to_u64("bundle sequence", col(&row, 0)?)?;
            self.commit(tx).await?;
            Ok(sequence)
        })
        .await
    }

    async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT sequence FROM bundle_head WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        to_u64("bundle sequence", col(&row, 0)?)
    }

    async fn server_bundles(&self) -> Result<ServerBundles, StoreError> {
        let mut client = self.client().await?;
        let tx = begin_snapshot(&mut client).await?;
        let row = tx
            .query_one("SELECT sequence FROM bundle_head WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        let sequence = to_u64("bundle sequence", col(&row, 0)?)?;
        let rows = tx
            .query(
                "SELECT server_id, bundle FROM server_bundles ORDER BY server_id",
                &[],
            )
            .await
            .map_err(db_error)?;
        let bundles = rows
            .iter()
            .map(|row| {
                Ok((
                    col::<&str>(row, 0)?.to_owned(),
                    col::<&str>(row, 1)?.as_bytes().to_vec(),
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        end_snapshot(tx).await?;
        Ok(ServerBundles { sequence, bundles })
    }

    async fn save_server_crls(&self, server_id: &str, crls: Vec<u8>) -> Result<(), StoreError> {
        let text = String::from_utf8(crls).map_err(|e| StoreError::Encode {
            what: "server crls",
            reason: e.to_string(),
        })?;
        let text = &text;
        self.retrying(move || async move {
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            self.fence(&tx, server_id).await?;
            tx.execute(
                "INSERT INTO server_crls (server_id, crls, updated_at) VALUES ($1, $2, now()) \
                 ON CONFLICT (server_id) DO UPDATE SET crls = EXCLUDED.crls, updated_at = now()",
                &[&server_id, text],
            )
            .await
            .map_err(db_error)?;
            tx.execute("UPDATE crl_head SET crls = crls + 1 WHERE id = 1", &[])
                .await
                .map_err(db_error)?;
            self.commit(tx).await
        })
        .await
    }

    async fn server_crls(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT server_id, crls FROM server_crls ORDER BY server_id",
                &[],
            )
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                Ok((
                    col::<&str>(row, 0)?.to_owned(),
                    col::<&str>(row, 1)?.as_bytes().to_vec(),
                ))
            })
            .collect()
    }

    async fn crl_counters(&self) -> Result<CrlCounters, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT revocations, crls FROM crl_head WHERE id = 1", &[])
            .await
            .map_err(db_error)?;
        Ok(CrlCounters {
            revocations: to_u64("revocation counter", col(&row, 0)?)?,
            crls: to_u64("crl counter", col(&row, 1)?)?,
        })
    }

    async fn append_audit(
        &self,
        records: Vec<NewAuditRecord>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let records = &records;
        self.retrying(move || async move {
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            let sealed = self.seal_into(&tx, records, SystemTime::now()).await?;
            self.commit(tx).await?;
            Ok(sealed)
        })
        .await
    }

    async fn append_source_events(
        &self,
        source: &AuditSource,
        events: Vec<SourceEvent>,
    ) -> Result<SourceAppend, StoreError> {
        if events.windows(2).any(|w| w[1].sequence <= w[0].sequence) {
            return Err(StoreError::Encode {
                what: "audit source events",
                reason: "sequences must increase strictly".to_owned(),
            });
        }
        let events = &events;
        self.retrying(move || async move {
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            tx.execute(
                "INSERT INTO audit_sources (spiffe_id, spool_id, last_sequence) \
                 VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
                &[&source.spiffe_id, &source.spool_id],
            )
            .await
            .map_err(db_error)?;
            let row = tx
                .query_one(
                    "SELECT last_sequence FROM audit_sources \
                     WHERE spiffe_id = $1 AND spool_id = $2 FOR UPDATE",
                    &[&source.spiffe_id, &source.spool_id],
                )
                .await
                .map_err(db_error)?;
            let last = to_u64("audit source", col(&row, 0)?)?;
            let fresh: Vec<&SourceEvent> = events.iter().filter(|e| e.sequence > last).collect();
            let continues = fresh
                .iter()
                .zip(1u64..)
                .all(|(event, n)| Some(event.sequence) == last.checked_add(n));
            if !continues || fresh.is_empty() {
                tx.rollback().await.map_err(db_error)?;
                return Ok(SourceAppend {
                    appended: Vec::new(),
                    acknowledged: last,
                });
            }
            let records: Vec<NewAuditRecord> = fresh.iter().map(|e| e.record.clone()).collect();
            let acknowledged = fresh.last().map_or(last, |e| e.sequence);
            let appended = self.seal_into(&tx, &records, SystemTime::now()).await?;
            tx.execute(
                "UPDATE audit_sources SET last_sequence = $3 WHERE spiffe_id = $1 AND spool_id = $2",
                &[
                    &source.spiffe_id,
                    &source.spool_id,
                    &to_i64("audit source", acknowledged)?,
                ],
            )
            .await
            .map_err(db_error)?;
            self.commit(tx).await?;
            Ok(SourceAppend {
                appended,
                acknowledged,
            })
        })
        .await
    }

    async fn audit_source_sequence(&self, source: &AuditSource) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT last_sequence FROM audit_sources WHERE spiffe_id = $1 AND spool_id = $2",
                &[&source.spiffe_id, &source.spool_id],
            )
            .await
            .map_err(db_error)?;
        row.map_or(Ok(0), |row| to_u64("audit source", col(&row, 0)?))
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditRecord>, StoreError> {
        let start = crate::store::audit_listing_start(filter, page)?;
        let since = filter.since.map(millis);
        let size = page.effective_size();
        let mut items = Vec::new();
        let mut more = false;
        let Ok(mut from) = i64::try_from(start) else {
            // Past any sequence a bigint can hold: nothing there.
            return Ok(Page {
                items,
                next_page_token: None,
            });
        };
        let client = self.client().await?;
        'scan: loop {
            let rows = client
                .query(
                    "SELECT sequence, body FROM audit_records \
                     WHERE chain_id = $1 AND sequence >= $2 \
                       AND ($3::bigint IS NULL OR time_ms >= $3) \
                     ORDER BY sequence LIMIT $4",
                    &[&self.inner.server_id, &from, &since, &SCAN_BATCH],
                )
                .await
                .map_err(db_error)?;
            let fetched = rows.len();
            for row in &rows {
                let sequence: i64 = col(row, 0)?;
                let record: AuditRecord =
                    serde_json::from_str(col(row, 1)?).map_err(|e| StoreError::Corrupt {
                        what: "audit",
                        reason: format!("record {sequence}: {e}"),
                    })?;
                from = sequence.saturating_add(1);
                if filter.matches(&record) {
                    if items.len() == size {
                        more = true;
                        break 'scan;
                    }
                    items.push(record);
                }
            }
            if i64::try_from(fetched).unwrap_or(i64::MAX) < SCAN_BATCH {
                break;
            }
        }
        let next_page_token = if more {
            items
                .last()
                .map(|r: &AuditRecord| page_token(&r.sequence.to_be_bytes()))
        } else {
            None
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    async fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.fetch_opt(
            "audit head",
            "SELECT body FROM audit_heads WHERE chain_id = $1 AND sequence > 0",
            &[&self.inner.server_id],
        )
        .await
    }

    async fn audit_chains(&self) -> Result<Vec<AuditHead>, StoreError> {
        self.fetch_all(
            "audit head",
            "SELECT body FROM audit_heads WHERE sequence > 0 ORDER BY chain_id",
            &[],
        )
        .await
    }

    async fn save_audit_checkpoint(&self, checkpoint: AuditCheckpoint) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO audit_checkpoints (chain_id, sequence, body) VALUES ($1, $2, $3) \
                 ON CONFLICT (chain_id, sequence) DO UPDATE SET body = EXCLUDED.body",
                &[
                    &self.inner.server_id,
                    &to_i64("audit checkpoint", checkpoint.sequence)?,
                    &encode("audit checkpoint", &checkpoint)?,
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn latest_audit_checkpoint(&self) -> Result<Option<AuditCheckpoint>, StoreError> {
        self.fetch_opt(
            "audit checkpoint",
            "SELECT body FROM audit_checkpoints WHERE chain_id = $1 \
                 ORDER BY sequence DESC LIMIT 1",
            &[&self.inner.server_id],
        )
        .await
    }

    async fn remove_audit_checkpoint(&self, sequence: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM audit_checkpoints WHERE chain_id = $1 AND sequence = $2",
                &[
                    &self.inner.server_id,
                    &to_i64("audit checkpoint", sequence)?,
                ],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn list_audit_checkpoints(
        &self,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        self.list_chain_checkpoints(&self.inner.server_id, from_sequence, limit)
            .await
    }

    async fn list_audit_merged(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditRecord>, StoreError> {
        if filter.from_sequence.is_some() {
            return self.list_audit(filter, page).await;
        }
        // The position after which the page starts: (time_ms, chain_id, sequence).
        let (mut time, mut chain, mut sequence) = match &page.token {
            None => (i64::MIN, String::new(), i64::MIN),
            Some(token) => merged_position(token)?,
        };
        let since = filter.since.map(millis);
        let size = page.effective_size();
        let mut items: Vec<AuditRecord> = Vec::new();
        let mut last = None;
        let mut more = false;
        let client = self.client().await?;
        'scan: loop {
            let rows = client
                .query(
                    "SELECT chain_id, sequence, time_ms, body FROM audit_records \
                     WHERE (time_ms, chain_id, sequence) > ($1, $2, $3) \
                       AND ($4::bigint IS NULL OR time_ms >= $4) \
                     ORDER BY time_ms, chain_id, sequence LIMIT $5",
                    &[&time, &chain, &sequence, &since, &SCAN_BATCH],
                )
                .await
                .map_err(db_error)?;
            let fetched = rows.len();
            for row in &rows {
                let (row_chain, row_sequence, row_time): (&str, i64, i64) =
                    (col(row, 0)?, col(row, 1)?, col(row, 2)?);
                let record: AuditRecord =
                    serde_json::from_str(col(row, 3)?).map_err(|e| StoreError::Corrupt {
                        what: "audit",
                        reason: format!("record {row_sequence} of chain {row_chain}: {e}"),
                    })?;
                (time, chain, sequence) = (row_time, row_chain.to_owned(), row_sequence);
                if filter.matches(&record) {
                    if items.len() == size {
                        more = true;
                        break 'scan;
                    }
                    items.push(record);
                    last = Some((time, chain.clone(), sequence));
                }
            }
            if i64::try_from(fetched).unwrap_or(i64::MAX) < SCAN_BATCH {
                break;
            }
        }
        let next_page_token = match (more, last) {
            (true, Some((t, c, s))) => Some(page_token(format!("{t}:{s}:{c}").as_bytes())),
            _ => None,
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    async fn list_chain_records(
        &self,
        chain_id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let Ok(from) = i64::try_from(from_sequence) else {
            return Ok(Vec::new());
        };
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT sequence, body FROM audit_records \
                 WHERE chain_id = $1 AND sequence >= $2 ORDER BY sequence LIMIT $3",
                &[&chain_id, &from, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let sequence: i64 = col(row, 0)?;
                serde_json::from_str(col(row, 1)?).map_err(|e| StoreError::Corrupt {
                    what: "audit",
                    reason: format!("record {sequence} of chain {chain_id}: {e}"),
                })
            })
            .collect()
    }

    async fn list_chain_checkpoints(
        &self,
        chain_id: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        self.fetch_all(
            "audit checkpoint",
            "SELECT body FROM audit_checkpoints WHERE chain_id = $1 AND sequence >= $2 \
                 ORDER BY sequence LIMIT $3",
            &[
                &chain_id,
                &i64::try_from(from_sequence).unwrap_or(i64::MAX),
                &i64::try_from(limit).unwrap_or(i64::MAX),
            ],
        )
        .await
    }

    async fn create_session(
        &self,
        session: Session,
        entry: Option<NewEntry>,
        audit: Vec<NewAuditRecord>,
    ) -> Result<Session, StoreError> {
        let entry = match entry {
            Some(entry) => Some((EntryId::generate()?, entry)),
            None => None,
        };
        let now = SystemTime::now();
        let (session, entry, audit) = (&session, &entry, &audit);
        let (created, revision) = self
            .retrying(move || async move {
                let mut client = self.client().await?;
                let tx = begin(&mut client).await?;
                let mut session = session.clone();
                let mut pending = Vec::new();
                if let Some((id, new)) = &entry {
                    let created = insert_entry(&tx, id, new, now).await??;
                    session.entry_id = Some(created.id.clone());
                    pending.push(Pending {
                        entry: created,
                        deleted: false,
                    });
                }
                let inserted = tx
                    .execute(
                        "INSERT INTO sessions (id, body) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        &[&session.id.as_str(), &encode("session", &session)?],
                    )
                    .await
                    .map_err(db_error)?;
                if inserted == 0 {
                    return Err(StoreError::AlreadyExists {
                        resource: "session",
                        key: session.id.to_string(),
                    });
                }
                self.seal_into(&tx, audit, now).await?;
                self.take_revisions(&tx, &mut pending).await?;
                self.commit(tx).await?;
                Ok((session, pending.last().map(|p| p.entry.revision)))
            })
            .await?;
        if let Some(revision) = revision {
            self.published(revision);
        }
        Ok(created)
    }

    async fn update_session(&self, update: SessionUpdate) -> Result<Session, StoreError> {
        let entry_id = match &update.entry {
            SessionEntryOp::Create(_) => Some(EntryId::generate()?),
            _ => None,
        };
        let now = SystemTime::now();
        let (update, entry_id) = (&update, &entry_id);
        let (updated, revision) = self
            .retrying(move || async move {
                let mut client = self.client().await?;
                let tx = begin(&mut client).await?;
                let id = &update.session.id;
                let row = tx
                    .query_opt(
                        "SELECT body FROM sessions WHERE id = $1 FOR UPDATE",
                        &[&id.as_str()],
                    )
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| StoreError::NotFound {
                        resource: "session",
                        key: id.to_string(),
                    })?;
                let old: Session = decode("session", col(&row, 0)?)?;
                if old.state != update.expected {
                    return Err(StoreError::StateChanged {
                        resource: "session",
                        key: id.to_string(),
                    });
                }
                let mut session = update.session.clone();
                // Serials and JWT ids recorded meanwhile are kept.
                session.serials = old.serials.clone();
                session.jwts = old.jwts.clone();
                let mut pending = Vec::new();
                match &update.entry {
                    SessionEntryOp::Create(new) => {
                        if let Some(entry_id) = &entry_id {
                            let created = insert_entry(&tx, entry_id, new, now).await??;
                            session.entry_id = Some(created.id.clone());
                            pending.push(Pending {
                                entry: created,
                                deleted: false,
                            });
                        }
                    }
                    SessionEntryOp::Delete => {
                        if let Some(entry_id) = &old.entry_id
                            && let Some(entry) = delete_entry_row(&tx, entry_id).await?
                        {
                            pending.push(Pending {
                                entry,
                                deleted: true,
                            });
                        }
                    }
                }
                upsert_revocations(&tx, &update.revocations).await?;
                tx.execute(
                    "UPDATE sessions SET body = $2 WHERE id = $1",
                    &[&id.as_str(), &encode("session", &session)?],
                )
                .await
                .map_err(db_error)?;
                // The change and its audit records are one write.
                self.seal_into(&tx, &update.audit, now).await?;
                self.take_revisions(&tx, &mut pending).await?;
                self.commit(tx).await?;
                Ok((session, pending.last().map(|p| p.entry.revision)))
            })
            .await?;
        if let Some(revision) = revision {
            self.published(revision);
        }
        Ok(updated)
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.fetch_opt(
            "session",
            "SELECT body FROM sessions WHERE id = $1",
            &[&id.as_str()],
        )
        .await
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> Result<Page<Session>, StoreError> {
        let mut after = token_key(page.token.as_deref(), |s| SessionId::parse(s).is_ok())?;
        let size = page.effective_size();
        // The state is matched by the database too: the servers read the live sessions every
        // few seconds, and ended ones (most of the table) need not cross the wire for that.
        let state = filter
            .state
            .map(|state| encode("session state", &state))
            .transpose()?;
        let client = self.client().await?;
        let mut items = Vec::new();
        let mut more = false;
        'scan: loop {
            let rows = client
                .query(
                    "SELECT id, body FROM sessions WHERE ($1::text IS NULL OR id > $1) \
                       AND ($3::text IS NULL OR body::jsonb -> 'state' = $3::jsonb) \
                     ORDER BY id LIMIT $2",
                    &[&after, &SCAN_BATCH, &state],
                )
                .await
                .map_err(db_error)?;
            let fetched = rows.len();
            for row in &rows {
                after = Some(col::<String>(row, 0)?);
                let session: Session = decode("session", col(row, 1)?)?;
                if filter.matches(&session) {
                    if items.len() == size {
                        more = true;
                        break 'scan;
                    }
                    items.push(session);
                }
            }
            if i64::try_from(fetched).unwrap_or(i64::MAX) < SCAN_BATCH {
                break;
            }
        }
        let next_page_token = if more {
            items
                .last()
                .map(|s: &Session| page_token(s.id.as_str().as_bytes()))
        } else {
            None
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    async fn add_session_credential(
        &self,
        id: &SessionId,
        credential: SessionCredential,
    ) -> Result<Session, StoreError> {
        let credential = &credential;
        self.retrying(move || async move {
            let mut client = self.client().await?;
            let tx = begin(&mut client).await?;
            let row = tx
                .query_opt(
                    "SELECT body FROM sessions WHERE id = $1 FOR UPDATE",
                    &[&id.as_str()],
                )
                .await
                .map_err(db_error)?
                .ok_or_else(|| StoreError::NotFound {
                    resource: "session",
                    key: id.to_string(),
                })?;
            let mut session: Session = decode("session", col(&row, 0)?)?;
            match &credential {
                SessionCredential::X509(serial) => session.serials.push(serial.clone()),
                SessionCredential::Jwt(jwt) => session.jwts.push(jwt.clone()),
            }
            tx.execute(
                "UPDATE sessions SET body = $2 WHERE id = $1",
                &[&id.as_str(), &encode("session", &session)?],
            )
            .await
            .map_err(db_error)?;
            self.commit(tx).await?;
            Ok(session)
        })
        .await
    }

    async fn add_revocations(&self, revocations: Vec<Revocation>) -> Result<(), StoreError> {
        if revocations.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        upsert_revocations(&tx, &revocations).await?;
        self.commit(tx).await
    }

    async fn list_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.fetch_all(
            "revocation",
            "SELECT body FROM revocations ORDER BY serial",
            &[],
        )
        .await
    }

    async fn prune_revocations(&self, now: SystemTime) -> Result<u64, StoreError> {
        self.singleton(
            "prune_revocations",
            "DELETE FROM revocations WHERE not_after_ns <= $1",
            &[&nanos(now)],
        )
        .await
    }

    async fn next_crl_number(&self, authority_id: &str, at_least: u64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO crl_numbers (authority_id, last_number) \
                 VALUES ($1, greatest($2, coalesce((SELECT last_number + 1 FROM crl_numbers \
                                                    WHERE authority_id = ''), 0))) \
                 ON CONFLICT (authority_id) DO UPDATE \
                 SET last_number = greatest(EXCLUDED.last_number, crl_numbers.last_number + 1) \
                 RETURNING last_number",
                &[&authority_id, &to_i64("crl number", at_least)?],
            )
            .await
            .map_err(db_error)?;
        to_u64("crl number", col(&row, 0)?)
    }
}

#[cfg(test)]
#[async_trait]
impl crate::store::conformance::TestableStore for PostgresStore {
    async fn entries_by_parent(
        &self,
        parent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        self.fetch_all(
            "entry",
            "SELECT body FROM entries WHERE parent_id = $1 ORDER BY id",
            &[&parent_id.as_str()],
        )
        .await
    }
}

// === transactions ===

impl PostgresStore {
    /// The record (JSON in column 0) of the one row `sql` returns, if any.
    async fn fetch_opt<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        let client = self.client().await?;
        let row = client.query_opt(sql, params).await.map_err(db_error)?;
        row.map(|row| decode(what, col(&row, 0)?)).transpose()
    }

    /// The records (JSON in column 0) of every row `sql` returns, in its order.
    async fn fetch_all<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(sql, params).await.map_err(db_error)?;
        rows.iter().map(|row| decode(what, col(row, 0)?)).collect()
    }

    /// Takes the revisions of `pending` from the feed counter, as the **last** lock of the
    /// transaction, then writes each entry's final row and its change (see the module docs),
    /// prunes the feed to the retention and notifies the listeners (at commit). Returns the
    /// entries with their revisions.
    async fn take_revisions(
        &self,
        tx: &Transaction<'_>,
        pending: &mut [Pending],
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let n = i64::try_from(pending.len()).unwrap_or(i64::MAX);
        let row = tx
            .query_one(
                "UPDATE feed_head SET revision = revision + $1 WHERE id = 1 RETURNING revision",
                &[&n],
            )
            .await
            .map_err(db_error)?;
        let last: i64 = col(&row, 0)?;
        let first = last - n + 1;
        let mut revisions = Vec::with_capacity(pending.len());
        let mut bodies = Vec::with_capacity(pending.len());
        let mut ids = Vec::new();
        let mut entry_revisions = Vec::new();
        let mut entry_bodies = Vec::new();
        let mut written = Vec::with_capacity(pending.len());
        for (revision, item) in (first..).zip(pending.iter_mut()) {
            let change_revision = to_u64("revision", revision)?;
            let kind = if item.deleted {
                ChangeKind::EntryDeleted(item.entry.clone())
            } else {
                item.entry.revision = change_revision;
                let body = encode("entry", &item.entry)?;
                ids.push(item.entry.id.as_str().to_owned());
                entry_revisions.push(revision);
                entry_bodies.push(body);
                written.push(item.entry.clone());
                ChangeKind::EntryUpserted(item.entry.clone())
            };
            if item.deleted {
                // The change names the revision it took; the entry keeps its last version.
                item.entry.revision = change_revision;
            }
            let change = Change {
                revision: change_revision,
                kind,
            };
            revisions.push(revision);
            bodies.push(encode("change", &change)?);
        }
        if !ids.is_empty() {
            tx.execute(
                "UPDATE entries SET revision = u.revision, body = u.body \
                 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(id, revision, body) \
                 WHERE entries.id = u.id",
                &[&ids, &entry_revisions, &entry_bodies],
            )
            .await
            .map_err(db_error)?;
        }
        tx.execute(
            "INSERT INTO entry_changes (revision, body) \
             SELECT * FROM unnest($1::bigint[], $2::text[])",
            &[&revisions, &bodies],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "DELETE FROM entry_changes WHERE revision <= $1",
            &[&(last - self.inner.retention)],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&FEED_CHANNEL, &last.to_string()],
        )
        .await
        .map_err(db_error)?;
        Ok(written)
    }

    /// Seals `records` after the chain head (locked until the commit) and inserts them and
    /// the new head.
    async fn seal_into(
        &self,
        tx: &Transaction<'_>,
        records: &[NewAuditRecord],
        now: SystemTime,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let chain = &self.inner.server_id;
        // Only the instance that holds the server id extends its chain: the shared row lock
        // holds off a takeover until this commits, and after one this instance writes nothing.
        self.fence(tx, chain).await?;
        tx.execute(
            "INSERT INTO audit_heads (chain_id, sequence, body) VALUES ($1, 0, NULL) \
             ON CONFLICT DO NOTHING",
            &[chain],
        )
        .await
        .map_err(db_error)?;
        let row = tx
            .query_one(
                "SELECT sequence, body FROM audit_heads WHERE chain_id = $1 FOR UPDATE",
                &[chain],
            )
            .await
            .map_err(db_error)?;
        let head: Option<AuditHead> = col::<Option<&str>>(&row, 1)?.map(decode_head).transpose()?;
        let (mut sequence, mut prev_hash, prev_time) = head
            .map_or((0, GENESIS_HASH, SystemTime::UNIX_EPOCH), |h| {
                (h.sequence, h.hash, h.time)
            });
        // Times never decrease along the chain, even if the clock steps back.
        let time = now.max(prev_time);
        let mut sealed = Vec::with_capacity(records.len());
        let mut sequences = Vec::with_capacity(records.len());
        let mut times = Vec::with_capacity(records.len());
        let mut bodies = Vec::with_capacity(records.len());
        for new in records {
            sequence = sequence.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                what: "audit head",
                reason: "sequence exhausted".to_owned(),
            })?;
            let record = new
                .clone()
                .seal(chain, sequence, time, prev_hash)
                .map_err(|e| StoreError::Encode {
                    what: "audit record",
                    reason: e.to_string(),
                })?;
            sequences.push(to_i64("audit sequence", sequence)?);
            times.push(millis(record.time));
            bodies.push(encode("audit record", &record)?);
            prev_hash = record.hash;
            sealed.push(record);
        }
        tx.execute(
            "INSERT INTO audit_records (chain_id, sequence, time_ms, body) \
             SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::text[])",
            &[chain, &sequences, &times, &bodies],
        )
        .await
        .map_err(db_error)?;
        if let Some(last) = sealed.last() {
            tx.execute(
                "UPDATE audit_heads SET sequence = $2, body = $3 WHERE chain_id = $1",
                &[
                    chain,
                    &to_i64("audit sequence", last.sequence)?,
                    &encode("audit head", &last.head())?,
                ],
            )
            .await
            .map_err(db_error)?;
        }
        Ok(sealed)
    }
}

/// The position a merged audit page token names: `time_ms:sequence:chain_id`, hex-encoded.
fn merged_position(token: &str) -> Result<(i64, String, i64), StoreError> {
    let text = token_key(Some(token), |_| true)?.ok_or(StoreError::InvalidPageToken)?;
    let mut parts = text.splitn(3, ':');
    let (Some(time), Some(sequence), Some(chain)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(StoreError::InvalidPageToken);
    };
    Ok((
        time.parse().map_err(|_| StoreError::InvalidPageToken)?,
        chain.to_owned(),
        sequence.parse().map_err(|_| StoreError::InvalidPageToken)?,
    ))
}

impl PostgresStore {
    /// Fails with [`StoreError::Superseded`] when `server_id` is this store's and another
    /// instance has claimed it; holds the claim (a shared row lock) until `tx` ends, so a
    /// takeover waits for this write instead of racing it.
    async fn fence(&self, tx: &Transaction<'_>, server_id: &str) -> Result<(), StoreError> {
        if server_id != self.inner.server_id {
            return Ok(());
        }
        let claimed = tx
            .query_opt(
                "SELECT 1 FROM servers WHERE server_id = $1 AND instance_id = $2 FOR SHARE",
                &[&server_id, &self.inner.instance_id],
            )
            .await
            .map_err(db_error)?;
        match claimed {
            Some(_) => Ok(()),
            None => Err(self.superseded(tx.client()).await),
        }
    }

    /// Commits `tx`, timing it for `commit_latency`.
    async fn commit(&self, tx: Transaction<'_>) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let done = tx.commit().await.map_err(db_error);
        self.inner.commits.observe(started.elapsed().as_secs_f64());
        done
    }

    /// Runs `statement` as job `job` of the servers sharing the database: in a transaction
    /// that first takes the job's advisory lock (`pg_try_advisory_xact_lock`), so that while
    /// one server runs it the others skip it (0 rows) instead of doing the same work at once.
    /// No leader is kept: the lock ends with the transaction. The statements are idempotent.
    pub(super) async fn singleton(
        &self,
        job: &str,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        if !try_job_lock(&tx, job).await? {
            return Ok(0);
        }
        let done = tx.execute(statement, params).await.map_err(db_error)?;
        self.commit(tx).await?;
        Ok(done)
    }

    /// The error of an instance whose claim on its server id was taken over, naming the
    /// instance that holds it now.
    async fn superseded(&self, client: &tokio_postgres::Client) -> StoreError {
        let holder = match client
            .query_opt(
                "SELECT host, instance_id FROM servers WHERE server_id = $1",
                &[&self.inner.server_id],
            )
            .await
        {
            Ok(Some(row)) => match (row.try_get::<_, &str>(0), row.try_get::<_, &str>(1)) {
                (Ok(host), Ok(instance)) => format!("instance {instance} on host {host}"),
                _ => "unreadable".to_owned(),
            },
            Ok(None) => "none now".to_owned(),
            Err(e) => format!("unknown: cannot read the servers table: {}", db_error(e)),
        };
        StoreError::Superseded {
            server_id: self.inner.server_id.clone(),
            instance: holder,
        }
    }
}

/// Starts a `REPEATABLE READ READ ONLY` transaction: every read in it sees one snapshot.
async fn begin_snapshot(
    client: &mut tokio_postgres::Client,
) -> Result<Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db_error)
}

/// Ends a [`begin_snapshot`] transaction. It wrote nothing, so it is not timed as a commit.
async fn end_snapshot(tx: Transaction<'_>) -> Result<(), StoreError> {
    tx.commit().await.map_err(db_error)
}

/// Starts a READ COMMITTED transaction whatever the database's default: the feed counter's
/// row lock and `ON CONFLICT DO NOTHING` rely on it (under REPEATABLE READ, concurrent writers
/// of the counter would fail with serialization errors instead of waiting their turn).
async fn begin(client: &mut tokio_postgres::Client) -> Result<Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(db_error)
}

/// Stores (or replaces) the bundle of `trust_domain` in `tx`.
async fn upsert_bundle(
    tx: &Transaction<'_>,
    trust_domain: &TrustDomain,
    bundle: Vec<u8>,
    updated_at: SystemTime,
) -> Result<(), StoreError> {
    let stored = FederatedBundle {
        trust_domain: trust_domain.clone(),
        bundle,
        updated_at,
    };
    tx.execute(
        "INSERT INTO federated_bundles (trust_domain, body) VALUES ($1, $2) \
         ON CONFLICT (trust_domain) DO UPDATE SET body = EXCLUDED.body",
        &[&trust_domain.name(), &encode("federated bundle", &stored)?],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Takes `trust_domain`'s federation lock for the rest of `tx` (waiting for it): a
/// relationship and its bundle change one transaction at a time, so a bundle is never deleted
/// on its own while a relationship that keeps it is being created.
async fn lock_federation(
    tx: &Transaction<'_>,
    trust_domain: &TrustDomain,
) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&super::lock_key(&format!(
            "federation/{}",
            trust_domain.name()
        ))],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Takes job `job`'s advisory lock for the rest of `tx` if no other server holds it; false
/// (logged) when one does.
async fn try_job_lock(tx: &Transaction<'_>, job: &str) -> Result<bool, StoreError> {
    let row = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&super::job_lock_key(job)],
        )
        .await
        .map_err(db_error)?;
    let taken = col::<bool>(&row, 0)?;
    if !taken {
        tracing::debug!(job, "another server runs this job now; skipped");
    }
    Ok(taken)
}

/// Inserts a new entry's row (its revision and body follow in [`PostgresStore::take_revisions`]).
/// The inner error is [`StoreError::AlreadyExists`] when another entry has the same identity.
async fn insert_entry(
    tx: &Transaction<'_>,
    id: &EntryId,
    new: &NewEntry,
    now: SystemTime,
) -> Result<Result<RegistrationEntry, StoreError>, StoreError> {
    let identity = new.identity_key();
    let entry = RegistrationEntry::from_new(id.clone(), new.clone(), now, 0);
    let inserted = tx
        .execute(
            "INSERT INTO entries (id, identity_key, spiffe_id, parent_id, selectors, revision, body) \
             VALUES ($1, $2, $3, $4, $5, 0, '') ON CONFLICT (identity_key) DO NOTHING",
            &[
                &id.as_str(),
                &identity.as_slice(),
                &entry.spiffe_id.as_str(),
                &entry.parent_id.as_str(),
                &selector_strings(&entry),
            ],
        )
        .await
        .map_err(db_error)?;
    if inserted == 1 {
        return Ok(Ok(entry));
    }
    Ok(Err(duplicate_of(tx, &identity, id)
        .await?
        .unwrap_or_else(concurrent_duplicate)))
}

/// Deletes an entry's row and returns its last version.
async fn delete_entry_row(
    tx: &Transaction<'_>,
    id: &EntryId,
) -> Result<Option<RegistrationEntry>, StoreError> {
    let row = tx
        .query_opt(
            "DELETE FROM entries WHERE id = $1 RETURNING body",
            &[&id.as_str()],
        )
        .await
        .map_err(db_error)?;
    row.map(|row| decode("entry", col(&row, 0)?)).transpose()
}

/// [`StoreError::AlreadyExists`] naming the entry other than `id` with this identity, if any.
async fn duplicate_of(
    tx: &Transaction<'_>,
    identity: &[u8; 32],
    id: &EntryId,
) -> Result<Option<StoreError>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT id FROM entries WHERE identity_key = $1 AND id <> $2",
            &[&identity.as_slice(), &id.as_str()],
        )
        .await
        .map_err(db_error)?;
    row.map(|row| {
        Ok(StoreError::AlreadyExists {
            resource: "entry",
            key: col(&row, 0)?,
        })
    })
    .transpose()
}

async fn upsert_revocations(
    tx: &Transaction<'_>,
    revocations: &[Revocation],
) -> Result<(), StoreError> {
    if revocations.is_empty() {
        return Ok(());
    }
    let (serials, not_afters, bodies) = revocation_columns(revocations)?;
    let params: [&(dyn ToSql + Sync); 3] = [&serials, &not_afters, &bodies];
    tx.execute(
        "INSERT INTO revocations (serial, not_after_ns, body) \
         SELECT DISTINCT ON (serial) serial, not_after_ns, body \
             FROM unnest($1::text[], $2::bigint[], $3::text[]) \
             WITH ORDINALITY AS u(serial, not_after_ns, body, n) \
         ORDER BY serial, n DESC \
         ON CONFLICT (serial) DO UPDATE \
         SET not_after_ns = EXCLUDED.not_after_ns, body = EXCLUDED.body",
        &params,
    )
    .await
    .map_err(db_error)?;
    // Tells every server (each polls the counter) to re-sign the CRLs of its authorities.
    tx.execute(
        "UPDATE crl_head SET revocations = revocations + 1 WHERE id = 1",
        &[],
    )
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The columns of `revocations` rows (serial, NotAfter in nanoseconds, body), as arrays for
/// `unnest`.
pub(super) type RevocationColumns = (Vec<String>, Vec<i64>, Vec<String>);

/// [`RevocationColumns`] of `revocations`.
pub(super) fn revocation_columns(
    revocations: &[Revocation],
) -> Result<RevocationColumns, StoreError> {
    let mut serials = Vec::with_capacity(revocations.len());
    let mut not_afters = Vec::with_capacity(revocations.len());
    let mut bodies = Vec::with_capacity(revocations.len());
    for revocation in revocations {
        serials.push(revocation.serial.clone());
        not_afters.push(nanos(revocation.not_after));
        bodies.push(encode("revocation", revocation)?);
    }
    Ok((serials, not_afters, bodies))
}

fn selector_strings(entry: &RegistrationEntry) -> Vec<String> {
    entry.selectors.iter().map(ToString::to_string).collect()
}

/// A duplicate whose entry could not be read back (deleted again meanwhile).
fn concurrent_duplicate() -> StoreError {
    StoreError::AlreadyExists {
        resource: "entry",
        key: "(created and deleted concurrently)".to_owned(),
    }
}

fn entry_not_found(id: &EntryId) -> StoreError {
    StoreError::NotFound {
        resource: "entry",
        key: id.to_string(),
    }
}

fn decode_head(text: &str) -> Result<AuditHead, StoreError> {
    decode("audit head", text)
}

fn limit_plus_one(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX).saturating_add(1)
}

/// A page of `items` (fetched with one more than `size`): the extra one, if there, means more.
fn page_of<T>(mut items: Vec<T>, size: usize, key: impl Fn(&T) -> Vec<u8>) -> Page<T> {
    let more = items.len() > size;
    items.truncate(size);
    let next_page_token = if more {
        items.last().map(|item| page_token(&key(item)))
    } else {
        None
    };
    Page {
        items,
        next_page_token,
    }
}
