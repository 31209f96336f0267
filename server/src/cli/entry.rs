//! `sigil-server entry`: create, show, update, delete and count registration entries.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use sigil_core::HumanDuration;
use sigil_proto::admin::{
    self as pb, CountEntriesRequest, CreateEntriesRequest, DeleteEntryRequest, GetEntryRequest,
    ListEntriesRequest, UpdateEntryRequest,
};

use super::client::Admin;
use super::output::{Printer, block, count};
use super::time::{format_rfc3339, format_with_distance, now_unix};
use super::{ConnectArgs, expiry_time, seconds, selector, spiffe_id};

/// Most entries sent in one `CreateEntries` call.
const CREATE_CHUNK: usize = 1000;

/// Entries asked for per `ListEntries` page.
const PAGE_SIZE: u32 = 1000;

/// `sigil-server entry ...`.
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create a registration entry from flags, or many from a JSON-lines file (`--data`).
    Create(EntryCreateArgs),
    /// Show entries: one by --id, those matching the filters, or every entry.
    Show(EntryShowArgs),
    /// Change an entry: the flags given replace those fields; the others keep their values.
    Update(EntryUpdateArgs),
    /// Delete an entry.
    Delete(EntryDeleteArgs),
    /// Count the registration entries.
    Count(EntryCountArgs),
}

/// Flags of `entry create`.
#[derive(Debug, Args)]
pub struct EntryCreateArgs {
    /// SPIFFE ID the matching workloads get.
    #[arg(long, value_name = "ID", value_parser = spiffe_id, required_unless_present = "data")]
    spiffe_id: Option<String>,
    /// SPIFFE ID of the agent (or of an alias entry) under which the workloads run.
    #[arg(long, value_name = "ID", value_parser = spiffe_id, required_unless_present = "data")]
    parent_id: Option<String>,
    /// Selector a workload must present, TYPE:VALUE (e.g. unix:uid:1000); repeat for several,
    /// all of which must match.
    #[arg(long, value_name = "TYPE:VALUE", value_parser = selector, required_unless_present = "data")]
    selector: Vec<String>,
    #[command(flatten)]
    options: EntryOptions,
    /// Create many entries from a file of JSON lines (`-` reads stdin). Each line is one entry
    /// whose keys are the flag names in snake_case: spiffe_id, parent_id, selector (a list),
    /// x509_svid_ttl, jwt_svid_ttl (`1h` or seconds), dns (a list), hint, expires_in,
    /// expires_at, federates_with (a list). `entry show --output json` output is accepted as input too.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = [
            "spiffe_id", "parent_id", "selector", "x509_svid_ttl", "jwt_svid_ttl", "dns",
            "hint", "expires_in", "expires_at", "federates_with",
        ]
    )]
    data: Option<PathBuf>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Entry settings shared by `entry create` and `entry update`.
#[derive(Debug, Args)]
pub struct EntryOptions {
    /// Lifetime of the X509-SVIDs issued for the entry (e.g. 1h; 0s: the server default).
    /// The server caps it at a sixth of its CA's lifetime.
    #[arg(long, value_name = "DURATION", value_parser = seconds)]
    x509_svid_ttl: Option<u64>,
    /// Lifetime of the JWT-SVIDs issued for the entry (e.g. 5m; 0s: the server default).
    #[arg(long, value_name = "DURATION", value_parser = seconds)]
    jwt_svid_ttl: Option<u64>,
    /// DNS name to put in the X509-SVID; repeat for several (the first is the common name).
    #[arg(long, value_name = "NAME")]
    dns: Vec<String>,
    /// Hint that tells a workload with several identities which one this is.
    #[arg(long, value_name = "HINT")]
    hint: Option<String>,
    /// Expire the entry this long from now (e.g. 30d).
    #[arg(long, value_name = "DURATION", value_parser = seconds, conflicts_with = "expires_at")]
    expires_in: Option<u64>,
    /// Expire the entry at this RFC 3339 time (e.g. 2030-01-01T00:00:00Z); `never` for no
    /// expiry.
    #[arg(long, value_name = "TIME", value_parser = expiry_time)]
    expires_at: Option<i64>,
    /// A federated trust domain (spiffe://other.org or other.org) whose bundle the entry's
    /// workloads also get, and whose JWT-SVIDs they may validate; repeat for several. It needs
    /// a federation relationship (or a bundle set). On update, replaces the list; `none`
    /// empties it.
    #[arg(long, value_name = "TRUST_DOMAIN")]
    federates_with: Vec<String>,
}

/// Flags of `entry show`.
#[derive(Debug, Args)]
pub struct EntryShowArgs {
    /// Show only the entry with this ID.
    #[arg(long, value_name = "ENTRY_ID", conflicts_with_all = ["spiffe_id", "parent_id", "selector"])]
    id: Option<String>,
    /// Show only entries with this SPIFFE ID.
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    spiffe_id: Option<String>,
    /// Show only entries with this parent ID.
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    parent_id: Option<String>,
    /// Show only entries that have this selector (TYPE:VALUE).
    #[arg(long, value_name = "TYPE:VALUE", value_parser = selector)]
    selector: Option<String>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `entry update`.
#[derive(Debug, Args)]
pub struct EntryUpdateArgs {
    /// ID of the entry to change.
    #[arg(long, value_name = "ENTRY_ID")]
    id: String,
    /// New SPIFFE ID.
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    spiffe_id: Option<String>,
    /// New parent ID.
    #[arg(long, value_name = "ID", value_parser = spiffe_id)]
    parent_id: Option<String>,
    /// New selectors (TYPE:VALUE); repeat for several. Replaces all of the entry's selectors.
    #[arg(long, value_name = "TYPE:VALUE", value_parser = selector)]
    selector: Vec<String>,
    #[command(flatten)]
    options: EntryOptions,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `entry delete`.
#[derive(Debug, Args)]
pub struct EntryDeleteArgs {
    /// ID of the entry to delete.
    #[arg(long, value_name = "ENTRY_ID")]
    id: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Flags of `entry count`.
#[derive(Debug, Args)]
pub struct EntryCountArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

pub(super) async fn execute(command: EntryCommand) -> anyhow::Result<ExitCode> {
    match command {
        EntryCommand::Create(args) => create(args).await,
        EntryCommand::Show(args) => show(args).await,
        EntryCommand::Update(args) => update(args).await,
        EntryCommand::Delete(args) => delete(args).await,
        EntryCommand::Count(args) => count_entries(args).await,
    }
}

// === create ===

async fn create(args: EntryCreateArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    if let Some(path) = &args.data {
        return create_batch(path, &args.connect, printer).await;
    }
    let mut entry = pb::Entry {
        spiffe_id: args.spiffe_id.unwrap_or_default(),
        parent_id: args.parent_id.unwrap_or_default(),
        selectors: args.selector,
        ..pb::Entry::default()
    };
    args.options.apply(&mut entry, now_unix());
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let response = admin
        .call(|mut c| async move {
            c.create_entries(CreateEntriesRequest {
                entries: vec![entry],
            })
            .await
        })
        .await?;
    match response.results.into_iter().next().and_then(|r| r.result) {
        Some(pb::entry_result::Result::Entry(entry)) => {
            print_entry(printer, &entry, now_unix())?;
            Ok(ExitCode::SUCCESS)
        }
        Some(pb::entry_result::Result::Error(error)) => Err(anyhow::anyhow!(
            "the server refused the entry: {}",
            error.message
        )),
        None => Err(anyhow::anyhow!("the server sent no result for the entry")),
    }
}

/// One line of a `--data` file: the flags of `entry create`, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryLine {
    spiffe_id: Option<String>,
    parent_id: Option<String>,
    #[serde(default, alias = "selectors")]
    selector: Vec<String>,
    x509_svid_ttl: Option<DurationValue>,
    jwt_svid_ttl: Option<DurationValue>,
    #[serde(default, alias = "dns_names")]
    dns: Vec<String>,
    hint: Option<String>,
    expires_in: Option<DurationValue>,
    expires_at: Option<String>,
    #[serde(default)]
    federates_with: Vec<String>,
    // Output-only fields of `entry show --output json`, accepted so its output can be fed back.
    #[serde(default, rename = "id")]
    _id: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "created_at")]
    _created_at: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "revision")]
    _revision: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "effective_x509_svid_ttl")]
    _effective_x509_svid_ttl: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "effective_jwt_svid_ttl")]
    _effective_jwt_svid_ttl: Option<serde::de::IgnoredAny>,
}

/// A duration in a data file: `"1h"` or a number of seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Seconds(u64),
    Text(String),
}

// === impl EntryLine ===

impl EntryLine {
    fn into_entry(self, now: i64) -> Result<pb::Entry, String> {
        let secs = |field: &str, value: Option<DurationValue>| -> Result<u64, String> {
            match value {
                None => Ok(0),
                Some(DurationValue::Seconds(s)) => Ok(s),
                Some(DurationValue::Text(t)) => seconds(&t).map_err(|e| format!("{field}: {e}")),
            }
        };
        let expires_at = match (self.expires_in, self.expires_at) {
            (Some(_), Some(_)) => return Err("give expires_in or expires_at, not both".to_owned()),
            (Some(d), None) => add_seconds(now, secs("expires_in", Some(d))?),
            (None, Some(t)) => expiry_time(&t).map_err(|e| format!("expires_at: {e}"))?,
            (None, None) => 0,
        };
        Ok(pb::Entry {
            spiffe_id: self.spiffe_id.unwrap_or_default(),
            parent_id: self.parent_id.unwrap_or_default(),
            selectors: self.selector,
            x509_svid_ttl: secs("x509_svid_ttl", self.x509_svid_ttl)?,
            jwt_svid_ttl: secs("jwt_svid_ttl", self.jwt_svid_ttl)?,
            dns_names: self.dns,
            hint: self.hint.unwrap_or_default(),
            expires_at,
            federates_with: self.federates_with,
            ..pb::Entry::default()
        })
    }
}

/// A result of a batch, one JSON line per input line.
#[derive(Debug, Serialize)]
struct BatchFailure<'a> {
    line: usize,
    spiffe_id: &'a str,
    error: ErrorJson<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorJson<'a> {
    code: String,
    message: &'a str,
}

#[derive(Debug, Serialize)]
struct BatchSuccess<'a> {
    line: usize,
    #[serde(flatten)]
    entry: EntryJson<'a>,
}

async fn create_batch(
    path: &std::path::Path,
    connect: &ConnectArgs,
    printer: Printer,
) -> anyhow::Result<ExitCode> {
    let text = read_data(path)?;
    let now = now_unix();
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<EntryLine>(line)
            .map_err(|e| e.to_string())
            .and_then(|l| l.into_entry(now));
        match parsed {
            Ok(entry) => entries.push((number, entry)),
            Err(e) => problems.push(format!("line {number}: {e}")),
        }
    }
    if !problems.is_empty() {
        let shown: Vec<&str> = problems.iter().take(20).map(String::as_str).collect();
        let more = problems.len().saturating_sub(shown.len());
        return Err(anyhow::anyhow!(
            "{} is not valid, so nothing was created ({}):\n  {}{}",
            path.display(),
            count(problems.len(), "bad line", "bad lines"),
            shown.join("\n  "),
            if more > 0 {
                format!("\n  ... and {more} more")
            } else {
                String::new()
            }
        ));
    }
    if entries.is_empty() {
        return Err(anyhow::anyhow!("{} has no entries", path.display()));
    }
    let admin = Admin::connect(&connect.admin_socket).await?;
    let (mut created, mut failed) = (0usize, 0usize);
    for chunk in entries.chunks(CREATE_CHUNK) {
        let request = CreateEntriesRequest {
            entries: chunk.iter().map(|(_, e)| e.clone()).collect(),
        };
        let response = admin
            .call(|mut c| async move { c.create_entries(request).await })
            .await
            .map_err(|error| {
                let first_line = chunk.first().map_or(0, |(n, _)| *n);
                error.context(format!(
                    "created {} before this failure; entries from line {first_line} on were not \
                     created",
                    count(created, "entry", "entries")
                ))
            })?;
        if response.results.len() != chunk.len() {
            return Err(anyhow::anyhow!(
                "the server answered {} results for {} entries",
                response.results.len(),
                chunk.len()
            ));
        }
        for ((line, sent), result) in chunk.iter().zip(response.results) {
            match result.result {
                Some(pb::entry_result::Result::Entry(entry)) => {
                    created += 1;
                    if printer.is_json() {
                        printer.json(&BatchSuccess {
                            line: *line,
                            entry: EntryJson::new(&entry),
                        })?;
                    } else {
                        printer.text(&format!(
                            "line {line}: created {} {}\n",
                            entry.id, entry.spiffe_id
                        ))?;
                    }
                }
                Some(pb::entry_result::Result::Error(error)) => {
                    failed += 1;
                    let code = format!("{:?}", tonic::Code::from_i32(error.code));
                    if printer.is_json() {
                        printer.json(&BatchFailure {
                            line: *line,
                            spiffe_id: &sent.spiffe_id,
                            error: ErrorJson {
                                code,
                                message: &error.message,
                            },
                        })?;
                    } else {
                        printer.text(&format!("line {line}: failed: {}\n", error.message))?;
                    }
                }
                None => {
                    failed += 1;
                    printer.text(&format!("line {line}: failed: the server sent no result\n"))?;
                }
            }
        }
    }
    if !printer.is_json() {
        printer.text(&format!(
            "Created {} of {}{}\n",
            created,
            count(created + failed, "entry", "entries"),
            if failed > 0 {
                format!("; {failed} failed")
            } else {
                String::new()
            }
        ))?;
    }
    if failed > 0 {
        super::report_failure(&format!(
            "{} of {} failed (see the lines above)",
            count(failed, "entry", "entries"),
            created + failed
        ));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn read_data(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read entries from stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

// === show, update, delete, count ===

async fn show(args: EntryShowArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let now = now_unix();
    if let Some(id) = args.id {
        let entry = admin
            .call(|mut c| async move { c.get_entry(GetEntryRequest { id }).await })
            .await?;
        print_entry(printer, &entry, now)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut request = ListEntriesRequest {
        spiffe_id: args.spiffe_id.unwrap_or_default(),
        parent_id: args.parent_id.unwrap_or_default(),
        selector: args.selector.unwrap_or_default(),
        page_size: PAGE_SIZE,
        page_token: String::new(),
    };
    let mut shown = 0usize;
    loop {
        let sent = request.clone();
        let page = admin
            .call(|mut c| async move { c.list_entries(sent).await })
            .await?;
        for entry in &page.entries {
            if !printer.is_json() && shown > 0 {
                printer.text("\n")?;
            }
            print_entry(printer, entry, now)?;
            shown += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        if page.next_page_token == request.page_token {
            return Err(anyhow::anyhow!(
                "the server sent the same page token twice; stopping"
            ));
        }
        request.page_token = page.next_page_token;
    }
    if !printer.is_json() {
        let summary = match shown {
            0 => "No entries found\n".to_owned(),
            n => format!("\nFound {}\n", count(n, "entry", "entries")),
        };
        printer.text(&summary)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn update(args: EntryUpdateArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let o = &args.options;
    let nothing = args.spiffe_id.is_none()
        && args.parent_id.is_none()
        && args.selector.is_empty()
        && o.x509_svid_ttl.is_none()
        && o.jwt_svid_ttl.is_none()
        && o.dns.is_empty()
        && o.hint.is_none()
        && o.expires_in.is_none()
        && o.expires_at.is_none()
        && o.federates_with.is_empty();
    if nothing {
        return Err(anyhow::anyhow!(
            "nothing to update: give at least one of --spiffe-id, --parent-id, --selector, \
             --x509-svid-ttl, --jwt-svid-ttl, --dns, --hint, --expires-in, --expires-at, \
             --federates-with"
        ));
    }
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let id = args.id.clone();
    // The server replaces the whole entry, so start from the current one.
    let mut entry = admin
        .call(|mut c| async move { c.get_entry(GetEntryRequest { id }).await })
        .await?;
    if let Some(spiffe_id) = args.spiffe_id {
        entry.spiffe_id = spiffe_id;
    }
    if let Some(parent_id) = args.parent_id {
        entry.parent_id = parent_id;
    }
    if !args.selector.is_empty() {
        entry.selectors = args.selector;
    }
    args.options.apply(&mut entry, now_unix());
    let updated = admin
        .call(|mut c| async move {
            c.update_entry(UpdateEntryRequest { entry: Some(entry) })
                .await
        })
        .await?;
    print_entry(printer, &updated, now_unix())?;
    Ok(ExitCode::SUCCESS)
}

async fn delete(args: EntryDeleteArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let id = args.id;
    let entry = admin
        .call(|mut c| async move { c.delete_entry(DeleteEntryRequest { id }).await })
        .await?;
    if printer.is_json() {
        printer.json(&EntryJson::new(&entry))?;
    } else {
        printer.text(&format!(
            "Deleted entry {} ({})\n",
            entry.id, entry.spiffe_id
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct CountJson {
    count: u64,
}

async fn count_entries(args: EntryCountArgs) -> anyhow::Result<ExitCode> {
    let printer = Printer::new(args.connect.output);
    let admin = Admin::connect(&args.connect.admin_socket).await?;
    let response = admin
        .call(|mut c| async move { c.count_entries(CountEntriesRequest {}).await })
        .await?;
    if printer.is_json() {
        printer.json(&CountJson {
            count: response.count,
        })?;
    } else {
        let n = usize::try_from(response.count).unwrap_or(usize::MAX);
        printer.text(&format!("{}\n", count(n, "entry", "entries")))?;
    }
    Ok(ExitCode::SUCCESS)
}

// === impl EntryOptions ===

impl EntryOptions {
    /// Sets the fields given on the command line.
    fn apply(&self, entry: &mut pb::Entry, now: i64) {
        if let Some(ttl) = self.x509_svid_ttl {
            entry.x509_svid_ttl = ttl;
        }
        if let Some(ttl) = self.jwt_svid_ttl {
            entry.jwt_svid_ttl = ttl;
        }
        if !self.dns.is_empty() {
            entry.dns_names.clone_from(&self.dns);
        }
        if let Some(hint) = &self.hint {
            entry.hint.clone_from(hint);
        }
        if let Some(secs) = self.expires_in {
            entry.expires_at = add_seconds(now, secs);
        }
        if let Some(at) = self.expires_at {
            entry.expires_at = at;
        }
        if !self.federates_with.is_empty() {
            entry.federates_with = self
                .federates_with
                .iter()
                .filter(|td| td.as_str() != "none")
                .cloned()
                .collect();
        }
    }
}

fn add_seconds(now: i64, secs: u64) -> i64 {
    now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX))
}

// === printing ===

/// An entry as JSON: the field names of `--data` lines, durations in seconds (`null`: the
/// server default), times in RFC 3339.
#[derive(Debug, Serialize)]
struct EntryJson<'a> {
    id: &'a str,
    spiffe_id: &'a str,
    parent_id: &'a str,
    selectors: &'a [String],
    x509_svid_ttl: Option<u64>,
    effective_x509_svid_ttl: u64,
    jwt_svid_ttl: Option<u64>,
    effective_jwt_svid_ttl: u64,
    dns_names: &'a [String],
    hint: &'a str,
    expires_at: Option<String>,
    created_at: String,
    revision: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    federates_with: &'a [String],
}

// === impl EntryJson ===

impl<'a> EntryJson<'a> {
    fn new(e: &'a pb::Entry) -> Self {
        Self {
            id: &e.id,
            spiffe_id: &e.spiffe_id,
            parent_id: &e.parent_id,
            selectors: &e.selectors,
            x509_svid_ttl: (e.x509_svid_ttl > 0).then_some(e.x509_svid_ttl),
            effective_x509_svid_ttl: e.effective_x509_svid_ttl,
            jwt_svid_ttl: (e.jwt_svid_ttl > 0).then_some(e.jwt_svid_ttl),
            effective_jwt_svid_ttl: e.effective_jwt_svid_ttl,
            dns_names: &e.dns_names,
            hint: &e.hint,
            expires_at: (e.expires_at != 0).then(|| format_rfc3339(e.expires_at)),
            created_at: format_rfc3339(e.created_at),
            revision: e.revision,
            federates_with: &e.federates_with,
        }
    }
}

fn print_entry(printer: Printer, entry: &pb::Entry, now: i64) -> anyhow::Result<()> {
    if printer.is_json() {
        printer.json(&EntryJson::new(entry))
    } else {
        printer.text(&entry_text(entry, now))
    }
}

/// The text block of an entry.
fn entry_text(e: &pb::Entry, now: i64) -> String {
    let mut rows = vec![
        ("Entry ID", e.id.clone()),
        ("SPIFFE ID", e.spiffe_id.clone()),
        ("Parent ID", e.parent_id.clone()),
        ("Revision", e.revision.to_string()),
        (
            "X509-SVID TTL",
            ttl_text(e.x509_svid_ttl, e.effective_x509_svid_ttl),
        ),
        (
            "JWT-SVID TTL",
            ttl_text(e.jwt_svid_ttl, e.effective_jwt_svid_ttl),
        ),
    ];
    rows.extend(e.selectors.iter().map(|s| ("Selector", s.clone())));
    rows.extend(e.dns_names.iter().map(|d| ("DNS name", d.clone())));
    rows.extend(
        e.federates_with
            .iter()
            .map(|td| ("Federates with", td.clone())),
    );
    if !e.hint.is_empty() {
        rows.push(("Hint", e.hint.clone()));
    }
    rows.push((
        "Expires at",
        match e.expires_at {
            0 => "never".to_owned(),
            t => format_with_distance(t, now),
        },
    ));
    rows.push(("Created at", format_rfc3339(e.created_at)));
    block(&rows)
}

/// `1h`, `default (1h)`, or `48h (capped to 4h)`.
fn ttl_text(set: u64, effective: u64) -> String {
    let human = |s: u64| HumanDuration(Duration::from_secs(s)).to_string();
    match set {
        0 => format!("default ({})", human(effective)),
        s if s == effective => human(s),
        s => format!("{} (capped to {})", human(s), human(effective)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_show_what_was_set_and_what_applies() {
        assert_eq!(ttl_text(0, 3600), "default (1h)");
        assert_eq!(ttl_text(300, 300), "5m");
        assert_eq!(ttl_text(172_800, 14_400), "2d (capped to 4h)");
    }

    #[test]
    fn data_lines_read_flag_names_and_show_output() {
        let line: EntryLine = serde_json::from_str(
            r#"{"spiffe_id":"spiffe://example.org/a","parent_id":"spiffe://example.org/p",
                "selector":["unix:uid:1"],"x509_svid_ttl":"1h","jwt_svid_ttl":60,"dns":["a.example"],
                "hint":"h","expires_in":"1d"}"#,
        )
        .unwrap();
        let entry = line.into_entry(1000).unwrap();
        assert_eq!(entry.x509_svid_ttl, 3600);
        assert_eq!(entry.jwt_svid_ttl, 60);
        assert_eq!(entry.expires_at, 1000 + 86_400);
        assert_eq!(entry.dns_names, ["a.example"]);

        let shown = pb::Entry {
            id: "00".repeat(16),
            spiffe_id: "spiffe://example.org/a".to_owned(),
            parent_id: "spiffe://example.org/p".to_owned(),
            selectors: vec!["unix:uid:1".to_owned()],
            expires_at: 1_900_000_000,
            ..pb::Entry::default()
        };
        let json = serde_json::to_string(&EntryJson::new(&shown)).unwrap();
        let again = serde_json::from_str::<EntryLine>(&json)
            .unwrap()
            .into_entry(0)
            .unwrap();
        assert_eq!(again.spiffe_id, shown.spiffe_id);
        assert_eq!(again.selectors, shown.selectors);
        assert_eq!(again.expires_at, shown.expires_at);
    }

    #[test]
    fn data_lines_refuse_unknown_keys_and_bad_values() {
        assert!(serde_json::from_str::<EntryLine>(r#"{"spife_id":"x"}"#).is_err());
        let both = serde_json::from_str::<EntryLine>(r#"{"expires_in":"1h","expires_at":"never"}"#)
            .unwrap()
            .into_entry(0);
        assert!(both.unwrap_err().contains("not both"));
        let bad_ttl = serde_json::from_str::<EntryLine>(r#"{"x509_svid_ttl":"1 hour"}"#)
            .unwrap()
            .into_entry(0);
        assert!(bad_ttl.unwrap_err().starts_with("x509_svid_ttl: "));
    }

    #[test]
    fn entry_text_is_aligned() {
        let e = pb::Entry {
            id: "ab".to_owned(),
            spiffe_id: "spiffe://example.org/a".to_owned(),
            parent_id: "spiffe://example.org/p".to_owned(),
            selectors: vec!["unix:uid:1".to_owned()],
            effective_x509_svid_ttl: 3600,
            effective_jwt_svid_ttl: 300,
            created_at: 0,
            ..pb::Entry::default()
        };
        let text = entry_text(&e, 0);
        assert!(text.starts_with("Entry ID      : ab\n"), "{text}");
        assert!(text.contains("X509-SVID TTL : default (1h)\n"), "{text}");
        assert!(text.contains("Expires at    : never\n"), "{text}");
    }
}
