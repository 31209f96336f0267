//! Privileged sessions and the revocation list.

use std::ops::Bound;
use std::time::SystemTime;

use ::sled::IVec;
use ::sled::transaction::ConflictableTransactionError;

use super::entries::{EntryTx, TxResult};
use super::record::StoredChange;
use super::{Inner, PageCollector, decode, encode, page_start, transaction_error};
use crate::audit::NewAuditRecord;
use crate::store::{
    Change, ChangeKind, EntryId, NewEntry, Page, PageRequest, Revocation, Session,
    SessionCredential, SessionEntryOp, SessionFilter, SessionId, SessionUpdate, StoreError,
};

// --- privileged sessions ---

impl Inner {
    pub(super) fn create_session(
        &self,
        session: &Session,
        entry: Option<&(EntryId, NewEntry)>,
        audit: &[NewAuditRecord],
        now: SystemTime,
    ) -> Result<Session, StoreError> {
        self.entry_tx(|tx| {
            if tx.sessions.get(session.id.as_str())?.is_some() {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::AlreadyExists {
                        resource: "session",
                        key: session.id.to_string(),
                    },
                ));
            }
            let mut session = session.clone();
            if let Some((id, new)) = entry {
                let created = tx.create_entry(id, new, now)?;
                session.entry_id = Some(created.id);
            }
            tx.put_session(&session)?;
            self.seal_into(tx.audit, tx.audit_head, audit, now)?;
            Ok(session)
        })
    }

    pub(super) fn update_session(
        &self,
        update: &SessionUpdate,
        entry_id: Option<&EntryId>,
        now: SystemTime,
    ) -> Result<Session, StoreError> {
        self.entry_tx(|tx| {
            let id = &update.session.id;
            let Some(bytes) = tx.sessions.get(id.as_str())? else {
                return Err(ConflictableTransactionError::Abort(StoreError::NotFound {
                    resource: "session",
                    key: id.to_string(),
                }));
            };
            let old: Session =
                decode("session", &bytes).map_err(ConflictableTransactionError::Abort)?;
            if old.state != update.expected {
                return Err(ConflictableTransactionError::Abort(
                    StoreError::StateChanged {
                        resource: "session",
                        key: id.to_string(),
                    },
                ));
            }
            let mut session = update.session.clone();
            // Serials and JWT ids recorded meanwhile are kept.
            session.serials = old.serials.clone();
            session.jwts = old.jwts.clone();
            match &update.entry {
                SessionEntryOp::Create(new) => {
                    if let Some(entry_id) = entry_id {
                        let created = tx.create_entry(entry_id, new, now)?;
                        session.entry_id = Some(created.id);
                    }
                }
                SessionEntryOp::Delete => {
                    if let Some(entry_id) = &old.entry_id
                        && let Some(entry) = tx.get(entry_id)?
                    {
                        let revision = tx.next_revision()?;
                        tx.replace(&entry)?;
                        tx.entries.remove(entry_id.as_str())?;
                        tx.record(&StoredChange::Change(Change {
                            revision,
                            kind: ChangeKind::EntryDeleted(entry),
                        }))?;
                    }
                }
            }
            for revocation in &update.revocations {
                let value = encode("revocation", revocation)
                    .map_err(ConflictableTransactionError::Abort)?;
                tx.revocations.insert(revocation.serial.as_bytes(), value)?;
            }
            tx.put_session(&session)?;
            // The change and its audit records are one write.
            self.seal_into(tx.audit, tx.audit_head, &update.audit, now)?;
            Ok(session)
        })
    }

    pub(super) fn add_session_credential(
        &self,
        id: &SessionId,
        credential: &SessionCredential,
    ) -> Result<Session, StoreError> {
        self.trees
            .sessions
            .transaction(|tx| {
                let Some(bytes) = tx.get(id.as_str())? else {
                    return Err(ConflictableTransactionError::Abort(StoreError::NotFound {
                        resource: "session",
                        key: id.to_string(),
                    }));
                };
                let mut session: Session =
                    decode("session", &bytes).map_err(ConflictableTransactionError::Abort)?;
                match credential {
                    SessionCredential::X509(serial) => session.serials.push(serial.clone()),
                    SessionCredential::Jwt(jwt) => session.jwts.push(jwt.clone()),
                }
                let value =
                    encode("session", &session).map_err(ConflictableTransactionError::Abort)?;
                tx.insert(id.as_str(), value)?;
                Ok(session)
            })
            .map_err(transaction_error)
    }

    pub(super) fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> Result<Page<Session>, StoreError> {
        let start = page_start(page.token.as_deref(), |s| SessionId::parse(s).is_ok())?;
        let mut page = PageCollector::new(page.effective_size());
        for item in self
            .trees
            .sessions
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
        {
            let session: Session = decode("session", &item?.1)?;
            if filter.matches(&session) && !page.offer(session) {
                break;
            }
        }
        Ok(page.finish(|session: &Session| session.id.as_str().as_bytes().to_vec()))
    }

    pub(super) fn get_session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.trees
            .sessions
            .get(id.as_str())?
            .map(|bytes| decode("session", &bytes))
            .transpose()
    }
}

impl EntryTx<'_> {
    fn put_session(&self, session: &Session) -> TxResult<()> {
        let value = encode("session", session).map_err(ConflictableTransactionError::Abort)?;
        self.sessions.insert(session.id.as_str(), value)?;
        Ok(())
    }
}

// --- revoked serials ---

impl Inner {
    pub(super) fn add_revocations(&self, revocations: &[Revocation]) -> Result<(), StoreError> {
        let mut batch = ::sled::Batch::default();
        for revocation in revocations {
            batch.insert(
                revocation.serial.as_bytes(),
                encode("revocation", revocation)?,
            );
        }
        self.trees.revocations.apply_batch(batch)?;
        Ok(())
    }

    pub(super) fn list_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.trees
            .revocations
            .iter()
            .map(|item| decode("revocation", &item?.1))
            .collect()
    }

    pub(super) fn prune_revocations(&self, now: SystemTime) -> Result<u64, StoreError> {
        let mut pruned = 0;
        for item in self.trees.revocations.iter() {
            let (key, value) = item?;
            let revocation: Revocation = decode("revocation", &value)?;
            if revocation.not_after <= now
                && self
                    .trees
                    .revocations
                    .compare_and_swap(&key, Some(&value), None::<IVec>)?
                    .is_ok()
            {
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}
