//! The result table, the statistics behind its cells, and how figures are written.

use std::fmt::Write as _;
use std::time::Duration;

/// Whether a row met its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Met {
    /// The target holds.
    Yes,
    /// The target does not hold.
    No,
    /// The row has no target (context for another row).
    NoTarget,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// What is measured.
    pub(crate) measurement: String,
    /// Our figure, with its unit.
    pub(crate) ours: String,
    /// The baseline measured in the same run, with what it is.
    pub(crate) baseline: String,
    /// Our figure divided by the baseline's (`None` when it means nothing).
    pub(crate) ratio: Option<f64>,
    /// The target, as text (`—` when none).
    pub(crate) target: String,
    /// Whether the target holds.
    pub(crate) met: Met,
}

// === impl Row ===

impl Row {
    /// A row without a target.
    pub(crate) fn info(
        measurement: impl Into<String>,
        ours: impl Into<String>,
        baseline: impl Into<String>,
        ratio: Option<f64>,
    ) -> Self {
        Self {
            measurement: measurement.into(),
            ours: ours.into(),
            baseline: baseline.into(),
            ratio,
            target: "—".into(),
            met: Met::NoTarget,
        }
    }

    /// Sets the target and whether it holds.
    pub(crate) fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = target.into();
        self.met = if met { Met::Yes } else { Met::No };
        self
    }
}

/// Percentiles of a set of durations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Percentiles {
    /// Median.
    pub(crate) p50: Duration,
    /// 99th percentile (nearest rank).
    pub(crate) p99: Duration,
    /// How many samples.
    pub(crate) count: usize,
}

// === impl Percentiles ===

impl Percentiles {
    /// The percentiles of `samples` (`None` when there are none).
    pub(crate) fn of(samples: &[Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let rank = |q: f64| {
            // Nearest rank: the smallest sample with at least q of the samples at or below it.
            let n = sorted.len() as f64;
            let index = ((q * n).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[index]
        };
        Some(Self {
            p50: rank(0.50),
            p99: rank(0.99),
            count: sorted.len(),
        })
    }

    /// `p50 X, p99 Y (n=N)`.
    pub(crate) fn text(&self) -> String {
        format!(
            "p50 {}, p99 {} (n={})",
            duration(self.p50),
            duration(self.p99),
            self.count
        )
    }
}

/// A duration with a unit that keeps three significant digits or so.
pub(crate) fn duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1e-3 {
        format!("{:.0} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.2} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

/// A byte count in B, KiB or MiB.
pub(crate) fn bytes(b: f64) -> String {
    if b.abs() < 10.0 * 1024.0 {
        format!("{b:.0} B")
    } else if b.abs() < 10.0 * 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    }
}

/// A rate with thousands separators (`12,345/s`).
pub(crate) fn rate(per_second: f64) -> String {
    format!("{}/s", thousands(per_second.round() as u64))
}

/// `1234567` as `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The ratio of two durations.
pub(crate) fn ratio(ours: Duration, baseline: Duration) -> Option<f64> {
    let b = baseline.as_secs_f64();
    (b > 0.0).then(|| ours.as_secs_f64() / b)
}

/// The table, as Markdown.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| measurement | our figure | baseline (same run) | ratio | target | met? |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for row in rows {
        let ratio = match row.ratio {
            Some(r) if r >= 100.0 => format!("{r:.0}"),
            Some(r) if r >= 10.0 => format!("{r:.1}"),
            Some(r) => format!("{r:.2}"),
            None => "—".into(),
        };
        let met = match row.met {
            Met::Yes => "yes",
            Met::No => "**no**",
            Met::NoTarget => "—",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.measurement, row.ours, row.baseline, ratio, row.target, met
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&samples).unwrap();
        assert_eq!(p.p50, Duration::from_millis(50));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(p.count, 100);
        assert!(Percentiles::of(&[]).is_none());
        let one = Percentiles::of(&[Duration::from_millis(7)]).unwrap();
        assert_eq!(
            (one.p50, one.p99),
            (Duration::from_millis(7), Duration::from_millis(7))
        );
    }

    #[test]
    fn numbers_are_written_for_people() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(duration(Duration::from_micros(250)), "250 µs");
        assert_eq!(duration(Duration::from_micros(2_500)), "2.50 ms");
        assert_eq!(bytes(2048.0), "2048 B");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0), "3072.0 KiB");
    }
}
