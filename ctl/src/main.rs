//! `kairosctl schedule add|list|show|pause|resume|rm`,
//! `kairosctl task add`, `kairosctl dead list|replay|purge`.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use kairos_scheduler::config::{check_redis_url, redis_url_parser};
use kairos_shared::config::{
    amqp_url_parser, check_amqp_url, parse_namespace, DEFAULT_AMQP_URL, DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
};
use kairos_shared::secrets::read_secret_file;
use kairos_shared::tls::TlsSettings;
use kairosctl::{Api, Reply};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kairosctl",
    version,
    about = "Manage Kairos schedules, tasks and dead letters through a scheduler's HTTP API"
)]
struct Cli {
    /// Address of a scheduler's HTTP API. Without it, kairosctl works on
    /// Redis and RabbitMQ directly, with the settings below.
    #[arg(
        long,
        env = "KAIROS_HTTP_ADDR",
        value_name = "KAIROS_HTTP_ADDR",
        global = true
    )]
    http_addr: Option<String>,

    /// Bearer token of the scheduler's API (its KAIROS_API_TOKEN).
    #[arg(
        long,
        env = "KAIROS_API_TOKEN",
        value_name = "KAIROS_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    api_token: Option<String>,

    /// A file holding the API token, instead of KAIROS_API_TOKEN.
    #[arg(
        long,
        env = "KAIROS_API_TOKEN_FILE",
        value_name = "KAIROS_API_TOKEN_FILE",
        conflicts_with = "api_token",
        global = true
    )]
    api_token_file: Option<PathBuf>,

    /// Namespace (direct mode).
    #[arg(long, env = "KAIROS_NAMESPACE", value_name = "KAIROS_NAMESPACE", default_value = DEFAULT_NAMESPACE, value_parser = parse_namespace, global = true)]
    namespace: String,

    /// Redis of the delay queue and schedules (direct mode).
    #[arg(long, env = "KAIROS_REDIS_URL", value_name = "KAIROS_REDIS_URL", default_value = DEFAULT_REDIS_URL, value_parser = redis_url_parser(), hide_env_values = true, global = true)]
    redis_url: String,

    /// A file holding the Redis URL (direct mode).
    #[arg(
        long,
        env = "KAIROS_REDIS_URL_FILE",
        value_name = "KAIROS_REDIS_URL_FILE",
        conflicts_with = "redis_url",
        global = true
    )]
    redis_url_file: Option<PathBuf>,

    /// RabbitMQ (direct mode).
    #[arg(long, env = "KAIROS_AMQP_URL", value_name = "KAIROS_AMQP_URL", default_value = DEFAULT_AMQP_URL, value_parser = amqp_url_parser(), hide_env_values = true, global = true)]
    amqp_url: String,

    /// A file holding the RabbitMQ URL (direct mode).
    #[arg(
        long,
        env = "KAIROS_AMQP_URL_FILE",
        value_name = "KAIROS_AMQP_URL_FILE",
        conflicts_with = "amqp_url",
        global = true
    )]
    amqp_url_file: Option<PathBuf>,

    /// Delay-queue shards, as the schedulers use (direct mode).
    #[arg(
        long,
        env = "KAIROS_SHARDS",
        value_name = "KAIROS_SHARDS",
        default_value_t = 8,
        global = true
    )]
    shards: u16,

    /// TLS trust and identity for `amqps://` and `rediss://` (direct mode).
    #[command(flatten)]
    tls: TlsSettings,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Timed triggers.
    #[command(subcommand)]
    Schedule(ScheduleCmd),
    /// Enqueue tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// The dead-letter queue.
    #[command(subcommand)]
    Dead(DeadCmd),
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Enqueue one task; prints its id.
    Add(Box<TaskAdd>),
}

#[derive(Args)]
struct TaskAdd {
    /// Task name, e.g. email.send.
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "default")]
    queue: String,
    /// Task id (default: a new UUIDv7).
    #[arg(long)]
    id: Option<String>,
    #[arg(long, default_value_t = 0)]
    priority: u8,
    /// Body, JSON (sent with content_type application/json).
    #[arg(long, conflicts_with = "body_text")]
    body: Option<String>,
    /// Body, sent as UTF-8 text.
    #[arg(long)]
    body_text: Option<String>,
    /// Run this many ms after the scheduler accepts it.
    #[arg(long, conflicts_with = "run_at")]
    delay_ms: Option<i64>,
    /// Run at this Unix time in ms.
    #[arg(long)]
    run_at: Option<i64>,
    #[arg(long)]
    max_retries: Option<u32>,
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Header `k=v` (repeatable); integers and true/false become typed.
    #[arg(long = "header", value_name = "K=V")]
    headers: Vec<String>,
}

#[derive(Subcommand)]
enum DeadCmd {
    /// Show dead letters (nothing is removed).
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their queues with fresh retries: the ids
    /// given, or all.
    Replay { ids: Vec<String> },
    /// Delete every dead letter.
    Purge,
}

#[derive(Subcommand)]
enum ScheduleCmd {
    /// Create or replace a schedule.
    Add(Box<Add>),
    /// List schedules with their next fire, last fire and last outcome.
    List {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one schedule as JSON.
    Show { id: String },
    /// Stop firing until resumed.
    Pause { id: String },
    /// Fire again from the next tick (no catch-up burst).
    Resume { id: String },
    /// Delete a schedule.
    Rm { id: String },
}

#[derive(Args)]
struct Add {
    /// Schedule id: 1 to 80 of A-Z a-z 0-9 . _ : -
    #[arg(long)]
    id: String,
    /// Whole definition as JSON (as `PUT /v1/schedules/{id}` takes it);
    /// `-` reads standard input. Other flags are then ignored.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Cron expression: 5 fields, or 6 with seconds first.
    #[arg(long, conflicts_with_all = ["every_ms", "at"])]
    cron: Option<String>,
    /// Fixed interval in ms.
    #[arg(long, conflicts_with = "at")]
    every_ms: Option<u64>,
    /// First tick of an interval (Unix ms).
    #[arg(long, requires = "every_ms")]
    start_at: Option<i64>,
    /// One-shot time (Unix ms).
    #[arg(long)]
    at: Option<i64>,
    /// IANA time zone of the cron expression.
    #[arg(long, default_value = "UTC")]
    tz: String,
    /// Task name.
    #[arg(long)]
    task: Option<String>,
    #[arg(long, default_value = "default")]
    queue: String,
    #[arg(long, default_value_t = 0)]
    priority: u8,
    /// Task body, JSON.
    #[arg(long)]
    body: Option<String>,
    /// Header `k=v` (repeatable); integers and true/false become typed.
    #[arg(long = "header", value_name = "K=V")]
    headers: Vec<String>,
    #[arg(long)]
    max_retries: Option<u32>,
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// fire_once, skip or fire_all.
    #[arg(long, default_value = "fire_once")]
    misfire: String,
    /// allow or skip.
    #[arg(long, default_value = "allow")]
    overlap: String,
    /// Create it paused.
    #[arg(long)]
    paused: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kairosctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Takes the settings given as files (`KAIROS_*_FILE`) in.
fn read_secret_files(cli: &mut Cli) -> Result<(), String> {
    if let Some(path) = &cli.api_token_file {
        cli.api_token = Some(read_secret_file("KAIROS_API_TOKEN_FILE", path, |_| Ok(()))?);
    }
    if let Some(path) = &cli.redis_url_file {
        cli.redis_url = read_secret_file("KAIROS_REDIS_URL_FILE", path, check_redis_url)?;
    }
    if let Some(path) = &cli.amqp_url_file {
        cli.amqp_url = read_secret_file("KAIROS_AMQP_URL_FILE", path, check_amqp_url)?;
    }
    Ok(())
}

fn run(mut cli: Cli) -> anyhow::Result<ExitCode> {
    read_secret_files(&mut cli).map_err(anyhow::Error::msg)?;
    let api = match &cli.http_addr {
        Some(addr) => Api::new(addr).with_token(cli.api_token.clone()),
        None => {
            let mut config = kairos_scheduler::Config::for_namespace(&cli.namespace);
            config.redis_url = cli.redis_url.clone();
            config.common.amqp_url = cli.amqp_url.clone();
            config.common.tls = cli.tls.clone();
            config.shards = cli.shards;
            Api::local(&config).map_err(anyhow::Error::msg)?
        }
    };
    let cmd = match cli.command {
        Command::Schedule(cmd) => cmd,
        Command::Task(TaskCmd::Add(add)) => {
            let reply = api
                .enqueue(&task_request(*add)?)
                .map_err(anyhow::Error::msg)?;
            if reply.ok() {
                println!("{}", reply.body["id"].as_str().unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            return Ok(print_reply(&reply));
        }
        Command::Dead(cmd) => return dead(&api, cmd),
    };
    let reply = match cmd {
        ScheduleCmd::Add(add) => {
            let id = add.id.clone();
            let spec = build_spec(*add)?;
            api.put(&id, &spec)
        }
        ScheduleCmd::List { json } => {
            let r = api.list().map_err(anyhow::Error::msg)?;
            if r.ok() && !json {
                print_table(&r.body);
                return Ok(ExitCode::SUCCESS);
            }
            Ok(r)
        }
        ScheduleCmd::Show { id } => api.get(&id),
        ScheduleCmd::Pause { id } => api.pause(&id),
        ScheduleCmd::Resume { id } => api.resume(&id),
        ScheduleCmd::Rm { id } => api.delete(&id),
    }
    .map_err(anyhow::Error::msg)?;
    Ok(print_reply(&reply))
}

fn print_reply(r: &Reply) -> ExitCode {
    if r.ok() {
        if !r.body.is_null() {
            println!(
                "{}",
                serde_json::to_string_pretty(&r.body).unwrap_or_default()
            );
        }
        ExitCode::SUCCESS
    } else {
        let msg = r
            .body
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string);
        eprintln!(
            "kairosctl: HTTP {}: {}",
            r.status,
            msg.unwrap_or_else(|| r.body.to_string())
        );
        ExitCode::FAILURE
    }
}

fn dead(api: &Api, cmd: DeadCmd) -> anyhow::Result<ExitCode> {
    let reply = match cmd {
        DeadCmd::List { limit, json } => {
            let r = api.dead_list(limit).map_err(anyhow::Error::msg)?;
            if r.ok() && !json {
                print_dead(&r.body);
                return Ok(ExitCode::SUCCESS);
            }
            r
        }
        DeadCmd::Replay { ids } => api.dead_replay(&ids).map_err(anyhow::Error::msg)?,
        DeadCmd::Purge => api.dead_purge().map_err(anyhow::Error::msg)?,
    };
    Ok(print_reply(&reply))
}

fn print_dead(body: &Value) {
    let empty = Vec::new();
    let rows = body["dead"].as_array().unwrap_or(&empty);
    println!(
        "{:<38} {:<20} {:<12} {:<7} {:<24} ERROR",
        "ID", "NAME", "QUEUE", "ATTEMPT", "FAILED_AT"
    );
    for d in rows {
        let text = |k: &str| d[k].as_str().unwrap_or("-").to_string();
        println!(
            "{:<38} {:<20} {:<12} {:<7} {:<24} {}",
            text("id"),
            text("name"),
            text("queue"),
            text("attempt"),
            d["failed_at"]
                .as_i64()
                .map(utc)
                .unwrap_or_else(|| "-".into()),
            text("error")
        );
    }
}

/// The JSON of `POST /v1/tasks` from the flags.
fn task_request(add: TaskAdd) -> anyhow::Result<Value> {
    let mut task = Map::new();
    task.insert("name".into(), add.name.into());
    task.insert("queue".into(), add.queue.into());
    task.insert("priority".into(), add.priority.into());
    if let Some(id) = add.id {
        task.insert("id".into(), id.into());
    }
    if let Some(body) = add.body {
        let v: Value = serde_json::from_str(&body).context("--body is not JSON")?;
        task.insert("body".into(), v);
    }
    if let Some(text) = add.body_text {
        task.insert("body_text".into(), text.into());
    }
    let numbers = [
        ("delay_ms", add.delay_ms.map(Value::from)),
        ("run_at", add.run_at.map(Value::from)),
        ("max_retries", add.max_retries.map(Value::from)),
        ("timeout_ms", add.timeout_ms.map(Value::from)),
    ];
    for (k, v) in numbers {
        if let Some(v) = v {
            task.insert(k.into(), v);
        }
    }
    let headers = parse_headers(&add.headers)?;
    if !headers.is_empty() {
        task.insert("headers".into(), headers.into());
    }
    Ok(task.into())
}

/// `K=V` pairs; integers and booleans become typed JSON.
fn parse_headers(pairs: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut headers = Map::new();
    for h in pairs {
        let Some((k, v)) = h.split_once('=') else {
            bail!("--header {h:?}: use K=V");
        };
        let value = if let Ok(n) = v.parse::<i64>() {
            json!(n)
        } else if let Ok(b) = v.parse::<bool>() {
            json!(b)
        } else {
            json!(v)
        };
        headers.insert(k.to_string(), value);
    }
    Ok(headers)
}

fn build_spec(add: Add) -> anyhow::Result<Value> {
    if let Some(path) = add.file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        } else {
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        };
        return serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()));
    }
    let Some(name) = add.task else {
        bail!("--task NAME is required (or --file)");
    };
    let mut task = Map::new();
    task.insert("name".into(), name.into());
    task.insert("queue".into(), add.queue.into());
    task.insert("priority".into(), add.priority.into());
    if let Some(body) = add.body {
        let v: Value = serde_json::from_str(&body).context("--body is not JSON")?;
        task.insert("body".into(), v);
    }
    let headers = parse_headers(&add.headers)?;
    if !headers.is_empty() {
        task.insert("headers".into(), headers.into());
    }
    if let Some(n) = add.max_retries {
        task.insert("max_retries".into(), n.into());
    }
    if let Some(n) = add.timeout_ms {
        task.insert("timeout_ms".into(), n.into());
    }
    let mut spec = Map::new();
    if let Some(c) = add.cron {
        spec.insert("cron".into(), c.into());
    }
    if let Some(e) = add.every_ms {
        spec.insert("every_ms".into(), e.into());
    }
    if let Some(s) = add.start_at {
        spec.insert("start_at".into(), s.into());
    }
    if let Some(a) = add.at {
        spec.insert("at".into(), a.into());
    }
    spec.insert("timezone".into(), add.tz.into());
    spec.insert("task".into(), task.into());
    spec.insert("misfire".into(), add.misfire.into());
    spec.insert("overlap".into(), add.overlap.into());
    if add.paused {
        spec.insert("enabled".into(), false.into());
    }
    Ok(spec.into())
}

fn print_table(body: &Value) {
    let empty = Vec::new();
    let rows = body["schedules"].as_array().unwrap_or(&empty);
    println!(
        "{:<28} {:<22} {:<8} {:<24} {:<24} OUTCOME",
        "ID", "TRIGGER", "STATE", "NEXT_FIRE_AT", "LAST_FIRE_AT"
    );
    for s in rows {
        let trigger = if let Some(c) = s["cron"].as_str() {
            format!("cron {c}")
        } else if let Some(e) = s["every_ms"].as_u64() {
            format!("every {e} ms")
        } else {
            format!("at {}", s["at"])
        };
        let state = if s["enabled"].as_bool().unwrap_or(true) {
            "active"
        } else {
            "paused"
        };
        let show = |v: &Value| v.as_i64().map(utc).unwrap_or_else(|| "-".into());
        let outcome = s["last_outcome"]["outcome"].as_str().unwrap_or("-");
        println!(
            "{:<28} {:<22} {:<8} {:<24} {:<24} {}",
            s["id"].as_str().unwrap_or_default(),
            trigger,
            state,
            show(&s["next_fire_at"]),
            show(&s["last_fire_at"]),
            outcome
        );
    }
}

/// Unix ms as UTC, to the millisecond.
fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}
