//! Section 7, several servers on one PostgreSQL database (issue 19): issuance with two servers
//! on PostgreSQL against one server on sled in the same run, and an entry created through one
//! server until a workload of an agent of the other shows it.
//!
//! PostgreSQL comes from Debian's packages (`sigil-testkit` starts a cluster in the run's
//! temporary directory); without it the section says so and adds a row saying it was skipped.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sigil_proto::admin::DeleteEntryRequest;

use crate::Harness;
use crate::clients::{self, TRUST_DOMAIN};
use crate::report::{Percentiles, Row, rate};
use crate::small::{
    ISSUANCE_CALLERS, Load, drain, issuance_setup, load, propagation_row, wait_shown, watch_stream,
};
use crate::topology::{AgentHandle, ServerHandle};

/// Runs the section.
pub(crate) async fn run(h: &mut Harness) -> anyhow::Result<()> {
    let Some(postgres) = sigil_testkit::Postgres::start() else {
        h.note("ha: PostgreSQL is not installed (apt-get install postgresql): section skipped");
        h.rows.push(Row::info(
            "7. Several servers on PostgreSQL".to_owned(),
            "skipped: PostgreSQL is not installed".to_owned(),
            "-".to_owned(),
            None,
        ));
        return Ok(());
    };
    let dir = h.dir.path().join("ha");

    // The baseline, in the same run: one server on sled under the same load.
    h.note("ha: one server on sled, the baseline");
    let (sled, _) = ServerHandle::start(&dir.join("sled")).await?;
    let sled_load = issue(h, &sled, "ha-sled").await?;
    sled.stop().await?;

    h.note("ha: two servers on one PostgreSQL database");
    let url = postgres.create_database().await;
    let on_database = |id: &str| {
        format!("store = \"postgres\"\npostgres_url = \"{url}\"\nserver_id = \"{id}\"\n")
    };
    let (a, _) = ServerHandle::start_with(&dir.join("a"), &on_database("a")).await?;
    let (b, _) = ServerHandle::start_with(&dir.join("b"), &on_database("b")).await?;
    // Both servers serve both CAs before anything is measured.
    let mut admin_a = a.admin().await?;
    let mut admin_b = b.admin().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while clients::bundle(&mut admin_a).await?.authorities().len() < 2
        || clients::bundle(&mut admin_b).await?.authorities().len() < 2
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the servers' bundles never held both CAs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let postmaster = postgres
        .postmaster_pid()
        .context("the PostgreSQL cluster has no postmaster.pid")?;
    let database_before = crate::procs::tree_cpu_of(postmaster)?;
    let (load_a, load_b) = tokio::join!(issue(h, &a, "ha-a"), issue(h, &b, "ha-b"));
    let (load_a, load_b) = (load_a?, load_b?);
    let database_cpu = crate::procs::tree_cpu_of(postmaster)?.saturating_sub(database_before);
    let signed = load_a.signed + load_b.signed;
    let cpu = (load_a.server_cpu + load_b.server_cpu)
        .as_secs_f64()
        .max(1e-3);
    let ours = signed as f64 / cpu;
    let with_database = signed as f64 / (cpu + database_cpu.as_secs_f64());
    let baseline = sled_load.per_cpu_second();
    h.rows.push(
        Row::info(
            format!(
                "7. Issuance, two servers on one PostgreSQL, {ISSUANCE_CALLERS} agents each at once: X509-SVIDs per server CPU-second (both servers' CPU; the database's apart)"
            ),
            format!(
                "{} (a: {}; b: {}); counting PostgreSQL's CPU too ({}): {}",
                rate(ours),
                load_a.text(),
                load_b.text(),
                crate::report::duration(database_cpu),
                rate(with_database)
            ),
            format!(
                "one server on sled, same load, same run: {} ({})",
                rate(baseline),
                sled_load.text()
            ),
            Some(ours / baseline),
        )
        .target("≥ 0.5", ours / baseline >= 0.5),
    );

    propagation(h, &b, &mut admin_a).await?;
    a.stop().await?;
    b.stop().await?;
    Ok(())
}

/// [`ISSUANCE_CALLERS`] simulated agents of `server` issuing for the plan's issuance time.
async fn issue(h: &Harness, server: &ServerHandle, prefix: &str) -> anyhow::Result<Load> {
    let mut admin = server.admin().await?;
    let bundle = clients::bundle(&mut admin).await?;
    let (sim, params) = issuance_setup(&mut admin, server.addr, &bundle, prefix).await?;
    let mut callers = Vec::with_capacity(ISSUANCE_CALLERS);
    for _ in 0..ISSUANCE_CALLERS {
        callers.push(sim.client(server.addr, &bundle).await?);
    }
    load(h, server, callers, &params).await
}

/// Entries created (and deleted) through server A's admin API (`admin_a`) until an open
/// workload stream on an agent of `b` shows the change.
async fn propagation(
    h: &mut Harness,
    b: &ServerHandle,
    admin_a: &mut sigil_proto::admin::admin_client::AdminClient<tonic::transport::Channel>,
) -> anyhow::Result<()> {
    let n = h.plan.propagation_trials;
    h.note(&format!(
        "ha: {n} entries created through A until B's agent's workload shows them"
    ));
    let mut admin_b = b.admin().await?;
    let bundle = clients::bundle(&mut admin_b).await?;
    let (token, agent_id) = clients::join_token(admin_a).await?;
    let standing = format!("spiffe://{TRUST_DOMAIN}/ha/standing");
    clients::create_entries(
        admin_a,
        vec![clients::entry(&standing, &agent_id, &[h.uid_selector()])],
    )
    .await?;
    let mut agent = AgentHandle::spawn(&h.dir.path().join("ha").join("agent"), b, &bundle, &token)?;
    agent.wait_socket(Duration::from_secs(60)).await?;
    crate::small::wait_for_identity(&agent, &standing, Duration::from_secs(60))
        .await
        .context("B's agent never served the workload its SVID")?;
    let deadline = h.phase_deadline(Duration::from_secs(if h.plan.quick { 10 } else { 90 }));
    let (watcher, mut rx) = watch_stream(&agent.socket).await?;
    let (mut shown, mut rpc) = (Vec::new(), Vec::new());
    let mut missed = 0usize;
    for k in 0..n {
        if Instant::now() > deadline {
            break;
        }
        let id = format!("spiffe://{TRUST_DOMAIN}/ha/propagation/{k}");
        drain(&mut rx);
        let t = Instant::now();
        let created = clients::create_entries(
            admin_a,
            vec![clients::entry(&id, &agent_id, &[h.uid_selector()])],
        )
        .await?
        .into_iter()
        .next()
        .context("no entry created")?;
        rpc.push(t.elapsed());
        match wait_shown(&mut rx, |m| m.has(&id).then_some(())).await {
            Some((at, ())) => shown.push(at.saturating_duration_since(t)),
            None => missed += 1,
        }
        admin_a
            .delete_entry(DeleteEntryRequest { id: created.id })
            .await?;
    }
    watcher.abort();
    agent.stop().await?;
    let ours = Percentiles::of(&shown).context("no propagation sample")?;
    let rpc = Percentiles::of(&rpc).context("no propagation sample")?;
    h.rows.push(propagation_row(
        "7. Propagation across servers: entry created through server A until the open workload stream of an agent of server B shows it".to_owned(),
        &ours,
        "A's CreateEntries round trip alone (durable)".to_owned(),
        &rpc,
        missed,
    ));
    Ok(())
}
