//! TLS: `amqps://` and `rediss://` against a RabbitMQ node and a
//! redis-server the tests start, with certificates of a CA made for the
//! test (so trusted by nobody unless told with `KAIROS_TLS_CA_FILE`).

use kairos_shared::amqp::{connect_to, Broker};
use kairos_shared::client::{Client, NewTask};
use kairos_shared::contract::Names;
use kairos_shared::events::EventKind;
use kairos_tests::tls::TlsFiles;
use kairos_tests::*;
use std::process::Command;
use std::time::Duration;

const REDIS_PASSWORD: &str = "s3cret-redis-pw";

/// The environment of a `kairos-*` process on the TLS servers.
fn process_env(
    ns: &str,
    rabbit: &OwnRabbit,
    redis: &OwnRedis,
    files: &TlsFiles,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("KAIROS_NAMESPACE".to_string(), ns.to_string()),
        ("KAIROS_AMQP_URL".into(), rabbit.url()),
        ("KAIROS_REDIS_URL".into(), redis.url()),
        ("KAIROS_EVENTS".into(), "true".into()),
        (
            "RUST_LOG".into(),
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ];
    env.extend(files.env(true));
    env
}

/// Both servers require a client certificate: the scheduler, the worker
/// and kairosctl (the real binaries, configured by environment) need the
/// CA file and the client certificate for every connection they make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_task_runs_over_amqps_and_rediss_with_a_private_ca() {
    init_logging();
    let files = TlsFiles::generate();
    let redis = OwnRedis::start_tls(&files, REDIS_PASSWORD, true);
    let rabbit = OwnRabbit::start_tls(&files, true);
    let ns = "kt-tls";
    let names = Names::new(ns);
    let broker = Broker::new(&rabbit.url(), &files.settings(&files.ca, true));

    // A client without a certificate is turned away by the node.
    let anonymous = Broker::new(&rabbit.url(), &files.settings(&files.ca, false));
    assert!(
        connect_to(&anonymous, "kairos-test").await.is_err(),
        "the node must require a client certificate"
    );

    let conn = connect_to(&broker, "kairos-test")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "amqps with the CA and client certificate: {e}\n{}",
                rabbit.log()
            )
        });
    let channel = conn.create_channel().await.expect("channel");
    kairos_shared::topology::declare_base(&channel, &names)
        .await
        .expect("topology");
    kairos_shared::topology::declare_task_queue(&channel, &names, "default")
        .await
        .expect("task queue");
    let mut tap = EventTap::on(&conn, &names).await;

    let env = process_env(ns, &rabbit, &redis, &files);
    let mut scheduler_env = env.clone();
    scheduler_env.push(("KAIROS_HTTP_ADDR".into(), "127.0.0.1:0".into()));
    let mut scheduler = Proc::spawn("kairos-scheduler", &scheduler_env);
    let mut worker = Proc::spawn("kairos-worker", &env);

    // One delayed task from the Rust client, one from kairosctl (which
    // works on Redis and RabbitMQ directly without KAIROS_HTTP_ADDR).
    let client = Client::connect_to(&broker, ns).await.expect("client");
    let from_client = client
        .enqueue(NewTask::new("kairos.noop").id("tls-client").delay_ms(300))
        .await
        .expect("enqueue over amqps");
    run_ok(
        Command::new(binary("kairosctl"))
            .envs(env.iter().cloned())
            .args(["task", "add", "--name", "kairos.noop", "--id", "tls-ctl"])
            .args(["--delay-ms", "300"]),
        "kairosctl over amqps/rediss",
        "run kairosctl",
    );

    tap.wait_until(Duration::from_secs(60), "both tasks to succeed", |seen| {
        ["tls-client", "tls-ctl"]
            .iter()
            .all(|id| seen.iter().any(|e| e.kind == "succeeded" && e.id == *id))
    })
    .await;
    assert_eq!(from_client, "tls-client");
    // They went through the delay queue in Redis, and not early.
    for started in tap.of(EventKind::Started) {
        let due = started.due_at.expect("a delayed task has a due time");
        assert!(started.at >= due, "{} started early", started.id);
    }

    for p in [&mut worker, &mut scheduler] {
        let status = p.terminate(Duration::from_secs(30));
        assert!(status.success(), "exit status {status}");
    }
    let _ = client.close().await;
    let _ = conn.close(200, "done".into()).await;
}

/// A server whose certificate no trusted CA signed is refused, and the
/// error says so without showing the password of the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_signed_by_another_ca_is_refused_with_a_clear_error() {
    init_logging();
    let files = TlsFiles::generate();
    let redis = OwnRedis::start_tls(&files, REDIS_PASSWORD, false);
    let rabbit = OwnRabbit::start_tls(&files, false);
    let wrong = files.settings(&files.other_ca, false);

    // Redis, as the scheduler connects to it.
    let client = kairos_scheduler::redis_io::conn::client(&redis.url(), &wrong).expect("client");
    let err = client
        .get_multiplexed_async_connection()
        .await
        .expect_err("a server signed by another CA must be refused")
        .to_string();
    println!("rediss, wrong CA: {err}");
    assert!(err.contains("certificate"), "unclear error: {err}");
    assert!(!err.contains(REDIS_PASSWORD), "password in error: {err}");

    // RabbitMQ.
    let err = connect_to(&Broker::new(&rabbit.url(), &wrong), "kairos-test")
        .await
        .expect_err("a node signed by another CA must be refused")
        .to_string();
    println!("amqps, wrong CA: {err}");
    assert!(err.contains("certificate"), "unclear error: {err}");
    assert!(!err.contains("guest:guest"), "credentials in error: {err}");

    // The system's roots do not know the test CA either.
    let plain = Broker::new(&rabbit.url(), &Default::default());
    assert!(connect_to(&plain, "kairos-test").await.is_err());

    // With the right CA both work (and with no client certificate, which
    // these servers do not ask for).
    let right = files.settings(&files.ca, false);
    let mut con = kairos_scheduler::redis_io::conn::client(&redis.url(), &right)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("rediss with the right CA");
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    let conn = connect_to(&Broker::new(&rabbit.url(), &right), "kairos-test")
        .await
        .unwrap_or_else(|e| panic!("amqps with the right CA: {e}\n{}", rabbit.log()));
    let _ = conn.close(200, "done".into()).await;
}

/// Settings that cannot work fail at start and name themselves: a missing
/// CA file, a certificate without its key, `#insecure`.
#[test]
fn bad_tls_settings_fail_at_start_naming_the_setting() {
    let files = TlsFiles::generate();
    let ca = files.ca.display().to_string();
    let cert = files.client_cert.display().to_string();
    let key = files.client_key.display().to_string();
    // (binary, environment, the setting the error must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (
            "kairos-worker",
            &[("KAIROS_TLS_CA_FILE", "/nonexistent/ca.pem")],
            "KAIROS_TLS_CA_FILE",
        ),
        (
            "kairos-worker",
            // A key is not a certificate.
            &[("KAIROS_TLS_CA_FILE", &key)],
            "KAIROS_TLS_CA_FILE",
        ),
        (
            "kairos-scheduler",
            &[("KAIROS_TLS_CA_FILE", &ca), ("KAIROS_TLS_CERT_FILE", &cert)],
            "KAIROS_TLS_KEY_FILE",
        ),
        (
            "kairos-scheduler",
            &[("KAIROS_REDIS_URL", "rediss://127.0.0.1:6390/0#insecure")],
            "KAIROS_TLS_CA_FILE",
        ),
    ];
    for (bin, vars, named) in cases {
        let out = Command::new(binary(bin))
            .envs(vars.iter().copied())
            .output()
            .expect("run");
        assert!(!out.status.success(), "{bin} accepted {vars:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{bin} with {vars:?} said: {err}");
    }
}
