//! Dead letters with paging and filters (issue 16): a cursor that neither
//! skips nor repeats a letter, also while letters go; filters on queue,
//! name and error text; one letter shown with its body; replay and purge of
//! the matches only; the same through `/v1/dead` and `kairosctl dead`.

use kairos_shared::contract::{text, H_ATTEMPT, H_ERROR, H_FAILED_AT, H_ORIGIN_QUEUE};
use kairos_shared::dead::{self, Cursor, Filter};
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::types::AMQPValue;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// A dead letter a test puts into `NS.dead`: id, origin queue, task name
/// (none: an untyped message), error.
struct Letter<'a> {
    id: &'a str,
    queue: &'a str,
    name: Option<&'a str>,
    error: &'a str,
    body: &'a [u8],
}

/// Publishes dead letters as Kairos writes them (the dead-letter headers
/// on the task's properties), oldest first.
async fn bury(env: &TestEnv, letters: &[Letter<'_>]) {
    for (i, l) in letters.iter().enumerate() {
        let mut props = task_props(l.name.unwrap_or("-"), l.id);
        if l.name.is_none() {
            props = lapin::BasicProperties::default().with_message_id(l.id.into());
        }
        let props = with_headers(
            props,
            &[
                (H_ORIGIN_QUEUE, text(l.queue)),
                (H_ERROR, text(l.error)),
                (H_ATTEMPT, AMQPValue::LongInt(1)),
                (H_FAILED_AT, AMQPValue::LongLongInt(now_ms() + i as i64)),
            ],
        );
        env.publish(&env.names.dead(), "", props, l.body).await;
    }
}

/// `n` letters `P00`..: queue `q{i%3}`, name `test.{i%2}`, error
/// `connect TIMEOUT` for every fifth, else `boom {i}`.
fn numbered(n: usize) -> Vec<(String, String, String, String)> {
    (0..n)
        .map(|i| {
            let error = if i % 5 == 0 {
                "connect TIMEOUT".to_string()
            } else {
                format!("boom {i}")
            };
            (
                format!("P{i:02}"),
                format!("q{}", i % 3),
                format!("test.{}", i % 2),
                error,
            )
        })
        .collect()
}

async fn bury_numbered(env: &TestEnv, rows: &[(String, String, String, String)]) {
    let letters: Vec<Letter> = rows
        .iter()
        .map(|(id, q, n, e)| Letter {
            id,
            queue: q,
            name: Some(n),
            error: e,
            body: b"{}",
        })
        .collect();
    bury(env, &letters).await;
}

/// Every id of every page from `cursor` on, following the cursors.
async fn page_all(
    env: &TestEnv,
    filter: &Filter,
    limit: usize,
    mut cursor: Option<Cursor>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..100 {
        let page = dead::page(&env.conn, &env.names, filter, limit, cursor)
            .await
            .expect("page");
        assert!(page.dead.len() <= limit);
        ids.extend(page.dead.iter().filter_map(|d| d.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(Cursor::parse(&c).expect("a cursor parses")),
            None => return ids,
        }
    }
    panic!("paging did not end");
}

fn ids_where(
    rows: &[(String, String, String, String)],
    keep: impl Fn(usize) -> bool,
) -> Vec<String> {
    rows.iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, r)| r.0.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_pages_through_every_letter_once_even_while_letters_go() {
    let env = TestEnv::new("dlpage").await;
    let rows = numbered(30);
    bury_numbered(&env, &rows).await;
    env.wait_dead_depth(30, Duration::from_secs(20)).await;

    // Every letter once, in order, whatever the page size.
    for limit in [1, 7, 30, 100] {
        let ids = page_all(&env, &Filter::default(), limit, None).await;
        assert_eq!(ids, ids_where(&rows, |_| true), "limit {limit}");
    }
    let last = dead::page(&env.conn, &env.names, &Filter::default(), 30, None)
        .await
        .expect("page");
    assert_eq!(last.next_cursor, None, "the whole queue fits: no next page");
    assert!(!last.truncated);

    // Filters, paged.
    let qa = Filter {
        queue: Some("q0".into()),
        ..Filter::default()
    };
    assert_eq!(
        page_all(&env, &qa, 3, None).await,
        ids_where(&rows, |i| i % 3 == 0)
    );
    let timeouts = Filter {
        error: Some("timeout".into()),
        ..Filter::default()
    };
    assert_eq!(
        page_all(&env, &timeouts, 2, None).await,
        ids_where(&rows, |i| i % 5 == 0)
    );
    let both = Filter {
        name: Some("test.1".into()),
        queue: Some("q0".into()),
        ..Filter::default()
    };
    assert_eq!(
        page_all(&env, &both, 2, None).await,
        ids_where(&rows, |i| i % 2 == 1 && i % 3 == 0)
    );
    assert_eq!(
        env.queue_depth(&env.names.dead()).await,
        30,
        "paging removes nothing"
    );

    // Page 1, then letters go in front of the cursor and behind it, and a
    // new one comes: the rest of the pages still miss and repeat nothing.
    let first = dead::page(&env.conn, &env.names, &Filter::default(), 5, None)
        .await
        .expect("page 1");
    let seen: Vec<String> = first.dead.iter().filter_map(|d| d.id.clone()).collect();
    assert_eq!(seen, ["P00", "P01", "P02", "P03", "P04"]);
    let cursor = Cursor::parse(first.next_cursor.as_deref().expect("more")).expect("cursor");
    let gone = Filter::ids(&["P01".into(), "P02".into(), "P07".into()]);
    let purged = dead::purge_matching(&env.conn, &env.names, &gone)
        .await
        .expect("purge by ids");
    assert_eq!(purged.purged, 3);
    bury(
        &env,
        &[Letter {
            id: "P30",
            queue: "q0",
            name: Some("test.0"),
            error: "late",
            body: b"{}",
        }],
    )
    .await;
    let rest = page_all(&env, &Filter::default(), 4, Some(cursor)).await;
    let mut expected = ids_where(&rows, |i| i >= 5 && i != 7);
    expected.push("P30".into());
    assert_eq!(rest, expected);

    // The letter the cursor points after goes itself: the next page
    // resumes after the one before it.
    let first = dead::page(&env.conn, &env.names, &Filter::default(), 3, None)
        .await
        .expect("page 1");
    let seen: Vec<String> = first.dead.iter().filter_map(|d| d.id.clone()).collect();
    assert_eq!(seen, ["P00", "P03", "P04"]);
    let cursor = Cursor::parse(first.next_cursor.as_deref().expect("more")).expect("cursor");
    dead::purge_matching(&env.conn, &env.names, &Filter::ids(&["P04".into()]))
        .await
        .expect("purge P04");
    let rest = page_all(&env, &Filter::default(), 50, Some(cursor)).await;
    assert_eq!(rest.first().map(String::as_str), Some("P05"), "{rest:?}");
    let mut expected = ids_where(&rows, |i| i >= 5 && i != 7);
    expected.push("P30".into());
    assert_eq!(rest, expected);
    let counts = dead::count_by_queue(&env.conn, &env.names, 10_000)
        .await
        .expect("count");
    assert!(counts.complete);
    assert_eq!(counts.total, 27);
    assert_eq!(counts.queues.values().sum::<u64>(), 27);
    assert_eq!(counts.queues.get("q0"), Some(&11), "{counts:?}");

    // Every letter of the page goes (replayed, say): the next page starts
    // where the page did, and still skips nothing.
    let first = dead::page(&env.conn, &env.names, &Filter::default(), 3, None)
        .await
        .expect("page 1");
    let seen: Vec<String> = first.dead.iter().filter_map(|d| d.id.clone()).collect();
    assert_eq!(seen, ["P00", "P03", "P05"]);
    let cursor = Cursor::parse(first.next_cursor.as_deref().expect("more")).expect("cursor");
    dead::purge_matching(&env.conn, &env.names, &Filter::ids(&seen))
        .await
        .expect("purge the page");
    let rest = page_all(&env, &Filter::default(), 5, Some(cursor)).await;
    let mut expected = ids_where(&rows, |i| i >= 6 && i != 7);
    expected.push("P30".into());
    assert_eq!(rest, expected);
}

/// `send` through kairosctl's client on the blocking pool.
async fn call(
    api: &ScheduleApi,
    method: &'static str,
    path: &str,
    body: Option<Value>,
) -> kairosctl::Reply {
    let path = path.to_string();
    api.call(move |a| {
        let body = body.map(|b| b.to_string().into_bytes());
        a.send(method, &path, body.as_deref())
    })
    .await
}

fn ids_of(reply: &kairosctl::Reply) -> Vec<String> {
    reply.body["dead"]
        .as_array()
        .expect("a page")
        .iter()
        .map(|d| d["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_filters_shows_and_replays_or_purges_only_the_matches() {
    let env = TestEnv::new("dlhttp").await;
    for q in ["qa", "qb", "qc"] {
        env.declare_queue(q).await;
    }
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let log = RunLog::default();
    let mut wc = env.worker_config();
    wc.queues = vec!["qa".into(), "qb".into(), "qc".into()];
    let worker = InProcess::worker(
        Worker::new(wc)
            .with_builtins()
            .handler("test.rec", log.handler(0)),
    );
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(20)).await;

    bury(
        &env,
        &[
            Letter {
                id: "R1",
                queue: "qa",
                name: Some("test.rec"),
                error: "handler panicked",
                body: br#"{"n":1}"#,
            },
            Letter {
                id: "R2",
                queue: "qa",
                name: Some("test.rec"),
                error: "handler panicked",
                body: br#"{"n":2}"#,
            },
            Letter {
                id: "R3",
                queue: "qa",
                name: Some("test.rec"),
                error: "database gone",
                body: b"plain text",
            },
            Letter {
                id: "R4",
                queue: "qb",
                name: Some("test.rec"),
                error: "connect Timeout",
                body: &[0xff, 0x00, 0x01],
            },
            Letter {
                id: "R5",
                queue: "qa",
                name: Some("test.other"),
                error: "boom",
                body: b"{}",
            },
            Letter {
                id: "R6",
                queue: "qa",
                name: None,
                error: "undecodable",
                body: b"?",
            },
        ],
    )
    .await;
    // Two that really failed: kairos.fail without retries, one after the
    // other so that they die in this order.
    for (n, id) in [(7, "F1"), (8, "F2")] {
        let r = call(
            &api,
            "POST",
            "/v1/tasks",
            Some(json!({"name": "kairos.fail", "id": id, "queue": "qc", "max_retries": 0, "body": {"k": id}})),
        )
        .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        env.wait_dead_depth(n, Duration::from_secs(20)).await;
    }

    // Paging a filter over HTTP.
    let p1 = call(&api, "GET", "/v1/dead?queue=qa&limit=2", None).await;
    assert_eq!(p1.status, 200, "{:?}", p1.body);
    assert_eq!(ids_of(&p1), ["R1", "R2"]);
    let cursor = p1.body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let p2 = call(
        &api,
        "GET",
        &format!("/v1/dead?queue=qa&limit=10&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(ids_of(&p2), ["R3", "R5", "R6"]);
    assert_eq!(p2.body["next_cursor"], Value::Null);
    let failed = call(
        &api,
        "GET",
        "/v1/dead?name=kairos.fail&error=FAILS%20EVERY",
        None,
    )
    .await;
    assert_eq!(ids_of(&failed), ["F1", "F2"], "{:?}", failed.body);
    // The old shape still answers: no parameters, "dead" oldest first.
    let all = call(&api, "GET", "/v1/dead", None).await;
    assert_eq!(
        ids_of(&all),
        ["R1", "R2", "R3", "R4", "R5", "R6", "F1", "F2"]
    );
    assert_eq!(all.body["dead"][0]["queue"], "qa");
    assert_eq!(all.body["dead"][0]["body_bytes"], 7);

    // One letter with its body: JSON, text, or base64.
    let f1 = call(&api, "GET", "/v1/dead/F1", None).await;
    assert_eq!(f1.status, 200, "{:?}", f1.body);
    assert_eq!(f1.body["body_encoding"], "json");
    assert_eq!(f1.body["body"], json!({"k": "F1"}));
    assert_eq!(f1.body["queue"], "qc");
    assert_eq!(f1.body["name"], "kairos.fail");
    assert!(f1.body["headers"]["x-error"]
        .as_str()
        .is_some_and(|e| e.contains("kairos.fail")));
    assert_eq!(f1.body["body_base64"], Value::Null);
    let r3 = call(&api, "GET", "/v1/dead/R3", None).await;
    assert_eq!(
        (r3.body["body_encoding"].as_str(), r3.body["body"].as_str()),
        (Some("text"), Some("plain text"))
    );
    let r4 = call(&api, "GET", "/v1/dead/R4", None).await;
    assert_eq!(r4.body["body_encoding"], "base64");
    assert_eq!(r4.body["body_base64"], "/wAB");
    assert_eq!(r4.body["headers"]["x-attempt"], 1);
    let missing = call(&api, "GET", "/v1/dead/nope", None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["id"], "nope");

    // Bad parameters: 400 naming the field.
    for (method, path, body, field) in [
        ("GET", "/v1/dead?limit=0", None, "limit"),
        ("GET", "/v1/dead?limit=x", None, "limit"),
        ("GET", "/v1/dead?cursor=nonsense", None, "cursor"),
        ("GET", "/v1/dead?state=dead", None, "state"),
        ("DELETE", "/v1/dead?limit=3", None, "limit"),
        (
            "POST",
            "/v1/dead/replay",
            Some(json!({"queues": ["qa"]})),
            "body",
        ),
        (
            "POST",
            "/v1/dead/replay",
            Some(json!({"queue": "q".repeat(300)})),
            "queue",
        ),
        (
            "POST",
            "/v1/dead/replay",
            Some(json!({"ids": ["R1"], "limit": 0})),
            "limit",
        ),
    ] {
        let r = call(&api, method, path, body).await;
        assert_eq!(r.status, 400, "{method} {path}: {:?}", r.body);
        assert_eq!(r.body["field"], field, "{method} {path}: {:?}", r.body);
    }
    assert_eq!(
        env.queue_depth(&env.names.dead()).await,
        8,
        "nothing moved yet"
    );

    // Replay by filter: only test.rec of qa goes back, and runs.
    let replayed = call(
        &api,
        "POST",
        "/v1/dead/replay",
        Some(json!({"queue": "qa", "name": "test.rec"})),
    )
    .await;
    assert_eq!(replayed.status, 200, "{:?}", replayed.body);
    assert_eq!(replayed.body["replayed"], json!(["R1", "R2", "R3"]));
    assert_eq!(replayed.body["refused"], json!([]));
    log.wait_distinct(3, Duration::from_secs(20)).await;
    for id in ["R1", "R2", "R3"] {
        assert_eq!(log.runs_of(id), 1, "{id}");
    }
    assert_eq!(log.runs_of("R4"), 0, "R4 is of another queue");
    assert_eq!(
        ids_of(&call(&api, "GET", "/v1/dead", None).await),
        ["R4", "R5", "R6", "F1", "F2"]
    );

    // By ids: an untyped letter is refused (it stays), an unknown id named.
    let r = call(
        &api,
        "POST",
        "/v1/dead/replay",
        Some(json!({"ids": ["R6", "nope"]})),
    )
    .await;
    assert_eq!(r.body["replayed"], json!([]));
    assert_eq!(r.body["refused"][0]["id"], "R6");
    assert!(r.body["refused"][0]["error"]
        .as_str()
        .is_some_and(|e| e.contains("task name")));
    assert_eq!(r.body["not_found"], json!(["nope"]));

    // Purge by filter: only the matches go, the rest keep their order.
    let purged = call(&api, "DELETE", "/v1/dead?error=timeout", None).await;
    assert_eq!(purged.body["purged"], 1, "{:?}", purged.body);
    let purged = call(&api, "DELETE", "/v1/dead?ids=F2,R5", None).await;
    assert_eq!(purged.body["purged"], 2, "{:?}", purged.body);
    assert_eq!(
        ids_of(&call(&api, "GET", "/v1/dead", None).await),
        ["R6", "F1"]
    );
    let counts = dead::count_by_queue(&env.conn, &env.names, 100)
        .await
        .expect("count");
    assert_eq!(counts.queues.get("qa"), Some(&1));
    assert_eq!(counts.queues.get("qc"), Some(&1));
    // No filter: everything, at once.
    let purged = call(&api, "DELETE", "/v1/dead", None).await;
    assert_eq!(purged.body["purged"], 2);
    assert_eq!(env.queue_depth(&env.names.dead()).await, 0);
    worker.stop().await;
    scheduler.stop().await;
}

/// Runs the real kairosctl with `env` added; (exit code, stdout, stderr).
fn kairosctl(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let mut cmd = Command::new(binary("kairosctl"));
    cmd.args(args).env_remove("KAIROS_HTTP_ADDR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run kairosctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kairosctl_dead_lists_shows_replays_and_purges_by_filter() {
    let env = TestEnv::new("dlctl").await;
    env.declare_queue("qb").await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    ScheduleApi::new(addr)
        .wait_ready(Duration::from_secs(20))
        .await;
    bury(
        &env,
        &[
            Letter {
                id: "K1",
                queue: "qa",
                name: Some("test.a"),
                error: "smtp timeout",
                body: br#"{"to":"x@example.com"}"#,
            },
            Letter {
                id: "K2",
                queue: "qa",
                name: Some("test.a"),
                error: "SMTP TIMEOUT\nsecond line",
                body: b"{}",
            },
            Letter {
                id: "K3",
                queue: "qb",
                name: Some("test.b"),
                error: "boom",
                body: b"{}",
            },
            Letter {
                id: "K4",
                queue: "qb",
                name: Some("test.b"),
                error: "boom",
                body: b"{}",
            },
        ],
    )
    .await;
    env.wait_dead_depth(4, Duration::from_secs(20)).await;
    let http = [("KAIROS_HTTP_ADDR", addr.to_string())];
    let ctl = |args: &[&str]| kairosctl(args, &http);

    let (code, table, err) = ctl(&["dead", "list", "--queue", "qb"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].starts_with("K3") && rows[0].contains("boom"),
        "{table}"
    );
    assert!(rows[1].starts_with("K4"), "{table}");

    let (code, out, err) = ctl(&["dead", "list", "--limit", "3", "--json"]);
    assert_eq!(code, 0, "{err}");
    let page: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(page["dead"].as_array().map(Vec::len), Some(3));
    let cursor = page["next_cursor"].as_str().expect("a cursor").to_string();
    let (code, out, err) = ctl(&["dead", "list", "--cursor", &cursor, "--json"]);
    assert_eq!(code, 0, "{err}");
    let rest: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(rest["dead"][0]["id"], "K4");
    assert_eq!(rest["next_cursor"], Value::Null);
    let (code, _, err) = ctl(&["dead", "list", "--limit", "1"]);
    assert_eq!(code, 0);
    assert!(err.contains("--cursor"), "says how to go on: {err}");

    let (code, out, err) = ctl(&["dead", "show", "K1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("smtp timeout") && out.contains("x@example.com"),
        "{out}"
    );
    assert!(out.contains("x-origin-queue"), "headers are shown: {out}");
    let (code, out, _) = ctl(&["dead", "show", "K1", "--json"]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(shown["body"]["to"], "x@example.com");
    let (code, _, err) = ctl(&["dead", "show", "nope"]);
    assert_eq!(code, 1, "not found: {err}");
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = ctl(&["dead", "replay", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found: nope"), "{err}");
    let (code, _, _) = ctl(&["dead", "list", "--limit", "0"]);
    assert_eq!(code, 2, "a usage error");

    let (code, out, err) = ctl(&["dead", "purge", "--error", "TIMEOUT", "--queue", "qa"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("purged 2 matching"), "{out}");

    // In process (no scheduler address): the same routes on the namespace.
    let direct = [
        ("KAIROS_NAMESPACE", env.ns.clone()),
        ("KAIROS_AMQP_URL", env.amqp_url.clone()),
        ("KAIROS_REDIS_URL", REDIS_URL.to_string()),
    ];
    let (code, out, err) = kairosctl(&["dead", "list", "--json"], &direct);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    let ids: Vec<&str> = listed["dead"]
        .as_array()
        .expect("letters")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["K3", "K4"]);
    let (code, out, err) = kairosctl(&["dead", "replay", "--name", "test.b"], &direct);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 2"), "{out}");
    assert_eq!(
        env.queue_depth(&env.names.queue("qb")).await,
        2,
        "back in their queue"
    );
    assert_eq!(env.queue_depth(&env.names.dead()).await, 0);
    scheduler.stop().await;
}

/// Reads run ahead of the caller (many `basic.get`s in flight): over a
/// thousand letters the pages still hold each once, in order, and a page
/// that stops early puts back the letters read ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_over_a_long_queue_keep_the_order() {
    let env = TestEnv::new("dllong").await;
    let n = 1_000;
    let letters = (0..n)
        .map(|i| {
            (
                String::new(),
                with_headers(
                    task_props("test.long", &format!("L{i:04}")),
                    &[
                        (
                            H_ORIGIN_QUEUE,
                            text(if i % 10 == 0 { "rare" } else { "common" }),
                        ),
                        (H_ERROR, text("boom")),
                    ],
                ),
                b"{}".to_vec(),
            )
        })
        .collect();
    env.publish_many(&env.names.dead(), letters).await;
    env.wait_dead_depth(n, Duration::from_secs(30)).await;
    let all: Vec<String> = (0..n).map(|i| format!("L{i:04}")).collect();
    assert_eq!(page_all(&env, &Filter::default(), 150, None).await, all);
    let rare = Filter {
        queue: Some("rare".into()),
        ..Filter::default()
    };
    let want: Vec<String> = (0..n).step_by(10).map(|i| format!("L{i:04}")).collect();
    assert_eq!(page_all(&env, &rare, 7, None).await, want);
    let shown = dead::show(&env.conn, &env.names, "L0998")
        .await
        .expect("show")
        .expect("found");
    assert_eq!(shown.letter.queue, "common");
    assert_eq!(env.queue_depth(&env.names.dead()).await, n);
    let counts = dead::count_by_queue(&env.conn, &env.names, 500)
        .await
        .expect("count");
    assert!(!counts.complete, "bounded at 500");
    assert_eq!(counts.queues.values().sum::<u64>(), 500);
    assert_eq!(counts.total, 1_000);
}

/// The new routes sit behind the API token like every other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_routes_need_the_token() {
    let env = TestEnv::new("dltoken").await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    sc.api_token = Some(kairos_shared::secrets::Secret::new("dead-letter-token"));
    let scheduler = InProcess::scheduler(sc);
    let with = |token: Option<&str>, method: &'static str, path: &'static str| {
        let addr = addr.to_string();
        let token = token.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            kairosctl::Api::new(&addr)
                .with_token(token)
                .send(method, path, None)
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while with(Some("dead-letter-token"), "GET", "/v1/dead")
        .await
        .expect("join")
        .map(|r| r.status)
        != Ok(200)
    {
        assert!(tokio::time::Instant::now() < deadline, "API did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (method, path) in [
        ("GET", "/v1/dead/some-id"),
        ("GET", "/v1/dead?queue=q"),
        ("POST", "/v1/dead/replay"),
        ("DELETE", "/v1/dead?name=x"),
    ] {
        let r = with(None, method, path)
            .await
            .expect("join")
            .expect("answer");
        assert_eq!(r.status, 401, "{method} {path}");
        let r = with(Some("dead-letter-token"), method, path)
            .await
            .expect("join")
            .expect("answer");
        assert!(r.status == 200 || r.status == 404, "{method} {path}: {r:?}");
    }
    scheduler.stop().await;
}
