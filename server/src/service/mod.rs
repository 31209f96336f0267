//! The services: each owns the rules of one subject, writes the store and the audit log for
//! it, and is what the gRPC handlers in [`crate::api`] call.
//!
//! | service | owns |
//! |---|---|
//! | [`authority::Authority`] | the CA as the others use it: signing per credential kind with the TTL policy, and the one published bundle state |
//! | [`entries::Entries`] | registration entries: what may be registered, written and audited |
//! | [`agents::Agents`] | join tokens, attestation, authentication on every call, renewal, eviction, bans |
//! | [`svids::Svids`] | workload SVIDs for agents (authorized from the entry cache) and operator mints |
//! | [`bundles::Bundles`] | the own bundle with its CRLs, and federated bundles |
//! | [`federation::Federation`] | federation relationships, the poller of their bundle endpoints, and the federated bundles agents get |
//! | [`sessions::Sessions`] | privileged sessions, from open to expiry, and the SVIDs issued under them |
//! | [`sync::EntrySync`] | what each agent's sync stream says |
//! | [`crl::CrlPublisher`] | the revocation lists |
//! | [`audit::AuditLog`] | the running audit log on the store (the chain itself is [`crate::audit`]) |
//! | [`ingest::AuditIngest`] | what audit sources (brokers) record in the chain, each event once |
//! | [`entry_cache::EntryCache`] | every entry in memory, kept current from the change feed |
//!
//! Services take and return domain types and their own error enum; they know nothing of gRPC.
//! Who may call whom: services call the store, the CA, the pure [`crate::audit`] and
//! [`crate::policy`] modules and each other's types; they never call [`crate::api`].

pub(crate) mod agents;
pub(crate) mod audit;
pub(crate) mod audit_peers;
pub(crate) mod authority;
pub(crate) mod bundles;
pub(crate) mod crl;
pub(crate) mod entries;
pub(crate) mod entry_cache;
pub(crate) mod federation;
pub(crate) mod ingest;
pub(crate) mod metrics;
pub(crate) mod sessions;
pub(crate) mod svids;
pub(crate) mod sync;
#[cfg(test)]
pub(crate) mod testing;
