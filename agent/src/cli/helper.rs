//! `sigil-agent helper`: SVIDs as files, for software that reads files and knows nothing of
//! SPIFFE (nginx, HAProxy, PostgreSQL, Envoy's file-based SDS). Like spiffe-helper, in the
//! agent's binary.
//!
//! It holds a Workload API stream open (`FetchX509SVID`) and on every update writes, into one
//! directory: the SVID's chain, its key (0600), the bundle, the CRLs the agent was sent (PEM,
//! one file, with an operator's extra CRL file appended), the federated bundles, and, with
//! `--jwt-audience`, a JWT-SVID (refreshed at half its life). Then, once every file is in
//! place, it signals the process it runs (`--cmd`, `--renew-signal`) and runs `--on-update`.
//! When the stream ends (the agent restarts, say) it reconnects, and the files stay meanwhile.
//!
//! ## Files replaced as one set
//!
//! Each update is written whole into a new directory `DIR/.sigil-helper/gen-N`, flushed, and
//! published by renaming one symlink, `DIR/.sigil-helper/current`, onto it. The file names in
//! `DIR` are symlinks through `current` (`DIR/svid.pem -> .sigil-helper/current/svid.pem`), so at
//! every moment they resolve to one set, and a crash (kill -9 included) before the rename
//! leaves the previous set in place. A reader opening the files across a rename would pair two
//! sets: sets are published at most once every [`SETTLE`], and the software is told after the
//! rename, so a reload reads the set that caused it. Older generations are removed after the
//! rename (the one before is kept, for readers mid-way). `DIR` and `DIR/.sigil-helper` must be
//! the helper's alone (`sigil_daemon::check_private_dir`): whoever could write them would choose
//! what is read as the SVID, the bundle and the CRLs.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use serde::Deserialize;
use sigil_proto::workload::{JwtsvidRequest, X509svidRequest, X509svidResponse};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::api::{connect, pem_block};

/// The directory, under the output directory, that holds the generations.
pub(super) const GENERATIONS_DIR: &str = ".sigil-helper";

/// How long `--on-update` may run before it is killed.
const ON_UPDATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `sigil-agent helper`'s flags; each may also be set in the `--config` file under the same
/// name with underscores (flags win): the file is read into this same shape.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperArgs {
    /// A TOML file with any of the settings below (keys: socket_path, dir, spiffe_id,
    /// on_update, cmd, renew_signal, jwt_audience, svid_file_name, svid_key_file_name,
    /// svid_bundle_file_name, crl_file_name, federated_bundle_file_name, jwt_svid_file_name,
    /// extra_crl_file); flags win.
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The Workload API socket (else SPIFFE_ENDPOINT_SOCKET, else the agent's default).
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Where to write the files (created 0755 if missing). Required.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Which of the caller's SVIDs to write (default: the first the agent lists).
    #[arg(long, value_name = "ID")]
    pub spiffe_id: Option<String>,
    /// A shell command run (`sh -c`) after every update, once every file is in place
    /// (`nginx -s reload`, say); it gets 30 s.
    #[arg(long, value_name = "CMD")]
    pub on_update: Option<String>,
    /// A process to run once the first files are written (a program and its arguments, split
    /// as a shell would, without a shell), signalled with `--renew-signal` after each later
    /// update; SIGTERM and SIGINT are passed on to it, and the helper exits with its status.
    #[arg(long, value_name = "CMD")]
    pub cmd: Option<String>,
    /// The signal for `--cmd` after an update: HUP, USR1, ... (`SIG` prefix optional).
    #[arg(long, value_name = "SIGNAL")]
    pub renew_signal: Option<String>,
    /// Also write a JWT-SVID for this audience (refreshed at half its life).
    #[arg(long, value_name = "AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The SVID's chain, leaf first (default svid.pem).
    #[arg(long, value_name = "NAME")]
    pub svid_file_name: Option<String>,
    /// Its private key, PKCS#8, mode 0600 (default svid_key.pem).
    #[arg(long, value_name = "NAME")]
    pub svid_key_file_name: Option<String>,
    /// The trust bundle (default svid_bundle.pem).
    #[arg(long, value_name = "NAME")]
    pub svid_bundle_file_name: Option<String>,
    /// The CRLs, one PEM file (default crl.pem).
    #[arg(long, value_name = "NAME")]
    pub crl_file_name: Option<String>,
    /// The federated trust domains' bundles, one PEM file (default federated_bundle.pem).
    #[arg(long, value_name = "NAME")]
    pub federated_bundle_file_name: Option<String>,
    /// The JWT-SVID, with `--jwt-audience` (default jwt_svid.token).
    #[arg(long, value_name = "NAME")]
    pub jwt_svid_file_name: Option<String>,
    /// A PEM file of CRLs appended to the CRL file at every write (the CRLs of CAs above the
    /// trust domain's, which nginx's `ssl_crl` wants for every CA in a chain).
    #[arg(long, value_name = "PATH")]
    pub extra_crl_file: Option<PathBuf>,
}

/// The keys the `--config` file accepts.
const KNOWN_KEYS: &[&str] = &[
    "socket_path",
    "dir",
    "spiffe_id",
    "on_update",
    "cmd",
    "renew_signal",
    "jwt_audience",
    "svid_file_name",
    "svid_key_file_name",
    "svid_bundle_file_name",
    "crl_file_name",
    "federated_bundle_file_name",
    "jwt_svid_file_name",
    "extra_crl_file",
];

/// The checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperSettings {
    socket: PathBuf,
    dir: PathBuf,
    spiffe_id: Option<String>,
    on_update: Option<String>,
    cmd: Option<Vec<String>>,
    renew_signal: Option<nix::sys::signal::Signal>,
    jwt_audience: Option<String>,
    names: FileNames,
    extra_crl_file: Option<PathBuf>,
}

/// The name of each file in the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileNames {
    svid: String,
    key: String,
    bundle: String,
    crl: String,
    federated: String,
    jwt: String,
}

impl HelperSettings {
    /// The settings from the flags and the file they name, every problem at once.
    ///
    /// # Errors
    ///
    /// Every problem, one per line, each naming its setting.
    pub fn from_args(args: HelperArgs) -> anyhow::Result<Self> {
        let mut problems = sigil_daemon::config::Problems::default();
        let file: HelperArgs = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                sigil_daemon::config::parse_file(&text, KNOWN_KEYS, &mut problems)
            }
            None => HelperArgs::default(),
        };
        let dir = args.dir.or(file.dir);
        if dir.is_none() {
            problems.push("dir", "is required (--dir or dir in the file)");
        }
        let renew_signal = args
            .renew_signal
            .or(file.renew_signal)
            .and_then(|name| problems.check("renew_signal", parse_signal(&name)));
        let cmd = args.cmd.or(file.cmd).and_then(|text| {
            problems.check(
                "cmd",
                match shlex::split(&text) {
                    Some(argv) if !argv.is_empty() => Ok(argv),
                    _ => Err(format!(
                        "{text:?} is not a command line (a program and its arguments, quoted as \
                         in a shell; no shell features)"
                    )),
                },
            )
        });
        if renew_signal.is_some() && cmd.is_none() {
            problems.push("renew_signal", "needs cmd: the process to signal");
        }
        let mut name =
            |key: &'static str, flag: Option<String>, file: Option<String>, default: &str| {
                let name = flag.or(file).unwrap_or_else(|| default.to_owned());
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    problems.push(
                        key,
                        format!("{name:?} must be a plain file name (no '/', not hidden)"),
                    );
                }
                name
            };
        let names = FileNames {
            svid: name(
                "svid_file_name",
                args.svid_file_name,
                file.svid_file_name,
                "svid.pem",
            ),
            key: name(
                "svid_key_file_name",
                args.svid_key_file_name,
                file.svid_key_file_name,
                "svid_key.pem",
            ),
            bundle: name(
                "svid_bundle_file_name",
                args.svid_bundle_file_name,
                file.svid_bundle_file_name,
                "svid_bundle.pem",
            ),
            crl: name(
                "crl_file_name",
                args.crl_file_name,
                file.crl_file_name,
                "crl.pem",
            ),
            federated: name(
                "federated_bundle_file_name",
                args.federated_bundle_file_name,
                file.federated_bundle_file_name,
                "federated_bundle.pem",
            ),
            jwt: name(
                "jwt_svid_file_name",
                args.jwt_svid_file_name,
                file.jwt_svid_file_name,
                "jwt_svid.token",
            ),
        };
        let all = [
            &names.svid,
            &names.key,
            &names.bundle,
            &names.crl,
            &names.federated,
            &names.jwt,
        ];
        let distinct: std::collections::BTreeSet<&String> = all.iter().copied().collect();
        if distinct.len() != all.len() {
            problems.push(
                "svid_file_name",
                "every file name must differ from the others",
            );
        }
        let socket = super::api::socket_path(args.socket_path.or(file.socket_path).as_deref())?;
        problems.into_result()?;
        Ok(Self {
            socket,
            dir: dir.ok_or_else(|| anyhow!("dir is required"))?,
            spiffe_id: args.spiffe_id.or(file.spiffe_id),
            on_update: args.on_update.or(file.on_update),
            cmd,
            renew_signal,
            jwt_audience: args.jwt_audience.or(file.jwt_audience),
            names,
            extra_crl_file: args.extra_crl_file.or(file.extra_crl_file),
        })
    }
}

/// `HUP`, `SIGHUP`, `hup`: the signal.
fn parse_signal(name: &str) -> Result<nix::sys::signal::Signal, String> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .map_err(|_| format!("{name:?} is not a signal name (HUP, USR1, ...)"))
}

/// One set of files: name -> (contents, mode).
type FileSet = BTreeMap<String, (Vec<u8>, u32)>;

/// The least time between two published sets: a reload triggered by one update reads that
/// set before the next replaces it.
const SETTLE: Duration = Duration::from_secs(1);

/// How soon a set that could not be written is tried again.
const WRITE_RETRY: Duration = Duration::from_secs(5);

/// How long `--cmd`'s process gets to exit after SIGTERM before it is killed.
const CHILD_GRACE: Duration = Duration::from_secs(10);

/// Why the watch loop returned.
enum Stop {
    /// `--cmd`'s process exited: the helper exits with its status.
    Exited(ExitCode),
    /// SIGTERM or SIGINT.
    Signal(nix::sys::signal::Signal),
}

/// Runs the helper until `--cmd`'s process exits (its status), a SIGTERM or SIGINT (passed on
/// to that process, whose status is then the helper's), or a fatal error (the process is
/// stopped first).
///
/// # Errors
///
/// The output directory is not the helper's alone; `--cmd` cannot be started.
pub(super) async fn run(settings: HelperSettings) -> anyhow::Result<ExitCode> {
    let mut child: Option<Child> = None;
    let outcome = watch(&settings, &mut child).await;
    match (outcome, child) {
        (Ok(Stop::Exited(status)), _) => Ok(status),
        (Ok(Stop::Signal(signal)), Some(running)) => Ok(stop_child(running, signal).await),
        (Ok(Stop::Signal(_)), None) => Ok(ExitCode::SUCCESS),
        (Err(error), Some(running)) => {
            stop_child(running, nix::sys::signal::Signal::SIGTERM).await;
            Err(error)
        }
        (Err(error), None) => Err(error),
    }
}

/// Sends `signal` to `child`, waits [`CHILD_GRACE`] for it to exit (then kills it), and returns
/// its exit status.
async fn stop_child(mut child: Child, signal: nix::sys::signal::Signal) -> ExitCode {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
    let status = match tokio::time::timeout(CHILD_GRACE, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            warn!("--cmd's process did not exit within 10 s of the signal; killing it");
            let _ = child.kill().await;
            child.wait().await
        }
    };
    exit_code(status.ok())
}

/// The helper's exit code for `--cmd`'s exit status (1 when killed by a signal or unknown).
fn exit_code(status: Option<std::process::ExitStatus>) -> ExitCode {
    status
        .and_then(|s| s.code())
        .and_then(|c| u8::try_from(c).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from)
}

/// Watches the Workload API and writes every update, until `--cmd`'s process exits or a
/// signal.
async fn watch(settings: &HelperSettings, child: &mut Option<Child>) -> anyhow::Result<Stop> {
    let mut signals = Signals::new()?;
    sigil_daemon::check_private_dir(&settings.dir, 0o755)
        .with_context(|| format!("--dir {}", settings.dir.display()))?;
    let mut writer = Writer::open(&settings.dir)?;
    let mut backoff = Duration::from_millis(200);
    let mut last: Option<FileSet> = None;
    let mut published = tokio::time::Instant::now() - SETTLE;
    loop {
        // Connect (and open the stream), or wait and try again.
        let connected = match connect(&settings.socket).await {
            Ok(mut client) => match client.fetch_x509svid(X509svidRequest {}).await {
                Ok(stream) => Ok((client, stream.into_inner())),
                Err(status) => Err(format!("the Workload API refused: {}", status.message())),
            },
            Err(error) => Err(sigil_daemon::report(error.as_ref())),
        };
        let (mut client, mut stream) = match connected {
            Ok(connected) => connected,
            Err(error) => {
                warn!(%error, retry_in = ?backoff, "the files stay as they are");
                if let Some(stop) = pause(backoff, child, &mut signals).await? {
                    return Ok(stop);
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        info!(socket = %settings.socket.display(), "watching the Workload API");
        let mut current: Option<X509svidResponse> = None;
        // When to render again without a new message: a JWT-SVID at half its life, or a set
        // that could not be written.
        let mut again: Option<tokio::time::Instant> = None;
        loop {
            let wake = again.unwrap_or_else(far_future);
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(message)) => {
                        backoff = Duration::from_millis(200);
                        current = Some(message);
                    }
                    Ok(None) => { warn!("the Workload API ended the stream; reconnecting"); break }
                    Err(status) => { warn!(code = ?status.code(), message = status.message(), "the Workload API stream failed; reconnecting"); break }
                },
                () = tokio::time::sleep_until(wake) => again = None,
                exited = wait_child(child) => return exited.map(Stop::Exited),
                signal = signals.next() => return Ok(Stop::Signal(signal)),
            }
            let Some(response) = &current else { continue };
            let (files, jwt_expiry) = match render(settings, response, &mut client).await {
                Ok(rendered) => rendered,
                Err(error) => {
                    warn!(error = %sigil_daemon::report(error.as_ref()), "cannot render this update; keeping the previous files");
                    again = Some(tokio::time::Instant::now() + WRITE_RETRY);
                    continue;
                }
            };
            again = jwt_expiry.map(half_life_from_now);
            if last.as_ref() == Some(&files) {
                continue;
            }
            // One set at a time: the last reload reads its set before this one replaces it.
            tokio::time::sleep_until(published + SETTLE).await;
            if let Err(error) = writer.write(&files) {
                warn!(error = %sigil_daemon::report(error.as_ref()), "cannot write the files; the previous set stays, retrying");
                again = Some(tokio::time::Instant::now() + WRITE_RETRY);
                continue;
            }
            published = tokio::time::Instant::now();
            info!(dir = %settings.dir.display(), files = files.len(), "files updated");
            last = Some(files);
            notify(settings, child).await?;
        }
        if let Some(stop) = pause(backoff, child, &mut signals).await? {
            return Ok(stop);
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// SIGTERM and SIGINT, as the helper receives them.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    /// The next of the two to arrive.
    async fn next(&mut self) -> nix::sys::signal::Signal {
        tokio::select! {
            _ = self.terminate.recv() => nix::sys::signal::Signal::SIGTERM,
            _ = self.interrupt.recv() => nix::sys::signal::Signal::SIGINT,
        }
    }
}

/// Waits `wait`, unless `--cmd`'s process exits or a signal comes first (then why to stop).
async fn pause(
    wait: Duration,
    child: &mut Option<Child>,
    signals: &mut Signals,
) -> anyhow::Result<Option<Stop>> {
    tokio::select! {
        () = tokio::time::sleep(wait) => Ok(None),
        exited = wait_child(child) => exited.map(|status| Some(Stop::Exited(status))),
        signal = signals.next() => Ok(Some(Stop::Signal(signal))),
    }
}

/// A day from now: "not scheduled".
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

/// When to fetch a JWT-SVID expiring at `expiry` again: at half its remaining life.
fn half_life_from_now(expiry: SystemTime) -> tokio::time::Instant {
    let left = expiry
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .min(Duration::from_secs(86_400));
    tokio::time::Instant::now() + (left / 2).max(Duration::from_secs(1))
}

/// The files of one update, and when its JWT-SVID (if any) expires.
async fn render(
    settings: &HelperSettings,
    response: &X509svidResponse,
    client: &mut super::api::Client,
) -> anyhow::Result<(FileSet, Option<SystemTime>)> {
    let (mut files, spiffe_id) = render_x509(settings, response)?;
    let Some(audience) = &settings.jwt_audience else {
        return Ok((files, None));
    };
    let token = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec![audience.clone()],
            spiffe_id,
        })
        .await
        .map_err(|s| anyhow!("cannot fetch the JWT-SVID: {}", s.message()))?
        .into_inner()
        .svids
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("the agent returned no JWT-SVID"))?
        .svid;
    let expiry = jwt_expiry_of(&token)?;
    files.insert(settings.names.jwt.clone(), (token.into_bytes(), 0o600));
    Ok((files, Some(expiry)))
}

/// The files of an X509-SVID update (all but the JWT-SVID), and the SPIFFE ID chosen.
fn render_x509(
    settings: &HelperSettings,
    response: &X509svidResponse,
) -> anyhow::Result<(FileSet, String)> {
    let svid = match &settings.spiffe_id {
        Some(id) => response
            .svids
            .iter()
            .find(|s| &s.spiffe_id == id)
            .ok_or_else(|| anyhow!("the agent holds no SVID {id} for this process"))?,
        None => response
            .svids
            .first()
            .ok_or_else(|| anyhow!("the agent holds no SVID for this process"))?,
    };
    let names = &settings.names;
    let mut files = FileSet::new();
    files.insert(
        names.svid.clone(),
        (pem_all("CERTIFICATE", &svid.x509_svid)?, 0o644),
    );
    files.insert(
        names.key.clone(),
        (
            pem_block("PRIVATE KEY", &svid.x509_svid_key).into_bytes(),
            0o600,
        ),
    );
    files.insert(
        names.bundle.clone(),
        (pem_all("CERTIFICATE", &svid.bundle)?, 0o644),
    );
    let mut crls = String::new();
    for crl in &response.crl {
        crls.push_str(&pem_block("X509 CRL", crl));
    }
    if let Some(extra) = &settings.extra_crl_file {
        let text = std::fs::read_to_string(extra)
            .with_context(|| format!("cannot read extra_crl_file {}", extra.display()))?;
        if !text.contains("-----BEGIN X509 CRL-----") {
            bail!("extra_crl_file {} holds no PEM CRL", extra.display());
        }
        crls.push_str(&text);
        if !text.ends_with('\n') {
            crls.push('\n');
        }
    }
    files.insert(names.crl.clone(), (crls.into_bytes(), 0o644));
    let mut federated = Vec::new();
    for bundle in response.federated_bundles.values() {
        federated.extend(pem_all("CERTIFICATE", bundle)?);
    }
    files.insert(names.federated.clone(), (federated, 0o644));
    Ok((files, svid.spiffe_id.clone()))
}

/// The `exp` of a JWT (its signature was checked by the agent's server; this only schedules).
fn jwt_expiry_of(token: &str) -> anyhow::Result<SystemTime> {
    use base64::Engine as _;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow!("the JWT-SVID is not a JWS"))?;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .context("the JWT-SVID's payload is not base64url")?,
    )
    .context("the JWT-SVID's payload is not JSON")?;
    let exp = claims["exp"]
        .as_u64()
        .ok_or_else(|| anyhow!("the JWT-SVID has no exp"))?;
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(exp))
        .ok_or_else(|| anyhow!("the JWT-SVID's exp is out of range"))
}

/// Concatenated DER certificates (as the Workload API sends chains and bundles) as PEM.
fn pem_all(label: &str, der: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut rest = der;
    let mut pem = String::new();
    while !rest.is_empty() {
        let (after, _) = x509_parser::parse_x509_certificate(rest)
            .map_err(|e| anyhow!("the agent sent a certificate that does not parse: {e}"))?;
        let used = rest.len() - after.len();
        pem.push_str(&pem_block(label, &rest[..used]));
        rest = after;
    }
    Ok(pem.into_bytes())
}

/// After an update: signal `--cmd`'s process (starting it after the first), then run
/// `--on-update`.
async fn notify(settings: &HelperSettings, child: &mut Option<Child>) -> anyhow::Result<()> {
    if let Some(argv) = &settings.cmd {
        match child {
            None => {
                let (program, args) = argv
                    .split_first()
                    .ok_or_else(|| anyhow!("--cmd is empty"))?;
                let started = Command::new(program)
                    .args(args)
                    .spawn()
                    .with_context(|| format!("cannot start --cmd {argv:?}"))?;
                info!(pid = started.id(), cmd = ?argv, "started");
                *child = Some(started);
            }
            Some(running) => {
                if let (Some(signal), Some(pid)) = (
                    settings.renew_signal,
                    running.id().and_then(|p| i32::try_from(p).ok()),
                ) {
                    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
                        Ok(()) => info!(pid, %signal, "signalled"),
                        Err(error) => warn!(%error, %signal, "cannot signal --cmd's process"),
                    }
                }
            }
        }
    }
    if let Some(on_update) = &settings.on_update {
        // In a process group of its own, so that a timeout stops whatever it started too.
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", on_update])
            .process_group(0)
            .kill_on_drop(true);
        let mut running = match command.spawn() {
            Ok(running) => running,
            Err(error) => {
                warn!(command = on_update, %error, "cannot run on-update");
                return Ok(());
            }
        };
        match tokio::time::timeout(ON_UPDATE_TIMEOUT, running.wait()).await {
            Ok(Ok(status)) if status.success() => info!(command = on_update, "on-update ran"),
            Ok(Ok(status)) => warn!(command = on_update, %status, "on-update failed"),
            Ok(Err(error)) => warn!(command = on_update, %error, "cannot wait for on-update"),
            Err(_) => {
                if let Some(group) = running.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(group),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = running.wait().await;
                warn!(
                    command = on_update,
                    "on-update timed out after 30 s and was killed"
                );
            }
        }
    }
    Ok(())
}

/// Resolves with the helper's exit status once `--cmd`'s process exits; never without one.
async fn wait_child(child: &mut Option<Child>) -> anyhow::Result<ExitCode> {
    match child {
        Some(running) => {
            let status = running.wait().await.context("cannot wait for --cmd")?;
            info!(%status, "--cmd exited; stopping");
            Ok(exit_code(Some(status)))
        }
        None => std::future::pending().await,
    }
}

/// Writes file sets into a directory, each replacing the previous one whole (module docs).
#[derive(Debug)]
pub(super) struct Writer {
    dir: PathBuf,
    generations: PathBuf,
    next: u64,
}

/// A generation written and flushed, not yet published.
#[derive(Debug)]
pub(super) struct Prepared {
    name: String,
    files: Vec<String>,
}

impl Writer {
    /// A writer into `dir` (created 0755 if missing), continuing after the generations there.
    ///
    /// # Errors
    ///
    /// `dir` cannot be created or read.
    pub(super) fn open(dir: &Path) -> anyhow::Result<Self> {
        let generations = dir.join(GENERATIONS_DIR);
        // Neither the directory nor the generations may be writable by anyone else, nor
        // symbolic links: whoever could change them would choose what is read as the SVID,
        // the bundle and the CRLs.
        sigil_daemon::check_private_dir(&generations, 0o755)
            .with_context(|| format!("{}", generations.display()))?;
        let mut next = 0;
        for entry in std::fs::read_dir(&generations)
            .with_context(|| format!("cannot read {}", generations.display()))?
        {
            let name = entry?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("gen-"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                next = next.max(n.saturating_add(1));
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            generations,
            next,
        })
    }

    /// Writes `files` as one set and publishes it.
    ///
    /// # Errors
    ///
    /// A file cannot be written; the previous set then stays.
    pub(super) fn write(&mut self, files: &FileSet) -> anyhow::Result<()> {
        let prepared = self.prepare(files)?;
        self.publish(prepared)
    }

    /// Writes `files` into a new generation and flushes it; readers still see the previous
    /// set.
    ///
    /// # Errors
    ///
    /// A file cannot be written.
    pub(super) fn prepare(&mut self, files: &FileSet) -> anyhow::Result<Prepared> {
        let name = format!("gen-{}", self.next);
        self.next = self.next.saturating_add(1);
        let path = self.generations.join(&name);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot clear {}", path.display()))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        for (file, (contents, mode)) in files {
            let target = path.join(file);
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(*mode)
                .open(&target)
                .with_context(|| format!("cannot create {}", target.display()))?;
            out.write_all(contents)
                .and_then(|()| out.sync_all())
                .with_context(|| format!("cannot write {}", target.display()))?;
        }
        sync_dir(&path)?;
        Ok(Prepared {
            name,
            files: files.keys().cloned().collect(),
        })
    }

    /// Points `current` at `prepared` (one rename), makes sure every file name in the
    /// directory is the symlink through `current`, and removes generations older than the
    /// previous one.
    ///
    /// # Errors
    ///
    /// The rename or a link fails.
    pub(super) fn publish(&self, prepared: Prepared) -> anyhow::Result<()> {
        let current = self.generations.join("current");
        let previous = std::fs::read_link(&current).ok();
        let staged = self.generations.join("current.new");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(&prepared.name, &staged)
            .with_context(|| format!("cannot create {}", staged.display()))?;
        std::fs::rename(&staged, &current)
            .with_context(|| format!("cannot publish {}", current.display()))?;
        sync_dir(&self.generations)?;
        for file in &prepared.files {
            let link = self.dir.join(file);
            let target = Path::new(GENERATIONS_DIR).join("current").join(file);
            if std::fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
                continue;
            }
            let staged = self.dir.join(format!(".{file}.link"));
            let _ = std::fs::remove_file(&staged);
            std::os::unix::fs::symlink(&target, &staged)
                .with_context(|| format!("cannot create {}", staged.display()))?;
            std::fs::rename(&staged, &link)
                .with_context(|| format!("cannot replace {}", link.display()))?;
        }
        sync_dir(&self.dir)?;
        let keep = [Some(PathBuf::from(&prepared.name)), previous];
        for entry in std::fs::read_dir(&self.generations)? {
            let entry = entry?;
            let name = PathBuf::from(entry.file_name());
            let is_generation = name.to_str().is_some_and(|n| n.starts_with("gen-"));
            if is_generation
                && !keep.iter().flatten().any(|k| *k == name)
                && let Err(error) = std::fs::remove_dir_all(entry.path())
            {
                warn!(%error, path = %entry.path().display(), "cannot remove an old generation");
            }
        }
        Ok(())
    }
}

/// Flushes a directory's entries.
fn sync_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn set(tag: &str) -> FileSet {
        [
            (
                "svid.pem".to_owned(),
                (format!("cert {tag}").into_bytes(), 0o644),
            ),
            (
                "svid_key.pem".to_owned(),
                (format!("key {tag}").into_bytes(), 0o600),
            ),
        ]
        .into_iter()
        .collect()
    }

    fn read(dir: &Path) -> (String, String) {
        (
            std::fs::read_to_string(dir.join("svid.pem")).unwrap(),
            std::fs::read_to_string(dir.join("svid_key.pem")).unwrap(),
        )
    }

    #[test]
    fn a_set_is_replaced_whole_and_a_crash_before_publishing_leaves_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer::open(dir.path()).unwrap();
        writer.write(&set("1")).unwrap();
        assert_eq!(read(dir.path()), ("cert 1".into(), "key 1".into()));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("svid_key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Killed after writing the next set, before publishing it: readers see set 1 whole.
        let _unpublished = writer.prepare(&set("2")).unwrap();
        drop(writer);
        assert_eq!(read(dir.path()), ("cert 1".into(), "key 1".into()));

        // A restarted helper goes on after the leftover generation, and cleans it up.
        let mut writer = Writer::open(dir.path()).unwrap();
        writer.write(&set("3")).unwrap();
        assert_eq!(read(dir.path()), ("cert 3".into(), "key 3".into()));
        writer.write(&set("4")).unwrap();
        assert_eq!(read(dir.path()), ("cert 4".into(), "key 4".into()));
        let generations: Vec<_> = std::fs::read_dir(dir.path().join(GENERATIONS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("gen-"))
            .collect();
        assert_eq!(
            generations.len(),
            2,
            "the current and the previous: {generations:?}"
        );
    }

    #[test]
    fn a_directory_others_can_write_or_a_linked_generations_dir_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Writer::open(&shared).unwrap_err();
        assert!(format!("{err:#}").contains("writable"), "{err:#}");

        // Another user's `.sigil-helper` (here: a link to a directory of theirs).
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::symlink(&elsewhere, out.join(GENERATIONS_DIR)).unwrap();
        let err = Writer::open(&out).unwrap_err();
        assert!(format!("{err:#}").contains("link"), "{err:#}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn a_regular_file_in_the_way_becomes_the_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svid.pem"), "from spiffe-helper").unwrap();
        let mut writer = Writer::open(dir.path()).unwrap();
        writer.write(&set("1")).unwrap();
        assert_eq!(read(dir.path()).0, "cert 1");
        assert!(
            std::fs::symlink_metadata(dir.path().join("svid.pem"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    /// What one update becomes: the chosen SVID's chain, key (0600) and bundle as PEM, every
    /// CRL then the extra file's, the federated bundles; an extra file without a CRL refused.
    #[test]
    fn an_update_renders_every_file() {
        let cert = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            rcgen::CertificateParams::new(vec![name.to_owned()])
                .unwrap()
                .self_signed(&key)
                .unwrap()
                .der()
                .to_vec()
        };
        let (leaf, ca, other_ca, peer) = (cert("leaf"), cert("ca"), cert("ca2"), cert("peer"));
        let svid = |id: &str| sigil_proto::workload::X509svid {
            spiffe_id: id.to_owned(),
            x509_svid: leaf.clone(),
            x509_svid_key: vec![1, 2, 3],
            bundle: [ca.clone(), other_ca.clone()].concat(),
            hint: String::new(),
        };
        let response = X509svidResponse {
            svids: vec![
                svid("spiffe://example.org/a"),
                svid("spiffe://example.org/b"),
            ],
            crl: vec![vec![9, 9], vec![8, 8]],
            federated_bundles: [("spiffe://other.org".to_owned(), peer.clone())]
                .into_iter()
                .collect(),
        };
        let dir = tempfile::tempdir().unwrap();
        let extra = dir.path().join("root.crl.pem");
        std::fs::write(
            &extra,
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----",
        )
        .unwrap();
        let mut settings = HelperSettings::from_args(HelperArgs {
            dir: Some(dir.path().into()),
            socket_path: Some("/tmp/api.sock".into()),
            spiffe_id: Some("spiffe://example.org/b".into()),
            extra_crl_file: Some(extra.clone()),
            ..HelperArgs::default()
        })
        .unwrap();
        let (files, id) = render_x509(&settings, &response).unwrap();
        assert_eq!(id, "spiffe://example.org/b");
        let text = |name: &str| String::from_utf8(files[name].0.clone()).unwrap();
        assert_eq!(text("svid.pem").matches("BEGIN CERTIFICATE").count(), 1);
        assert_eq!(
            text("svid_bundle.pem").matches("BEGIN CERTIFICATE").count(),
            2
        );
        assert_eq!(files["svid_key.pem"].1, 0o600);
        assert!(text("svid_key.pem").starts_with("-----BEGIN PRIVATE KEY-----"));
        let crl = text("crl.pem");
        assert_eq!(crl.matches("-----BEGIN X509 CRL-----").count(), 3, "{crl}");
        assert!(
            crl.ends_with("AAAA\n-----END X509 CRL-----\n"),
            "the extra file comes last: {crl}"
        );
        assert_eq!(
            text("federated_bundle.pem")
                .matches("BEGIN CERTIFICATE")
                .count(),
            1
        );

        std::fs::write(&extra, "not a crl").unwrap();
        assert!(render_x509(&settings, &response).is_err());
        settings.spiffe_id = Some("spiffe://example.org/none".into());
        settings.extra_crl_file = None;
        assert!(render_x509(&settings, &response).is_err());
    }

    /// docs/operations.md names every flag and every config key of the helper.
    #[test]
    fn the_operations_guide_documents_every_setting() {
        use clap::CommandFactory as _;
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operations.md"
        ))
        .unwrap();
        let cli = crate::cli::Cli::command();
        let helper = cli.find_subcommand("helper").unwrap();
        for arg in helper.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            assert!(
                docs.contains(&format!("`--{long}")),
                "--{long} is not documented"
            );
        }
        for key in KNOWN_KEYS {
            assert!(
                docs.contains(&format!("`{key}`")),
                "{key} is not documented"
            );
        }
    }

    #[test]
    fn settings_report_every_problem_and_signals_parse() {
        let err = HelperSettings::from_args(HelperArgs {
            renew_signal: Some("BOGUS".into()),
            svid_file_name: Some("../x".into()),
            ..HelperArgs::default()
        })
        .unwrap_err()
        .to_string();
        for key in ["dir", "renew_signal", "svid_file_name"] {
            assert!(err.contains(key), "{key}: {err}");
        }
        assert_eq!(
            parse_signal("hup").unwrap(),
            nix::sys::signal::Signal::SIGHUP
        );
        assert_eq!(
            parse_signal("SIGUSR1").unwrap(),
            nix::sys::signal::Signal::SIGUSR1
        );
        let ok = HelperSettings::from_args(HelperArgs {
            dir: Some("/tmp/x".into()),
            cmd: Some("nginx".into()),
            renew_signal: Some("HUP".into()),
            socket_path: Some("/tmp/api.sock".into()),
            ..HelperArgs::default()
        })
        .unwrap();
        assert_eq!(ok.names.key, "svid_key.pem");
        assert_eq!(ok.names.crl, "crl.pem");
    }
}
