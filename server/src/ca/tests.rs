//! The CA's tests: the shared fixtures here; the tests of the authorities (first start,
//! rotation, the journal, restarts) in `tests/authorities.rs`; those of signing in
//! `tests/signing.rs`.

mod authorities;
mod signing;
mod upstream;

use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SignatureAlgorithm};
use rustls_pki_types::CertificateDer;
use sigil_core::JwtSvid;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::X509Certificate;

use super::*;

// --- fixtures ---

const TD: &str = "example.org";
const WORKLOAD: &str = "spiffe://example.org/ns/prod/web";
const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/abc";

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// An in-memory journal store, shared between "restarts".
#[derive(Default)]
struct MemoryJournal {
    journal: Mutex<Option<Vec<u8>>>,
    saves: AtomicUsize,
    fail_saves: AtomicBool,
}

#[async_trait]
impl CaJournalStore for MemoryJournal {
    async fn load_ca_journal(&self) -> Result<Option<Vec<u8>>, CaJournalStoreError> {
        Ok(self.journal.lock().unwrap().clone())
    }

    async fn save_ca_journal(&self, journal: Vec<u8>) -> Result<(), CaJournalStoreError> {
        if self.fail_saves.load(Ordering::SeqCst) {
            return Err(CaJournalStoreError::new("disk full"));
        }
        self.saves.fetch_add(1, Ordering::SeqCst);
        *self.journal.lock().unwrap() = Some(journal);
        Ok(())
    }
}

impl MemoryJournal {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.journal.lock().unwrap().as_ref().unwrap()).unwrap()
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    keys_dir: std::path::PathBuf,
    journal: Arc<MemoryJournal>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let keys_dir = tmp.path().join("keys");
        Self {
            _tmp: tmp,
            keys_dir,
            journal: Arc::new(MemoryJournal::default()),
        }
    }

    async fn ca(&self, ca_ttl: Duration, now: SystemTime) -> Result<Ca, CaError> {
        let keys = Arc::new(DiskKeyManager::new(&self.keys_dir).unwrap());
        Ca::load_or_init(td(), ca_ttl, keys, self.journal.clone(), now).await
    }

    fn key_files(&self) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(&self.keys_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn csr_with(alg: &'static SignatureAlgorithm, params: &CertificateParams) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn csr() -> Vec<u8> {
    csr_with(&PKCS_ECDSA_P256_SHA256, &CertificateParams::default())
}

fn workload(ttl: u64) -> WorkloadX509SvidParams {
    WorkloadX509SvidParams {
        spiffe_id: id(WORKLOAD),
        dns_names: vec!["web.example.org".into(), "*.web.example.org".into()],
        ttl: secs(ttl),
        caps: vec![],
        session: None,
    }
}

fn pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// `openssl verify -x509_strict -CAfile bundle.pem -attime <at> [extra] leaf.pem`.
fn openssl_verify(
    bundle: &X509Bundle,
    leaf: &CertificateDer<'_>,
    at: SystemTime,
    extra: &[&str],
) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let (bundle_pem, leaf_pem) = (dir.path().join("bundle.pem"), dir.path().join("leaf.pem"));
    std::fs::write(&bundle_pem, bundle.to_pem()).unwrap();
    std::fs::write(&leaf_pem, pem(leaf)).unwrap();
    let at = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-attime", &at.to_string()])
        .args(extra)
        .arg("-CAfile")
        .arg(&bundle_pem)
        .arg(&leaf_pem)
        .output()
        .expect("openssl is on PATH");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    assert!(rest.is_empty());
    cert
}

fn unix(t: SystemTime) -> i64 {
    i64::try_from(authority::unix_seconds(t)).unwrap()
}

/// The X.509 authority ids in the bundle, in order.
fn bundle_ids(ca: &Ca) -> Vec<String> {
    ca.x509_bundle()
        .authorities()
        .iter()
        .map(|der| hex(parse(der).raw_serial()))
        .collect()
}

fn states(ca: &Ca, kind: AuthorityKind) -> Vec<(String, AuthorityState)> {
    ca.authorities()
        .into_iter()
        .filter(|a| a.kind == kind)
        .map(|a| (a.id, a.state))
        .collect()
}

fn active_id(ca: &Ca, kind: AuthorityKind) -> String {
    ca.authorities()
        .into_iter()
        .find(|a| a.kind == kind && a.state == AuthorityState::Active)
        .unwrap()
        .id
}

/// Checks the leaf profile field by field, beyond what sigil-core checks.
fn assert_leaf_profile(der: &CertificateDer<'_>, want_id: &str, dns: &[&str], root: &[u8]) {
    let cert = parse(der);
    assert!(cert.subject().iter().next().is_none(), "empty subject");
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "san is critical with an empty subject");
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![want_id.to_owned()]);
    let dns_sans: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        dns_sans,
        dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()
    );
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(
        bc.critical && !bc.value.ca,
        "basic constraints present, CA=false"
    );
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert_eq!(cert.raw_serial().len(), 16, "128-bit serial");
    assert!(cert.raw_serial()[0] & 0x80 == 0, "positive serial");
    // The AKI names the root's SKI.
    let root_der = CertificateDer::from(root.to_vec());
    let root = parse(&root_der);
    let ski = root
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap();
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, ski);
    assert_eq!(cert.issuer(), root.subject());
}

fn jwt_kid(svid: &JwtSvid) -> String {
    let header = svid.token().split('.').next().unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}
