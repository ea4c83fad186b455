//! The API closed to strangers (issue 14, items 15 and 16): the bearer
//! token, the refusal to serve an open API beyond loopback, the JSON
//! content type, secrets from files, and passwords never printed.

use kairos_tests::*;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "test-token-0123456789abcdef";

/// One HTTP/1.0 request to 127.0.0.1:`port`: (status, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `/healthz` until it answers (a process scheduler is starting).
async fn wait_healthy(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http_get(port, "/healthz").map(|r| r.0) != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the scheduler on port {port} did not answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_closes_every_route_but_the_probes() {
    let env = TestEnv::new("api-token").await;
    let addr = free_addr();
    let mut penv = env.process_env();
    penv.push(("KAIROS_HTTP_ADDR".into(), addr.to_string()));
    penv.push(("KAIROS_API_TOKEN".into(), TOKEN.into()));
    let scheduler = Proc::spawn("kairos-scheduler", &penv);
    let port = addr.port();
    wait_healthy(port).await;

    let right = bearer(TOKEN);
    let json = ("Content-Type", "application/json");
    let task = r#"{"name": "kairos.noop"}"#;
    for (method, path, body) in [
        ("GET", "/v1/schedules", ""),
        ("GET", "/v1/dead", ""),
        ("POST", "/v1/tasks", task),
        ("DELETE", "/v1/dead", ""),
    ] {
        let none = http(port, method, path, &[json], body);
        assert_eq!(none.0, 401, "{method} {path} without a token: {}", none.1);
        assert!(none.1.contains("KAIROS_API_TOKEN"), "{}", none.1);
        let wrong = http(
            port,
            method,
            path,
            &[json, ("Authorization", "Bearer nope")],
            body,
        );
        assert_eq!(wrong.0, 401, "{method} {path} with a wrong token");
        let almost = bearer(&TOKEN[..TOKEN.len() - 1]);
        let prefix = http(
            port,
            method,
            path,
            &[json, ("Authorization", &almost)],
            body,
        );
        assert_eq!(prefix.0, 401, "{method} {path} with a prefix of the token");
    }
    let ok = http(
        port,
        "GET",
        "/v1/schedules",
        &[("Authorization", &right)],
        "",
    );
    assert_eq!(ok.0, 200, "{}", ok.1);
    let enq = http(
        port,
        "POST",
        "/v1/tasks",
        &[json, ("Authorization", &right)],
        task,
    );
    assert_eq!(enq.0, 202, "{}", enq.1);
    // The probes stay open (`/readyz` may not exist: then 404, never 401).
    assert_eq!(http(port, "GET", "/healthz", &[], "").0, 200);
    assert_ne!(http(port, "GET", "/readyz", &[], "").0, 401);

    // kairosctl sends the token it is given.
    let ctl = |token: Option<&str>| {
        let mut cmd = Command::new(binary("kairosctl"));
        cmd.args(["schedule", "list", "--json"])
            .env("KAIROS_HTTP_ADDR", addr.to_string())
            .env_remove("KAIROS_API_TOKEN")
            .env_remove("KAIROS_API_TOKEN_FILE");
        if let Some(t) = token {
            cmd.env("KAIROS_API_TOKEN", t);
        }
        let out = cmd.output().expect("run kairosctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = ctl(Some(TOKEN));
    assert!(ok, "{out}");
    assert!(out.contains("schedules"), "{out}");
    let (ok, out) = ctl(None);
    assert!(!ok, "{out}");
    drop(scheduler);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_declared_json() {
    let env = TestEnv::new("api-ctype").await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let port = addr.port();
    wait_healthy(port).await;
    let task = r#"{"name": "kairos.noop", "id": "from-a-web-page"}"#;
    // What a web page can make a browser send cross-site without asking.
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let headers: Vec<_> = ct.iter().map(|c| ("Content-Type", *c)).collect();
        let r = http(port, "POST", "/v1/tasks", &headers, task);
        assert_eq!(r.0, 415, "{ct:?}: {}", r.1);
        assert!(r.1.contains("application/json"), "{}", r.1);
        let r = http(port, "POST", "/v1/dead/replay", &headers, "");
        assert_eq!(r.0, 415, "replay with {ct:?}: {}", r.1);
        let r = http(port, "PUT", "/v1/schedules/s1", &headers, "{}");
        assert_eq!(r.0, 415, "put with {ct:?}: {}", r.1);
    }
    // Nothing of it reached the broker.
    assert_eq!(env.queue_depth(&env.names.queue("default")).await, 0);
    let r = http(
        port,
        "POST",
        "/v1/tasks",
        &[("Content-Type", "application/json; charset=utf-8")],
        task,
    );
    assert_eq!(r.0, 202, "{}", r.1);
    scheduler.stop().await;
}

/// Runs a Kairos binary until it exits (at most 30 s): (exit code, stderr).
fn run_to_exit(name: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary(name));
    cmd.args(args);
    for var in [
        "KAIROS_API_TOKEN",
        "KAIROS_API_TOKEN_FILE",
        "KAIROS_API_INSECURE",
        "KAIROS_AMQP_URL_FILE",
        "KAIROS_REDIS_URL_FILE",
    ] {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{name} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    (status.code(), err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_api_beyond_loopback_needs_a_token_or_an_explicit_insecure() {
    let env = TestEnv::new("api-bind").await;
    let port = free_port();
    let everywhere = format!("0.0.0.0:{port}");
    let mut base: Vec<(String, String)> = env.process_env();
    base.retain(|(k, _)| k != "KAIROS_HTTP_ADDR");
    base.push(("KAIROS_HTTP_ADDR".into(), everywhere.clone()));

    let vars: Vec<(&str, &str)> = base.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, err) = run_to_exit("kairos-scheduler", &[], &vars);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("KAIROS_API_TOKEN"), "{err}");
    assert!(err.contains(&everywhere), "{err}");

    // Told so, it serves the open API.
    let mut insecure = base.clone();
    insecure.push(("KAIROS_API_INSECURE".into(), "true".into()));
    let proc = Proc::spawn("kairos-scheduler", &insecure);
    wait_healthy(port).await;
    assert_eq!(http(port, "GET", "/v1/schedules", &[], "").0, 200);
    drop(proc);

    // With a token from a file, it serves the closed API.
    let dir = std::env::temp_dir().join(format!("kairos-{}", env.ns));
    std::fs::create_dir_all(&dir).expect("dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    let port = free_port();
    let mut closed = base.clone();
    closed.retain(|(k, _)| k != "KAIROS_HTTP_ADDR");
    closed.push(("KAIROS_HTTP_ADDR".into(), format!("0.0.0.0:{port}")));
    closed.push((
        "KAIROS_API_TOKEN_FILE".into(),
        token_file.display().to_string(),
    ));
    let proc = Proc::spawn("kairos-scheduler", &closed);
    wait_healthy(port).await;
    assert_eq!(http(port, "GET", "/v1/schedules", &[], "").0, 401);
    let right = bearer(TOKEN);
    assert_eq!(
        http(
            port,
            "GET",
            "/v1/schedules",
            &[("Authorization", &right)],
            ""
        )
        .0,
        200
    );
    drop(proc);

    // A token both ways is refused, naming both.
    let mut both: Vec<(&str, &str)> = vars.clone();
    let path = token_file.display().to_string();
    both.push(("KAIROS_API_TOKEN_FILE", &path));
    both.push(("KAIROS_API_TOKEN", TOKEN));
    let (code, err) = run_to_exit("kairos-scheduler", &[], &both);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("KAIROS_API_TOKEN_FILE") && err.contains("<KAIROS_API_TOKEN>"),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_in_urls_are_never_printed() {
    let env = TestEnv::new("api-redact").await;
    const PASSWORD: &str = "pa55-s3cret-word";
    let bad_amqp = format!("amqp://kairos:{PASSWORD}@rabbitmq:notaport/%2f");
    let bad_redis = format!("redis://:{PASSWORD}@redis:notaport/0");
    // A URL clap refuses: the worker and the scheduler name the setting,
    // show the URL masked, and exit.
    for (name, args, var, url) in [
        ("kairos-worker", &[][..], "KAIROS_AMQP_URL", &bad_amqp),
        ("kairos-scheduler", &[], "KAIROS_AMQP_URL", &bad_amqp),
        ("kairos-scheduler", &[], "KAIROS_REDIS_URL", &bad_redis),
        (
            "kairosctl",
            &["schedule", "list"],
            "KAIROS_REDIS_URL",
            &bad_redis,
        ),
        (
            "kairosctl",
            &["schedule", "list"],
            "KAIROS_AMQP_URL",
            &bad_amqp,
        ),
    ] {
        let vars = [(var, url.as_str()), ("KAIROS_NAMESPACE", env.ns.as_str())];
        let (code, err) = run_to_exit(name, args, &vars);
        assert_eq!(code, Some(2), "{name} {var}: {err}");
        assert!(err.contains(var), "{name} {var}: {err}");
        assert!(err.contains(":***@"), "{name} {var}: {err}");
        assert!(
            !err.contains(PASSWORD),
            "{name} {var} printed the password: {err}"
        );
    }
    // The same URL from a file.
    let dir = std::env::temp_dir().join(format!("kairos-{}", env.ns));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("amqp");
    std::fs::write(&file, &bad_amqp).expect("write");
    let path = file.display().to_string();
    let (code, err) = run_to_exit("kairos-worker", &[], &[("KAIROS_AMQP_URL_FILE", &path)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("KAIROS_AMQP_URL_FILE"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");

    // A well-formed URL the broker refuses: the worker keeps retrying and
    // logs why, without the password.
    let refused = format!("amqp://guest:{PASSWORD}@127.0.0.1:5672/%2f");
    let mut child = Command::new(binary("kairos-worker"))
        .env("KAIROS_AMQP_URL", &refused)
        .env("KAIROS_NAMESPACE", &env.ns)
        .env("RUST_LOG", "debug")
        .env_remove("KAIROS_AMQP_URL_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = child.kill();
    let out = child.wait_with_output().expect("worker output");
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.contains("cannot connect to RabbitMQ"), "{logs}");
    assert!(
        !logs.contains(PASSWORD),
        "the worker logged the password: {logs}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
