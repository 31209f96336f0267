//! The agent-facing API of the real `sigil-server` binary, over TCP with mTLS: attestation,
//! join tokens, authentication on every call, authorization of entries, and the certificates
//! it issues (checked by `openssl verify -x509_strict`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use sigil_proto::node::{
    AttestAgentRequest, BatchNewX509svidRequest, GetBundleRequest, NewJwtsvidRequest,
    NewX509svidParams, RenewAgentRequest, x509svid_result,
};
use sigil_server::DenyReason;
use sigil_tests::*;
use tonic::Code;

#[tokio::test]
async fn attestation_issues_an_agent_svid_that_openssl_accepts() {
    let server = TestServer::start("");
    let agent = TestAgent::attest(&server).await;
    assert!(
        agent.id.path().starts_with("/sigil/agent/join_token/"),
        "{}",
        agent.id
    );
    assert_eq!(agent.chain.len(), 1);
    let bundle = server.bundle().await;
    openssl_verify(&bundle, &agent.chain[0]).unwrap();

    // With its SVID the agent is authenticated.
    let mut client = agent.client(&server).await;
    let resp = client
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let b = resp.bundle.unwrap();
    assert_eq!(b.trust_domain, TRUST_DOMAIN);
    assert!(b.sequence >= 1);
    let json: serde_json::Value = serde_json::from_slice(&b.spiffe_bundle).unwrap();
    assert!(
        json["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["use"] == "x509-svid")
    );
}

#[tokio::test]
async fn a_join_token_is_used_once_even_under_concurrency() {
    let server = TestServer::start("");
    let token = server.join_token(Duration::from_secs(600)).await;
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let token = token.clone();
        let addr = server.node_addr;
        let bundle = server.bundle().await;
        tasks.push(tokio::spawn(async move {
            let mut client = node_client(addr, &bundle, None).await.unwrap();
            client
                .attest_agent(AttestAgentRequest {
                    join_token: token,
                    csr: TestKey::new().csr(),
                })
                .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
                assert!(status.message().contains("already used"), "{status:?}");
            }
        }
    }
    assert_eq!(ok, 1, "exactly one attestation may succeed");
}

#[tokio::test]
async fn an_expired_token_is_refused_and_consumed() {
    let server = TestServer::start("");
    let token = server.join_token(Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = TestAgent::attest_with(&server, &token).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("expired"), "{err:?}");
    // Consumed: a second try no longer finds it.
    let err = TestAgent::attest_with(&server, &token).await.err().unwrap();
    assert!(err.message().contains("unknown or already used"), "{err:?}");
}

#[tokio::test]
async fn unknown_tokens_and_malformed_requests_get_clear_errors() {
    let server = TestServer::start("");
    let bundle = server.bundle().await;
    let mut client = node_client(server.node_addr, &bundle, None).await.unwrap();
    let cases: Vec<(&str, AttestAgentRequest, Code, &str)> = vec![
        (
            "unknown token",
            AttestAgentRequest {
                join_token: "0123456789abcdef".into(),
                csr: TestKey::new().csr(),
            },
            Code::PermissionDenied,
            "unknown or already used",
        ),
        (
            "token that is not a path segment",
            AttestAgentRequest {
                join_token: "a/../b".into(),
                csr: TestKey::new().csr(),
            },
            Code::PermissionDenied,
            "join token",
        ),
        (
            "empty token",
            AttestAgentRequest {
                join_token: String::new(),
                csr: TestKey::new().csr(),
            },
            Code::InvalidArgument,
            "join_token is required",
        ),
        (
            "garbage csr",
            AttestAgentRequest {
                join_token: "abc".into(),
                csr: b"not a csr".to_vec(),
            },
            Code::InvalidArgument,
            "malformed CSR",
        ),
    ];
    for (name, request, code, text) in cases {
        let err = client.attest_agent(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(err.message().contains(text), "{name}: {err:?}");
    }

    // A malformed CSR does not burn a valid token.
    let token = server.join_token(Duration::from_secs(600)).await;
    let err = client
        .attest_agent(AttestAgentRequest {
            join_token: token.clone(),
            csr: vec![0x30, 0x03, 1, 2, 3],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    TestAgent::attest_with(&server, &token).await.unwrap();

    // A CSR for a non-P-256 key is refused, and says why.
    let token = server.join_token(Duration::from_secs(600)).await;
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&p384).unwrap().der().to_vec();
    let err = client
        .attest_agent(AttestAgentRequest {
            join_token: token,
            csr,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().to_lowercase().contains("p-256"), "{err:?}");
}

#[tokio::test]
async fn calls_without_an_agent_svid_are_refused_with_a_reason() {
    let server = TestServer::start("");
    let bundle = server.bundle().await;
    let mut anonymous = node_client(server.node_addr, &bundle, None).await.unwrap();
    let err = anonymous.get_bundle(GetBundleRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(DenyReason::from_status(&err), Some(DenyReason::NotAttested));
}

#[tokio::test]
async fn a_workload_svid_is_refused_at_the_handshake() {
    let server = TestServer::start("");
    let bundle = server.bundle().await;
    let key = TestKey::new();
    let minted = server
        .admin()
        .await
        .mint_x509svid(sigil_proto::admin::MintX509svidRequest {
            spiffe_id: "spiffe://example.org/web".into(),
            csr: key.csr(),
            ttl_seconds: 0,
            dns_names: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    // A valid SVID of the trust domain, but not an agent's: the server for agents never sees
    // the connection.
    let connected = node_client(
        server.node_addr,
        &bundle,
        Some((certs(&minted.cert_chain), key.private_key())),
    )
    .await;
    match connected {
        Err(_) => {}
        Ok(mut client) => {
            // TLS 1.3: the server's refusal arrives with the first request, as an alert or a
            // closed connection; never as an answer of the server for agents.
            let err = client.get_bundle(GetBundleRequest {}).await.unwrap_err();
            assert_ne!(err.code(), Code::PermissionDenied, "{err:?}");
            assert_eq!(DenyReason::from_status(&err), None, "{err:?}");
        }
    }
}

#[tokio::test]
async fn banned_and_evicted_agents_are_refused_with_their_reason() {
    let server = TestServer::start("");
    let agent = TestAgent::attest(&server).await;
    let mut client = agent.client(&server).await;
    client.get_bundle(GetBundleRequest {}).await.unwrap();

    let mut admin = server.admin().await;
    admin
        .ban_agent(sigil_proto::admin::AgentRequest {
            spiffe_id: agent.id.to_string(),
        })
        .await
        .unwrap();
    let err = client.get_bundle(GetBundleRequest {}).await.unwrap_err();
    assert_eq!(
        DenyReason::from_status(&err),
        Some(DenyReason::Banned),
        "{err:?}"
    );
    // A banned agent stays recorded: it cannot be evicted (and so cannot attest again).
    let err = admin
        .evict_agent(sigil_proto::admin::AgentRequest {
            spiffe_id: agent.id.to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let other = TestAgent::attest(&server).await;
    admin
        .evict_agent(sigil_proto::admin::AgentRequest {
            spiffe_id: other.id.to_string(),
        })
        .await
        .unwrap();
    let err = other
        .client(&server)
        .await
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        DenyReason::from_status(&err),
        Some(DenyReason::NotAttested),
        "{err:?}"
    );
}

#[tokio::test]
async fn renewal_switches_the_agent_to_its_new_svid() {
    let server = TestServer::start("");
    let agent = TestAgent::attest(&server).await;
    let mut client = agent.client(&server).await;
    let new_key = TestKey::new();
    let renewed = client
        .renew_agent(RenewAgentRequest { csr: new_key.csr() })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(renewed.spiffe_id, agent.id.to_string());
    let renewed = TestAgent {
        id: agent.id.clone(),
        chain: certs(&renewed.cert_chain),
        key: new_key,
    };
    openssl_verify(&server.bundle().await, &renewed.chain[0]).unwrap();

    // The old SVID keeps working until the new one is first used...
    client.get_bundle(GetBundleRequest {}).await.unwrap();
    renewed
        .client(&server)
        .await
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap();
    // ...then it must re-attest.
    let err = agent
        .client(&server)
        .await
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        DenyReason::from_status(&err),
        Some(DenyReason::MustReattest),
        "{err:?}"
    );
}

#[tokio::test]
async fn workload_svids_come_from_entries_authorized_for_the_agent_only() {
    let server = TestServer::start("");
    let agent = TestAgent::attest(&server).await;
    let other = TestAgent::attest(&server).await;
    let mine = create_entry(
        &server,
        entry(
            "spiffe://example.org/web",
            agent.id.as_str(),
            &["unix:uid:1000"],
        ),
    )
    .await
    .unwrap();
    // An entry parented to an entry of this agent (a nested parent) is authorized too.
    let nested = create_entry(
        &server,
        entry(
            "spiffe://example.org/nested",
            "spiffe://example.org/web",
            &["unix:uid:1001"],
        ),
    )
    .await
    .unwrap();
    let theirs = create_entry(
        &server,
        entry(
            "spiffe://example.org/db",
            other.id.as_str(),
            &["unix:uid:1000"],
        ),
    )
    .await
    .unwrap();

    let mut client = agent.client(&server).await;
    let key = TestKey::new();
    let resp = client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![
                NewX509svidParams {
                    entry_id: mine.id.clone(),
                    csr: key.csr(),
                },
                NewX509svidParams {
                    entry_id: nested.id.clone(),
                    csr: key.csr(),
                },
                // CVE-2021-27098: another agent's entry.
                NewX509svidParams {
                    entry_id: theirs.id.clone(),
                    csr: key.csr(),
                },
                NewX509svidParams {
                    entry_id: "not-an-id".into(),
                    csr: key.csr(),
                },
                NewX509svidParams {
                    entry_id: mine.id.clone(),
                    csr: b"garbage".to_vec(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let results: Vec<_> = resp
        .results
        .into_iter()
        .map(|r| r.result.unwrap())
        .collect();
    let bundle = server.bundle().await;
    for (i, want) in [
        (0, "spiffe://example.org/web"),
        (1, "spiffe://example.org/nested"),
    ] {
        let x509svid_result::Result::Svid(svid) = &results[i] else {
            panic!("result {i}: {:?}", results[i]);
        };
        assert_eq!(svid.spiffe_id, want);
        let chain = certs(&svid.cert_chain);
        openssl_verify(&bundle, &chain[0]).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let uris: Vec<_> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, [want]);
    }
    let expect_error = |i: usize, code: Code| match &results[i] {
        x509svid_result::Result::Error(e) => assert_eq!(e.code, code as i32, "result {i}: {e:?}"),
        other => panic!("result {i} should have failed: {other:?}"),
    };
    expect_error(2, Code::PermissionDenied);
    expect_error(3, Code::InvalidArgument);
    expect_error(4, Code::InvalidArgument);

    // JWT-SVIDs follow the same rule.
    let jwt = client
        .new_jwtsvid(NewJwtsvidRequest {
            entry_id: mine.id.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.spiffe_id, "spiffe://example.org/web");
    assert_eq!(jwt.token.split('.').count(), 3);
    let err = client
        .new_jwtsvid(NewJwtsvidRequest {
            entry_id: theirs.id.clone(),
            audience: vec!["db".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .new_jwtsvid(NewJwtsvidRequest {
            entry_id: mine.id,
            audience: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn no_entry_may_claim_the_reserved_sigil_prefix_or_an_invalid_id() {
    let server = TestServer::start("");
    let agent = TestAgent::attest(&server).await;
    let cases = [
        (
            "the server's own ID (CVE-2021-27098)",
            "spiffe://example.org/sigil/server",
            "reserved",
        ),
        (
            "an agent ID",
            "spiffe://example.org/sigil/agent/join_token/x",
            "reserved",
        ),
        (
            "another trust domain",
            "spiffe://evil.org/web",
            "not in trust domain",
        ),
        (
            "trailing slash",
            "spiffe://example.org/web/",
            "trailing slash",
        ),
        (
            "not a spiffe id",
            "https://example.org/web",
            "not a valid SPIFFE ID",
        ),
        ("root id", "spiffe://example.org", "no path"),
    ];
    for (name, id, text) in cases {
        let err = create_entry(&server, entry(id, agent.id.as_str(), &["unix:uid:0"]))
            .await
            .unwrap_err();
        assert!(err.contains(text), "{name}: {err}");
    }
    let err = create_entry(
        &server,
        entry("spiffe://example.org/x", agent.id.as_str(), &["nocolon"]),
    )
    .await
    .unwrap_err();
    assert!(err.contains("type:value"), "{err}");
}

#[tokio::test]
async fn oversized_messages_are_refused_without_harm() {
    let server = TestServer::start("");
    let agent = TestAgent::attest(&server).await;
    let mut client = agent
        .client(&server)
        .await
        .max_encoding_message_size(64 * 1024 * 1024);
    let err = client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: "x".into(),
                csr: vec![0u8; 5 * 1024 * 1024],
            }],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{err:?}"
    );
    // The server is still serving.
    agent
        .client(&server)
        .await
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap();
    // And more CSRs than a batch allows are refused as such.
    let params = (0..501)
        .map(|_| NewX509svidParams {
            entry_id: "x".into(),
            csr: vec![],
        })
        .collect();
    let err = client
        .batch_new_x509svid(BatchNewX509svidRequest { params })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("maximum is 500"), "{err:?}");
}

#[tokio::test]
async fn a_sync_stream_ends_when_the_client_svid_expires() {
    let server = TestServer::start(
        "ca_ttl = \"1m\"\ndefault_x509_svid_ttl = \"10s\"\ndefault_jwt_svid_ttl = \"10s\"\nagent_svid_ttl = \"5s\"",
    );
    let agent = TestAgent::attest(&server).await;
    let mut client = agent.client(&server).await;
    let mut stream = client
        .sync_entries(sigil_proto::node::SyncEntriesRequest {
            since_revision: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap(); // the snapshot
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream outlived the agent SVID");
    let status = end.unwrap_err();
    assert_eq!(
        DenyReason::from_status(&status),
        Some(DenyReason::Expired),
        "{status:?}"
    );
    // And a new call with the expired SVID is refused as such.
    let err = agent
        .client(&server)
        .await
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        DenyReason::from_status(&err),
        Some(DenyReason::Expired),
        "{err:?}"
    );
}

#[tokio::test]
async fn tls_sessions_are_never_resumed() {
    let server = TestServer::start("");
    let bundle = server.bundle().await;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(
            sigil_core::tls::SpiffeServerVerifier::new(
                sigil_core::tls::SharedBundles::from_bundle(bundle),
                sigil_core::x509_svid::Authorizer::exact(server_id()),
            ),
        ))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    // The client offers resumption; the server must never accept it.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    for attempt in 0..3 {
        let tcp = tokio::net::TcpStream::connect(server.node_addr)
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("sigil-server").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        // Read a little so TLS 1.3 tickets, if any were sent, arrive.
        use tokio::io::AsyncWriteExt as _;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
        )
        .await;
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "attempt {attempt} resumed a session"
        );
    }
}
