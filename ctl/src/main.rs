//! `kairosctl schedule add|list|show|pause|resume|rm`,
//! `kairosctl task add`, `kairosctl dead list|show|replay|purge`.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use kairos_scheduler::config::{check_redis_url, redis_url_parser};
use kairos_scheduler::schedules::model::{Misfire, Overlap, ScheduleSpec};
use kairos_shared::config::{
    amqp_url_parser, check_amqp_url, parse_namespace, DEFAULT_AMQP_URL, DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
};
use kairos_shared::secrets::read_secret_file;
use kairos_shared::template::{TaskTemplate, DEFAULT_QUEUE};
use kairos_shared::tls::TlsSettings;
use kairosctl::ops::{self, Output};
use kairosctl::tail::{self, TailFilter};
use kairosctl::{bulk, exit, Api, CallError, Reply, TaskQuery};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Delay-queue shards, as the schedulers default to (`KAIROS_SHARDS`).
const DEFAULT_SHARDS: u16 = 8;

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

    /// Each task queue's order, as the schedulers and workers are given it
    /// (direct mode: `task add` and `dead replay` declare queues by it).
    #[arg(long, env = "KAIROS_QUEUE_ORDER", value_name = "KAIROS_QUEUE_ORDER", default_value = "", hide_default_value = true, value_parser = kairos_shared::config::parse_queue_orders, global = true)]
    queue_order: kairos_shared::order::QueueOrders,

    /// The namespace's queue mode, as the schedulers and workers are given
    /// it (direct mode: `task add` routes by priority band in quorum mode,
    /// `dead replay` too, and both declare queues of this kind).
    #[arg(long, env = "KAIROS_QUEUE_MODE", value_name = "KAIROS_QUEUE_MODE", default_value = "classic", value_parser = kairos_shared::config::parse_queue_mode, global = true)]
    queue_mode: kairos_shared::queue_mode::QueueMode,

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
        default_value_t = DEFAULT_SHARDS,
        global = true
    )]
    shards: u16,

    /// TLS trust and identity for `amqps://` and `rediss://` (direct mode).
    #[command(flatten)]
    tls: TlsSettings,

    /// `KAIROS_LOG_FORMAT` of the warnings kairosctl logs (to stderr).
    #[command(flatten)]
    log: kairos_shared::trace_init::LogSettings,

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
    Dead(kairosctl::dead::DeadCmd),
    /// Follow the lifecycle events live (needs --http-addr; events must be
    /// on, KAIROS_EVENTS=true, in the scheduler and workers).
    Tail(Tail),
    /// Every logical queue: ready, consumers, delayed, due, dead, paused,
    /// rates of the last minute.
    Queues {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause or resume a queue on every worker.
    #[command(subcommand)]
    Queue(QueueCmd),
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Workers stop taking tasks from this queue (what they run goes on).
    Pause {
        /// The logical queue.
        name: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Workers take tasks from this queue again.
    Resume {
        /// The logical queue.
        name: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct Tail {
    /// Only this task id.
    #[arg(long)]
    id: Option<String>,
    /// Only tasks of this name.
    #[arg(long)]
    name: Option<String>,
    /// Only tasks of this logical queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only these events, comma-separated (started,succeeded,...).
    #[arg(long)]
    event: Option<String>,
    /// Print each event's JSON as published.
    #[arg(long)]
    json: bool,
    /// Exit after this many events.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Enqueue one task (prints its id), or many from a file of JSON lines
    /// (--file; prints a summary).
    Add(Box<TaskAdd>),
    /// A task's state, timeline, progress, error and result.
    Show {
        /// The task id.
        id: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task waiting in the delay queue (scheduled or retrying).
    Cancel {
        /// The task id.
        id: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Abort a running task (its worker cancels it); a waiting one is
    /// cancelled.
    Abort {
        /// The task id.
        id: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recent tasks, newest first.
    List(TaskList),
}

#[derive(Args)]
struct TaskList {
    /// Only tasks in this state: scheduled, ready, running, retrying,
    /// succeeded, dead, cancelled.
    #[arg(long)]
    state: Option<String>,
    /// Only tasks of this logical queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only tasks of this name.
    #[arg(long)]
    name: Option<String>,
    /// At most this many (1 to 1000; the server's default is 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
    /// Continue after the previous page (its next_cursor).
    #[arg(long)]
    cursor: Option<String>,
    /// Print the API's JSON (with next_cursor).
    #[arg(long)]
    json: bool,
}

/// The task flags `task add` and `schedule add` share: a
/// [`TaskTemplate`] but for its name (`--name` and `--task`).
#[derive(Args)]
struct TemplateFlags {
    /// Logical queue.
    #[arg(long, default_value = DEFAULT_QUEUE)]
    queue: String,
    /// 0 to 9, higher runs first.
    #[arg(long, default_value_t = 0)]
    priority: u8,
    /// Body, JSON (sent with content_type application/json).
    #[arg(long)]
    body: Option<String>,
    /// Header `k=v` (repeatable); integers and true/false become typed.
    #[arg(long = "header", value_name = "K=V")]
    headers: Vec<String>,
    /// Retries after the first attempt.
    #[arg(long)]
    max_retries: Option<u32>,
    /// Time limit of one attempt, in ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
}

impl TemplateFlags {
    /// The template these flags describe, for a task named `name`.
    fn template(self, name: String) -> anyhow::Result<TaskTemplate> {
        let body = self
            .body
            .map(|b| serde_json::from_str(&b))
            .transpose()
            .context("--body is not JSON")?;
        Ok(TaskTemplate {
            queue: self.queue,
            priority: self.priority,
            body,
            headers: parse_headers(&self.headers)?,
            max_retries: self.max_retries,
            timeout_ms: self.timeout_ms,
            ..TaskTemplate::new(name)
        })
    }
}

#[derive(Args)]
struct TaskAdd {
    /// Task name, e.g. email.send.
    #[arg(long, required_unless_present = "file")]
    name: Option<String>,
    /// Many tasks: a file of JSON lines, one POST /v1/tasks body per line
    /// (`-` reads standard input). Prints a summary; bad lines are
    /// reported by number and the rest still sent.
    #[arg(long, conflicts_with_all = [
        "name", "id", "body", "body_text", "headers", "max_retries",
        "timeout_ms", "delay_ms", "run_at", "priority", "queue",
    ])]
    file: Option<PathBuf>,
    /// With --file: requests in flight at once (1 to 256).
    #[arg(long, default_value_t = bulk::DEFAULT_CONCURRENCY, requires = "file",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// With --file: write the lines not accepted (bad, refused, unanswered,
    /// or not sent because the run stopped) to this file, to send again
    /// once fixed; empty when every line was accepted.
    #[arg(long, value_name = "PATH", requires = "file")]
    failed_out: Option<PathBuf>,
    /// Print the API's JSON (with --file: the summary as JSON, and no
    /// progress bar).
    #[arg(long)]
    json: bool,
    /// Task id (default: a new UUIDv7).
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    task: TemplateFlags,
    /// Body, sent as UTF-8 text.
    #[arg(long, conflicts_with = "body")]
    body_text: Option<String>,
    /// Run this many ms after the scheduler accepts it.
    #[arg(long, conflicts_with = "run_at")]
    delay_ms: Option<i64>,
    /// Run at this Unix time in ms.
    #[arg(long)]
    run_at: Option<i64>,
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
    #[command(flatten)]
    template: TemplateFlags,
    /// fire_once, skip or fire_all.
    #[arg(long, default_value = "fire_once", value_parser = snake_case::<Misfire>)]
    misfire: Misfire,
    /// allow or skip.
    #[arg(long, default_value = "allow", value_parser = snake_case::<Overlap>)]
    overlap: Overlap,
    /// Create it paused.
    #[arg(long)]
    paused: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let init = kairos_shared::trace_init::init(&cli.log, None, "kairosctl", "warn", true);
    if let Err(e) = init {
        eprintln!("kairosctl: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kairosctl: {e:#}");
            // A call that got no answer: 3; anything else before a request
            // (flags, files, settings): 2.
            let code = e
                .downcast_ref::<CallError>()
                .map_or(exit::USAGE, CallError::exit_code);
            ExitCode::from(code)
        }
    }
}

/// An error of the older `Api` methods (a `String`): it means no answer
/// came, as the address was checked before.
fn no_answer(message: String) -> anyhow::Error {
    CallError::Unreachable(message).into()
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
    if let Command::Tail(args) = &cli.command {
        return tail(&cli, args);
    }
    let api = match &cli.http_addr {
        Some(addr) => Api::try_new(addr)?.with_token(cli.api_token.clone()),
        None => {
            let mut config = kairos_scheduler::Config::for_namespace(&cli.namespace);
            config.redis_url = cli.redis_url.clone();
            config.common.amqp_url = cli.amqp_url.clone();
            config.common.queue_order = cli.queue_order.clone();
            config.common.queue_mode = cli.queue_mode;
            config.common.tls = cli.tls.clone();
            config.shards = cli.shards;
            Api::connect_local(&config)?
        }
    };
    let cmd = match cli.command {
        Command::Schedule(cmd) => cmd,
        Command::Task(TaskCmd::Add(add)) => {
            return task_add(&api, *add);
        }
        Command::Dead(cmd) => return kairosctl::dead::run(&api, cmd).map_err(no_answer),
        Command::Tail(_) => unreachable!("tail is handled before connecting"),
        Command::Task(TaskCmd::Show { id, json }) => {
            return Ok(code(ops::task_show(&api, &id, Output::from_flag(json))))
        }
        Command::Task(TaskCmd::Cancel { id, json }) => {
            return Ok(code(ops::task_cancel(&api, &id, Output::from_flag(json))))
        }
        Command::Task(TaskCmd::Abort { id, json }) => {
            return Ok(code(ops::task_abort(&api, &id, Output::from_flag(json))))
        }
        Command::Task(TaskCmd::List(list)) => {
            let query = TaskQuery {
                state: list.state,
                queue: list.queue,
                name: list.name,
                limit: list.limit,
                cursor: list.cursor,
            };
            return Ok(code(ops::task_list(
                &api,
                &query,
                Output::from_flag(list.json),
            )));
        }
        Command::Queues { json } => return Ok(code(ops::queues(&api, Output::from_flag(json)))),
        Command::Queue(QueueCmd::Pause { name, json }) => {
            return Ok(code(ops::queue_pause(
                &api,
                &name,
                true,
                Output::from_flag(json),
            )))
        }
        Command::Queue(QueueCmd::Resume { name, json }) => {
            return Ok(code(ops::queue_pause(
                &api,
                &name,
                false,
                Output::from_flag(json),
            )))
        }
    };
    let reply = match cmd {
        ScheduleCmd::Add(add) => {
            let id = add.id.clone();
            let spec = build_spec(*add)?;
            api.put(&id, &spec)
        }
        ScheduleCmd::List { json } => {
            let r = api.list().map_err(no_answer)?;
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
    .map_err(no_answer)?;
    Ok(print_reply(&reply))
}

fn code(c: u8) -> ExitCode {
    ExitCode::from(c)
}

/// `task add`: one task from the flags, or many from `--file`.
fn task_add(api: &Api, add: TaskAdd) -> anyhow::Result<ExitCode> {
    if let Some(path) = add.file.clone() {
        return task_add_file(
            api,
            &path,
            usize::from(add.concurrency),
            add.failed_out.as_deref(),
            add.json,
        );
    }
    let json = add.json;
    let reply = api.enqueue(&task_template(add)?).map_err(no_answer)?;
    if reply.ok() && !json {
        println!("{}", reply.body["id"].as_str().unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    if json && !reply.ok() && !reply.body.is_null() {
        // The answer on stdout (a duplicate's 409 names the id), the
        // error on stderr.
        println!(
            "{}",
            serde_json::to_string_pretty(&reply.body).unwrap_or_default()
        );
    }
    Ok(print_reply(&reply))
}

/// `task add --file`: every line sent, a progress bar on a terminal, then
/// the summary (stdout) and its exit code.
fn task_add_file(
    api: &Api,
    path: &std::path::Path,
    concurrency: usize,
    failed_out: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let stdin = path.as_os_str() == "-";
    let mut failed_file = match failed_out {
        Some(out) => {
            let same = !stdin
                && std::fs::canonicalize(out)
                    .ok()
                    .is_some_and(|o| std::fs::canonicalize(path).is_ok_and(|p| p == o));
            if same {
                bail!("--failed-out {} is the --file itself", out.display());
            }
            let file = std::fs::File::create(out)
                .with_context(|| format!("--failed-out {}", out.display()))?;
            Some(std::io::BufWriter::new(file))
        }
        None => None,
    };
    let show_bar = !json && std::io::stderr().is_terminal();
    let bar = if !show_bar {
        indicatif::ProgressBar::hidden()
    } else if stdin {
        indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} lines  {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        )
    } else {
        let total = count_lines(path)?;
        indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} lines  eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    };
    let on_line = {
        let bar = bar.clone();
        move || bar.inc(1)
    };
    let keep = failed_file
        .as_mut()
        .map(|w| w as &mut (dyn std::io::Write + Send));
    let mut summary = if stdin {
        bulk::send(
            api,
            std::io::BufReader::new(std::io::stdin()),
            concurrency,
            keep,
            on_line,
        )
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("--file {}", path.display()))?;
        bulk::send(
            api,
            std::io::BufReader::new(file),
            concurrency,
            keep,
            on_line,
        )
    };
    if let Some(Err(e)) = failed_file.as_mut().map(std::io::Write::flush) {
        summary
            .write_error
            .get_or_insert_with(|| format!("writing the lines not accepted: {e}"));
    }
    bar.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).context("encoding the summary")?
        );
    } else {
        print!("{}", summary.render());
    }
    Ok(code(summary.exit_code()))
}

/// Lines that hold something (the progress bar's length).
fn count_lines(path: &std::path::Path) -> anyhow::Result<u64> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("--file {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut buf = Vec::new();
    let mut n = 0;
    while reader
        .read_until(b'\n', &mut buf)
        .with_context(|| format!("reading {}", path.display()))?
        > 0
    {
        if !buf.iter().all(u8::is_ascii_whitespace) {
            n += 1;
        }
        buf.clear();
    }
    Ok(n)
}

/// `kairosctl tail`: follows `/v1/events` over HTTP only (the stream is
/// the scheduler's; in direct mode there is none to follow).
fn tail(cli: &Cli, args: &Tail) -> anyhow::Result<ExitCode> {
    let Some(addr) = &cli.http_addr else {
        bail!("tail follows a scheduler's event stream: give --http-addr (or KAIROS_HTTP_ADDR)");
    };
    let filter = TailFilter {
        id: args.id.clone(),
        name: args.name.clone(),
        queue: args.queue.clone(),
        event: args.event.clone(),
    };
    let followed =
        tail::EventStream::open(addr, cli.api_token.as_deref(), &filter).and_then(|mut stream| {
            // Said once the server listens, so a script knows that what it
            // does next is seen.
            eprintln!("kairosctl: following {addr}");
            let mut printed = 0;
            while let Some(event) = stream.next_event()? {
                if args.json {
                    println!("{event}");
                } else {
                    println!("{}", tail::human_line(&event));
                }
                printed += 1;
                if args.count.is_some_and(|n| printed >= n) {
                    break;
                }
            }
            Ok(())
        });
    match followed {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(tail::TailError::Status { status, message }) => {
            eprintln!("kairosctl: HTTP {status}: {message}");
            Ok(code(exit::for_status(status)))
        }
        Err(e @ tail::TailError::Http { .. }) => Err(CallError::Unreachable(e.to_string()).into()),
        Err(e) => Err(e.into()),
    }
}

/// Prints an answer: its JSON when it is a success, the error on stderr
/// when not; the exit code per `kairosctl::exit::for_status`.
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
        code(r.exit_code())
    }
}

/// The task of `POST /v1/tasks` from the flags.
fn task_template(add: TaskAdd) -> anyhow::Result<TaskTemplate> {
    let Some(name) = add.name else {
        bail!("--name NAME is required (or --file)");
    };
    Ok(TaskTemplate {
        id: add.id,
        body_text: add.body_text,
        run_at: add.run_at,
        delay_ms: add.delay_ms,
        ..add.task.template(name)?
    })
}

/// A flag value spelled as its serde name (`fire_once`).
fn snake_case<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_value(Value::String(text.to_string())).map_err(|e| e.to_string())
}

/// `K=V` pairs; integers and booleans become typed JSON.
fn parse_headers(pairs: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut headers = Map::new();
    for h in pairs {
        let Some((k, v)) = h.split_once('=') else {
            bail!("--header {h:?}: use K=V");
        };
        let value = if let Ok(n) = v.parse::<i64>() {
            Value::from(n)
        } else if let Ok(b) = v.parse::<bool>() {
            Value::from(b)
        } else {
            Value::from(v)
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
    let spec = ScheduleSpec {
        id: None,
        cron: add.cron,
        every_ms: add.every_ms,
        start_at: add.start_at,
        at: add.at,
        timezone: add.tz,
        task: add.template.template(name)?,
        misfire: add.misfire,
        overlap: add.overlap,
        enabled: !add.paused,
        max_run_ms: None,
    };
    serde_json::to_value(spec).context("encoding the schedule")
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
