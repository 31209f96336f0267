//! `sigil-bench instructions`: instructions per X509-SVID on the server's in-process signing
//! path against instructions per ring P-256 verify+sign pair, counted by valgrind's callgrind.
//! Unlike the timed issuance rows, these counts do not move with the machine's load. Run on
//! demand (it needs `valgrind`, and takes about half a minute), not in CI.
//!
//! Each side runs under callgrind in a process of its own (this executable re-executed as
//! `__count_signing N` or `__count_ring N`): set-up and a warm-up first, then [`mark`], the
//! measured work, and [`mark`] again. Callgrind dumps its counters when `mark` is entered
//! (`--dump-before`), so the second part holds exactly the measured work, on every thread
//! (sled's flusher and the blocking pool included), and nothing of the set-up (sled's thread
//! pool spins while it starts, and under valgrind's one-thread-at-a-time scheduling that spin
//! is large and varies from run to run). The signing part's profile is kept
//! (`callgrind.signing.out.2`, with `callgrind_annotate`'s inclusive view beside it) to show
//! where the instructions go.

use std::hint::black_box;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use rcgen::KeyPair;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1, KeyPair as _, UnparsedPublicKey};

use crate::report::{Row, table, thousands};

/// CSRs per batch (as the issuance load and the agent send).
const BATCH: usize = 100;

/// Measured batches of the signing run (after one warm-up batch).
const SIGNING_BATCHES: usize = 4;

/// Measured pairs of the ring run (after 50 warm-up pairs).
const RING_PAIRS: usize = 400;

const USAGE: &str = "\
usage: sigil-bench instructions [--out DIR]

Counts instructions per X509-SVID on the server's in-process signing path (entry ids parsed,
authorization from the entry cache, CSR check, certificate built from the entry and signed,
one audit record each, appended durably to a sled store) against instructions per ring P-256
verify+sign pair, under valgrind's callgrind (apt-get install valgrind). Prints one Markdown
table; keeps the signing profile in DIR (default: sigil-bench-instructions).";

/// Runs the counting roles: `__count_signing BATCHES` and `__count_ring PAIRS`.
pub(crate) fn dispatch(args: &[String]) -> Option<anyhow::Result<()>> {
    let (role, rest) = args.split_first()?;
    let count = || -> anyhow::Result<usize> {
        rest.first()
            .context("a count is needed")?
            .parse()
            .context("the count is not a number")
    };
    match role.as_str() {
        "__count_signing" => Some(count().and_then(count_signing)),
        "__count_ring" => Some(count().and_then(count_ring)),
        _ => None,
    }
}

/// `sigil-bench instructions [--out DIR]`.
pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut out = PathBuf::from("sigil-bench-instructions");
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(args.next().context("--out needs a directory")?),
            "-h" | "--help" => {
                writeln!(std::io::stdout().lock(), "{USAGE}")?;
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        bail!("valgrind is not installed (apt-get install valgrind)");
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let signing = callgrind(&out, "signing", SIGNING_BATCHES)?;
    let per_svid = signing.0 as f64 / (SIGNING_BATCHES * BATCH) as f64;
    let per_pair = callgrind(&out, "ring", RING_PAIRS)?.0 as f64 / RING_PAIRS as f64;
    let profile = signing.1;
    let annotated = out.join("callgrind.signing.txt");
    match Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=99"])
        .arg(&profile)
        .output()
    {
        Ok(o) if o.status.success() => std::fs::write(&annotated, &o.stdout)
            .with_context(|| format!("cannot write {}", annotated.display()))?,
        _ => note(&format!(
            "callgrind_annotate did not run; the raw profile is {}",
            profile.display()
        )),
    }
    let rows = vec![Row::info(
        format!("Instructions per X509-SVID, in-process signing path ({BATCH} per batch: ids, authorization, CSR check, template, sign, audit record durable)"),
        thousands(per_svid.round() as u64),
        format!("ring P-256 verify+sign pair: {}", thousands(per_pair.round() as u64)),
        Some(per_pair / per_svid),
    )
    .target("≥ 0.8", per_pair / per_svid >= 0.8)];
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", table(&rows))?;
    writeln!(
        stdout,
        "profile of the signing path: {} (callgrind_annotate --inclusive=yes {})",
        annotated.display(),
        profile.display()
    )?;
    Ok(())
}

/// Runs this executable as `__count_{what} count` under callgrind: the instructions of its
/// measured part (between the two [`mark`]s), and the file that holds that part's profile.
fn callgrind(out: &Path, what: &str, count: usize) -> anyhow::Result<(u64, PathBuf)> {
    let exe = std::env::current_exe().context("cannot find the harness executable")?;
    let file = out.join(format!("callgrind.{what}.out"));
    note(&format!("callgrind: {what}, {count}"));
    let output = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", file.display()))
        .arg(format!("--dump-before={MARK}"))
        .arg(exe)
        .arg(format!("__count_{what}"))
        .arg(count.to_string())
        .output()
        .context("cannot run valgrind")?;
    if !output.status.success() {
        bail!(
            "{what} under callgrind failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Part 1 is the set-up (dumped when the first mark is entered), part 2 the measured work.
    let part = PathBuf::from(format!("{}.2", file.display()));
    let text = std::fs::read_to_string(&part)
        .with_context(|| format!("callgrind wrote no {}", part.display()))?;
    let total =
        summary(&text).with_context(|| format!("no instruction total in {}", part.display()))?;
    for other in [
        format!("{}.1", file.display()),
        format!("{}.3", file.display()),
    ] {
        let _ = std::fs::remove_file(other);
    }
    let _ = std::fs::remove_file(&file);
    Ok((total, part))
}

/// A progress line on stderr.
fn note(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}

/// The name of [`mark`] as callgrind sees it.
const MARK: &str = "sigil_bench::instructions::mark";

/// Where callgrind dumps its counters (`--dump-before`): between set-up and measured work,
/// and after the measured work.
#[inline(never)]
fn mark() {
    black_box(());
}

/// The instruction total of a callgrind profile part (its `summary:` or `totals:` line).
fn summary(profile: &str) -> Option<u64> {
    profile.lines().find_map(|line| {
        let rest = line
            .strip_prefix("summary:")
            .or_else(|| line.strip_prefix("totals:"))?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// One warm-up batch of [`BATCH`] CSRs through the in-process signing path, then `batches`
/// more.
fn count_signing(batches: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let csrs = (0..BATCH)
        .map(|_| crate::clients::csr(&KeyPair::generate()?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let path = sigil_server::instructions::SigningPath::new(dir.path(), BATCH)
            .await
            .map_err(anyhow::Error::msg)?;
        for measured in [false, true] {
            if measured {
                mark();
            }
            for _ in 0..if measured { batches } else { 1 } {
                let issued = path.batch(&csrs).await.map_err(anyhow::Error::msg)?;
                if issued != BATCH {
                    bail!("{issued} of {BATCH} SVIDs issued");
                }
            }
        }
        mark();
        anyhow::Ok(())
    })
}

/// 50 warm-up ring P-256 verify+sign pairs, then `pairs` more (as
/// [`crate::crypto::verify_sign_pairs_per_cpu_second`] does them).
fn count_ring(pairs: usize) -> anyhow::Result<()> {
    let rng = SystemRandom::new();
    let (key, info, signature) = crate::crypto::csr_like(&rng)?;
    let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
    let tbs = vec![0x5au8; 450];
    for (measured, count) in [(false, 50), (true, pairs)] {
        if measured {
            mark();
        }
        for _ in 0..count {
            verifier
                .verify(black_box(&info), black_box(&signature))
                .ok()
                .context("verify")?;
            black_box(key.sign(&rng, black_box(&tbs)).ok().context("sign")?);
        }
    }
    mark();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callgrind_totals_are_read_from_its_profile() {
        let part = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfn=(1) main\n0 5\nsummary: 123456789\ntotals: 123456789\n";
        assert_eq!(summary(part), Some(123_456_789));
        assert_eq!(summary("events: Ir\n"), None);
    }

    #[test]
    fn the_counting_roles_run_outside_valgrind() {
        count_ring(3).unwrap();
        count_signing(0).unwrap();
    }
}
