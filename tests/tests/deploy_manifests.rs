//! The deployment files validate (scripts/validate-deploy.sh: the rendered
//! kustomize base and overlays against the Kubernetes and KEDA schemas,
//! and docker-compose.yml), and the validator is seen to validate: copies
//! with a wrong field fail, naming it.

use kairos_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// The first run may install the Python tools into target/py: one run at a
/// time, so two installs never race.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs the script on `k8s_dir` (the default when `None`).
fn validate(k8s_dir: Option<&Path>) -> Output {
    validate_with(k8s_dir, &[])
}

/// As [`validate`], with `env` added.
fn validate_with(k8s_dir: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let root = workspace_root();
    let mut cmd = Command::new(root.join("scripts/validate-deploy.sh"));
    if let Some(dir) = k8s_dir {
        cmd.arg(dir);
    }
    cmd.envs(env.iter().copied());
    cmd.current_dir(&root)
        .output()
        .expect("bash runs scripts/validate-deploy.sh")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A copy of deploy/k8s under target/, removed on drop.
struct Copy {
    dir: PathBuf,
}

impl Copy {
    fn new() -> Self {
        let dir = workspace_root()
            .join("target")
            .join(format!("deploy-test-{}", uuid::Uuid::now_v7().simple()))
            .join("k8s");
        copy_dir(&workspace_root().join("deploy/k8s"), &dir);
        Copy { dir }
    }

    /// Replaces `from` by `to` in the copy's file `rel`; `from` must be there.
    fn edit(&self, rel: &str, from: &str, to: &str) {
        let path = self.dir.join(rel);
        let text = std::fs::read_to_string(&path).expect("read manifest");
        assert!(text.contains(from), "{rel} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write manifest");
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        if let Some(top) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(top);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// kubectl is on the PATH: the script renders with it.
fn has_kubectl() -> bool {
    Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_manifests_and_the_compose_file_validate() {
    let out = validate(None);
    let all = text(&out);
    assert!(out.status.success(), "validation failed:\n{all}");
    let how = if has_kubectl() {
        "rendered "
    } else {
        "as they are"
    };
    for seen in [
        "deploy/k8s/base",
        "deploy/k8s/overlays/two-pools",
        "deploy/k8s/overlays/due-soon",
        "deploy/k8s/overlays/quorum",
    ] {
        assert!(
            all.lines().any(|l| l.contains(how) && l.contains(seen)),
            "{seen} not checked {how}:\n{all}"
        );
    }
    for seen in ["KEDA schemas", "docker-compose.yml valid"] {
        assert!(all.contains(seen), "{seen:?} missing from:\n{all}");
    }
}

#[test]
fn without_kubectl_the_files_are_checked_as_they_are() {
    let unknown = [("KAIROS_KUBECTL", "/nonexistent/kubectl")];
    let out = validate_with(None, &unknown);
    let all = text(&out);
    assert!(out.status.success(), "validation failed:\n{all}");
    assert!(
        all.contains(
            "/nonexistent/kubectl not found: checking the files of deploy/k8s/base as they are"
        ),
        "{all}"
    );
    let copy = Copy::new();
    copy.edit(
        "overlays/two-pools/worker-heavy-scaledobject.yaml",
        "maxReplicaCount: 5",
        "maxReplicaCount: five",
    );
    let out = validate_with(Some(&copy.dir), &unknown);
    let all = text(&out);
    assert!(!out.status.success(), "a broken file passed:\n{all}");
    assert!(
        all.contains("ScaledObject/kairos-worker-heavy: spec.maxReplicaCount: 'five' is not of type 'integer'"),
        "{all}"
    );
}

#[test]
fn a_wrong_field_fails_validation_and_is_named() {
    let copy = Copy::new();
    // KEDA's schema: an integer field given a string.
    copy.edit(
        "base/keda-scaledobject.yaml",
        "minReplicaCount: 1",
        "minReplicaCount: \"x\"",
    );
    // KEDA's schema, strict: a misspelt field the API server would drop.
    copy.edit(
        "overlays/two-pools/worker-heavy-scaledobject.yaml",
        "cooldownPeriod:",
        "cooldownPeriods:",
    );
    // Kubernetes' schema, strict: a misspelt field of a Deployment.
    copy.edit(
        "base/scheduler-deployment.yaml",
        "terminationGracePeriodSeconds:",
        "terminationGracePeriod:",
    );
    let out = validate(Some(&copy.dir));
    let all = text(&out);
    assert!(!out.status.success(), "broken manifests passed:\n{all}");
    for named in [
        "ScaledObject/kairos-worker: spec.minReplicaCount: 'x' is not of type 'integer'",
        "ScaledObject/kairos-worker-heavy: spec: Additional properties are not allowed ('cooldownPeriods'",
        "Deployment/kairos-scheduler: spec.template.spec: Additional properties are not allowed ('terminationGracePeriod'",
    ] {
        assert!(all.contains(named), "{named:?} missing from:\n{all}");
    }
}

#[test]
fn a_quorum_deployment_scaling_on_one_band_fails() {
    // In quorum mode a queue is three band queues: a trigger on the first
    // alone would miss the backlog of the higher bands.
    if !has_kubectl() {
        eprintln!("no kubectl: the render this needs cannot be made");
        return;
    }
    let copy = Copy::new();
    copy.edit(
        "overlays/quorum/kustomization.yaml",
        r"value: '^kairos\.q\.default(\.p4|\.p7)?$'",
        "value: kairos.q.default",
    );
    copy.edit(
        "overlays/quorum/kustomization.yaml",
        "value: \"true\"",
        "value: \"false\"",
    );
    let out = validate(Some(&copy.dir));
    let all = text(&out);
    assert!(!out.status.success(), "a one-band trigger passed:\n{all}");
    assert!(
        all.contains(
            "ScaledObject/kairos-worker: KAIROS_QUEUE_MODE is quorum, so queue 'kairos.q.default' has priority bands"
        ),
        "{all}"
    );
}

#[test]
fn a_second_scaled_object_on_one_workload_fails() {
    // KEDA's webhook refuses it in a cluster; the validator says so first,
    // from the render.
    if !has_kubectl() {
        eprintln!("no kubectl: the render this needs cannot be made");
        return;
    }
    let copy = Copy::new();
    copy.edit(
        "overlays/due-soon/kustomization.yaml",
        "$patch: delete",
        "$patch: merge",
    );
    let out = validate(Some(&copy.dir));
    let all = text(&out);
    assert!(!out.status.success(), "two ScaledObjects passed:\n{all}");
    assert!(
        all.contains("Deployment/kairos-worker is already scaled by ScaledObject/"),
        "{all}"
    );
}

/// `KEY: value` pairs of the base ConfigMap's `data` (quotes taken off).
fn base_settings() -> Vec<(String, String)> {
    let path = workspace_root().join("deploy/k8s/base/configmap.yaml");
    let text = std::fs::read_to_string(&path).expect("read the base ConfigMap");
    text.lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| !l.starts_with(' ') && !l.starts_with('#'))
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.starts_with("KAIROS_") || *k == "RUST_LOG")
        .map(|(k, v)| (k.to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// The scheduler Deployment's `terminationGracePeriodSeconds`.
fn scheduler_grace() -> std::time::Duration {
    let path = workspace_root().join("deploy/k8s/base/scheduler-deployment.yaml");
    let text = std::fs::read_to_string(&path).expect("read the scheduler Deployment");
    let secs = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .and_then(|v| v.parse().ok())
        .expect("terminationGracePeriodSeconds in the scheduler Deployment");
    std::time::Duration::from_secs(secs)
}

/// `GET path` on `port` with `headers`, on the blocking pool: the status.
async fn status_of(port: u16, path: &'static str, token: Option<&'static str>) -> Option<u16> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .ok()?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        raw.split_whitespace().nth(1)?.parse().ok()
    })
    .await
    .ok()?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_with_the_base_settings_is_ready_and_stops_within_its_grace() {
    const TOKEN: &str = "a-token-of-the-secret-file";
    let env = TestEnv::new("deploy-settings").await;
    // The Secret's keys as the Deployment mounts them: files, with the
    // trailing newline `kubectl create secret --from-file` keeps.
    let dir = workspace_root()
        .join("target")
        .join(format!("deploy-secrets-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("secret dir");
    let penv = env.process_env();
    let url = |k: &str| {
        penv.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .expect("test setting")
    };
    for (file, value) in [
        ("amqp-url", url("KAIROS_AMQP_URL")),
        ("redis-url", url("KAIROS_REDIS_URL")),
        ("api-token", TOKEN.to_string()),
    ] {
        std::fs::write(dir.join(file), format!("{value}\n")).expect("secret file");
    }
    let (http, metrics) = (free_port(), free_port());
    let mut settings: Vec<(String, String)> = base_settings()
        .into_iter()
        .filter(|(k, _)| k != "KAIROS_NAMESPACE")
        .collect();
    assert!(settings.len() >= 5, "ConfigMap settings: {settings:?}");
    let file = |name: &str| dir.join(name).display().to_string();
    settings.extend([
        ("KAIROS_NAMESPACE".into(), env.ns.clone()),
        // The Deployment's own settings, on free ports.
        ("KAIROS_HTTP_ADDR".into(), format!("0.0.0.0:{http}")),
        ("KAIROS_METRICS_ADDR".into(), format!("0.0.0.0:{metrics}")),
        ("KAIROS_AMQP_URL_FILE".into(), file("amqp-url")),
        ("KAIROS_REDIS_URL_FILE".into(), file("redis-url")),
        ("KAIROS_API_TOKEN_FILE".into(), file("api-token")),
    ]);
    let mut scheduler = Proc::spawn("kairos-scheduler", &settings);

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while status_of(http, "/readyz", None).await != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the scheduler with the base settings never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status_of(http, "/healthz", None).await, Some(200));
    assert_eq!(status_of(http, "/metrics", None).await, Some(401));
    assert_eq!(status_of(http, "/metrics", Some(TOKEN)).await, Some(200));
    // The metrics port Prometheus scrapes, without the token.
    assert_eq!(status_of(metrics, "/metrics", None).await, Some(200));

    let grace = scheduler_grace();
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || scheduler.terminate(grace))
        .await
        .expect("terminate");
    assert!(status.success(), "scheduler exit: {status:?}");
    eprintln!("scheduler stopped {:?} after SIGTERM", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
