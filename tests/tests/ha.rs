//! Several servers on one PostgreSQL database (high availability): each has its own CA and
//! `server_id`, every one serves the union of their authorities, an entry written through
//! one reaches agents syncing from another, and an agent whose server dies moves to the next
//! server it lists and keeps serving its workloads.
//!
//! Needs PostgreSQL (`sigil-testkit` starts it); skipped with one line without it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use sigil_tests::{
    CuttableProxy, TestAgentProcess, TestServer, create_entry, entry, my_uid, openssl_verify,
    svid_ids, x509_stream_with,
};

/// The configuration of server `id` on the database at `url`.
fn on_database(url: &str, id: &str) -> String {
    format!("store = \"postgres\"\npostgres_url = \"{url}\"\nserver_id = \"{id}\"\n")
}

/// The DER of each authority in `server`'s bundle.
async fn authorities(server: &TestServer) -> BTreeSet<Vec<u8>> {
    server
        .bundle()
        .await
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// Waits (at most 15 s) until every server's bundle holds `count` authorities, the same ones.
async fn bundles_converge(servers: &[&TestServer], count: usize) -> BTreeSet<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut seen = Vec::new();
        for server in servers {
            seen.push(authorities(server).await);
        }
        if seen.iter().all(|s| s.len() == count && *s == seen[0]) {
            return seen.swap_remove(0);
        }
        assert!(
            Instant::now() < deadline,
            "bundles did not converge on {count} authorities: {:?}",
            seen.iter().map(BTreeSet::len).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Servers `ids` on the database at `url`, once every one's bundle holds every one's CA.
async fn servers_on<const N: usize>(url: &str, ids: [&str; N]) -> [TestServer; N] {
    let servers = ids.map(|id| TestServer::start(&on_database(url, id)));
    let refs: Vec<&TestServer> = servers.iter().collect();
    bundles_converge(&refs, N).await;
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_serve_one_bundle_and_an_agent_fails_over_between_them() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let [a, b, mut c] = servers_on(&url, ["a", "b", "c"]).await;
    // Every server serves (and verifies against) all three CAs.
    let union = authorities(&a).await;
    assert_eq!(union.len(), 3);

    // Nine agents race on one join token across the three servers: exactly one attests.
    let token = a.join_token(Duration::from_secs(600)).await;
    let mut racers = tokio::task::JoinSet::new();
    for server in [&a, &b, &c].into_iter().cycle().take(9) {
        let (address, bundle, token) = (server.node_addr, server.bundle().await, token.clone());
        racers.spawn(async move {
            let mut client = sigil_tests::node_client(address, &bundle, None)
                .await
                .unwrap();
            client
                .attest_agent(sigil_proto::node::AttestAgentRequest {
                    join_token: token,
                    csr: sigil_tests::TestKey::new().csr(),
                })
                .await
        });
    }
    let mut attested = 0;
    while let Some(result) = racers.join_next().await {
        match result.unwrap() {
            Ok(_) => attested += 1,
            Err(status) => assert!(
                matches!(
                    status.code(),
                    tonic::Code::PermissionDenied | tonic::Code::NotFound
                ),
                "{status:?}"
            ),
        }
    }
    assert_eq!(attested, 1, "one join token, one agent");

    // The agent takes its token and bootstrap bundle from A, lists C first: it attests at
    // C (the token is in the shared database) and syncs from C.
    let agent = TestAgentProcess::start_listing(&a, &[c.node_addr, b.node_addr]).await;
    let me = format!("unix:uid:{}", my_uid());
    const FIRST: &str = "spiffe://example.org/ha/first";
    const SECOND: &str = "spiffe://example.org/ha/second";
    // An entry created through A reaches the workload of an agent syncing from C.
    create_entry(&a, entry(FIRST, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (mut stream, first) =
        x509_stream_with(&agent, |m| svid_ids(m).contains(&FIRST.into())).await;
    let svid = &first.svids[0];
    let leaf = CertificateDer::from(sigil_tests::certs(&svid.x509_svid)[0].to_vec());
    // Signed by C's CA, verified by openssl against A's bundle.
    openssl_verify(&a.bundle().await, &leaf).unwrap();
    // A privileged session opened through B; its SVID reaches the workload, signed by C.
    const ADMIN: &str = "spiffe://example.org/ha/failover-admin";
    let session = sigil_tests::open_session(&b, &agent, ADMIN, "10m", &[]);
    let session_id = session["id"].as_str().unwrap().to_owned();
    sigil_tests::next_x509_until(&mut stream, Duration::from_secs(10), |m| {
        svid_ids(m).contains(&ADMIN.to_owned())
    })
    .await
    .unwrap();
    assert_eq!(
        authorities(&a).await,
        union,
        "A's bundle is the union the agent's SVID chains to"
    );

    // C dies without a goodbye; the agent moves to B and the workload keeps its SVID and gets
    // what is created afterwards.
    c.kill9();
    create_entry(&a, entry(SECOND, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let update = loop {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the second entry never reached the workload after C died; agent log:\n{}",
                    agent.log_text()
                )
            })
            .unwrap()
            .expect("the workload's stream ended");
        if svid_ids(&msg).contains(&SECOND.to_owned()) {
            break msg;
        }
    };
    let ids = svid_ids(&update);
    assert!(ids.contains(&FIRST.to_owned()), "{ids:?}");
    assert!(ids.contains(&ADMIN.to_owned()), "{ids:?}");
    for svid in &update.svids {
        let leaf = CertificateDer::from(sigil_tests::certs(&svid.x509_svid)[0].to_vec());
        openssl_verify(&b.bundle().await, &leaf).unwrap();
    }
    // The session, opened through B, is revoked through A while C (whose CA signed its first
    // SVID) is dead: withdrawn from the workload of the agent now syncing from B, and the
    // revocation names C as the server whose CRL still has to list it.
    let revoked = sigil_tests::server_cli(
        &a,
        &[
            "session",
            "revoke",
            &session_id,
            "--reason",
            "failover test",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    assert!(
        revoked["pending_crl_servers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|s| s == "c")),
        "{revoked}"
    );
    let withdrawn = sigil_tests::next_x509_until(&mut stream, Duration::from_secs(10), |m| {
        !svid_ids(m).contains(&ADMIN.to_owned())
    })
    .await
    .unwrap_or_else(|status| {
        panic!(
            "the revoked session's SVID stayed with the workload: {status:?}\nagent log:\n{}",
            agent.log_text()
        )
    });
    let ids = svid_ids(&withdrawn);
    assert!(
        ids.contains(&FIRST.to_owned()) && ids.contains(&SECOND.to_owned()),
        "{ids:?}"
    );
    let log = agent.log_text();
    assert!(
        (log.contains("connected to another server") || log.contains("trying the next server"))
            && log.contains(&b.node_addr.to_string()),
        "the agent did not say it moved to B; log:\n{log}"
    );
    // B and A still hold C's authority (its SVIDs are valid until they expire).
    assert_eq!(authorities(&b).await, union);
}

/// The serials every CRL `server` serves lists (its own authorities' and the other servers').
async fn served_revocations(server: &TestServer) -> (usize, BTreeSet<String>) {
    let bundle = server
        .admin()
        .await
        .get_bundle(sigil_proto::admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let serials = bundle
        .crls
        .iter()
        .flat_map(|crl| sigil_tests::crl_serials(&crl.der))
        .collect();
    (bundle.crls.len(), serials)
}

/// A session opened through B for a workload whose agent syncs from A, and revoked through
/// C: its SVID (signed by A) leaves the workload's stream and its serial goes on the CRL the
/// workload receives, and every server serves every server's CRLs, that one included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_through_one_server_and_revoked_through_another_is_withdrawn_everywhere() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let [a, b, mut c] = servers_on(&url, ["a", "b", "c"]).await;
    let agent = TestAgentProcess::start_listing(&a, &[a.node_addr]).await;
    const STANDING: &str = "spiffe://example.org/ha/standing";
    const ADMIN: &str = "spiffe://example.org/ha/admin";
    create_entry(
        &a,
        entry(
            STANDING,
            &agent.agent_id(),
            &[&format!("unix:uid:{}", my_uid())],
        ),
    )
    .await
    .unwrap();

    let session = sigil_tests::open_session(&b, &agent, ADMIN, "10m", &[]);
    let id = session["id"].as_str().unwrap().to_owned();
    let (mut stream, first) =
        x509_stream_with(&agent, |m| svid_ids(m).contains(&ADMIN.into())).await;
    let svid = first.svids.iter().find(|s| s.spiffe_id == ADMIN).unwrap();
    let serial = sigil_tests::leaf_serial(&svid.x509_svid);
    // Minted by A (the agent's server), so only A can put it on a CRL.
    let leaf = CertificateDer::from(sigil_tests::certs(&svid.x509_svid)[0].to_vec());
    openssl_verify(&a.bundle().await, &leaf).unwrap();

    let revoked = sigil_tests::server_cli(
        &c,
        &[
            "session", "revoke", &id, "--reason", "ha test", "--output", "json",
        ],
    )
    .json();
    assert_eq!(revoked["state"], "revoked");
    let update = sigil_tests::next_x509_until(&mut stream, Duration::from_secs(10), |m| {
        !svid_ids(m).contains(&ADMIN.to_owned())
            && m.crl
                .iter()
                .any(|crl| sigil_tests::crl_serials(crl).contains(&serial))
    })
    .await
    .unwrap_or_else(|status| {
        panic!(
            "the revocation did not reach the workload: {status:?}\nA's log:\n{}",
            a.log_text()
        )
    });
    assert_eq!(svid_ids(&update), [STANDING]);
    // Every server serves the three servers' CRLs, A's listing the serial.
    let deadline = Instant::now() + Duration::from_secs(10);
    for server in [&a, &b, &c] {
        loop {
            let (count, serials) = served_revocations(server).await;
            if count == 3 && serials.contains(&serial) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a server serves {count} crls, serial listed: {}",
                serials.contains(&serial)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Every server verifies its own chain and the other two, each against the key it pinned
    // on first sight.
    for server in [&a, &b, &c] {
        let run = sigil_tests::server_cli(server, &["audit", "verify", "--output", "json"]);
        let report = run.json();
        assert!(run.status.success(), "{}{}", run.stdout, run.stderr);
        assert_eq!(report["ok"], true, "{report}");
        let peers = report["peer_chains"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{report}");
        for peer in peers {
            assert_eq!(peer["ok"], true, "{peer}");
            assert!(peer["checked"].as_u64().unwrap() > 0, "{peer}");
            assert!(
                peer["pinned_by"]
                    .as_str()
                    .unwrap()
                    .starts_with("pinned on first sight"),
                "{peer}"
            );
        }
    }
    // `audit show` on any server lists every server's chain, merged by time: the session's
    // story (opened through B, its SVID issued by A, revoked through C) in one listing.
    let shown =
        sigil_tests::server_cli(&a, &["audit", "show", "--session", &id, "--output", "json"])
            .json_lines();
    let story: Vec<(String, String)> = shown
        .iter()
        .map(|r| {
            (
                r["chain_id"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (chain, action) in [
        ("b", "session.open"),
        ("a", "svid.x509.issue"),
        ("c", "session.revoke"),
    ] {
        assert!(
            story
                .iter()
                .any(|(c, a)| c == chain && a.starts_with(action)),
            "{chain} {action} missing from {story:?}"
        );
    }
    let all = sigil_tests::server_cli(&a, &["audit", "show", "--output", "json"]).json_lines();
    let chains: BTreeSet<&str> = all
        .iter()
        .map(|r| r["chain_id"].as_str().unwrap())
        .collect();
    assert_eq!(chains, BTreeSet::from(["a", "b", "c"]));
    let times: Vec<&str> = all.iter().map(|r| r["time"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "not by time: {times:?}"
    );
    let text = sigil_tests::server_cli(&b, &["audit", "show"]).stdout;
    assert!(text.starts_with("CHAIN"), "{text}");
    let pins = std::fs::read_to_string(a.data_dir().join("keys/audit_peers.json")).unwrap();
    assert!(pins.contains("\"b\"") && pins.contains("\"c\""), "{pins}");

    // Whoever can write the database replaces C's chain with one of their own: records and
    // checkpoints made by a server named `c` with another audit key (on a database of its
    // own), copied over C's. Every link and signature in it is valid, but A pinned C's real
    // key, so A refuses to vouch for it.
    c.kill9();
    let forge_db = cluster.create_database().await;
    let forger = TestServer::start(&on_database(&forge_db, "c"));
    create_entry(
        &forger,
        entry(
            "spiffe://example.org/forged",
            "spiffe://example.org/x",
            &["unix:uid:1"],
        ),
    )
    .await
    .unwrap();
    let dump = |table: &str, columns: &str, format: &str| {
        format!(
            "SELECT string_agg(format('INSERT INTO {table} ({columns}) VALUES ({format});', \
             {columns}), E'\\n') FROM {table} WHERE chain_id = 'c'"
        )
    };
    let mut script = String::from(
        "DELETE FROM audit_records WHERE chain_id = 'c';\n\
         DELETE FROM audit_checkpoints WHERE chain_id = 'c';\n\
         DELETE FROM audit_heads WHERE chain_id = 'c';\n",
    );
    for (table, columns, format) in [
        (
            "audit_records",
            "chain_id, sequence, time_ms, body",
            "%L, %s, %s, %L",
        ),
        (
            "audit_checkpoints",
            "chain_id, sequence, body",
            "%L, %s, %L",
        ),
        ("audit_heads", "chain_id, sequence, body", "%L, %s, %L"),
    ] {
        let rows = sigil_testkit::Postgres::sql_text(&forge_db, &dump(table, columns, format))
            .await
            .unwrap()
            .unwrap_or_default();
        script.push_str(&rows);
        script.push('\n');
    }
    drop(forger);
    assert!(script.contains("audit_checkpoints"), "{script}");
    sigil_testkit::Postgres::sql(&url, &script).await.unwrap();
    let run = sigil_tests::server_cli(&a, &["audit", "verify", "--output", "json"]);
    assert!(!run.status.success(), "{}", run.stdout);
    let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(
        report["chain_ok"], true,
        "A's own chain is intact: {report}"
    );
    let peer_c = report["peer_chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["chain_id"] == "c")
        .cloned()
        .unwrap();
    assert_eq!(peer_c["ok"], false, "{peer_c}");
    assert!(
        peer_c["problem"]
            .as_str()
            .unwrap()
            .contains("no checkpoint is signed by the key the chain is pinned to"),
        "{peer_c}"
    );
    assert!(run.stderr.contains("\"c\""), "{}", run.stderr);
    // B's chain still verifies.
    let peer_b = report["peer_chains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["chain_id"] == "b")
        .cloned()
        .unwrap();
    assert_eq!(peer_b["ok"], true, "{peer_b}");

    // A writer cuts B's chain back past a checkpoint A already verified (deleting the last
    // record and that checkpoint, and rewriting the head to match): every remaining link and
    // signature is valid, but A remembers the checkpoint it verified.
    create_entry(
        &b,
        entry(
            "spiffe://example.org/ha/late",
            "spiffe://example.org/x",
            &["unix:uid:2"],
        ),
    )
    .await
    .unwrap();
    let signed = sigil_tests::server_cli(&b, &["audit", "checkpoint", "--output", "json"]).json();
    let last = signed["sequence"].as_u64().unwrap();
    assert!(last >= 2, "{signed}");
    let run = sigil_tests::server_cli(&a, &["audit", "verify", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let peer = |report: &serde_json::Value, chain: &str| {
        report["peer_chains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["chain_id"] == chain)
            .cloned()
            .unwrap()
    };
    assert_eq!(peer(&report, "b")["ok"], true, "{report}");
    sigil_testkit::Postgres::sql(
        &url,
        &format!(
            "DELETE FROM audit_records WHERE chain_id = 'b' AND sequence = {last};
             DELETE FROM audit_checkpoints WHERE chain_id = 'b' AND sequence >= {last};
             UPDATE audit_heads SET sequence = {previous}, body = (
                 SELECT jsonb_build_object('chain_id', r->'chain_id', 'sequence', r->'sequence',
                                           'hash', r->'hash', 'time', r->'time')::text
                 FROM (SELECT body::jsonb AS r FROM audit_records
                       WHERE chain_id = 'b' AND sequence = {previous}) AS x)
             WHERE chain_id = 'b';",
            previous = last - 1
        ),
    )
    .await
    .unwrap();
    let run = sigil_tests::server_cli(&a, &["audit", "verify", "--output", "json"]);
    assert!(!run.status.success());
    let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let peer_b = peer(&report, "b");
    assert_eq!(peer_b["ok"], false, "{peer_b}");
    assert!(
        peer_b["problem"].as_str().unwrap().contains("missing"),
        "{peer_b}"
    );
}

/// Runs `healthcheck` until its outcome passes `wanted` (at most `within`).
fn health_until(
    server: &TestServer,
    within: Duration,
    what: &str,
    wanted: impl Fn(&sigil_tests::CliRun) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let run = sigil_tests::server_cli(server, &["healthcheck"]);
        if wanted(&run) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "healthcheck not {what} within {within:?}: {}{}\nserver log:\n{}",
            run.stdout,
            run.stderr,
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A server cut from the database serves from its entry cache (its health says degraded)
/// for `max_store_staleness`, then authorizes nothing (health fails) and ends its agents'
/// streams, so that an agent listing another server moves there and keeps getting its
/// entries; the cut server recovers by itself when the database answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cut_from_the_database_stops_authorizing_within_its_bound_and_recovers() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.port()).parse().unwrap();
    let proxy = CuttableProxy::start(upstream).await;
    let through_proxy = url.replace(
        &format!("port={}", cluster.port()),
        &format!("port={}", proxy.address.port()),
    );
    assert_ne!(through_proxy, url);
    let server = TestServer::start(&format!(
        "{}max_store_staleness = \"4s\"\n",
        on_database(&through_proxy, "a")
    ));
    let other = TestServer::start(&on_database(&url, "b"));
    bundles_converge(&[&server, &other], 2).await;
    let agent =
        TestAgentProcess::start_listing(&server, &[server.node_addr, other.node_addr]).await;
    let me = format!("unix:uid:{}", my_uid());
    const BEFORE: &str = "spiffe://example.org/ha/before";
    const DURING: &str = "spiffe://example.org/ha/during";
    const AFTER: &str = "spiffe://example.org/ha/after";
    create_entry(&server, entry(BEFORE, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (mut stream, _) = x509_stream_with(&agent, |m| svid_ids(m).contains(&BEFORE.into())).await;
    health_until(&server, Duration::from_secs(5), "healthy", |r| {
        r.status.success() && r.stdout.contains("Server is healthy")
    });

    proxy.cut();
    let cut_at = Instant::now();
    // Within the bound: serving, and saying it is degraded.
    health_until(&server, Duration::from_secs(4), "degraded", |r| {
        r.status.success() && r.stdout.contains("degraded")
    });
    // Past it: nothing authorized, health fails, naming the bound.
    health_until(&server, Duration::from_secs(15), "failing", |r| {
        !r.status.success() && r.stderr.contains("longer than max_store_staleness")
    });
    assert!(
        cut_at.elapsed() >= Duration::from_secs(4),
        "refused before max_store_staleness ran out ({:?})",
        cut_at.elapsed()
    );
    assert!(
        server
            .log_text()
            .contains("authorizing nothing until it does"),
        "{}",
        server.log_text()
    );
    // The agent left the cut server for B: what is created through B reaches the workload.
    create_entry(&other, entry(DURING, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    sigil_tests::next_x509_until(&mut stream, Duration::from_secs(30), |m| {
        svid_ids(m).contains(&DURING.to_owned())
    })
    .await
    .unwrap_or_else(|status| {
        panic!(
            "the agent did not move to the server that still reads the database: {status:?}\nagent log:\n{}",
            agent.log_text()
        )
    });

    // The database answers again: the cut server recovers without a restart, and serves
    // what was written meanwhile.
    proxy.restore();
    health_until(&server, Duration::from_secs(30), "healthy again", |r| {
        r.status.success() && r.stdout.contains("Server is healthy")
    });
    create_entry(&server, entry(AFTER, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    sigil_tests::next_x509_until(&mut stream, Duration::from_secs(30), |m| {
        svid_ids(m).contains(&AFTER.to_owned())
    })
    .await
    .unwrap_or_else(|status| {
        panic!(
            "no SVID for the entry created after the recovery: {status:?}\nserver log:\n{}",
            server.log_text()
        )
    });
}

/// A session opened through B expires at its end although B is gone: every server expires
/// the live sessions it finds in the store, whoever opened them, and exactly one records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expires_on_time_when_the_server_that_opened_it_is_gone() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let [a, _c, mut b] = servers_on(&url, ["a", "c", "b"]).await;
    let agent = TestAgentProcess::start_listing(&a, &[a.node_addr]).await;
    let session = sigil_tests::open_session(
        &b,
        &agent,
        "spiffe://example.org/ha/brief",
        "4s",
        &["--svid-ttl", "2s"],
    );
    let id = session["id"].as_str().unwrap().to_owned();
    // A second live instance of `b` (another machine, say) is refused, naming the holder.
    let (status, log) = second_instance(&url, "b");
    assert!(!status.success());
    assert!(
        log.contains("another sigil-server with server_id \"b\"")
            && log.contains("last heartbeat")
            && log.matches("another sigil-server").count() == 1,
        "{log}"
    );
    b.kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shown =
            sigil_tests::server_cli(&a, &["session", "show", &id, "--output", "json"]).json();
        if shown["state"] == "expired" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session was not expired without its opener: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Expired once: one record (`audit show` lists every server's chain), by a server still
    // running.
    let records = sigil_tests::server_cli(
        &a,
        &[
            "audit",
            "show",
            "--action",
            "session.expire",
            "--output",
            "json",
        ],
    )
    .json_lines();
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        ["a", "c"].contains(&records[0]["chain_id"].as_str().unwrap()),
        "{records:?}"
    );
    // The killed server starts again under its id at once: the database let go of its claim
    // with its connection.
    b.restart();
    assert!(
        sigil_tests::server_cli(&b, &["healthcheck"])
            .status
            .success(),
        "{}",
        b.log_text()
    );
}

/// Runs `sigil-server run` as server `id` on the database at `url`, in a data directory of its
/// own, and returns how it exited (within 30 s) and what it logged.
fn second_instance(url: &str, id: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\nbind_address = \"127.0.0.1:0\"\n\
             data_dir = \"{}\"\nadmin_socket = \"{}\"\nlog_format = \"json\"\n{}",
            dir.path().join("data").display(),
            dir.path().join("admin.sock").display(),
            on_database(url, id)
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(sigil_tests::binary("sigil-server"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("a second instance of server {id} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    (status, log)
}

/// Writes through each of `servers` until `stop`, then returns every acknowledged entry (id,
/// revision) and how many writes were refused.
async fn write_through_all(
    servers: &[&TestServer],
    prefix: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<(String, u64)>, usize) {
    let [s0, s1, s2] = servers else {
        panic!("three servers")
    };
    let prefixes = [0, 1, 2].map(|i| format!("{prefix}/{i}"));
    // Three writers at once (a fixed three: no futures crate in the tests).
    let (r0, r1, r2) = tokio::join!(
        sigil_tests::write_entries_until(s0, &prefixes[0], stop.clone()),
        sigil_tests::write_entries_until(s1, &prefixes[1], stop.clone()),
        sigil_tests::write_entries_until(s2, &prefixes[2], stop.clone()),
    );
    let mut acked = Vec::new();
    let mut refused = 0;
    for (a, r) in [r0, r1, r2] {
        acked.extend(a);
        refused += r;
    }
    (acked, refused)
}

/// PostgreSQL restarted under three servers' writes, by an operator (`-m fast`) and as by a
/// power cut (`-m immediate`): every acknowledged entry is there with its revision, each
/// server takes writes again by itself, and every audit chain verifies on every server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_ride_out_postgres_restarts_without_losing_an_acknowledged_write() {
    // A cluster of its own: the other tests of this binary share the common one.
    let Some(postgres) = sigil_testkit::Postgres::start() else {
        return;
    };
    let url = postgres.create_database().await;
    let [a, b, c] = servers_on(&url, ["a", "b", "c"]).await;
    let servers = [&a, &b, &c];

    let mut acked = Vec::new();
    for (round, immediate) in [("fast", false), ("immediate", true)] {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let writers = write_through_all(&servers, round, stop_rx);
        let restart = async {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            if immediate {
                postgres.stop_immediately().unwrap();
            } else {
                postgres.stop_fast().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            postgres.start_again().unwrap();
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let _ = stop_tx.send(true);
        };
        let ((written, refused), ()) = tokio::join!(writers, restart);
        assert!(written.len() > 10, "{round}: only {} writes", written.len());
        assert!(
            refused > 0,
            "{round}: no write was refused while PostgreSQL was down"
        );
        acked.extend(written);
        // Each server takes writes again by itself.
        for server in servers {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let attempt = create_entry(
                    server,
                    entry(
                        &format!("spiffe://example.org/{round}/probe/{}", acked.len()),
                        "spiffe://example.org/sigil/agent/join_token/pg",
                        &["unix:uid:1"],
                    ),
                )
                .await;
                if let Ok(e) = attempt {
                    acked.push((e.id, e.revision));
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{round}: a server did not recover: {attempt:?}\nlog:\n{}",
                    server.log_text()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    // Every acknowledged write is there, as acknowledged, through every server.
    for server in servers {
        let stored: std::collections::BTreeMap<String, u64> = sigil_tests::all_entries(server)
            .await
            .into_iter()
            .map(|e| (e.id, e.revision))
            .collect();
        for (id, revision) in &acked {
            assert_eq!(
                stored.get(id),
                Some(revision),
                "acknowledged entry {id} (revision {revision}) lost or changed"
            );
        }
    }
    let revisions: BTreeSet<u64> = acked.iter().map(|(_, r)| *r).collect();
    assert_eq!(
        revisions.len(),
        acked.len(),
        "a revision was handed out twice"
    );
    // Every chain verifies on every server.
    for server in servers {
        let run = sigil_tests::server_cli(server, &["audit", "verify", "--output", "json"]);
        assert!(run.status.success(), "{}{}", run.stdout, run.stderr);
        let report = run.json();
        assert_eq!(
            report["peer_chains"].as_array().unwrap().len(),
            2,
            "{report}"
        );
    }
}

/// A session whose SVID server A signed, revoked through B while A is down: the revocation
/// names A as pending (its CRL cannot list the serial yet); once A is back, its CRL lists the
/// serial and B serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_while_the_signing_server_is_down_names_it_and_reaches_its_crl_on_return() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let [mut a, b] = servers_on(&url, ["a", "b"]).await;
    let agent = TestAgentProcess::start_listing(&a, &[a.node_addr, b.node_addr]).await;
    const ADMIN: &str = "spiffe://example.org/ha/pending";
    let session = sigil_tests::open_session(&a, &agent, ADMIN, "10m", &[]);
    let id = session["id"].as_str().unwrap().to_owned();
    let (_stream, first) = x509_stream_with(&agent, |m| svid_ids(m).contains(&ADMIN.into())).await;
    let svid = first.svids.iter().find(|s| s.spiffe_id == ADMIN).unwrap();
    let serial = sigil_tests::leaf_serial(&svid.x509_svid);

    a.kill9();
    let revoked = sigil_tests::server_cli(
        &b,
        &[
            "session", "revoke", &id, "--reason", "ha test", "--output", "json",
        ],
    )
    .json();
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(
        revoked["pending_crl_servers"],
        serde_json::json!(["a"]),
        "{revoked}"
    );
    let text = sigil_tests::server_cli(&b, &["session", "show", &id]);
    assert!(
        !text.stdout.contains("CRLs pending"),
        "only revoke's answer says it"
    );

    // A returns: it signs its CRLs at start, with the serial, and B serves them.
    a.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, serials) = served_revocations(&b).await;
        if serials.contains(&serial) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's CRL with the serial never reached B"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A revocation while every server runs names nobody.
    let agent_b = TestAgentProcess::start_listing(&b, &[b.node_addr]).await;
    let session = sigil_tests::open_session(&b, &agent_b, ADMIN, "10m", &[]);
    let id = session["id"].as_str().unwrap().to_owned();
    x509_stream_with(&agent_b, |m| svid_ids(m).contains(&ADMIN.into())).await;
    let revoked = sigil_tests::server_cli(
        &a,
        &[
            "session", "revoke", &id, "--reason", "ha test", "--output", "json",
        ],
    )
    .json();
    assert!(revoked.get("pending_crl_servers").is_none(), "{revoked}");
}

/// The SQL value of the advisory lock key of job `job` (as the server derives it: the first
/// eight bytes of SHA-256 over `sigil-server/job/` and the name, big-endian, signed).
fn job_lock_key_sql(job: &str) -> String {
    format!(
        "('x' || left(encode(sha256('sigil-server/job/{job}'::bytea), 'hex'), 16))::bit(64)::bigint"
    )
}

/// Session expiry is a job that one server at a time runs, under
/// `pg_try_advisory_xact_lock`: while another holds the lock (a server in the middle of its
/// pass) neither server expires anything, and once it lets go one of them expires the session,
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_expired_by_one_server_at_a_time() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let [a, b] = servers_on(&url, ["a", "b"]).await;
    let agent = TestAgentProcess::start_listing(&a, &[a.node_addr]).await;
    let held = sigil_testkit::Postgres::hold(
        &url,
        &format!(
            "BEGIN; SELECT pg_advisory_xact_lock({})",
            job_lock_key_sql("expire_sessions")
        ),
    )
    .await
    .unwrap();
    let session = sigil_tests::open_session(
        &b,
        &agent,
        "spiffe://example.org/ha/held",
        "4s",
        &["--svid-ttl", "2s"],
    );
    let id = session["id"].as_str().unwrap().to_owned();
    let show = |server: &TestServer| {
        sigil_tests::server_cli(server, &["session", "show", &id, "--output", "json"]).json()
    };
    // Two seconds past its end (each server would expire it within milliseconds of it): still
    // active, as far as both servers are concerned.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for server in [&a, &b] {
        assert_eq!(
            show(server)["state"],
            "active",
            "expired during another's pass"
        );
    }
    held.release().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while show(&a)["state"] != "expired" {
        assert!(
            Instant::now() < deadline,
            "not expired once the lock was free: {}",
            show(&a)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(show(&b)["state"], "expired");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let records = sigil_tests::server_cli(
        &b,
        &[
            "audit",
            "show",
            "--action",
            "session.expire",
            "--output",
            "json",
        ],
    )
    .json_lines();
    assert_eq!(records.len(), 1, "expired once: {records:?}");
}

/// The subject of `der`, as text.
fn subject(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .subject()
        .to_string()
}

/// The issuer of the leaf in the PEM `x509 mint` printed, and the leaf.
fn minted_leaf(server: &TestServer) -> (String, CertificateDer<'static>) {
    let minted = sigil_tests::server_cli(
        server,
        &[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/ha/minted",
            "--output",
            "json",
        ],
    )
    .json();
    let pem = minted["svid_pem"].as_str().unwrap();
    let leaf: CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
    let issuer = x509_parser::parse_x509_certificate(leaf.as_ref())
        .unwrap()
        .1
        .issuer()
        .to_string();
    (issuer, leaf)
}

/// A CA rotation by one server reaches the workloads of an agent that syncs from another
/// server before the new CA signs anything: the bundle such a workload holds while server A
/// still signs with its first CA already verifies what A signs after the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotated_by_one_server_reaches_another_servers_workloads_before_it_signs() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    // A's CA lives a minute: its successor is prepared at 30 s and signs from 50 s. B's lives
    // the default (a day).
    let a = TestServer::start(&format!(
        "{}ca_ttl = \"1m\"\ndefault_x509_svid_ttl = \"10s\"\ndefault_jwt_svid_ttl = \"10s\"\n\
         agent_svid_ttl = \"10s\"\n",
        on_database(&url, "a")
    ));
    let b = TestServer::start(&on_database(&url, "b"));
    let first = bundles_converge(&[&a, &b], 2).await;
    let (first_issuer, _) = minted_leaf(&a);
    let agent = TestAgentProcess::start_listing(&b, &[b.node_addr]).await;
    const ID: &str = "spiffe://example.org/ha/rotated";
    let me = format!("unix:uid:{}", my_uid());
    create_entry(&b, entry(ID, &agent.agent_id(), &[&me]))
        .await
        .unwrap();
    let (mut stream, _) = x509_stream_with(&agent, |m| svid_ids(m).contains(&ID.into())).await;

    // Wait (up to 45 s) for the workload of B's agent to be given a bundle with A's successor.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let (bundle, successor) = loop {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "A's next CA never reached the workload; agent log:\n{}",
                    agent.log_text()
                )
            })
            .unwrap()
            .expect("the workload's stream ended");
        let svid = msg.svids.iter().find(|s| s.spiffe_id == ID).unwrap();
        let bundle =
            sigil_core::X509Bundle::from_der(sigil_tests::trust_domain(), &svid.bundle).unwrap();
        let new: Vec<Vec<u8>> = bundle
            .authorities()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .filter(|c| !first.contains(c))
            .collect();
        if let [successor] = new.as_slice() {
            break (bundle, successor.clone());
        }
        assert!(new.is_empty(), "{} new authorities", new.len());
    };
    // At this moment A still signs with its first CA: the successor reached the workload
    // before it was activated.
    let (issuer, _) = minted_leaf(&a);
    assert_eq!(
        issuer, first_issuer,
        "A switched before its successor was known"
    );
    assert_ne!(subject(&successor), first_issuer);

    // Once A signs with its successor, what it signs verifies against the bundle the workload
    // of B's agent was given before.
    let deadline = Instant::now() + Duration::from_secs(40);
    let leaf = loop {
        let (issuer, leaf) = minted_leaf(&a);
        if issuer == subject(&successor) {
            break leaf;
        }
        assert_eq!(issuer, first_issuer);
        assert!(
            Instant::now() < deadline,
            "A never switched to its successor"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    openssl_verify(&bundle, &leaf).unwrap();
    // And B serves A's successor too.
    assert!(authorities(&b).await.contains(&successor));
}

/// A database that hangs instead of failing (its feed locked by another session: reads wait,
/// no error comes back) is a database that does not answer: past `max_store_staleness` the
/// server's `/ready` says so, well before the database's own lock timeout (30 s) would have
/// ended the wait, and it is ready again once the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_makes_the_server_unready_within_its_bound() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let server = TestServer::start(&format!(
        "{}max_store_staleness = \"2s\"\nhealth_address = \"127.0.0.1:0\"\n",
        on_database(&url, "a")
    ));
    let health = sigil_tests::http_endpoint(&server.log_text(), "health").unwrap();
    assert_eq!(sigil_tests::http_get(health, "/ready").unwrap().0, 200);
    let held =
        sigil_testkit::Postgres::hold(&url, "BEGIN; LOCK TABLE feed_head IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
    let locked = Instant::now();
    let body = loop {
        let (status, body) = sigil_tests::http_get(health, "/ready").unwrap();
        if status == 503 {
            break body;
        }
        assert!(
            locked.elapsed() < Duration::from_secs(20),
            "still ready {:?} after the database hung",
            locked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(body.contains("max_store_staleness"), "{body}");
    held.release().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sigil_tests::http_get(health, "/ready").unwrap().0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again after the database answered"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How many fetches of a federated bundle `server` has logged.
fn fetches(server: &TestServer) -> usize {
    server
        .log_text()
        .matches("federated bundle fetched")
        .count()
}

/// Federation with several servers: one server at a time polls a relationship's endpoint
/// (the polling job's lock), on one schedule kept in the database, so the endpoint is fetched
/// once per refresh hint, not once per server; every server hands the bundle to its agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_at_a_time_polls_a_federated_endpoint_and_every_server_serves_the_bundle() {
    let Some(cluster) = sigil_testkit::shared() else {
        return;
    };
    let url = cluster.create_database().await;
    let polling = "federation_min_poll = \"1s\"\n";
    let a = TestServer::start(&format!("{}{polling}", on_database(&url, "a")));
    let b = TestServer::start(&format!("{}{polling}", on_database(&url, "b")));
    bundles_converge(&[&a, &b], 2).await;
    let ledger = TestServer::start_in(
        "ledger.example",
        "bundle_endpoint_address = \"127.0.0.1:0\"\nbundle_endpoint_refresh_hint = \"2s\"\n",
        &[],
    );
    let dir = tempfile::tempdir().unwrap();

    // While something else holds the polling job's lock, no server fetches.
    let held = sigil_testkit::Postgres::hold(
        &url,
        &format!(
            "BEGIN; SELECT pg_advisory_xact_lock({})",
            job_lock_key_sql("federation_poll")
        ),
    )
    .await
    .unwrap();
    let created = sigil_tests::federate(
        &a,
        &ledger,
        "spiffe://ledger.example/sigil/server",
        dir.path(),
    )
    .await;
    assert!(created.status.success(), "{}", created.stderr);
    let show = |server: &TestServer| {
        sigil_tests::server_cli(
            server,
            &[
                "federation",
                "show",
                "--id",
                "ledger.example",
                "--output",
                "json",
            ],
        )
        .json()
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(show(&b)["last_attempt"].is_null(), "{}", show(&b));
    assert_eq!(fetches(&a) + fetches(&b), 0);
    held.release().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while show(&b)["last_success"].is_null() {
        assert!(Instant::now() < deadline, "never fetched: {}", show(&b));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Over ten seconds at a 2 s refresh hint: about five fetches between the two servers
    // (each polling on its own would make about ten).
    let before = fetches(&a) + fetches(&b);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = fetches(&a) + fetches(&b) - before;
    // (At least two: polling goes on; a loaded machine stretches the periods, never shortens
    // them.)
    assert!((2..=7).contains(&during), "{during} fetches in 10 s");

    // An agent syncing from the server that did not create the relationship hands its
    // workload the bundle.
    let agent = TestAgentProcess::start_listing(&b, &[b.node_addr]).await;
    let me = format!("unix:uid:{}", my_uid());
    let created = sigil_tests::server_cli(
        &b,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/ha/federated",
            "--parent-id",
            &agent.agent_id(),
            "--selector",
            &me,
            "--federates-with",
            "ledger.example",
        ],
    );
    assert!(created.status.success(), "{}", created.stderr);
    let (_stream, message) = x509_stream_with(&agent, |m| {
        m.federated_bundles.contains_key("spiffe://ledger.example")
    })
    .await;
    assert_eq!(svid_ids(&message), ["spiffe://example.org/ha/federated"]);
}
