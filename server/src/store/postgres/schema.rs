//! The PostgreSQL schema and its migrations.
//!
//! Each migration runs once, in order, inside one transaction that first takes a
//! transaction-level advisory lock, so that several servers starting at once on an empty
//! database migrate it exactly once; `schema_migrations` records what ran. A database migrated
//! by a newer build (a version this build does not know) is refused rather than written.
//!
//! Text keys that listings order by are `COLLATE "C"`: byte order, as the sled backend orders
//! them, whatever the database's default collation. Records are JSON text (`body`), as the sled
//! backend's were before it stored entries, changes and audit records in a binary form; the
//! other columns are what queries filter, order or
//! lock on.

use tokio_postgres::Client;

use super::db_error;
use crate::store::StoreError;

/// The oldest PostgreSQL this backend runs on (`server_version_num`).
pub(super) const MIN_SERVER_VERSION: i32 = 140_000;

/// The advisory lock key migrations take (ASCII "sigilmig").
const MIGRATION_LOCK: i64 = 0x7369_6769_6c6d_6967;

/// One step of the schema.
struct Migration {
    version: i32,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Append only: a released migration is never edited.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "entries and their change feed, nodes, join tokens, bundles, CA journals, \
                  audit chains, sessions, revocations, CRL numbers",
        sql: r#"
CREATE TABLE feed_head (
    id integer PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL
);
INSERT INTO feed_head (id, revision) VALUES (1, 0);

CREATE TABLE entries (
    id text COLLATE "C" PRIMARY KEY,
    identity_key bytea NOT NULL UNIQUE,
    spiffe_id text COLLATE "C" NOT NULL,
    parent_id text COLLATE "C" NOT NULL,
    selectors text[] NOT NULL,
    revision bigint NOT NULL,
    body text NOT NULL
);
CREATE INDEX entries_by_parent ON entries (parent_id, id);
CREATE INDEX entries_by_spiffe_id ON entries (spiffe_id, id);
CREATE INDEX entries_by_selector ON entries USING gin (selectors);

CREATE TABLE entry_changes (
    revision bigint PRIMARY KEY,
    body text NOT NULL
);

CREATE TABLE nodes (
    spiffe_id text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

CREATE TABLE join_tokens (
    token_hash text COLLATE "C" PRIMARY KEY,
    expires_at_ns bigint NOT NULL,
    body text NOT NULL
);

CREATE TABLE federated_bundles (
    trust_domain text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

CREATE TABLE ca_journals (
    server_id text COLLATE "C" PRIMARY KEY,
    journal bytea NOT NULL
);

CREATE TABLE audit_heads (
    chain_id text COLLATE "C" PRIMARY KEY,
    sequence bigint NOT NULL,
    body text
);

CREATE TABLE audit_records (
    chain_id text COLLATE "C" NOT NULL,
    sequence bigint NOT NULL,
    time_ms bigint NOT NULL,
    body text NOT NULL,
    PRIMARY KEY (chain_id, sequence)
);
CREATE INDEX audit_records_by_time ON audit_records (chain_id, time_ms);

CREATE TABLE audit_checkpoints (
    chain_id text COLLATE "C" NOT NULL,
    sequence bigint NOT NULL,
    body text NOT NULL,
    PRIMARY KEY (chain_id, sequence)
);

CREATE TABLE audit_sources (
    spiffe_id text COLLATE "C" NOT NULL,
    spool_id text COLLATE "C" NOT NULL,
    last_sequence bigint NOT NULL,
    PRIMARY KEY (spiffe_id, spool_id)
);

CREATE TABLE sessions (
    id text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

CREATE TABLE revocations (
    serial text COLLATE "C" PRIMARY KEY,
    not_after_ns bigint NOT NULL,
    body text NOT NULL
);

CREATE TABLE crl_numbers (
    authority_id text COLLATE "C" PRIMARY KEY,
    last_number bigint NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        description: "servers sharing the database (claim and heartbeat), their published \
                      bundles and CRLs, and the counters that tell the others",
        sql: r#"
CREATE TABLE servers (
    server_id text COLLATE "C" PRIMARY KEY,
    instance_id text NOT NULL,
    host text NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL
);

CREATE TABLE server_bundles (
    server_id text COLLATE "C" PRIMARY KEY,
    bundle text NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE bundle_head (
    id integer PRIMARY KEY CHECK (id = 1),
    sequence bigint NOT NULL
);
INSERT INTO bundle_head (id, sequence) VALUES (1, 0);

-- `audit show` across the servers' chains, by time.
CREATE INDEX audit_records_merged ON audit_records (time_ms, chain_id, sequence);

CREATE TABLE server_crls (
    server_id text COLLATE "C" PRIMARY KEY,
    crls text NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE crl_head (
    id integer PRIMARY KEY CHECK (id = 1),
    revocations bigint NOT NULL,
    crls bigint NOT NULL
);
INSERT INTO crl_head (id, revocations, crls) VALUES (1, 0, 0);
"#,
    },
    Migration {
        version: 3,
        description: "federation relationships (their endpoint, profile and fetch status)",
        sql: r#"
CREATE TABLE federations (
    trust_domain text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);
"#,
    },
];

/// The schema version this build writes.
pub(super) fn current_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Checks the server's version, then brings the schema up to date (see the module docs).
/// Returns the versions it applied.
pub(super) async fn migrate(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::integer", &[])
        .await
        .map_err(db_error)?;
    let version: i32 = row.try_get(0).map_err(db_error)?;
    if version < MIN_SERVER_VERSION {
        return Err(StoreError::Unsupported(format!(
            "PostgreSQL {}.{} is too old: Sigil needs PostgreSQL 14 or later",
            version / 10_000,
            version % 10_000 / 100
        )));
    }
    // Up to date already: no lock and no DDL (a runtime role without CREATE can start).
    let row = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(db_error)?;
    if row.try_get::<_, bool>(0).map_err(db_error)? {
        let row = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(db_error)?;
        let applied: i32 = row.try_get(0).map_err(db_error)?;
        if applied == current_version() {
            return Ok(Vec::new());
        }
    }
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_error)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY,
             description text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db_error)?;
    let row = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(db_error)?;
    let applied: i32 = row.try_get(0).map_err(db_error)?;
    if applied > current_version() {
        return Err(StoreError::Unsupported(format!(
            "the database schema is at version {applied}, newer than this build knows ({}): \
             it was migrated by a newer sigil-server; run that version",
            current_version()
        )));
    }
    let mut ran = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > applied) {
        tx.batch_execute(migration.sql).await.map_err(db_error)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
            &[&migration.version, &migration.description],
        )
        .await
        .map_err(db_error)?;
        ran.push(migration.version);
    }
    tx.commit().await.map_err(db_error)?;
    Ok(ran)
}
