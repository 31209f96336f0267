//! Measurement 5: a server with many entries and many simulated agents (real node API, mTLS,
//! each holding a `SyncEntries` stream), and one real agent with many authorized entries.
//!
//! Order: an empty server (start-up time and memory: the baselines), one simulated agent on it
//! (entry-change cost: the baseline), join tokens, the entries, the other simulated agents, the
//! entry-change cost again, the real agent's full sync and one rotation to streams on it, the
//! store on disk, a restart, a start without sled's snapshot, and the store's records by tree.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use prost::Message as _;
use sigil_proto::admin::admin_client::AdminClient;
use sigil_proto::admin::{self, CountEntriesRequest};
use sigil_proto::node::node_client::NodeClient;
use sigil_proto::node::{SyncEntriesRequest, change, sync_entries_response};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tonic::transport::Channel;

use crate::clients::{self, SimAgent, TRUST_DOMAIN};
use crate::procs::disk_usage;
use crate::report::{self, Percentiles, Row, bytes, duration, rate, thousands};
use crate::small::{self, Facts, Pusher as _, Rotations, wait_for_identity};
use crate::topology::{AgentHandle, ServerHandle};
use crate::{Harness, crypto};

/// Entries per `CreateEntries` call.
const CREATE_BATCH: usize = 1_000;

/// Admin or node calls in flight at once while loading.
const LOAD_PARALLELISM: usize = 16;

/// An entry upsert a simulated agent's sync stream delivered.
#[derive(Debug)]
struct Event {
    agent: usize,
    at: Instant,
    spiffe_id: String,
}

/// What one series of entry changes cost.
#[derive(Debug)]
struct ChangeCost {
    latency: Percentiles,
    server_cpu_per_change: Duration,
    /// Upserts delivered to agents other than the one the entry is for.
    elsewhere: usize,
}

/// Runs measurement 5.
pub(crate) async fn run(h: &mut Harness, facts: &Facts) -> anyhow::Result<()> {
    let plan = h.plan.clone();
    let dir = h.dir.path().join("scale");
    h.note("scale: an empty server");
    let (server, empty_start) = ServerHandle::start(&dir.join("server")).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let empty_rss = server.process.rss()?;
    let mut admin = server.admin().await?;
    let bundle = clients::bundle(&mut admin).await?;
    let attest = clients::node(server.addr, &bundle, None).await?;
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let synced = Arc::new(AtomicUsize::new(0));

    // The baseline of an entry change: one simulated agent, on the empty server.
    let (token, _) = clients::join_token(&mut admin).await?;
    let first = SimAgent::attest(&mut attest.clone(), &token).await?;
    let mut streams: Vec<JoinHandle<()>> = vec![
        sync_stream(
            first.client(server.addr, &bundle).await?,
            0,
            events_tx.clone(),
            synced.clone(),
        )
        .await?,
    ];
    wait_synced(&synced, 1, Duration::from_secs(30)).await?;
    let empty_change = change_trials(h, &server, &mut admin, &mut events, 0, &first.id, "empty")
        .await
        .context("entry changes on the empty server")?;

    // Join tokens: the real agent's, then the simulated agents' (as many as fit the budget).
    let (real_token, real_id) = clients::join_token(&mut admin).await?;
    h.note(&format!(
        "scale: {} join tokens",
        thousands((plan.scale_agents - 1) as u64)
    ));
    let tokens_deadline = h.phase_deadline(Duration::from_secs(if plan.quick { 5 } else { 60 }));
    let mut sim_tokens: Vec<(String, String)> = vec![(String::new(), first.id.to_string())];
    let mut set = JoinSet::new();
    let mut asked = 1;
    while asked < plan.scale_agents || !set.is_empty() {
        while asked < plan.scale_agents
            && set.len() < LOAD_PARALLELISM
            && Instant::now() < tokens_deadline
        {
            let mut admin = admin.clone();
            set.spawn(async move { clients::join_token(&mut admin).await });
            asked += 1;
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        sim_tokens.push(joined??);
    }

    // The entries: the real agent's (all but one with selectors no workload has, and one
    // sentinel for this process's uid, seen when the agent has minted them all), then the rest
    // spread over the simulated agents.
    let real_bulk = plan.agent_entries.saturating_sub(1);
    let sentinel = format!("spiffe://{TRUST_DOMAIN}/agent/sentinel");
    let mut specs: Vec<admin::Entry> = Vec::with_capacity(plan.scale_entries);
    specs.extend((0..real_bulk).map(|i| {
        clients::entry(
            &format!("spiffe://{TRUST_DOMAIN}/agent/{i}"),
            &real_id,
            &[format!("unix:uid:{}", 4_000_000 + i)],
        )
    }));
    specs.push(clients::entry(&sentinel, &real_id, &[h.uid_selector()]));
    let rest = plan.scale_entries.saturating_sub(specs.len());
    specs.extend((0..rest).map(|i| {
        let (_, parent) = &sim_tokens[i % sim_tokens.len()];
        clients::entry(
            &format!("spiffe://{TRUST_DOMAIN}/sim/{i}"),
            parent,
            &[format!("unix:uid:{}", 5_000_000 + i)],
        )
    }));
    let raw_bytes: usize = specs.iter().map(|e| e.encoded_len()).sum();
    h.note(&format!(
        "scale: creating {} entries in calls of {CREATE_BATCH}",
        thousands(specs.len() as u64)
    ));
    let create_deadline = h.phase_deadline(Duration::from_secs(if plan.quick { 10 } else { 240 }));
    let started = Instant::now();
    let mut created = 0usize;
    let mut sentinel_entry = None;
    let mut set = JoinSet::new();
    let mut batches = specs.chunks(CREATE_BATCH).map(<[admin::Entry]>::to_vec);
    loop {
        while set.len() < 2 && Instant::now() < create_deadline {
            let Some(batch) = batches.next() else { break };
            let mut admin = admin.clone();
            set.spawn(async move { clients::create_entries(&mut admin, batch).await });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        for entry in joined?? {
            created += 1;
            if entry.spiffe_id == sentinel {
                sentinel_entry = Some(entry);
            }
        }
    }
    let create_time = started.elapsed();
    let count = admin
        .count_entries(CountEntriesRequest {})
        .await?
        .into_inner()
        .count;
    h.note(&format!(
        "scale: {} entries created in {} ({} on the server)",
        thousands(created as u64),
        duration(create_time),
        thousands(count)
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let entries_rss = server.process.rss()?;
    if created < specs.len() {
        h.note("scale: the entry budget ran out; the real agent's entries are all in");
    }

    // The simulated agents: attest, connect with their SVID, hold a sync stream.
    h.note(&format!(
        "scale: attesting {} simulated agents, each with a sync stream",
        thousands((sim_tokens.len() - 1) as u64)
    ));
    let attest_deadline = h.phase_deadline(Duration::from_secs(if plan.quick { 10 } else { 120 }));
    let started = Instant::now();
    let mut sims: Vec<(usize, String)> = vec![(0, first.id.to_string())];
    let mut set = JoinSet::new();
    let mut pending = sim_tokens.iter().enumerate().skip(1);
    loop {
        while set.len() < LOAD_PARALLELISM && Instant::now() < attest_deadline {
            let Some((index, (token, _))) = pending.next() else {
                break;
            };
            let (mut attest, token, bundle) = (attest.clone(), token.clone(), bundle.clone());
            let (addr, events, synced) = (server.addr, events_tx.clone(), synced.clone());
            set.spawn(async move {
                let sim = SimAgent::attest(&mut attest, &token).await?;
                let client = sim.client(addr, &bundle).await?;
                let stream = sync_stream(client, index, events, synced).await?;
                anyhow::Ok((index, sim.id.to_string(), stream))
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (index, id, stream) = joined??;
        sims.push((index, id));
        streams.push(stream);
    }
    wait_synced(&synced, sims.len(), Duration::from_secs(60)).await?;
    let attest_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded_rss = server.process.rss()?;
    h.note(&format!(
        "scale: {} agents attested and synced in {}",
        sims.len(),
        duration(attest_time)
    ));

    // The same entry change, now with every agent connected: for one agent in the middle.
    let (target, target_id) = sims
        .get(sims.len() / 2)
        .cloned()
        .context("no simulated agent")?;
    let target_id = sigil_core::SpiffeId::new(&target_id)?;
    let loaded_change = change_trials(
        h,
        &server,
        &mut admin,
        &mut events,
        target,
        &target_id,
        "loaded",
    )
    .await
    .context("entry changes on the loaded server")?;

    // The real agent: from start to every SVID minted.
    h.note(&format!(
        "scale: an agent with {} entries, from start to full sync",
        thousands(plan.agent_entries as u64)
    ));
    let started = Instant::now();
    let mut agent = AgentHandle::spawn(&dir.join("agent"), &server, &bundle, &real_token)?;
    agent.wait_socket(Duration::from_secs(60)).await?;
    let sync_budget = h
        .deadline()
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(if plan.quick { 30 } else { 240 }));
    wait_for_identity(&agent, &sentinel, sync_budget).await?;
    let sync_time = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent_rss = agent.process.rss()?;
    let agent_anon = agent.process.rss_anon()?;
    let mint_problems =
        agent.process.log_count("cannot mint") + agent.process.log_count("svid refused");
    // One rotation of the sentinel pushed to streams of this process on that agent: each
    // stream's caller gets its message among the agent's 10,000 SVIDs.
    let mut sentinel_entry =
        sentinel_entry.context("the sentinel entry was not among those created")?;
    h.note(&format!(
        "scale: pushing rotations to {} streams of the agent with {} SVIDs",
        plan.streams,
        thousands(plan.agent_entries as u64)
    ));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut streams_held = Vec::with_capacity(plan.streams);
    for i in 0..plan.streams {
        streams_held.push(small::hold_stream(&agent.socket, i, tx.clone()).await?);
    }
    let mut rotations = Rotations {
        admin: &mut admin,
        entry: &mut sentinel_entry,
        agent: &agent.process,
        server: &server.process,
    };
    let fanout_deadline = h.phase_deadline(Duration::from_secs(if plan.quick { 10 } else { 60 }));
    let (loaded_fanout, loaded_cpu) = rotations
        .push(
            &mut rx,
            plan.streams,
            plan.pushes,
            fanout_deadline,
            "loaded",
        )
        .await?;
    for stream in &streams_held {
        stream.abort();
    }
    let loaded_fanout = Percentiles::of(&loaded_fanout).context("no push sample")?;
    agent.stop().await?;
    let crypto_time = plan.crypto_time;
    let svid_crypto =
        tokio::task::spawn_blocking(move || crypto::svid_crypto_per_cpu_second(crypto_time))
            .await??;

    // The store on disk, then a restart.
    let (allocated, apparent) = disk_usage(&server.data_dir.join("store"))?;
    for stream in &streams {
        stream.abort();
    }
    drop(events);
    h.note("scale: restarting the server");
    let (server, stop_time, restart) = server.restart().await?;
    let mut admin = server.admin().await?;
    let after_restart = admin
        .count_entries(CountEntriesRequest {})
        .await?
        .into_inner()
        .count;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted_rss = server.process.rss()?;
    let data_dir = server.data_dir.clone();
    server.stop().await?;

    // What a start after kill -9 reads: the same store without sled's snapshots (the last one
    // a crash leaves is the previous start's, here the empty store's: none), so the whole log.
    h.note("scale: starting the same store without sled's snapshot, as after a crash");
    let crashed_dir = dir.join("crashed");
    std::fs::create_dir_all(&crashed_dir)?;
    copy_tree(&data_dir, &crashed_dir.join("data"))?;
    remove_snapshots(&crashed_dir.join("data").join("store"))?;
    let (crashed, crash_start) = ServerHandle::start(&crashed_dir).await?;
    let after_crash = crashed
        .admin()
        .await?
        .count_entries(CountEntriesRequest {})
        .await?
        .into_inner()
        .count;
    crashed.stop().await?;
    if after_crash != after_restart {
        bail!("the store without its snapshot holds {after_crash} entries, not {after_restart}");
    }
    // What the store holds, tree by tree (the stopped server's store, read as the server
    // wrote it): where the bytes on disk come from.
    let store = data_dir.join("store");
    let trees = tokio::task::spawn_blocking(move || records_by_tree(&store)).await??;
    let logical: u64 = trees.iter().map(|t| t.bytes).sum();

    // The table.
    let entries = thousands(after_restart);
    let agents = sims.len();
    h.rows.push(Row::info(
        format!("5. Server: {} entries created through the admin API (CreateEntries, {CREATE_BATCH} per call, 2 in flight)", thousands(created as u64)),
        format!("{} ({} in {})", rate(created as f64 / create_time.as_secs_f64()), thousands(created as u64), duration(create_time)),
        "—",
        None,
    ));
    h.rows.push(Row::info(
        format!("5. Server: {agents} simulated agents attested (join token, mTLS) and holding a synced SyncEntries stream"),
        format!("{} for all", duration(attest_time)),
        "—",
        None,
    ));
    let full = !h.plan.quick;
    h.rows.push(full_target(
        Row::info(
            format!("5. Server start-up after a restart, {entries} entries (a clean stop, then spawn until the admin API answers)"),
            duration(restart),
            format!("the same server, empty: {}", duration(empty_start)),
            report::ratio(restart, empty_start),
        ),
        full,
        "≤ 500 ms",
        restart <= Duration::from_millis(500),
    ));
    h.rows.push(Row::info(
        format!("5. Server start-up on the same {entries} entries without sled's snapshot (as after kill -9: sled re-reads its whole log)"),
        duration(crash_start),
        format!("after a clean stop (above): {}", duration(restart)),
        report::ratio(crash_start, restart),
    ));
    h.rows.push(Row::info(
        format!("5. Server clean stop, {entries} entries (stdin closed until the process exits: sled's snapshot for the next start)"),
        duration(stop_time),
        "—",
        None,
    ));
    h.rows.push(full_target(
        Row::info(
            format!(
                "5. Server resident memory, {entries} entries just created, no agent connected"
            ),
            bytes(entries_rss as f64),
            format!("the same server, empty: {}", bytes(empty_rss as f64)),
            Some(entries_rss as f64 / empty_rss as f64),
        ),
        full,
        "≤ 300 MiB",
        entries_rss <= 300 * 1024 * 1024,
    ));
    h.rows.push(Row::info(
        format!("5. Server resident memory, {entries} entries, {agents} agents streaming"),
        bytes(loaded_rss as f64),
        format!("the same server, empty: {}", bytes(empty_rss as f64)),
        Some(loaded_rss as f64 / empty_rss as f64),
    ));
    h.rows.push(Row::info(
        format!("5. Server resident memory after the restart, {entries} entries, idle"),
        bytes(restarted_rss as f64),
        format!("empty: {}", bytes(empty_rss as f64)),
        Some(restarted_rss as f64 / empty_rss as f64),
    ));
    let disk_ratio = allocated as f64 / raw_bytes.max(1) as f64;
    h.rows.push(full_target(
        Row::info(
            format!(
                "5. sled store on disk, {entries} entries (with the audit log and change feed)"
            ),
            format!(
                "{} allocated ({} apparent)",
                bytes(allocated as f64),
                bytes(apparent as f64)
            ),
            format!(
                "the entries' protobuf encoding: {}",
                bytes(raw_bytes as f64)
            ),
            Some(disk_ratio),
        ),
        full,
        "≤ 10",
        disk_ratio <= 10.0,
    ));
    h.rows.push(Row::info(
        format!(
            "5. One rotation pushed to {} streams of the agent with {} SVIDs (each stream's message found among them)",
            plan.streams,
            thousands(plan.agent_entries as u64)
        ),
        loaded_cpu.median_and_split(&loaded_fanout, "rotation"),
        "the same agent code with a few SVIDs: measurement 3",
        None,
    ));
    h.rows.push(Row::info(
        format!("5. sled store's records by tree, {entries} entries (keys and values as the server wrote them, before sled's log and page rewrites)"),
        format!("{}: {} in all", describe_trees(&trees), bytes(logical as f64)),
        format!("on disk (above): {} allocated", bytes(allocated as f64)),
        (logical > 0).then(|| allocated as f64 / logical as f64),
    ));
    h.rows.push(Row::info(
        format!("5. One entry change until the agent that needs it has it (its SyncEntries stream), {agents} agents connected"),
        format!(
            "{}; server CPU {} per change; delivered elsewhere: {}",
            loaded_change.latency.text(),
            duration(loaded_change.server_cpu_per_change),
            loaded_change.elsewhere
        ),
        format!(
            "empty server, 1 agent: p50 {}, CPU {} per change",
            duration(empty_change.latency.p50),
            duration(empty_change.server_cpu_per_change)
        ),
        report::ratio(loaded_change.latency.p50, empty_change.latency.p50),
    ));
    let svids = plan.agent_entries;
    let floor = Duration::from_secs_f64(svids as f64 / svid_crypto);
    h.rows.push(Row::info(
        format!(
            "5. Agent with {} entries: start to full sync (attest, sync, every SVID minted){}",
            thousands(svids as u64),
            if mint_problems > 0 {
                format!(" ({mint_problems} mint warnings)")
            } else {
                String::new()
            }
        ),
        duration(sync_time),
        format!(
            "the crypto alone, 1 core (keygen, CSR sign, verify, sign: {}): {}",
            rate(svid_crypto),
            duration(floor)
        ),
        report::ratio(sync_time, floor),
    ));
    match (
        facts.agent_rss_one_svid,
        facts.agent_anon_one_svid,
        facts.svid_der_bytes,
    ) {
        (Some(one), Some(one_anon), Some(der)) => {
            // Counted in anonymous memory: VmRSS also holds the pages of the executable's code
            // that ran, and those move by a megabyte or more between builds of the same code
            // (the 1-SVID agent's `RssFile` differed by 1.5 MiB between two builds whose
            // `RssAnon` was the same), which is 150 B per SVID here.
            let added = (svids.max(2) - 1) as f64;
            let per_svid = agent_anon.saturating_sub(one_anon) as f64 / added;
            let per_svid_rss = agent_rss.saturating_sub(one) as f64 / added;
            h.rows.push(Row::info(
                format!(
                    "5. Agent resident memory with {} SVIDs",
                    thousands(svids as u64)
                ),
                bytes(agent_rss as f64),
                format!("an agent with 1 SVID: {}", bytes(one as f64)),
                Some(agent_rss as f64 / one as f64),
            ));
            h.rows.push(full_target(
                Row::info(
                    "5. Agent memory per cached SVID (anonymous memory, `RssAnon`)",
                    format!("{} (in VmRSS: {})", bytes(per_svid), bytes(per_svid_rss)),
                    format!("the SVID's chain and key, DER: {}", bytes(der as f64)),
                    Some(per_svid / der as f64),
                ),
                !h.plan.quick,
                "≤ 1,200 B",
                per_svid <= 1200.0,
            ));
        }
        _ => h.rows.push(Row::info(
            format!(
                "5. Agent resident memory with {} SVIDs",
                thousands(svids as u64)
            ),
            bytes(agent_rss as f64),
            "— (run with the other sections for the 1-SVID agent)",
            None,
        )),
    }
    Ok(())
}

/// Opens a `SyncEntries` stream for a simulated agent; the task counts its snapshot into
/// `synced` and reports each upsert.
async fn sync_stream(
    mut client: NodeClient<Channel>,
    agent: usize,
    events: mpsc::UnboundedSender<Event>,
    synced: Arc<AtomicUsize>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut stream = client
        .sync_entries(SyncEntriesRequest {
            since_revision: 0,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        let _client = client;
        while let Ok(Some(message)) = stream.message().await {
            match message.message {
                Some(sync_entries_response::Message::Snapshot(page)) if page.last => {
                    synced.fetch_add(1, Ordering::Relaxed);
                }
                Some(sync_entries_response::Message::Changes(changes)) => {
                    for c in changes.changes {
                        if let Some(change::Change::Upsert(entry)) = c.change {
                            let _ = events.send(Event {
                                agent,
                                at: Instant::now(),
                                spiffe_id: entry.spiffe_id,
                            });
                        }
                    }
                }
                Some(
                    sync_entries_response::Message::Snapshot(_)
                    | sync_entries_response::Message::Resume(_)
                    | sync_entries_response::Message::AuditCheckpoint(_),
                )
                | None => {}
            }
        }
    }))
}

/// Waits (at most `timeout`) until `count` sync streams have their snapshot.
async fn wait_synced(synced: &AtomicUsize, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while synced.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            bail!(
                "{} of {count} sync streams got their snapshot within {timeout:?}",
                synced.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Creates entries for simulated agent `target` one at a time, each timed until its stream
/// delivers it; also the server's CPU per change and what other agents were sent.
async fn change_trials(
    h: &Harness,
    server: &ServerHandle,
    admin: &mut AdminClient<Channel>,
    events: &mut mpsc::UnboundedReceiver<Event>,
    target: usize,
    target_id: &sigil_core::SpiffeId,
    label: &str,
) -> anyhow::Result<ChangeCost> {
    h.note(&format!(
        "scale: {} entry changes ({label})",
        h.plan.change_trials
    ));
    let deadline = h.phase_deadline(Duration::from_secs(if h.plan.quick { 5 } else { 30 }));
    // Whatever earlier steps left in the channel is not part of these changes.
    while events.try_recv().is_ok() {}
    let mut elsewhere = 0;
    let mut samples = Vec::new();
    let cpu_before = server.process.cpu()?;
    for k in 0..h.plan.change_trials {
        if Instant::now() > deadline {
            break;
        }
        let id = format!("spiffe://{TRUST_DOMAIN}/change/{label}/{k}");
        let t = Instant::now();
        clients::create_entries(
            admin,
            vec![clients::entry(
                &id,
                target_id.as_str(),
                &[format!("unix:uid:{}", 3_000_000 + k)],
            )],
        )
        .await?;
        let until = Instant::now() + Duration::from_secs(10);
        // Bounded by the timeout, and by a message count.
        for _ in 0..100_000 {
            let left = until.saturating_duration_since(Instant::now());
            let event = tokio::time::timeout(left, events.recv())
                .await
                .with_context(|| format!("{id} never reached its agent"))?
                .context("sync streams gone")?;
            if event.agent != target {
                elsewhere += 1;
            } else if event.spiffe_id == id {
                samples.push(event.at.saturating_duration_since(t));
                break;
            }
        }
    }
    let cpu = server.process.cpu()?.saturating_sub(cpu_before);
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(event) = events.try_recv() {
        elsewhere += usize::from(event.agent != target);
    }
    let latency = Percentiles::of(&samples).context("no entry-change sample")?;
    Ok(ChangeCost {
        server_cpu_per_change: cpu / u32::try_from(latency.count.max(1))?,
        latency,
        elsewhere,
    })
}

/// Copies the directory `from` to `to` (which must not exist), files and directories with their
/// permission bits (the server refuses a data directory that others may read), each file synced
/// to disk as the server's own were (a start while the copy is still being written back reads
/// up to three times slower).
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    Ok(())
}

/// The records of one sled tree: how many, and their keys' and values' bytes.
#[derive(Debug)]
struct TreeRecords {
    name: String,
    keys: u64,
    bytes: u64,
}

/// Every tree of the sled store `store` (of a stopped server), largest first.
fn records_by_tree(store: &Path) -> anyhow::Result<Vec<TreeRecords>> {
    let db = sigil_server::sled::Config::new()
        .path(store)
        .open()
        .with_context(|| format!("cannot open the store {}", store.display()))?;
    let mut trees = Vec::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name)?;
        let (mut keys, mut bytes) = (0u64, 0u64);
        for item in tree.iter() {
            let (key, value) = item?;
            keys += 1;
            bytes += (key.len() + value.len()) as u64;
        }
        if keys > 0 {
            trees.push(TreeRecords {
                name: String::from_utf8_lossy(&name).into_owned(),
                keys,
                bytes,
            });
        }
    }
    trees.sort_by_key(|t| std::cmp::Reverse(t.bytes));
    Ok(trees)
}

/// The four largest trees with their size (in MiB, so that they add up at a glance) and bytes
/// per record, the rest together.
fn describe_trees(trees: &[TreeRecords]) -> String {
    let mut parts: Vec<String> = trees
        .iter()
        .take(4)
        .map(|t| {
            format!(
                "{} {:.1} MiB ({} keys, {} B each)",
                t.name,
                t.bytes as f64 / 1024.0 / 1024.0,
                thousands(t.keys),
                t.bytes / t.keys.max(1)
            )
        })
        .collect();
    let rest: u64 = trees.iter().skip(4).map(|t| t.bytes).sum();
    if trees.len() > 4 {
        parts.push(format!(
            "{} other trees {:.1} MiB",
            trees.len() - 4,
            rest as f64 / 1024.0 / 1024.0
        ));
    }
    parts.join(", ")
}

/// Removes sled's snapshot files (`snap.*`) from the store directory `store`.
fn remove_snapshots(store: &Path) -> anyhow::Result<()> {
    let mut removed = 0;
    for entry in std::fs::read_dir(store)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("snap.") {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed == 0 {
        bail!("no sled snapshot in {}", store.display());
    }
    Ok(())
}

/// `row` with `target` when the run is a full one (the targets are set for the full sizes; a
/// `--quick` run's small sizes leave them out).
fn full_target(row: Row, full: bool, target: &str, met: bool) -> Row {
    if full { row.target(target, met) } else { row }
}
