//! The results: one row per figure, printed as a table at the end and
//! written as JSON. Count checks (lost, duplicated where it matters, wrong
//! totals) are collected separately: they fail the run, timings never do.

use serde::Serialize;
use std::fmt::Write as _;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) workload: String,
    pub(crate) metric: String,
    /// `None` when the figure could not be measured (see `note`).
    pub(crate) value: Option<f64>,
    pub(crate) unit: String,
    /// Ratio to the matching baseline figure of the same run.
    pub(crate) ratio: Option<f64>,
    /// The target, as text (e.g. ">= 0.8 x baseline", "<= 5 ms").
    pub(crate) target: Option<String>,
    /// Whether the target is met; `None` when there is no target.
    pub(crate) met: Option<bool>,
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn new(workload: &str, metric: &str, value: f64, unit: &str) -> Self {
        Row {
            workload: workload.into(),
            metric: metric.into(),
            value: Some(value),
            unit: unit.into(),
            ratio: None,
            target: None,
            met: None,
            note: String::new(),
        }
    }

    /// A figure that could not be measured in this build.
    pub(crate) fn unavailable(workload: &str, metric: &str, why: &str) -> Self {
        Row {
            value: None,
            note: why.into(),
            ..Row::new(workload, metric, 0.0, "")
        }
    }

    pub(crate) fn ratio(mut self, to: f64) -> Self {
        if let Some(v) = self.value {
            if to > 0.0 {
                self.ratio = Some(v / to);
            }
        }
        self
    }

    /// Target: the ratio at least `min`.
    pub(crate) fn ratio_at_least(mut self, min: f64) -> Self {
        self.target = Some(format!(">= {min} x base"));
        self.met = self.ratio.map(|r| r >= min);
        self
    }

    /// Target: the value at most `max` (in the row's unit).
    pub(crate) fn at_most(mut self, max: f64) -> Self {
        self.target = Some(format!("<= {max} {}", self.unit));
        self.met = self.value.map(|v| v <= max);
        self
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

#[derive(Default, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: Machine,
    pub(crate) rows: Vec<Row>,
    /// Count checks made.
    pub(crate) checks: usize,
    /// Count checks that failed: the run exits non-zero when any did.
    pub(crate) failures: Vec<String>,
}

#[derive(Default, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) kernel: String,
    pub(crate) rabbitmq: String,
    pub(crate) redis: String,
    pub(crate) args: String,
    /// Unix ms.
    pub(crate) started_at: String,
}

impl Report {
    /// Adds a row and prints it at once, so a long run shows progress.
    pub(crate) fn push(&mut self, row: Row) {
        println!("  {}", line(&row));
        self.rows.push(row);
    }

    /// Records a count check; a failed one is printed and remembered.
    pub(crate) fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        self.checks += 1;
        if !ok {
            println!("  COUNT CHECK FAILED: {what}");
            self.failures.push(what);
        }
    }

    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| workload | metric | value | unit | x baseline | target | met | note |"
        );
        let _ = writeln!(out, "|---|---|---:|---|---:|---|---|---|");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.workload,
                r.metric,
                r.value.map(fmt_value).unwrap_or_else(|| "n/a".into()),
                r.unit,
                r.ratio.map(|x| format!("{x:.2}")).unwrap_or_default(),
                r.target.clone().unwrap_or_default(),
                match r.met {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "",
                },
                r.note
            );
        }
        out
    }
}

/// What the run ran on, for the JSON and docs/BENCHMARKS.md.
pub(crate) async fn machine(args: &crate::Args) -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let rabbitmq = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "version"])
        .output()
        .await
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let redis = redis_version(&args.redis_url).await.unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        kernel,
        rabbitmq,
        redis,
        args: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        started_at: kairos_shared::amqp::now_ms().to_string(),
    }
}

async fn redis_version(url: &str) -> Option<String> {
    let mut con = redis::Client::open(url)
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_string())
}

fn line(r: &Row) -> String {
    let mut s = format!(
        "{} {}: {} {}",
        r.workload,
        r.metric,
        r.value.map(fmt_value).unwrap_or_else(|| "n/a".into()),
        r.unit
    );
    if let Some(x) = r.ratio {
        let _ = write!(s, " ({x:.2} x baseline)");
    }
    if let (Some(t), Some(m)) = (&r.target, r.met) {
        let _ = write!(s, " [target {t}: {}]", if m { "met" } else { "NOT met" });
    }
    if !r.note.is_empty() {
        let _ = write!(s, " ({})", r.note);
    }
    s
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Percentile of a sorted slice (nearest rank).
pub(crate) fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    // The epsilon keeps 99.9 % of 1,000 at rank 999, not 1,000 (float).
    let rank = (p * sorted.len() as f64 / 100.0 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<i64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&[], 99.0), 0);
    }

    #[test]
    fn targets_are_judged() {
        let r = Row::new("W1", "e2e", 800.0, "tasks/s")
            .ratio(1000.0)
            .ratio_at_least(0.8);
        assert_eq!(r.met, Some(true));
        let r = Row::new("W2", "p99", 7.0, "ms").at_most(5.0);
        assert_eq!(r.met, Some(false));
        let r = Row::unavailable("W5", "ticks/s", "not in this build");
        assert!(r.value.is_none() && r.met.is_none());
    }
}
