//! The operator commands of the real `sigil-server` binary against a running server: every
//! command in text and JSON, batches and pagination, minted SVIDs checked by openssl, and the
//! errors an operator meets (server not running, invalid input).
#![allow(clippy::panic, reason = "test code")]

mod cli_harness;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use cli_harness::{Server, cli_at, field};
use serde_json::Value;

const AGENT: &str = "spiffe://example.org/sigil/agent/join_token/abc";

fn id_of(v: &Value) -> &str {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no string id in {v}"))
}

#[test]
fn cli_healthcheck_reports_a_healthy_server() {
    let server = Server::start();
    let text = server.cli(&["healthcheck"]);
    let out = text.ok();
    assert!(out.starts_with("Server is healthy.\n"), "{out}");
    assert_eq!(field(out, "Trust domain"), "example.org");
    assert!(field(out, "Active CA expires at").ends_with(")"), "{out}");

    let json = server.json(&["healthcheck"]).one();
    assert_eq!(json["id"], "example.org");
    assert_eq!(json["status"], "healthy");
    assert!(
        json["active_authority_expires_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
}

#[test]
fn cli_token_generate_with_and_without_an_alias() {
    let server = Server::start();
    let text = server.cli(&[
        "token",
        "generate",
        "--spiffe-id",
        "spiffe://example.org/node1",
        "--ttl",
        "1h",
    ]);
    let out = text.ok();
    let token = field(out, "Token");
    assert_eq!(token.len(), 32, "{out}");
    // The agent ID names the token's fingerprint (the first 16 hex of its SHA-256), never
    // the token: it is a secret until spent.
    let fingerprint = &sigil_core::hex::sha256(token.as_bytes())[..16];
    assert_eq!(
        field(out, "Agent SPIFFE ID"),
        format!("spiffe://example.org/sigil/agent/join_token/{fingerprint}")
    );
    assert_eq!(field(out, "Alias SPIFFE ID"), "spiffe://example.org/node1");
    // Counted in whole seconds from the CLI's clock after the call (see the x509 mint test).
    let expires = field(out, "Expires at");
    assert!(
        ["(in 1h)", "(in 59m59s)", "(in 59m58s)"]
            .iter()
            .any(|distance| expires.ends_with(distance)),
        "{out}"
    );

    let json = server.json(&["token", "generate"]).one();
    assert_eq!(json["id"], json["token"]);
    let fingerprint = &sigil_core::hex::sha256(id_of(&json).as_bytes())[..16];
    assert!(
        json["agent_spiffe_id"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/join_token/{fingerprint}"))
    );
    assert_eq!(json["alias_spiffe_id"], Value::Null);

    let err = server.cli(&["token", "generate", "--ttl", "30d"]);
    assert!(err.fails().contains("maximum of 7d"), "{}", err.stderr);
}

#[test]
fn cli_entry_commands_round_trip_in_text_and_json() {
    let server = Server::start();

    // Create, in text.
    let created = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:50",
        "--x509-svid-ttl",
        "48h",
        "--dns",
        "web.example.org",
        "--hint",
        "web",
        "--expires-in",
        "30d",
    ]);
    let out = created.ok();
    let web = field(out, "Entry ID").to_owned();
    assert_eq!(web.len(), 32);
    assert_eq!(field(out, "SPIFFE ID"), "spiffe://example.org/web");
    assert_eq!(field(out, "Parent ID"), AGENT);
    // The CA lives 24h by default, so a 48h TTL is capped to 24h / 6 = 4h.
    assert_eq!(field(out, "X509-SVID TTL"), "2d (capped to 4h)");
    assert_eq!(field(out, "JWT-SVID TTL"), "default (5m)");
    assert_eq!(field(out, "DNS name"), "web.example.org");
    assert_eq!(field(out, "Hint"), "web");
    let expires = field(out, "Expires at");
    assert!(
        ["(in 30d)", "(in 29d23h)"]
            .iter()
            .any(|distance| expires.ends_with(distance)),
        "{out}"
    );
    assert!(
        out.contains("Selector      : unix:gid:50\nSelector      : unix:uid:1000\n"),
        "{out}"
    );

    // Create, in JSON, with an absolute expiry.
    let db = server
        .json(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/db",
            "--parent-id",
            AGENT,
            "--selector",
            "unix:uid:1001",
            "--jwt-svid-ttl",
            "1m",
            "--expires-at",
            "2099-01-01T00:00:00Z",
        ])
        .one();
    let db_id = id_of(&db).to_owned();
    assert_eq!(db["jwt_svid_ttl"], 60);
    assert_eq!(db["effective_jwt_svid_ttl"], 60);
    assert_eq!(db["x509_svid_ttl"], Value::Null);
    assert_eq!(db["effective_x509_svid_ttl"], 3600);
    assert_eq!(db["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(db["selectors"], serde_json::json!(["unix:uid:1001"]));

    // Show: by id, by filters, everything.
    let shown = server.json(&["entry", "show", "--id", &web]).one();
    assert_eq!(shown["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(shown["x509_svid_ttl"], 172_800);
    assert_eq!(shown["effective_x509_svid_ttl"], 14_400);
    let text = server.cli(&["entry", "show", "--id", &db_id]);
    assert_eq!(field(text.ok(), "Entry ID"), db_id);
    let by_selector = server
        .json(&["entry", "show", "--selector", "unix:uid:1001"])
        .lines();
    assert_eq!(
        by_selector.iter().map(id_of).collect::<Vec<_>>(),
        [db_id.as_str()]
    );
    let by_spiffe = server
        .json(&["entry", "show", "--spiffe-id", "spiffe://example.org/web"])
        .lines();
    assert_eq!(
        by_spiffe.iter().map(id_of).collect::<Vec<_>>(),
        [web.as_str()]
    );
    let by_parent = server
        .json(&["entry", "show", "--parent-id", AGENT])
        .lines();
    assert_eq!(by_parent.len(), 2);
    let all = server.cli(&["entry", "show"]);
    let all = all.ok();
    assert!(all.ends_with("\nFound 2 entries\n"), "{all}");
    assert_eq!(all.matches("Entry ID").count(), 2);
    let none = server.cli(&["entry", "show", "--selector", "k8s:ns:none"]);
    assert_eq!(none.ok(), "No entries found\n");
    assert_eq!(
        server
            .json(&["entry", "show", "--selector", "k8s:ns:none"])
            .ok(),
        ""
    );

    // Update: the given flags replace those fields, the rest is kept.
    let updated = server
        .json(&["entry", "update", "--id", &web, "--hint", "frontend"])
        .one();
    assert_eq!(updated["hint"], "frontend");
    assert_eq!(updated["selectors"], shown["selectors"]);
    assert_eq!(updated["dns_names"], shown["dns_names"]);
    assert_eq!(updated["x509_svid_ttl"], 172_800);
    assert_eq!(updated["expires_at"], shown["expires_at"]);
    assert!(updated["revision"].as_u64().unwrap() > shown["revision"].as_u64().unwrap());
    let text = server.cli(&[
        "entry",
        "update",
        "--id",
        &web,
        "--selector",
        "unix:uid:7",
        "--expires-at",
        "never",
        "--x509-svid-ttl",
        "0s",
    ]);
    let out = text.ok();
    assert!(out.contains("Selector      : unix:uid:7\n"), "{out}");
    assert_eq!(out.matches("Selector").count(), 1, "{out}");
    assert_eq!(field(out, "Expires at"), "never");
    assert_eq!(field(out, "X509-SVID TTL"), "default (1h)");
    assert_eq!(field(out, "Hint"), "frontend");
    let nothing = server.cli(&["entry", "update", "--id", &web]);
    assert!(
        nothing.fails().contains("nothing to update"),
        "{}",
        nothing.stderr
    );

    // Count, delete.
    assert_eq!(server.cli(&["entry", "count"]).ok(), "2 entries\n");
    assert_eq!(server.json(&["entry", "count"]).one()["count"], 2);
    let deleted = server.json(&["entry", "delete", "--id", &db_id]).one();
    assert_eq!(id_of(&deleted), db_id);
    let text = server.cli(&["entry", "delete", "--id", &web]);
    assert_eq!(
        text.ok(),
        format!("Deleted entry {web} (spiffe://example.org/web)\n")
    );
    assert_eq!(server.cli(&["entry", "count"]).ok(), "0 entries\n");
    let again = server.cli(&["entry", "delete", "--id", &web]);
    assert!(again.fails().contains(&web), "{}", again.stderr);
    let missing = server.cli(&["entry", "show", "--id", &web]);
    assert!(
        missing.fails().contains(&format!("no entry with id {web}")),
        "{}",
        missing.stderr
    );
}

#[test]
fn cli_entry_create_data_creates_ten_thousand_entries_and_show_pages_through_them() {
    let server = Server::start();
    let path = server.dir().join("entries.jsonl");
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!(
            "{{\"spiffe_id\":\"spiffe://example.org/w/{i}\",\"parent_id\":\"{AGENT}\",\"selector\":[\"unix:uid:{i}\"],\"x509_svid_ttl\":\"30m\"}}\n"
        ));
    }
    std::fs::write(&path, data).unwrap();
    let created = server
        .json(&["entry", "create", "--data", path.to_str().unwrap()])
        .lines();
    assert_eq!(created.len(), 10_000);
    for (i, result) in created.iter().enumerate() {
        assert_eq!(result["line"], i + 1);
        assert_eq!(result["spiffe_id"], format!("spiffe://example.org/w/{i}"));
        assert_eq!(result["x509_svid_ttl"], 1800);
        assert_eq!(id_of(result).len(), 32);
    }

    assert_eq!(server.cli(&["entry", "count"]).ok(), "10000 entries\n");
    // The server pages at 1000 entries, so this follows ten pages.
    let shown = server.json(&["entry", "show"]).lines();
    assert_eq!(shown.len(), 10_000);
    let mut ids: Vec<&str> = shown.iter().map(id_of).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10_000, "pages overlap");
    let text = server.cli(&["entry", "show"]);
    assert!(text.ok().ends_with("\nFound 10000 entries\n"));

    // `entry show --output json` is valid `--data` input (here, to another server).
    let other = Server::start();
    let export = other.dir().join("export.jsonl");
    std::fs::write(
        &export,
        server.json(&["entry", "show", "--parent-id", AGENT]).ok(),
    )
    .unwrap();
    let text = other.cli(&["entry", "create", "--data", export.to_str().unwrap()]);
    assert!(text.ok().ends_with("Created 10000 of 10000 entries\n"));
    assert_eq!(other.json(&["entry", "count"]).one()["count"], 10_000);
}

#[test]
fn cli_entry_create_data_reports_each_result_and_fails_if_any_failed() {
    let server = Server::start();
    let path = server.dir().join("mixed.jsonl");
    std::fs::write(
        &path,
        format!(
            "{{\"spiffe_id\":\"spiffe://example.org/a\",\"parent_id\":\"{AGENT}\",\"selector\":[\"unix:uid:1\"]}}\n\
             \n\
             {{\"spiffe_id\":\"spiffe://other.org/b\",\"parent_id\":\"{AGENT}\",\"selector\":[\"unix:uid:2\"]}}\n\
             {{\"spiffe_id\":\"spiffe://example.org/c\",\"parent_id\":\"{AGENT}\",\"selectors\":[\"unix:uid:3\"],\"dns_names\":[\"c.example\"]}}\n"
        ),
    )
    .unwrap();
    let run = server.json(&["entry", "create", "--data", path.to_str().unwrap()]);
    assert!(
        run.fails().contains("1 entry of 3 failed"),
        "{}",
        run.stderr
    );
    let results = run.lines_any();
    assert_eq!(results.len(), 3);
    assert_eq!(
        (
            results[0]["line"].as_u64(),
            results[0]["spiffe_id"].as_str()
        ),
        (Some(1), Some("spiffe://example.org/a"))
    );
    assert_eq!(results[1]["line"], 3);
    assert_eq!(results[1]["error"]["code"], "InvalidArgument");
    assert!(
        results[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not in trust domain example.org")
    );
    assert_eq!(results[2]["dns_names"], serde_json::json!(["c.example"]));

    // The same file again: the entries that exist are reported as such, in text.
    let text = server.cli(&["entry", "create", "--data", path.to_str().unwrap()]);
    text.fails();
    assert!(
        text.stdout
            .starts_with("line 1: failed: entry already exists: "),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("line 3: failed: "), "{}", text.stdout);
    assert!(
        text.stdout.ends_with("Created 0 of 3 entries; 3 failed\n"),
        "{}",
        text.stdout
    );
    let text = server.cli(&["entry", "create", "--data", "-"]);
    assert!(text.fails().contains("has no entries"), "{}", text.stderr);

    // A malformed file creates nothing and names every bad line.
    let bad = server.dir().join("bad.jsonl");
    std::fs::write(&bad, "{\"spiffe_id\":\"spiffe://example.org/x\",\"parent_id\":\"spiffe://example.org/p\",\"selector\":[\"a:b\"]}\nnot json\n{\"spife_id\":\"x\"}\n").unwrap();
    let before = server.json(&["entry", "count"]).one()["count"].clone();
    let run = server.cli(&["entry", "create", "--data", bad.to_str().unwrap()]);
    let err = run.fails();
    assert!(err.contains("nothing was created (2 bad lines)"), "{err}");
    assert!(
        err.contains("line 2: ") && err.contains("line 3: unknown field `spife_id`"),
        "{err}"
    );
    assert_eq!(server.json(&["entry", "count"]).one()["count"], before);

    // Flags and --data do not mix.
    let run = server.cli(&[
        "entry",
        "create",
        "--data",
        "x",
        "--spiffe-id",
        "spiffe://example.org/a",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_agent_commands_round_trip_in_text_and_json() {
    let server = sigil_tests::TestServer::start("");
    let socket = server.admin_socket();
    let cli = |args: &[&str]| cli_at(&socket, args);
    let json = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        cli_at(&socket, &all)
    };
    assert_eq!(
        tokio::task::block_in_place(|| cli(&["agent", "list"])).ok(),
        "No attested agents\n"
    );

    let a = sigil_tests::TestAgent::attest(&server).await;
    // A token made by the CLI, with an alias: attesting with it creates the alias entry.
    let token = tokio::task::block_in_place(|| {
        json(&[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node-b",
        ])
        .one()
    });
    let b = sigil_tests::TestAgent::attest_with(&server, token["token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(b.id.to_string(), token["agent_spiffe_id"]);
    let (a_id, b_id) = (a.id.to_string(), b.id.to_string());
    tokio::task::block_in_place(|| {
        let listed = json(&["agent", "list"]).lines();
        let mut ids: Vec<&str> = listed.iter().map(id_of).collect();
        ids.sort_unstable();
        let mut want = [a_id.as_str(), b_id.as_str()];
        want.sort_unstable();
        assert_eq!(ids, want);
        assert!(
            listed
                .iter()
                .all(|v| v["attestation_type"] == "join_token" && v["banned"] == false)
        );

        let text = cli(&["agent", "list"]);
        let out = text.ok();
        assert!(out.starts_with("SPIFFE ID"), "{out}");
        assert!(out.contains(&a_id) && out.contains(&b_id), "{out}");
        assert!(out.ends_with("\nFound 2 attested agents\n"), "{out}");

        let shown = cli(&["agent", "show", "--spiffe-id", &a_id]);
        assert_eq!(field(shown.ok(), "SPIFFE ID"), a_id);
        assert_eq!(field(shown.ok(), "Banned"), "no");
        let shown = json(&["agent", "show", "--spiffe-id", &a_id]).one();
        assert_eq!(id_of(&shown), a_id);
        assert!(!shown["serial"].as_str().unwrap().is_empty());

        let banned = json(&["agent", "ban", "--spiffe-id", &a_id]).one();
        assert_eq!(banned["banned"], true);
        let refused = cli(&["agent", "evict", "--spiffe-id", &a_id]);
        assert!(refused.fails().contains("is banned"), "{}", refused.stderr);
        let text = cli(&["agent", "ban", "--spiffe-id", &a_id]);
        assert!(text.ok().starts_with(&format!("Banned agent {a_id}")));

        let text = cli(&["agent", "evict", "--spiffe-id", &b_id]);
        assert!(text.ok().starts_with(&format!("Evicted agent {b_id}")));
        let gone = cli(&["agent", "show", "--spiffe-id", &b_id]);
        assert!(
            gone.fails().contains(&format!("no agent {b_id}")),
            "{}",
            gone.stderr
        );
        assert_eq!(json(&["agent", "list"]).lines().len(), 1);

        let alias = json(&[
            "entry",
            "show",
            "--spiffe-id",
            "spiffe://example.org/node-b",
        ])
        .one();
        assert_eq!(alias["parent_id"], b_id.as_str());
    });
}

#[test]
fn cli_bundle_commands_round_trip_in_text_and_json() {
    let server = Server::start();
    let pem = server.cli(&["bundle", "show"]).ok().to_owned();
    assert!(
        pem.starts_with("-----BEGIN CERTIFICATE-----\n")
            && pem.ends_with("-----END CERTIFICATE-----\n")
    );
    let spiffe: Value =
        serde_json::from_str(server.cli(&["bundle", "show", "--format", "spiffe"]).ok()).unwrap();
    assert!(!spiffe["keys"].as_array().unwrap().is_empty());
    let json = server.json(&["bundle", "show"]).one();
    assert_eq!(id_of(&json), "example.org");
    assert_eq!(json["pem"], pem.as_str());
    assert_eq!(json["spiffe_bundle"], spiffe);

    assert_eq!(
        server.cli(&["bundle", "list"]).ok(),
        "No federated bundles\n"
    );
    assert_eq!(server.json(&["bundle", "list"]).ok(), "");

    // Federate with two other trust domains, from PEM and from SPIFFE bundle JSON.
    let pem_path = server.dir().join("other.pem");
    std::fs::write(&pem_path, &pem).unwrap();
    let set = server.cli(&[
        "bundle",
        "set",
        "--id",
        "spiffe://other.org",
        "--path",
        pem_path.to_str().unwrap(),
    ]);
    assert_eq!(
        set.ok(),
        "Set the bundle of other.org (1 X.509 authority)\n"
    );
    let json_path = server.dir().join("third.json");
    std::fs::write(&json_path, serde_json::to_vec(&spiffe).unwrap()).unwrap();
    let set = server
        .json(&[
            "bundle",
            "set",
            "--id",
            "third.org",
            "--path",
            json_path.to_str().unwrap(),
            "--format",
            "spiffe",
        ])
        .one();
    assert_eq!(id_of(&set), "third.org");

    let listed = server.json(&["bundle", "list"]).lines();
    let mut ids: Vec<&str> = listed.iter().map(id_of).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["other.org", "third.org"]);
    assert!(listed.iter().all(|b| b["pem"] == pem.as_str()));
    let text = server.cli(&["bundle", "list"]);
    let out = text.ok();
    assert!(
        out.contains("Trust domain : other.org\n") && out.contains("Trust domain : third.org\n"),
        "{out}"
    );
    assert!(out.ends_with("Found 2 federated bundles\n"), "{out}");

    let own = server.cli(&[
        "bundle",
        "set",
        "--id",
        "example.org",
        "--path",
        pem_path.to_str().unwrap(),
    ]);
    assert!(own.fails().contains("cannot be set"), "{}", own.stderr);
    let garbage = server.cli(&[
        "bundle",
        "set",
        "--id",
        "x.org",
        "--path",
        json_path.to_str().unwrap(),
    ]);
    assert!(
        garbage.fails().contains("not a valid PEM bundle"),
        "{}",
        garbage.stderr
    );

    assert_eq!(
        server.cli(&["bundle", "delete", "--id", "other.org"]).ok(),
        "Deleted the bundle of other.org\n"
    );
    let deleted = server
        .json(&["bundle", "delete", "--id", "spiffe://third.org"])
        .one();
    assert_eq!(id_of(&deleted), "third.org");
    assert_eq!(server.json(&["bundle", "list"]).ok(), "");
    let again = server.cli(&["bundle", "delete", "--id", "other.org"]);
    assert!(again.fails().contains("other.org"), "{}", again.stderr);
}

#[test]
fn cli_x509_mint_write_passes_openssl_verify_and_keeps_the_key_private() {
    let server = Server::start();
    let out_dir = server.dir().join("svid");
    let text = server.cli(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/minted",
        "--dns",
        "minted.example.org",
        "--ttl",
        "10m",
        "--write",
        out_dir.to_str().unwrap(),
    ]);
    let out = text.ok();
    assert!(
        out.starts_with("Minted an X509-SVID for spiffe://example.org/minted, expiring at "),
        "{out}"
    );
    // The distance is counted in whole seconds from the CLI's clock after the call, which
    // can be a second or two past the one the server signed in on a loaded machine.
    assert!(
        ["(in 10m)", "(in 9m59s)", "(in 9m58s)"]
            .iter()
            .any(|distance| out.contains(distance)),
        "{out}"
    );
    let mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(out_dir.join("bundle.pem"))
        .arg(out_dir.join("svid.pem"))
        .output()
        .expect("openssl must be installed");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let san = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(out_dir.join("svid.pem"))
        .output()
        .unwrap();
    let san = String::from_utf8_lossy(&san.stdout);
    assert!(
        san.contains("URI:spiffe://example.org/minted") && san.contains("DNS:minted.example.org"),
        "{san}"
    );
    // The key matches the certificate.
    let pubkey = |args: &[&str]| Command::new("openssl").args(args).output().unwrap().stdout;
    assert_eq!(
        pubkey(&[
            "x509",
            "-noout",
            "-pubkey",
            "-in",
            out_dir.join("svid.pem").to_str().unwrap()
        ]),
        pubkey(&[
            "pkey",
            "-pubout",
            "-in",
            out_dir.join("svid.key").to_str().unwrap()
        ]),
    );

    // Minting again replaces the files; the key stays 0600.
    let json = server
        .json(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/minted",
            "--write",
            out_dir.to_str().unwrap(),
        ])
        .one();
    assert_eq!(id_of(&json), "spiffe://example.org/minted");
    assert_eq!(json["key_path"], out_dir.join("svid.key").to_str().unwrap());
    let mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Without --write, the PEM goes to stdout.
    let text = server.cli(&["x509", "mint", "--spiffe-id", "spiffe://example.org/minted"]);
    let out = text.ok();
    assert_eq!(field(out, "SPIFFE ID"), "spiffe://example.org/minted");
    assert_eq!(
        out.matches("-----BEGIN PRIVATE KEY-----").count(),
        1,
        "{out}"
    );
    assert!(
        out.matches("-----BEGIN CERTIFICATE-----").count() >= 2,
        "{out}"
    );
    let json = server
        .json(&["x509", "mint", "--spiffe-id", "spiffe://example.org/minted"])
        .one();
    assert!(
        json["svid_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(
        json["key_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert!(
        json["bundle_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );

    let foreign = server.cli(&["x509", "mint", "--spiffe-id", "spiffe://other.org/x"]);
    assert!(
        foreign.fails().contains("the server refused the request"),
        "{}",
        foreign.stderr
    );
}

#[test]
fn cli_jwt_mint_prints_the_token() {
    let server = Server::start();
    let text = server.cli(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/j",
        "--audience",
        "a",
        "--audience",
        "b",
        "--ttl",
        "2m",
    ]);
    let token = text.ok().trim_end();
    assert_eq!(token.split('.').count(), 3, "{token}");
    assert!(!token.contains(char::is_whitespace));
    let json = server
        .json(&[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/j",
            "--audience",
            "a",
        ])
        .one();
    assert_eq!(id_of(&json), "spiffe://example.org/j");
    assert_eq!(json["audience"], serde_json::json!(["a"]));
    assert_eq!(json["token"].as_str().unwrap().split('.').count(), 3);
    let missing = server.cli(&["jwt", "mint", "--spiffe-id", "spiffe://example.org/j"]);
    assert_eq!(missing.code, Some(2));
    assert!(missing.stderr.contains("--audience"), "{}", missing.stderr);
}

#[test]
fn cli_a_server_that_is_not_running_is_reported_as_such() {
    let mut server = Server::start();
    server.kill();
    // SIGKILL leaves the socket file behind: connection refused.
    assert!(server.socket().exists());
    let dir = tempfile::tempdir().unwrap();
    let never = dir.path().join("no-such.sock");
    for socket in [server.socket(), never] {
        for args in [
            &["healthcheck"][..],
            &["entry", "show"],
            &["entry", "count", "--output", "json"],
        ] {
            let run = cli_at(&socket, args);
            let err = run.fails();
            assert_eq!(
                err,
                format!(
                    "sigil-server: cannot reach the Sigil server at {}: is it running? (start it \
                     with `sigil-server run`, or point --admin-socket / SIGIL_ADMIN_SOCKET at its \
                     admin socket)\n",
                    socket.display()
                )
            );
            assert_eq!(run.code, Some(1));
            assert_eq!(run.stdout, "");
        }
    }
}

#[test]
fn cli_invalid_input_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("unused.sock");
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "example.org/web",
                "--parent-id",
                AGENT,
                "--selector",
                "a:b",
            ],
            "invalid value 'example.org/web' for '--spiffe-id <ID>'",
        ),
        (
            &["entry", "show", "--parent-id", "spiffe://Example.org/x"],
            "invalid value 'spiffe://Example.org/x' for '--parent-id <ID>'",
        ),
        (
            &[
                "agent",
                "show",
                "--spiffe-id",
                "spiffe://example.org/a/../b",
            ],
            "for '--spiffe-id <ID>'",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/w",
                "--parent-id",
                AGENT,
                "--selector",
                "nocolon",
            ],
            "for '--selector <TYPE:VALUE>'",
        ),
        (
            &["token", "generate", "--ttl", "10 minutes"],
            "write a number and a unit",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/w",
                "--parent-id",
                AGENT,
                "--selector",
                "a:b",
                "--expires-at",
                "tomorrow",
            ],
            "RFC 3339",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/w",
                "--selector",
                "a:b",
            ],
            "--parent-id <ID>",
        ),
    ];
    for (args, want) in cases {
        let run = cli_at(&socket, args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(want), "{args:?}: {}", run.stderr);
    }
    let run = cli_at(
        &socket,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "nope",
            "--parent-id",
            AGENT,
            "--selector",
            "a:b",
        ],
    );
    assert!(
        run.stderr
            .contains("a SPIFFE ID looks like spiffe://example.org/path"),
        "{}",
        run.stderr
    );

    // What only the server can check comes back with the server's reason.
    let server = Server::start();
    let run = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/sigil/x",
        "--parent-id",
        AGENT,
        "--selector",
        "a:b",
    ]);
    assert!(run.fails().contains("reserved"), "{}", run.stderr);
    let run = server.cli(&["entry", "show", "--id", "xyz"]);
    assert!(
        run.fails().contains("expected 32 lowercase hex characters"),
        "{}",
        run.stderr
    );
}
