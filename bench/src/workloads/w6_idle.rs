//! W6 idle cost: the real `kairos-scheduler` and `kairos-worker` binaries,
//! started in a namespace whose delay queue holds a large backlog due an
//! hour ahead, nothing else to do. CPU is utime + stime from /proc/PID/stat
//! over the window; memory is VmRSS at its end. A pump that polled Redis in
//! a loop would show here as CPU.

use super::Ctx;
use crate::env::BenchEnv;
use crate::report::Row;
use crate::service::Proc;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// Clock ticks per second of /proc/PID/stat times (USER_HZ: 100 on Linux
/// for every mainstream architecture).
pub(crate) const TICKS_PER_SEC: f64 = 100.0;

pub(crate) async fn measure(ctx: &mut Ctx<'_>, env: &BenchEnv, pending: usize) -> Result<()> {
    let vars = vec![
        ("KAIROS_NAMESPACE", env.ns.clone()),
        ("KAIROS_AMQP_URL", env.amqp_url.clone()),
        ("KAIROS_REDIS_URL", env.redis_url.clone()),
        // Nothing listens on it in this build; a port of its own in case a
        // build does, so it never collides with a running scheduler.
        ("KAIROS_HTTP_ADDR", "127.0.0.1:0".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let procs = [
        ("scheduler", Proc::spawn("kairos-scheduler", &vars)?),
        ("worker", Proc::spawn("kairos-worker", &vars)?),
    ];
    // Past startup (connect, declare, first claim round) before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let secs = ctx.args.w6_secs;
    let before: Vec<u64> = procs
        .iter()
        .map(|(_, p)| cpu_ticks(p.pid()))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let elapsed = t.elapsed().as_secs_f64();
    for ((name, p), before) in procs.iter().zip(before) {
        let used = cpu_ticks(p.pid())?.saturating_sub(before) as f64 / TICKS_PER_SEC;
        let cpu = used / elapsed * 100.0;
        let rss = rss_kib(p.pid())? as f64 / 1024.0;
        let w = "W6 idle";
        ctx.report.push(
            Row::new(w, &format!("{name} CPU"), cpu, "% of a core")
                .at_most(1.0)
                .note(format!("{pending} pending due in 1 h; over {secs} s")),
        );
        ctx.report
            .push(Row::new(w, &format!("{name} RSS"), rss, "MiB"));
    }
    for (_, p) in procs {
        p.terminate(Duration::from_secs(10)).await;
    }
    Ok(())
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    parse_cpu_ticks(&stat).context("unexpected /proc/PID/stat")
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: count
    // from after the last ')'. Field 3 is then index 0, so utime (14) and
    // stime (15) are 11 and 12.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(num(11)? + num(12)?)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_an_odd_command_name() {
        let stat = "4242 (kairos (x) y) S 1 2 3 4 5 6 7 8 9 10 17 25 0 0 20 0 8 0";
        assert_eq!(parse_cpu_ticks(stat), Some(42));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }
}
