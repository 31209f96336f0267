//! Metrics and health of the real binaries: the server's and the agent's `/metrics` parsed by
//! Python's `prometheus_client` (the OpenMetrics parser Prometheus users have), issuance
//! counters that move, and `/ready` through start, serving and the SIGTERM drain, and after a
//! restart with entries to mint (ready only once their SVIDs are).
//!
//! The parser runs under `SIGIL_PYTHON` (default `python3`); `.ci/run` installs
//! `prometheus-client` in its venv and sets `SIGIL_REQUIRE_PROMETHEUS_CLIENT=1`, which turns a missing
//! parser into a failure. Elsewhere that part is skipped with one line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr,
    reason = "test code"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sigil_proto::admin::CreateEntriesRequest;
use sigil_tests::{
    TestAgentProcess, TestServer, create_entry, entry, http_get, logged_endpoint, metric_becomes,
    metric_sample, my_uid, svid_ids, x509_stream_with,
};

/// Separate listeners for metrics and health, on ports the system picks.
const ENDPOINTS: &str = "metrics_address = \"127.0.0.1:0\"\nhealth_address = \"127.0.0.1:0\"\n";

/// The samples of the OpenMetrics text at `address`, as Python's `prometheus_client` parses
/// them: `name{label="value",...}` -> value (labels sorted). `None` when the parser is not
/// installed (and CI does not require it).
fn parsed_by_prometheus_client(address: SocketAddr) -> Option<BTreeMap<String, f64>> {
    let (status, body) = http_get(address, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "not OpenMetrics text: {body}");
    let python = sigil_tests::python_with(
        "prometheus_client",
        "SIGIL_REQUIRE_PROMETHEUS_CLIENT",
        "prometheus-client",
    )?;
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|line| {
                let (sample, value) = line.rsplit_once(' ').unwrap();
                (sample.to_owned(), value.parse::<f64>().unwrap())
            })
            .collect(),
    )
}

/// Fails unless docs/operations.md names every metric family the endpoint at `address`
/// exposes (each `# TYPE` line), counters with their `_total` sample name.
fn documented(address: SocketAddr) {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    let (_, body) = http_get(address, "/metrics").unwrap();
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split(' ').skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        let named = if kind == "counter" {
            format!("`{name}_total`")
        } else {
            format!("`{name}`")
        };
        assert!(
            docs.contains(&named),
            "docs/operations.md does not name {named}"
        );
    }
}

/// The value of `sample` (`name{labels}`), 0 when absent.
fn value(samples: &BTreeMap<String, f64>, sample: &str) -> f64 {
    samples.get(sample).copied().unwrap_or(0.0)
}

/// Polls `/ready` at `address` until it answers `status`, returning the body.
fn ready_until(address: SocketAddr, status: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Ok((got, body)) = http_get(address, "/ready")
            && got == status
        {
            return body;
        }
        assert!(Instant::now() < deadline, "/ready never answered {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_and_ready_follows_the_lifecycle() {
    let server = TestServer::start(ENDPOINTS);
    let server_metrics = logged_endpoint(|| server.log_text(), "metrics");
    let server_health = logged_endpoint(|| server.log_text(), "health");
    assert_ne!(server_metrics, server_health);
    assert_eq!(
        http_get(server_health, "/live").unwrap(),
        (200, "live\n".into())
    );
    assert_eq!(
        ready_until(server_health, 200, Duration::from_secs(5)),
        "ready\n"
    );
    // Each listener serves its own paths only.
    assert_eq!(http_get(server_health, "/metrics").unwrap().0, 404);
    assert_eq!(http_get(server_metrics, "/ready").unwrap().0, 404);

    let agent = TestAgentProcess::start_with_config(
        &server,
        &format!("{ENDPOINTS}log_format = \"json\"\n"),
    )
    .await;
    let agent_metrics = logged_endpoint(|| agent.log_text(), "metrics");
    let agent_health = logged_endpoint(|| agent.log_text(), "health");
    let me = format!("unix:uid:{}", my_uid());
    const ID: &str = "spiffe://example.org/observed";
    create_entry(&server, entry(ID, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (mut stream, _) = x509_stream_with(&agent, |m| svid_ids(m).contains(&ID.into())).await;
    assert_eq!(
        ready_until(agent_health, 200, Duration::from_secs(10)),
        "ready\n"
    );

    if let Some(before) = parsed_by_prometheus_client(server_metrics) {
        for sample in [
            "sigil_server_svids_issued_total{kind=\"x509\"}",
            "sigil_server_svids_issued_total{kind=\"x509_agent\"}",
            "sigil_server_signing_duration_seconds_count{kind=\"x509\"}",
            "sigil_server_entries{}",
            "sigil_server_sync_streams{}",
            "sigil_server_agents_connected{}",
            "sigil_server_audit_appended_total{}",
            "sigil_server_store_commit_duration_seconds_count{}",
            "sigil_server_grpc_calls_total{code=\"ok\",method=\"AttestAgent\",service=\"sigil.node.v1.Node\"}",
        ] {
            assert!(value(&before, sample) >= 1.0, "{sample}: {before:#?}");
        }
        assert!(
            value(
                &before,
                "sigil_server_authority_expiry_seconds{kind=\"x509\",state=\"active\"}"
            ) > 0.0
        );
        assert!(
            value(
                &before,
                "sigil_server_authority_next_prepare_seconds{kind=\"x509\"}"
            ) > 0.0
        );
        assert!(
            before.contains_key("sigil_server_audit_checkpoint_age_seconds{}"),
            "{before:#?}"
        );
        assert!(
            before.contains_key("sigil_server_crl_number{authority=\"own\"}"),
            "{before:#?}"
        );
        // No SPIFFE ID as a label value anywhere.
        assert!(
            before.keys().all(|k| !k.contains("spiffe://")),
            "{before:#?}"
        );

        // An operator's mint moves its counter, and only its.
        sigil_tests::server_cli(
            &server,
            &["x509", "mint", "--spiffe-id", "spiffe://example.org/minted"],
        );
        let after = parsed_by_prometheus_client(server_metrics).unwrap();
        let minted = "sigil_server_svids_issued_total{kind=\"x509_minted\"}";
        assert_eq!(value(&after, minted), value(&before, minted) + 1.0);
        assert!(
            value(
                &after,
                "sigil_server_grpc_calls_total{code=\"ok\",method=\"MintX509SVID\",service=\"sigil.admin.v1.Admin\"}"
            ) >= 1.0,
            "{after:#?}"
        );
    }
    // A call is counted when it ends: end one stream (the one above may have been the first
    // and is still open) and wait until the agent has seen it go.
    {
        let mut client = agent.client().await;
        let mut ended = client
            .fetch_x509svid(sigil_proto::workload::X509svidRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(ended.message().await.unwrap().is_some());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(agent_metrics, "/metrics").unwrap();
        if body.lines().any(|line| {
            line.starts_with("sigil_agent_grpc_calls_total{")
                && line.contains("method=\"FetchX509SVID\"")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an ended FetchX509SVID stream was never counted:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(held) = parsed_by_prometheus_client(agent_metrics) {
        assert!(value(&held, "sigil_agent_svids{}") >= 1.0, "{held:#?}");
        assert_eq!(value(&held, "sigil_agent_server_connected{}"), 1.0);
        assert_eq!(
            value(&held, "sigil_agent_server_unreachable_seconds{}"),
            0.0
        );
        assert!(value(&held, "sigil_agent_svid_soonest_expiry_seconds{}") > 0.0);
        assert!(
            value(&held, "sigil_agent_workload_connections{}") >= 1.0,
            "{held:#?}"
        );
        assert!(
            held.keys()
                .any(|k| k.starts_with("sigil_agent_grpc_calls_total{")
                    && k.contains("method=\"FetchX509SVID\"")),
            "{held:#?}"
        );
    }

    documented(server_metrics);
    documented(agent_metrics);

    // The agent drains for as long as the workload holds its stream (at most 5 s): /ready says
    // so meanwhile, /live still answers.
    agent.signal_nowait("TERM");
    let body = ready_until(agent_health, 503, Duration::from_secs(3));
    assert!(body.contains("draining"), "{body}");
    assert_eq!(http_get(agent_health, "/live").unwrap().0, 200);
    drop(stream.message().await);

    // The server: /ready goes 503 (draining) from the signal until the process is gone.
    server.signal_nowait("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_draining = false;
    while Instant::now() < deadline {
        match http_get(server_health, "/ready") {
            Ok((503, body)) if body.contains("draining") => saw_draining = true,
            Ok((200, _)) if saw_draining => panic!("ready again after draining began"),
            Ok(_) => {}
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        saw_draining,
        "the server's /ready never said it was draining"
    );
}

// An agent that starts with entries to mint says it is ready only once their SVIDs are minted
// (a workload that connects then gets its identity at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_is_ready_only_once_its_entries_svids_are_minted() {
    const ENTRIES: usize = 500;
    let server = TestServer::start("");
    let mut agent = TestAgentProcess::start_with_config(
        &server,
        &format!("{ENDPOINTS}log_format = \"json\"\n"),
    )
    .await;
    let other = format!("unix:uid:{}", my_uid().wrapping_add(1));
    let entries = (0..ENTRIES)
        .map(|i| {
            entry(
                &format!("spiffe://example.org/ready/{i}"),
                &agent.agent_id(),
                &[&other],
            )
        })
        .collect();
    let created = server
        .admin()
        .await
        .create_entries(CreateEntriesRequest { entries })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(created.len(), ENTRIES);
    let metrics = logged_endpoint(|| agent.log_text(), "metrics");
    // The agent minted its entries' SVIDs.
    metric_becomes(
        metrics,
        "sigil_agent_svids",
        ENTRIES as f64,
        Duration::from_secs(60),
    )
    .await;

    // Started again, it holds nothing until it has synced and minted.
    let before = agent.log_text().len();
    agent.restart();
    let since_restart = || agent.log_text()[before..].to_owned();
    let health = logged_endpoint(since_restart, "health");
    let metrics = logged_endpoint(since_restart, "metrics");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut not_ready = 0;
    loop {
        match http_get(health, "/ready") {
            Ok((200, _)) => break,
            Ok((503, _)) | Err(_) => not_ready += 1,
            Ok(other) => panic!("/ready answered {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent never became ready"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // Read after `/ready` said so: every SVID was minted before.
    let held = metric_sample(metrics, "sigil_agent_svids");
    assert!(
        held >= ENTRIES as f64,
        "ready with {held} SVIDs of {ENTRIES} (after {not_ready} answers not ready)"
    );
}
