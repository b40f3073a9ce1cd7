//! The harness itself: missing binaries fail loudly with what to run, no process or file
//! outlives a control plane, and its API server restarts keeping state and watches.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use portsentry_tests::{ControlPlane, Options, shared};
use tokio::sync::OnceCell;

/// Process ids and paths of a control plane that must not outlive it.
type Leftovers = (Vec<u32>, Vec<PathBuf>);

fn gone(pids: &[u32], paths: &[PathBuf]) -> bool {
    pids.iter()
        .all(|pid| !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(*pid))
        && paths.iter().all(|p| !p.exists())
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

#[tokio::test]
async fn missing_binaries_fail_with_what_to_run() {
    let empty = tempfile::tempdir().unwrap();
    let options = Options {
        bin_dir: Some(empty.path().to_owned()),
        ..Options::default()
    };
    let err = ControlPlane::start(options).await.unwrap_err().to_string();
    assert!(err.contains("kube-apiserver is missing"), "{err}");
    assert!(
        err.contains("run tests/run (or tests/build-control-plane"),
        "{err}"
    );
}

#[test]
fn a_panicking_test_leaves_no_process_or_file_behind() {
    let seen: Arc<Mutex<Option<Leftovers>>> = Arc::default();
    let record = seen.clone();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let plane = ControlPlane::start(Options::default()).await.unwrap();
            *record.lock().unwrap() = Some((
                plane.process_ids(),
                vec![plane.dir().to_owned(), plane.etcd_data_dir().to_owned()],
            ));
            panic!("a deliberate panic while the control plane runs");
        })
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (pids, paths) = seen.lock().unwrap().take().unwrap();
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver");
    assert!(gone(&pids, &paths), "left behind: {pids:?} {paths:?}");
}

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();
const CHILD: &str = "PORTSENTRY_TESTS_WATCHDOG_CHILD";

/// A shared control plane lives in a `static` and is never dropped: the watchdog must clean
/// up when the process ends. The test runs itself as a child process that exits abruptly.
#[tokio::test]
async fn a_shared_control_plane_is_cleaned_up_when_its_process_exits() {
    if env::var_os(CHILD).is_some() {
        let plane = shared(&SHARED, Options::default()).await.unwrap();
        let pids: Vec<String> = plane.process_ids().iter().map(u32::to_string).collect();
        println!(
            "CHILD {} {} {}",
            pids.join(","),
            plane.dir().display(),
            plane.etcd_data_dir().display()
        );
        std::process::exit(0);
    }
    let output = Command::new(env::current_exe().unwrap())
        .args([
            "--exact",
            "a_shared_control_plane_is_cleaned_up_when_its_process_exits",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "the child did not start a control plane:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let mut fields = line.split(' ');
    let pids: Vec<u32> = fields
        .next()
        .unwrap()
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    let paths: Vec<PathBuf> = fields.map(PathBuf::from).collect();
    assert_eq!(paths.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(&pids, &paths) {
        assert!(
            Instant::now() < deadline,
            "10 s after the child exited, still there: {pids:?} {paths:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 6 restarts the API server under a running operator: state must survive (same etcd)
/// and a watch opened before the restart must resume and see what happens after it.
#[tokio::test]
async fn the_api_server_restarts_with_its_state_and_watches_resume() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::{
        Api, ResourceExt,
        api::PostParams,
        runtime::{WatchStreamExt, watcher},
    };

    let plane = ControlPlane::start(Options::default()).await.unwrap();
    plane.ensure_namespace("restart").await.unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(plane.client().unwrap(), "restart");
    let named = |name: &str| {
        let mut configmap = ConfigMap::default();
        configmap.metadata.name = Some(name.to_owned());
        configmap
    };
    configmaps
        .create(&PostParams::default(), &named("before-restart"))
        .await
        .unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let watch = watcher(configmaps.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(async move {
        let mut watch = std::pin::pin!(watch);
        while let Some(event) = watch.next().await {
            if let Ok(configmap) = event {
                record.lock().unwrap().push(configmap.name_any());
            }
        }
    });

    plane
        .restart_apiserver(Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        configmaps
            .get_opt("before-restart")
            .await
            .unwrap()
            .is_some()
    );
    configmaps
        .create(&PostParams::default(), &named("after-restart"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.lock().unwrap().iter().any(|n| n == "after-restart") {
        assert!(
            Instant::now() < deadline,
            "the watch never resumed; it saw {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
}
