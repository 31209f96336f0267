//! The broker's own credentials, from the Workload API like any workload's: its X509-SVID, the
//! trust domain's bundle and the CRLs, replaced on every message of the `FetchX509SVID` stream
//! (rotation, bundle change, revocation) without touching listeners or live connections.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateRevocationListDer;
use sigil_core::{SpiffeId, TrustDomain, X509Bundle, X509Svid};
use sigil_proto::workload::{X509svid, X509svidRequest};
use tokio::sync::watch;
use tracing::warn;
use x509_parser::prelude::FromDer as _;
use x509_parser::revocation_list::CertificateRevocationList;

/// The credentials of one moment.
pub(crate) struct Credentials {
    /// The broker's SVID (chain and key).
    pub(crate) svid: X509Svid,
    /// The trust domain's bundle.
    pub(crate) bundle: X509Bundle,
    /// The CRLs the TLS verifier uses (those webpki reads), DER.
    pub(crate) crls: Vec<CertificateRevocationListDer<'static>>,
    /// Every serial on a CRL x509-parser reads, lowercase hex; checked after the handshake.
    pub(crate) revoked: HashSet<String>,
    /// The nextUpdate (`None`: it has none) of each authority's CRLs that both parsers read,
    /// the earliest of its CRLs, by the authority's name (DER).
    pub(crate) crl_next_update: HashMap<Vec<u8>, Option<SystemTime>>,
    /// The bundles of the federated trust domains the broker accepts peers of
    /// (`federated_trust_domains`) that the Workload API handed it.
    pub(crate) federated: Vec<X509Bundle>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_id", self.svid.spiffe_id())
            .field("crls", &self.crls.len())
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The credentials in one Workload API message: `svid` (with its bundle), the CRLs, and
    /// the federated bundles (`federated_bundles`: trust domain ID to DER) of the trust
    /// domains in `accepted`. A CRL either parser cannot read is logged and does not count
    /// for its authority's freshness (with no other CRL of it, `stale_crl` decides); what one
    /// parser read is still used (the verifier's CRLs, the serials refused after the
    /// handshake). A federated bundle that does not parse is logged and left out: its peers
    /// are refused.
    ///
    /// # Errors
    ///
    /// The SVID or the bundle is unusable.
    pub(crate) fn from_workload_api(
        svid: &X509svid,
        crls: &[Vec<u8>],
        federated_bundles: &BTreeMap<String, Vec<u8>>,
        accepted: &[TrustDomain],
    ) -> anyhow::Result<Self> {
        let mut federated = Vec::new();
        for td in accepted {
            let Some(der) = federated_bundles.get(&td.id_string()) else {
                continue;
            };
            match X509Bundle::from_der(td.clone(), der) {
                // A bundle without X.509 authorities (JWT keys only, or every key withdrawn)
                // vouches for no peer: as if absent.
                Ok(bundle) if bundle.authorities().is_empty() => {}
                Ok(bundle) => federated.push(bundle),
                Err(error) => {
                    warn!(trust_domain = %td, %error, "the workload api sent an unusable federated bundle; its peers are refused");
                }
            }
        }
        let parsed = X509Svid::parse(&svid.x509_svid, &svid.x509_svid_key)
            .map_err(|e| anyhow::anyhow!("the workload api sent an unusable svid: {e}"))?;
        let bundle = X509Bundle::from_der(parsed.spiffe_id().trust_domain().clone(), &svid.bundle)
            .map_err(|e| anyhow::anyhow!("the workload api sent an unusable bundle: {e}"))?;
        let mut revoked = HashSet::new();
        let mut crl_next_update = HashMap::new();
        // Each CRL is read by two parsers, and each use takes only what its parser read:
        // - the TLS verifier gets the CRLs webpki (rustls's parser) reads: rustls refuses to
        //   build a verifier with one it cannot parse, and one bad CRL would keep every
        //   handshake on the previous configuration (at start-up: no configuration at all).
        //   Those x509-parser cannot read come first: webpki checks only the first CRL of an
        //   authority, and theirs are the serials `revoked` lacks;
        // - `revoked` gets the serials of every CRL x509-parser reads (refusing too many is
        //   safe);
        // - a CRL counts for its authority's freshness only when both read it: one the verifier
        //   cannot use (a delta or partitioned CRL, an unknown critical extension) does not,
        //   and with no other CRL of its authority `stale_crl` decides.
        let (mut for_verifier, mut verifier_only) = (Vec::new(), Vec::new());
        for der in crls {
            let verifier = webpki::OwnedCertRevocationList::from_der(der).map(|_| ());
            let parsed = CertificateRevocationList::from_der(der);
            if verifier.is_ok() {
                let list = if parsed.is_ok() {
                    &mut for_verifier
                } else {
                    &mut verifier_only
                };
                list.push(CertificateRevocationListDer::from(der.clone()));
            }
            let crl = match parsed {
                Ok((_, crl)) => crl,
                Err(error) => {
                    warn!(
                        %error,
                        tls_verifier_uses_it = verifier.is_ok(),
                        "the workload api sent a crl x509-parser cannot read; it does not count for its authority's freshness"
                    );
                    continue;
                }
            };
            revoked.extend(
                crl.iter_revoked_certificates()
                    .map(|r| sigil_core::hex::encode(r.raw_serial())),
            );
            if let Err(error) = verifier {
                warn!(
                    %error,
                    issuer = %crl.issuer(),
                    "the workload api sent a crl the tls verifier cannot use: its serials are refused after the handshake; it does not count for its authority's freshness"
                );
                continue;
            }
            let next = crl.next_update().map(|t| {
                sigil_core::time::from_unix_seconds(t.timestamp()).unwrap_or(SystemTime::UNIX_EPOCH)
            });
            // Several CRLs of one authority: the one that goes stale first decides (one without
            // nextUpdate, at once).
            crl_next_update
                .entry(crl.issuer().as_raw().to_vec())
                .and_modify(|held: &mut Option<SystemTime>| {
                    *held = held.zip(next).map(|(a, b)| a.min(b));
                })
                .or_insert(next);
        }
        Ok(Self {
            svid: parsed,
            bundle,
            crls: verifier_only.into_iter().chain(for_verifier).collect(),
            revoked,
            crl_next_update,
            federated,
        })
    }

    /// The federated bundle of `td`, if the broker accepts its peers and has it.
    pub(crate) fn federated_bundle(&self, td: &TrustDomain) -> Option<&X509Bundle> {
        self.federated.iter().find(|b| b.trust_domain() == td)
    }

    /// Why revocations of the authority named `issuer` (a certificate's issuer, DER) cannot be
    /// trusted at `now`: no readable CRL of it, a CRL without nextUpdate, or one past it.
    pub(crate) fn crl_problem(&self, issuer: &[u8], now: SystemTime) -> Option<String> {
        crl_problem(&self.crl_next_update, issuer, now)
    }
}

fn crl_problem(
    next_updates: &HashMap<Vec<u8>, Option<SystemTime>>,
    issuer: &[u8],
    now: SystemTime,
) -> Option<String> {
    match next_updates.get(issuer) {
        None => Some("no readable CRL of the peer's authority".to_owned()),
        Some(None) => Some("the CRL of the peer's authority has no nextUpdate".to_owned()),
        Some(Some(next)) if *next < now => Some(format!(
            "the CRL of the peer's authority is past its nextUpdate ({})",
            sigil_core::time::format_rfc3339(sigil_core::time::unix_seconds(*next))
        )),
        Some(Some(_)) => None,
    }
}

/// Keeps `tx` current from the Workload API at `socket`: every message replaces the
/// credentials (the SVID named `want`, or the first). A broken stream is reopened after a
/// second; the last credentials stay until then.
pub(crate) async fn watch_credentials(
    socket: PathBuf,
    want: Option<SpiffeId>,
    federated: Vec<TrustDomain>,
    tx: watch::Sender<Option<Arc<Credentials>>>,
) {
    loop {
        if let Err(error) = follow(&socket, want.as_ref(), &federated, &tx).await {
            warn!(%error, socket = %socket.display(), "workload api stream ended; reconnecting in 1s");
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow(
    socket: &Path,
    want: Option<&SpiffeId>,
    federated: &[TrustDomain],
    tx: &watch::Sender<Option<Arc<Credentials>>>,
) -> anyhow::Result<()> {
    let mut client = sigil_proto::client::workload_api(socket).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    while let Some(message) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
    {
        let Some(svid) = message
            .svids
            .iter()
            .find(|s| want.is_none_or(|w| w.as_str() == s.spiffe_id))
        else {
            warn!(
                want = want.map(SpiffeId::as_str),
                "the workload api offers no such identity; keeping the previous one"
            );
            continue;
        };
        let credentials = Credentials::from_workload_api(
            svid,
            &message.crl,
            &message.federated_bundles,
            federated,
        )?;
        // "credentials updated" is logged once new handshakes use them (the broker's
        // credentials task), not here: a connection in between would find no TLS configuration.
        tx.send_replace(Some(Arc::new(credentials)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn revocations_count_as_unchecked_without_a_fresh_crl_of_the_peers_authority() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let hour = Duration::from_secs(3600);
        let map = HashMap::from([
            (b"fresh".to_vec(), Some(now + hour)),
            (b"stale".to_vec(), Some(now - hour)),
            (b"open-ended".to_vec(), None),
        ]);
        assert_eq!(crl_problem(&map, b"fresh", now), None);
        for (issuer, words) in [
            (&b"stale"[..], "past its nextUpdate"),
            (b"open-ended", "no nextUpdate"),
            (b"unknown", "no readable CRL"),
        ] {
            let problem = crl_problem(&map, issuer, now).unwrap_or_default();
            assert!(problem.contains(words), "{problem}");
        }
    }
}
