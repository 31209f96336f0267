//! The crypto baselines, measured with ring on one core in the same run as what they are
//! compared with.
//!
//! Rates are per second of the measuring thread's own CPU clock (`CLOCK_THREAD_CPUTIME_ID`),
//! not of the wall clock: what they are compared with (the server's SVIDs per CPU-second of its
//! process) is CPU time too, and a thread that waits for a busy core gains no CPU time, so the
//! ratio does not move with the machine's load.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};

/// Most iterations of any baseline loop (the time bound normally ends it first).
const MAX_ITERATIONS: u64 = 10_000_000;

/// This thread's CPU time so far.
pub(crate) fn thread_cpu() -> anyhow::Result<Duration> {
    let spec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .context("cannot read the thread CPU clock")?;
    Ok(Duration::from(spec))
}

/// `count` per second of CPU time spent since `cpu_start` (this thread's clock).
fn per_cpu_second(count: u64, cpu_start: Duration) -> anyhow::Result<f64> {
    let spent = thread_cpu()?.saturating_sub(cpu_start);
    Ok(count as f64 / spent.as_secs_f64().max(1e-6))
}

/// What the server does per X509-SVID at the least: verify the CSR's P-256 signature and sign
/// the certificate. Pairs per CPU-second of this thread, run for `time` of wall clock.
pub(crate) fn verify_sign_pairs_per_cpu_second(time: Duration) -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let (key, csr_info, csr_signature) = csr_like(&rng)?;
    let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
    // About the size of an SVID's TBSCertificate.
    let tbs = vec![0x5au8; 450];
    let start = Instant::now();
    let cpu_start = thread_cpu()?;
    let mut count = 0u64;
    while count < MAX_ITERATIONS && (!count.is_multiple_of(16) || start.elapsed() < time) {
        verifier
            .verify(black_box(&csr_info), black_box(&csr_signature))
            .ok()
            .context("baseline verify failed")?;
        black_box(key.sign(&rng, black_box(&tbs)).ok().context("sign")?);
        count += 1;
    }
    per_cpu_second(count, cpu_start)
}

/// [`verify_sign_pairs_per_cpu_second`] on `threads` threads at once: pairs per CPU-second of
/// each thread while every core is busy (as the server's are under load), averaged.
pub(crate) fn verify_sign_pairs_per_cpu_second_loaded(
    threads: usize,
    time: Duration,
) -> anyhow::Result<f64> {
    let rates = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| scope.spawn(move || verify_sign_pairs_per_cpu_second(time)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("baseline thread died")))
            })
            .collect::<anyhow::Result<Vec<f64>>>()
    })?;
    Ok(rates.iter().sum::<f64>() / rates.len().max(1) as f64)
}

/// The crypto an SVID costs end to end when the agent mints it: a P-256 key (generated and
/// loaded), the CSR signature, and the server's verify and sign. Per CPU-second of this thread.
pub(crate) fn svid_crypto_per_cpu_second(time: Duration) -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let (server_key, _, _) = csr_like(&rng)?;
    let csr_info = vec![0x33u8; 250];
    let tbs = vec![0x5au8; 450];
    let start = Instant::now();
    let cpu_start = thread_cpu()?;
    let mut count = 0u64;
    while count < MAX_ITERATIONS && (!count.is_multiple_of(16) || start.elapsed() < time) {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .ok()
            .context("keygen")?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .ok()
            .context("key load")?;
        let signature = key.sign(&rng, &csr_info).ok().context("sign")?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref())
            .verify(&csr_info, signature.as_ref())
            .ok()
            .context("verify")?;
        black_box(
            server_key
                .sign(&rng, black_box(&tbs))
                .ok()
                .context("sign")?,
        );
        count += 1;
    }
    per_cpu_second(count, cpu_start)
}

/// A key, a CSR-sized message and its signature.
pub(crate) fn csr_like(rng: &SystemRandom) -> anyhow::Result<(EcdsaKeyPair, Vec<u8>, Vec<u8>)> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng)
        .ok()
        .context("keygen")?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), rng)
        .ok()
        .context("key load")?;
    // About the size of a CertificationRequestInfo with a P-256 key.
    let info = vec![0x33u8; 250];
    let signature = key.sign(rng, &info).ok().context("sign")?.as_ref().to_vec();
    Ok((key, info, signature))
}

/// Reads `path` in 64 KiB pieces and hashes it with SHA-256, as the `unix:sha256` attestor
/// does; returns how long it took.
pub(crate) fn read_and_hash(path: &std::path::Path) -> anyhow::Result<Duration> {
    use std::io::Read as _;
    let start = Instant::now();
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded by the file's size; and by 16 Gi pieces, should it grow while read.
    for _ in 0..(1u64 << 34) {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
    }
    black_box(context.finish());
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baselines_run() {
        assert!(verify_sign_pairs_per_cpu_second(Duration::from_millis(20)).unwrap() > 0.0);
        assert!(
            verify_sign_pairs_per_cpu_second_loaded(2, Duration::from_millis(20)).unwrap() > 0.0
        );
        assert!(svid_crypto_per_cpu_second(Duration::from_millis(20)).unwrap() > 0.0);
        read_and_hash(&std::env::current_exe().unwrap()).unwrap();
    }
}
