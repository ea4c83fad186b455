//! Timed triggers (issue 3): exactly one task per tick across schedulers,
//! cron seconds, misfire policies, pause/resume, overlap, bad input, and
//! the seed example. Each test has its own namespace.

use kairos_shared::events::EventKind;
use kairos_tests::*;
use kairos_worker::Worker;
use serde_json::json;
use std::time::Duration;

/// A scheduler in this process with its API on a known address.
async fn scheduler_with_api(env: &TestEnv) -> (InProcess, ScheduleApi) {
    let mut c = env.scheduler_config();
    let addr = free_addr();
    c.http_addr = addr;
    let scheduler = InProcess::scheduler(c);
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(10)).await;
    (scheduler, api)
}

fn every(ms: u64, name: &str) -> serde_json::Value {
    json!({"every_ms": ms, "task": {"name": name}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scheduler_processes_fire_each_tick_once() {
    let env = TestEnv::new("sch3").await;
    let mut tap = EventTap::new(&env).await;
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.tick", log.handler(0)));
    let (mut procs, apis) = scheduler_processes(&env, 3).await;
    let r = apis[1].put("every-second", every(1000, "test.tick")).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let start = now_ms();
    tokio::time::sleep(Duration::from_secs(10)).await; // the scenario: 10 s of ticks
    let r = apis[2].call(|a| a.pause("every-second")).await;
    assert!(r.ok(), "{:?}", r.body);
    let stop = now_ms();
    // Everything fired before the pause has run within a second after it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ticks = log.ticks_of("every-second");
    println!("{} ticks in {} ms: {ticks:?}", ticks.len(), stop - start);
    assert!((10..=11).contains(&ticks.len()), "{ticks:?}");
    for w in ticks.windows(2) {
        assert_eq!(
            w[1] - w[0],
            1000,
            "ticks are consecutive seconds: {ticks:?}"
        );
    }
    for (id, n) in log.snapshot() {
        assert_eq!(n, 1, "{id} ran {n} times");
    }
    // Lateness of the ticks, from the workers' started events.
    tap.wait_distinct(EventKind::Started, ticks.len(), Duration::from_secs(5))
        .await;
    let mut late: Vec<i64> = tap
        .of(EventKind::Started)
        .iter()
        .filter_map(|e| Some(e.at - e.due_at?))
        .collect();
    late.sort_unstable();
    println!(
        "tick lateness (3 schedulers): p50 {} ms, p99 {} ms",
        percentile(&late, 50.0),
        percentile(&late, 99.0)
    );
    assert!(late[0] >= 0, "a tick started early: {late:?}");
    for p in &mut procs {
        assert!(p.terminate(Duration::from_secs(20)).success());
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_seconds_field_fires_on_even_seconds_and_five_fields_at_second_zero() {
    let env = TestEnv::new("schcron").await;
    let log = RunLog::default();
    let (scheduler, api) = scheduler_with_api(&env).await;
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.cron", log.handler(0)));
    let spec = json!({"cron": "*/2 * * * * *", "timezone": "Europe/Berlin", "task": {"name": "test.cron"}});
    assert_eq!(api.put("even", spec).await.status, 201);
    let five = json!({"cron": "* * * * *", "task": {"name": "test.cron"}});
    assert_eq!(api.put("minutely", five).await.status, 201);
    log.wait_for(Duration::from_secs(15), "3 even-second ticks", |l| {
        l.ticks_of("even").len() >= 3
    })
    .await;
    for t in log.ticks_of("even") {
        assert_eq!(t % 2000, 0, "tick {t} is not on an even second");
    }
    let view = api.get("minutely").await.body;
    let next = view["next_fire_at"].as_i64().expect("next_fire_at");
    assert_eq!(
        next % 60_000,
        0,
        "a 5-field expression fires at second 0: {view}"
    );
    assert!(next > now_ms() - 1000 && next <= now_ms() + 60_000);
    worker.stop().await;
    scheduler.stop().await;
}

/// Stops every scheduler for 5 s on an every-1-s schedule and returns the
/// ticks that ran from the outage (after the last tick before the stop,
/// before the restart).
async fn outage(misfire: &str) -> (Vec<i64>, Vec<i64>) {
    let env = TestEnv::new(&format!("mis{}", &misfire[..4])).await;
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.mis", log.handler(0)));
    let (first, api) = scheduler_with_api(&env).await;
    let spec = json!({"every_ms": 1000, "misfire": misfire, "task": {"name": "test.mis"}});
    assert_eq!(api.put("m", spec).await.status, 201);
    log.wait_for(Duration::from_secs(10), "a first tick", |l| {
        !l.ticks_of("m").is_empty()
    })
    .await;
    first.stop().await;
    let last_before = *log.ticks_of("m").last().expect("a tick");
    tokio::time::sleep(Duration::from_secs(5)).await; // the outage
    let restart = now_ms();
    let (second, _) = scheduler_with_api(&env).await;
    // A regular tick after the restart shows the schedule is back.
    log.wait_for(Duration::from_secs(10), "a tick after the restart", |l| {
        l.ticks_of("m").last().is_some_and(|t| *t > restart + 1000)
    })
    .await;
    second.stop().await;
    worker.stop().await;
    let all = log.ticks_of("m");
    let during: Vec<i64> = all
        .iter()
        .copied()
        .filter(|t| *t > last_before && *t < restart)
        .collect();
    for (id, n) in log.snapshot() {
        assert_eq!(n, 1, "{id} ran {n} times");
    }
    println!("{misfire}: last before {last_before}, restart {restart}, ran {all:?}");
    (during, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_fire_once_runs_one_catch_up() {
    let (during, _) = outage("fire_once").await;
    assert_eq!(during.len(), 1, "{during:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_skip_runs_none() {
    let (during, _) = outage("skip").await;
    assert!(during.is_empty(), "{during:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_fire_all_runs_every_missed_tick() {
    let (during, _) = outage("fire_all").await;
    assert_eq!(during.len(), 5, "{during:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_firing_and_resume_restarts_without_a_burst() {
    let env = TestEnv::new("schpause").await;
    let log = RunLog::default();
    let (scheduler, api) = scheduler_with_api(&env).await;
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.p", log.handler(0)));
    assert_eq!(api.put("p", every(1000, "test.p")).await.status, 201);
    log.wait_for(Duration::from_secs(10), "2 ticks", |l| {
        l.ticks_of("p").len() >= 2
    })
    .await;
    let r = api.call(|a| a.pause("p")).await;
    assert!(r.ok());
    assert_eq!(r.body["enabled"], false);
    assert!(r.body["next_fire_at"].is_null(), "{}", r.body);
    let paused_at = now_ms();
    tokio::time::sleep(Duration::from_millis(2500)).await; // paused for a while
    let ran = log.ticks_of("p");
    assert!(
        ran.iter().all(|t| *t <= paused_at),
        "fired while paused: {ran:?} after {paused_at}"
    );
    let resumed_at = now_ms();
    let r = api.call(|a| a.resume("p")).await;
    assert!(r.ok());
    let next = r.body["next_fire_at"].as_i64().expect("next");
    assert!(
        next > resumed_at - 50 && next <= resumed_at + 1000,
        "{}",
        r.body
    );
    log.wait_for(Duration::from_secs(10), "2 ticks after resume", |l| {
        l.ticks_of("p").iter().filter(|t| **t > paused_at).count() >= 2
    })
    .await;
    let after: Vec<i64> = log
        .ticks_of("p")
        .into_iter()
        .filter(|t| *t > paused_at)
        .collect();
    assert!(
        after[0] >= resumed_at - 50,
        "a tick from the pause ran: {after:?}"
    );
    assert_eq!(after[1] - after[0], 1000, "{after:?}");
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_never_runs_two_occurrences_at_once() {
    let env = TestEnv::new("schovl").await;
    let mut tap = EventTap::new(&env).await;
    let (scheduler, api) = scheduler_with_api(&env).await;
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let spec = json!({"every_ms": 1000, "overlap": "skip",
        "task": {"name": "kairos.sleep", "body": {"ms": 2500}}});
    assert_eq!(api.put("slow", spec).await.status, 201);
    tap.wait_until(Duration::from_secs(20), "3 occurrences to finish", |s| {
        s.iter().filter(|e| e.kind == "succeeded").count() >= 3
    })
    .await;
    let r = api.call(|a| a.pause("slow")).await;
    assert!(r.ok());
    let mut spans: Vec<(i64, i64)> = Vec::new();
    for s in tap.of(EventKind::Started) {
        if let Some(done) = tap
            .seen
            .iter()
            .find(|e| e.kind == "succeeded" && e.id == s.id)
        {
            spans.push((s.at, done.at));
        }
    }
    spans.sort_unstable();
    println!("occurrences: {spans:?}");
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "two occurrences ran at once: {spans:?}");
    }
    let view = api.get("slow").await.body;
    assert!(
        view["last_skipped_at"].is_i64(),
        "ticks were skipped: {view}"
    );
    assert_eq!(view["last_outcome"]["outcome"], "succeeded", "{view}");
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_good_schedules_keep_firing() {
    let env = TestEnv::new("schbad").await;
    let log = RunLog::default();
    let file = std::env::temp_dir().join(format!("{}.toml", env.ns));
    std::fs::write(
        &file,
        r#"
[[schedule]]
id = "from-file"
every_ms = 1000
task = { name = "test.good" }

[[schedule]]
id = "file-bad-cron"
cron = "70 * * * *"
task = { name = "test.good" }

[[schedule]]
id = "file-bad-zone"
cron = "* * * * *"
timezone = "Atlantis/Capital"
task = { name = "test.good" }
"#,
    )
    .expect("write schedule file");
    let mut c = env.scheduler_config();
    let addr = free_addr();
    c.http_addr = addr;
    c.schedule_file = Some(file.clone());
    let scheduler = InProcess::scheduler(c);
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(10)).await;
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.good", log.handler(0)));
    assert_eq!(api.put("good", every(1000, "test.good")).await.status, 201);

    let task = json!({"name": "test.good"});
    let cases = [
        ("c1", json!({"cron": "61 * * * *", "task": task}), "cron"),
        (
            "c2",
            json!({"cron": "* * * * *", "timezone": "Mars/Olympus", "task": task}),
            "timezone",
        ),
        (
            "c3",
            json!({"every_ms": 1000, "task": {"name": "t", "priority": 12}}),
            "task.priority",
        ),
        (
            "c4",
            json!({"every_ms": 1000, "task": {"name": "t", "headers": {"x-max-retries": -1}}}),
            "task.headers.x-max-retries",
        ),
        (
            "c5",
            json!({"every_ms": 1000, "at": 5, "task": task}),
            "trigger",
        ),
        ("c6", json!({"every_ms": 1000}), "body"),
        ("bad@id", json!({"every_ms": 1000, "task": task}), "id"),
    ];
    for (id, spec, field) in cases {
        let r = api.put(id, spec.clone()).await;
        assert_eq!(r.status, 400, "{id}: {spec} -> {:?}", r.body);
        assert_eq!(r.body["field"], field, "{id}: {:?}", r.body);
        let msg = r.body["error"].as_str().unwrap_or_default();
        assert!(
            msg.len() > field.len() + 5,
            "{id}: the error says what is wrong: {msg}"
        );
    }
    let r = api.call(|a| a.put_raw("c7", b"{not json")).await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("body"),
        "{:?}",
        r.body
    );
    let r = api
        .put(
            "c2b",
            json!({"cron": "* * * * *", "timezone": "Mars/Olympus", "task": task}),
        )
        .await;
    assert!(
        r.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Mars/Olympus"),
        "{:?}",
        r.body
    );
    assert_eq!(api.get("c1").await.status, 404);
    assert_eq!(api.get("file-bad-cron").await.status, 404);
    assert_eq!(api.get("file-bad-zone").await.status, 404);

    // The good schedules, from the API and from the file, keep firing.
    let since = now_ms();
    log.wait_for(
        Duration::from_secs(10),
        "both good schedules to tick after the bad input",
        |l| {
            l.ticks_of("good").iter().any(|t| *t > since)
                && l.ticks_of("from-file").iter().any(|t| *t > since)
        },
    )
    .await;
    let listed = api.call(|a| a.list()).await.body;
    let ids: Vec<&str> = listed["schedules"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, ["from-file", "good"]);
    let _ = std::fs::remove_file(file);
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_example_fires_each_at_its_interval() {
    let env = TestEnv::new("seed").await;
    let mut tap = EventTap::new(&env).await;
    let mut c = env.scheduler_config();
    c.schedule_file = Some(workspace_root().join("examples/seed/schedules.toml"));
    let scheduler = InProcess::scheduler(c);
    let worker = InProcess::worker(kairos_example_seed::worker(env.worker_config()));
    // Two ticks of every schedule: up to 30 s for the 15-s one.
    tap.wait_until(
        Duration::from_secs(40),
        "two runs of each seed task",
        |seen| {
            kairos_example_seed::TASKS.iter().all(|name| {
                seen.iter()
                    .filter(|e| e.kind == "succeeded" && e.name == *name)
                    .count()
                    >= 2
            })
        },
    )
    .await;
    for (i, name) in kairos_example_seed::TASKS.iter().enumerate() {
        let interval = 5000 * (i as i64 + 1);
        let mut ticks: Vec<i64> = tap
            .of(EventKind::Succeeded)
            .iter()
            .filter(|e| e.name == *name)
            .filter_map(|e| e.id.rsplit_once('@')?.1.parse().ok())
            .collect();
        ticks.sort_unstable();
        ticks.dedup();
        for t in &ticks {
            assert_eq!(t % interval, 0, "{name}: tick {t}");
        }
        for w in ticks.windows(2) {
            assert_eq!(w[1] - w[0], interval, "{name}: {ticks:?}");
        }
    }
    worker.stop().await;
    scheduler.stop().await;
}

/// Runs `kairosctl` against one scheduler; returns (success, stdout, stderr).
fn ctl(api: &ScheduleApi, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(binary("kairosctl"))
        .env("KAIROS_HTTP_ADDR", &api.addr)
        .args(args)
        .output()
        .expect("run kairosctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kairosctl_manages_schedules() {
    let env = TestEnv::new("schctl").await;
    let (scheduler, api) = scheduler_with_api(&env).await;
    let a = api.clone();
    tokio::task::spawn_blocking(move || {
        let (ok, out, err) = ctl(
            &a,
            &[
                "schedule",
                "add",
                "--id",
                "rep",
                "--cron",
                "0 6 * * 1-5",
                "--tz",
                "Europe/Berlin",
                "--task",
                "report.build",
                "--priority",
                "5",
                "--body",
                r#"{"kind":"daily"}"#,
                "--header",
                "x-max-retries=3",
                "--header",
                "team=ops",
                "--overlap",
                "skip",
            ],
        );
        assert!(ok, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(v["task"]["headers"]["x-max-retries"], 3);
        assert_eq!(v["timezone"], "Europe/Berlin");
        assert!(v["next_fire_at"].is_i64());

        let (ok, out, _) = ctl(&a, &["schedule", "list"]);
        assert!(
            ok && out.contains("rep") && out.contains("cron 0 6 * * 1-5") && out.contains("active"),
            "{out}"
        );
        let (ok, out, _) = ctl(&a, &["schedule", "pause", "rep"]);
        assert!(ok && out.contains("\"enabled\": false"), "{out}");
        let (ok, out, _) = ctl(&a, &["schedule", "list"]);
        assert!(ok && out.contains("paused"), "{out}");
        let (ok, out, _) = ctl(&a, &["schedule", "resume", "rep"]);
        assert!(ok && out.contains("\"enabled\": true"), "{out}");
        let (ok, out, _) = ctl(&a, &["schedule", "show", "rep"]);
        assert!(ok && out.contains("report.build"), "{out}");

        let (ok, _, err) = ctl(
            &a,
            &[
                "schedule",
                "add",
                "--id",
                "bad",
                "--cron",
                "0 25 * * *",
                "--task",
                "x",
            ],
        );
        assert!(!ok);
        assert!(err.contains("400") && err.contains("cron"), "{err}");

        let (ok, _, err) = ctl(&a, &["schedule", "rm", "rep"]);
        assert!(ok, "{err}");
        let (ok, _, err) = ctl(&a, &["schedule", "show", "rep"]);
        assert!(!ok && err.contains("404"), "{err}");
    })
    .await
    .expect("kairosctl checks");
    scheduler.stop().await;
}

#[test]
fn a_taken_or_bad_http_address_fails_at_start_naming_kairos_http_addr() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    for value in [addr.as_str(), "not-an-address"] {
        let out = std::process::Command::new(binary("kairos-scheduler"))
            .env("KAIROS_HTTP_ADDR", value)
            .env("KAIROS_NAMESPACE", "kt-httpaddr")
            .output()
            .expect("run");
        assert!(
            !out.status.success(),
            "started with KAIROS_HTTP_ADDR={value}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("KAIROS_HTTP_ADDR"), "{value}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_intervals_fire_on_time() {
    let env = TestEnv::new("schfast").await;
    let mut tap = EventTap::new(&env).await;
    let (scheduler, api) = scheduler_with_api(&env).await;
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    // Faster than the ticker's idle sleep: it must wake for each tick.
    assert_eq!(api.put("fast", every(300, "kairos.noop")).await.status, 201);
    tap.wait_distinct(EventKind::Started, 8, Duration::from_secs(10))
        .await;
    let mut late: Vec<i64> = tap
        .of(EventKind::Started)
        .iter()
        .filter_map(|e| Some(e.at - e.due_at?))
        .collect();
    late.sort_unstable();
    println!("every 300 ms: lateness {late:?}");
    assert!(late[0] >= 0, "{late:?}");
    // Generous for unoptimized builds next to other tests; the point is
    // that no tick waits for the ticker's 1 s idle sleep.
    assert!(percentile(&late, 50.0) < 100, "{late:?}");
    worker.stop().await;
    scheduler.stop().await;
}

/// A PUT that keeps the next tick (a cron schedule with a new template)
/// changes only the definition: the scheduler that fired the last tick and
/// remembers the old definition must lose its compare-and-set, read the new
/// one and fire the next tick with it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_template_fires_from_the_next_tick_not_yet_handed_over() {
    let env = TestEnv::new("schtpl").await;
    let (old, new) = (RunLog::default(), RunLog::default());
    let (scheduler, api) = scheduler_with_api(&env).await;
    let worker = InProcess::worker(
        Worker::new(env.worker_config())
            .handler("test.old", old.handler(0))
            .handler("test.new", new.handler(0)),
    );
    let cron = |name: &str| json!({"cron": "*/2 * * * * *", "task": {"name": name}});
    assert_eq!(api.put("t", cron("test.old")).await.status, 201);
    old.wait_for(Duration::from_secs(10), "2 ticks", |l| {
        l.ticks_of("t").len() >= 2
    })
    .await;
    let put_at = now_ms();
    let r = api.put("t", cron("test.new")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    new.wait_for(
        Duration::from_secs(10),
        "2 ticks of the new template",
        |l| l.ticks_of("t").len() >= 2,
    )
    .await;
    let (a, b) = (old.ticks_of("t"), new.ticks_of("t"));
    let lookahead = env.scheduler_config().schedule_lookahead_ms as i64;
    // Only an occurrence already handed over (within the lookahead) may
    // still run the old template.
    assert!(
        a.iter().all(|t| *t <= put_at + lookahead),
        "old template after the PUT: {a:?}, PUT at {put_at}"
    );
    assert!(b.iter().all(|t| *t > put_at), "{b:?}");
    let mut all: Vec<i64> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    let steps: Vec<i64> = all.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        steps.iter().all(|s| *s == 2000),
        "a tick missed or fired twice: old {a:?}, new {b:?}"
    );
    worker.stop().await;
    scheduler.stop().await;
}
