//! Schedulers and workers run inside the bench's runtime (as the library
//! lets any program embed them), and the real binaries for the idle-cost
//! workload.

use anyhow::{Context, Result};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A scheduler or worker running in this process until [`stop`](Self::stop).
pub(crate) struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<()>,
}

impl InProcess {
    pub(crate) fn scheduler(config: kairos_scheduler::Config) -> Self {
        Self::spawn(move |shutdown| async move {
            if let Err(err) = kairos_scheduler::run(config, shutdown).await {
                tracing::error!(cause = %err, "bench scheduler failed");
            }
        })
    }

    pub(crate) fn worker(worker: kairos_worker::Worker) -> Self {
        Self::spawn(move |shutdown| async move {
            if let Err(err) = worker.run(shutdown).await {
                tracing::error!(cause = %err, "bench worker failed");
            }
        })
    }

    fn spawn<F, Fut>(f: F) -> Self
    where
        F: FnOnce(Shutdown) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        InProcess {
            stop: Some(tx),
            handle: tokio::spawn(f(shutdown)),
        }
    }

    /// Signals shutdown and waits (at most 30 s) for `run` to return.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(30), &mut self.handle)
            .await
            .is_err()
        {
            self.handle.abort();
        }
    }
}

/// A `kairos-*` binary next to this one (same cargo profile), killed when
/// dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Proc {
    pub(crate) fn spawn(name: &str, env: &[(&str, String)]) -> Result<Self> {
        let path = sibling_binary(name)?;
        let child = Command::new(&path)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        Ok(Proc { child })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub(crate) async fn terminate(mut self, grace: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the bench binary has no directory")?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the binaries with the same profile first (`cargo build --release --bins`)",
        path.display()
    );
    Ok(path)
}
