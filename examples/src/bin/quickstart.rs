//! The Sigil quickstart: a server, an agent and a workload getting its SVIDs, in one command.
//!
//! ```text
//! cargo run --release --bin quickstart
//! ```
//!
//! It runs everything in a temporary directory (removed at the end), on loopback:
//! 1. starts a server for `quickstart.example` (CA, store, agent API, admin socket);
//! 2. generates a join token and starts an agent with it;
//! 3. registers an entry granting `spiffe://quickstart.example/me` to this user's uid;
//! 4. as a workload, fetches an X509-SVID and a JWT-SVID through the Workload API socket;
//! 5. verifies both against the trust bundle and prints what it got.
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use sigil_core::jwt::{JwtBundleSet, JwtSvid};
use sigil_core::x509_svid::verify_chain;
use sigil_core::{SpiffeBundle, TrustDomain, X509Bundle, X509Svid};
use sigil_proto::admin::admin_client::AdminClient;

const TRUST_DOMAIN: &str = "quickstart.example";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    say(&format!("Working in {}", dir.path().display()))?;

    // 1. The server.
    let server_config = sigil_server::ServerConfig::from_sources(
        Some(&format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\nbind_address = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_socket = \"{}\"\nlog_level = \"warn\"",
            dir.path().join("server").display(),
            dir.path().join("admin.sock").display()
        )),
        Default::default(),
    )?;
    let server = sigil_server::Server::start(server_config).await?;
    let server_addr = server.local_addr;
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async move {
        let _ = server_stopped.await;
        sigil_server::Shutdown::Immediate
    }));
    say(&format!(
        "1. Server for {TRUST_DOMAIN} listening on {server_addr}"
    ))?;

    // 2. A join token and the agent.
    let mut admin =
        AdminClient::new(sigil_proto::client::unix_channel(dir.path().join("admin.sock")).await?);
    let token = admin
        .generate_join_token(sigil_proto::admin::GenerateJoinTokenRequest {
            ttl_seconds: 600,
            spiffe_id: String::new(),
        })
        .await?
        .into_inner();
    let bundle = admin
        .get_bundle(sigil_proto::admin::GetBundleRequest {})
        .await?
        .into_inner();
    let bootstrap = dir.path().join("bootstrap.pem");
    std::fs::write(&bootstrap, &bundle.pem)?;
    let socket = dir.path().join("agent").join("api.sock");
    let agent_config = sigil_agent::config::AgentConfig::from_sources(
        None,
        sigil_agent::config::Overrides {
            trust_domain: Some(TRUST_DOMAIN.into()),
            server_address: vec![server_addr.to_string()],
            join_token: Some(token.token.clone()),
            trust_bundle: Some(bootstrap.display().to_string()),
            socket_path: Some(socket.display().to_string()),
            data_dir: Some(dir.path().join("agent-data").display().to_string()),
            ..Default::default()
        },
    )?;
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(sigil_agent::agent::run(agent_config, async move {
        let _ = agent_stopped.await;
        sigil_agent::agent::Shutdown::Immediate
    }));
    wait_for(&socket).await?;
    say(&format!(
        "2. Agent {} serving the Workload API on {}",
        token.agent_spiffe_id,
        socket.display()
    ))?;

    // 3. An entry for this user.
    let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))?;
    let entry = sigil_proto::admin::Entry {
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}/me"),
        parent_id: token.agent_spiffe_id.clone(),
        selectors: vec![format!("unix:uid:{uid}")],
        ..Default::default()
    };
    admin
        .create_entries(sigil_proto::admin::CreateEntriesRequest {
            entries: vec![entry],
        })
        .await?;
    say(&format!(
        "3. Registered spiffe://{TRUST_DOMAIN}/me for selector unix:uid:{uid}"
    ))?;

    // 4. The workload: X509-SVID and JWT-SVID through the Workload API.
    let mut workload = sigil_proto::client::workload_api(&socket).await?;
    let started = Instant::now();
    let x509 = loop {
        match workload
            .fetch_x509svid(sigil_proto::workload::X509svidRequest {})
            .await
        {
            Ok(stream) => {
                if let Some(msg) = stream.into_inner().message().await? {
                    break msg;
                }
            }
            Err(status)
                if status.code() == tonic::Code::PermissionDenied
                    && started.elapsed() < Duration::from_secs(15) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => bail!("fetching the X509-SVID failed: {status}"),
        }
    };
    let svid = x509.svids.first().context("no X509-SVID in the answer")?;
    let jwt = workload
        .fetch_jwtsvid(sigil_proto::workload::JwtsvidRequest {
            audience: vec!["quickstart".into()],
            spiffe_id: String::new(),
        })
        .await?
        .into_inner();
    let token = jwt.svids.first().context("no JWT-SVID in the answer")?;

    // 5. Verify both with nothing but the bundle.
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let parsed = X509Svid::parse(&svid.x509_svid, &svid.x509_svid_key)?;
    let x509_bundle = X509Bundle::from_der(td.clone(), &svid.bundle)?;
    let verified = verify_chain(parsed.cert_chain(), &x509_bundle, SystemTime::now())?;
    let spiffe_bundle = SpiffeBundle::parse(td.clone(), &bundle.spiffe_bundle)?;
    let jwt_bundles: JwtBundleSet = std::iter::once(spiffe_bundle.jwt_bundle()).collect();
    let validated =
        JwtSvid::parse_and_validate(&token.svid, &jwt_bundles, "quickstart", SystemTime::now())?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.x509_svid)?;

    say("4. The workload got, and verified against the trust bundle:")?;
    say(&format!("   X509-SVID  {}", verified.spiffe_id()))?;
    say(&format!(
        "     serial   {}",
        leaf.raw_serial_as_string().replace(':', "")
    ))?;
    let rfc3339 = sigil_core::time::format_rfc3339;
    say(&format!(
        "     valid    {} to {}",
        rfc3339(leaf.validity().not_before.timestamp()),
        rfc3339(leaf.validity().not_after.timestamp())
    ))?;
    say(&format!("     issuer   {}", leaf.issuer()))?;
    say(&format!(
        "   JWT-SVID   {} for audience {:?}",
        validated.spiffe_id(),
        validated.audience()
    ))?;
    let exp = validated
        .expiry()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    say(&format!(
        "     expires  {}",
        rfc3339(i64::try_from(exp).unwrap_or(i64::MAX))
    ))?;
    say(
        "Done: server, agent and workload all ran; everything was verified with the bundle alone.",
    )?;

    let _ = stop_agent.send(());
    let _ = stop_server.send(());
    let _ = agent_task.await;
    let _ = server_task.await;
    Ok(())
}

fn say(line: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(())
}

async fn wait_for(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("the agent did not open its socket within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
