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
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let root = workspace_root();
    let mut cmd = Command::new(root.join("scripts/validate-deploy.sh"));
    if let Some(dir) = k8s_dir {
        cmd.arg(dir);
    }
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

#[test]
fn the_manifests_and_the_compose_file_validate() {
    let out = validate(None);
    let all = text(&out);
    assert!(out.status.success(), "validation failed:\n{all}");
    for seen in [
        "rendered deploy/k8s/base",
        "rendered deploy/k8s/overlays/two-pools",
        "rendered deploy/k8s/overlays/due-soon",
        "KEDA schemas",
        "docker-compose.yml valid",
    ] {
        assert!(all.contains(seen), "{seen:?} missing from:\n{all}");
    }
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
fn a_second_scaled_object_on_one_workload_fails() {
    // KEDA's webhook refuses it in a cluster; the validator says so first.
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
