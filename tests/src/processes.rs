//! Running Kairos: in the test's runtime ([`InProcess`]), or as the real
//! binaries ([`Proc`]) for kill -9 and signal tests, and schedulers whose
//! HTTP API a test drives ([`scheduler_processes`]).

use crate::clients::ScheduleApi;
use crate::namespace::{SchedulerConfig, TestEnv};
use crate::servers::free_addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How often [`Proc::terminate`] checks whether the process exited.
const EXIT_POLL: Duration = Duration::from_millis(20);
/// How long a scheduler process may take until its HTTP API answers.
const API_READY: Duration = Duration::from_secs(20);

/// A scheduler or worker running in this test's runtime.
pub struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl InProcess {
    /// Runs `kairos_scheduler::run` with `config` until [`stop`](Self::stop).
    pub fn scheduler(config: SchedulerConfig) -> Self {
        Self::spawn(move |shutdown| async move {
            kairos_scheduler::run(config, shutdown)
                .await
                .expect("scheduler run");
        })
    }

    /// Runs `worker` until [`stop`](Self::stop).
    pub fn worker(worker: kairos_worker::Worker) -> Self {
        Self::spawn(move |shutdown| async move {
            worker.run(shutdown).await.expect("worker run");
        })
    }

    fn spawn<F, Fut>(f: F) -> Self
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        InProcess {
            stop: Some(tx),
            handle: Some(tokio::spawn(f(shutdown))),
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("service task");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// A `kairos-*` binary built by `cargo build` (the test command builds the
/// workspace's binaries first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Proc {
    /// The process.
    pub child: Child,
}

impl Proc {
    /// Starts binary `name` with `env` added; its output goes to the
    /// test's.
    pub fn spawn(name: &str, env: &[(String, String)]) -> Self {
        let mut cmd = Command::new(binary(name));
        cmd.envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        Proc {
            child: cmd.spawn().expect("spawn kairos binary"),
        }
    }

    /// As [`spawn`](Self::spawn), with the output (the log goes to stdout)
    /// appended to `log` for the test to read.
    pub fn spawn_logged(name: &str, env: &[(String, String)], log: &std::path::Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = file.try_clone().expect("log file");
        let mut cmd = Command::new(binary(name));
        cmd.envs(env.iter().cloned())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        Proc {
            child: cmd.spawn().expect("spawn kairos binary"),
        }
    }

    /// A `kairos-worker` in `env` named `id` (`KAIROS_WORKER_ID`), with
    /// its probes and metrics on a free port (`KAIROS_WORKER_HTTP_ADDR`)
    /// and `extra` settings added last (they win); returns the port too.
    pub fn worker_with_probes(
        env: &crate::TestEnv,
        id: &str,
        extra: &[(&str, &str)],
    ) -> (Self, u16) {
        let port = crate::free_port();
        let mut penv = env.process_env();
        penv.push(("KAIROS_WORKER_ID".into(), id.into()));
        penv.push((
            "KAIROS_WORKER_HTTP_ADDR".into(),
            format!("127.0.0.1:{port}"),
        ));
        for (k, v) in extra {
            penv.push(((*k).into(), (*v).into()));
        }
        (Self::spawn("kairos-worker", &penv), port)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit after SIGTERM"
            );
            std::thread::sleep(EXIT_POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The workspace's top directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Lines of a log file that contain `needle`.
pub fn log_lines(log: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// `n` `kairos-scheduler` processes in the test's namespace, each with its
/// API on its own address; returns once every API answers.
pub async fn scheduler_processes(env: &TestEnv, n: usize) -> (Vec<Proc>, Vec<ScheduleApi>) {
    let mut procs = Vec::new();
    let mut apis = Vec::new();
    for _ in 0..n {
        let addr = free_addr();
        let mut penv = env.process_env();
        penv.push(("KAIROS_HTTP_ADDR".into(), addr.to_string()));
        procs.push(Proc::spawn("kairos-scheduler", &penv));
        apis.push(ScheduleApi::new(addr));
    }
    for api in &apis {
        api.wait_ready(API_READY).await;
    }
    (procs, apis)
}

/// Runs `cmd` to its end and returns its output; panics when it cannot
/// start (`missing` says how to install it) or exits with a failure (the
/// message names `what` and shows its stderr).
pub fn run_ok(cmd: &mut Command, what: &str, missing: &str) -> std::process::Output {
    let out = cmd.output().expect(missing);
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
