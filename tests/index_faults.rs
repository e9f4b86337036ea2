//! The index under injected I/O faults, over HTTP: a failed log write or fsync poisons the
//! index for writes (503 `index_unavailable`, reads still served), a failed snapshot is only
//! retried (the write that triggered it succeeds), and after a restart no acknowledged item
//! is lost and no refused item appears.

mod common;

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{InProcess, ServerConfig, call};
use serde_json::{Value, json};
use swav::index::{FaultPoint, Faults, Index, IndexError, IndexOptions, ModelIdentity};

/// Fails the steps it is told to, until told otherwise.
#[derive(Default)]
struct Injector {
    failing: Mutex<HashSet<FaultPoint>>,
}

impl Injector {
    fn fail(&self, p: FaultPoint) {
        self.failing.lock().unwrap().insert(p);
    }
    fn heal(&self) {
        self.failing.lock().unwrap().clear();
    }
}

impl Faults for Injector {
    fn check(&self, point: FaultPoint) -> io::Result<()> {
        if self.failing.lock().unwrap().contains(&point) {
            return Err(io::Error::other(format!("injected failure at {point:?}")));
        }
        Ok(())
    }
}

fn identity(bundle: &swav::bundle::Bundle) -> ModelIdentity {
    let m = &bundle.manifest;
    ModelIdentity { name: m.name.clone(), sha256: m.model_sha256.clone(), dim: m.outputs.embedding.dim }
}

async fn server(dir: &Path, opts: IndexOptions, faults: Arc<Injector>) -> InProcess {
    let bundle = common::gray_bundle();
    let index = Index::open_with_faults(dir, identity(&bundle), opts, faults).expect("open index");
    let cfg = ServerConfig { index: Some(index), ..ServerConfig::default() };
    common::start_in_process(&bundle, common::engine(&bundle), cfg).await
}

/// Opens the index again once the server has let go of it.
fn reopen(dir: &Path) -> Index {
    let identity = identity(&common::gray_bundle());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Index::open_or_create(dir, identity.clone(), IndexOptions::default()) {
            Ok(i) => return i,
            Err(IndexError::Locked(_)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

async fn add(srv: &InProcess, id: &str, seed: u32) -> (u16, Value) {
    let image = base64::engine::general_purpose::STANDARD.encode(common::gray_png(28, 28, seed));
    let req = reqwest::Client::new().post(format!("{}/v1/items", srv.base)).json(&json!({"items": [{"id": id, "image": image}]}));
    call(req, "/v1/items", "post").await
}

async fn stats(srv: &InProcess) -> Value {
    call(reqwest::Client::new().get(format!("{}/v1/index", srv.base)), "/v1/index", "get").await.1
}

async fn log_failure_poisons_writes_keeps_reads_and_a_restart_recovers(point: FaultPoint) {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Injector::default());
    let srv = server(dir.path(), IndexOptions::default(), faults.clone()).await;
    assert_eq!(add(&srv, "before", 1).await.0, 200);

    faults.fail(point);
    let (status, body) = add(&srv, "refused", 2).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("index_unavailable")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("restart"), "{body}");
    // The disk may be fine again, but nothing written after a failed fsync can be trusted:
    // every write is refused until a restart.
    faults.heal();
    let (status, body) = add(&srv, "after", 3).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("index_unavailable")), "{body}");
    let resp = reqwest::Client::new().delete(format!("{}/v1/items/before", srv.base)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);

    // Reads stay up.
    let (status, _) = call(reqwest::Client::new().get(format!("{}/v1/items/before", srv.base)), "/v1/items/{id}", "get").await;
    assert_eq!(status, 200);
    let req = reqwest::Client::new().post(format!("{}/v1/search?k=5", srv.base)).json(&json!({"id": "before"}));
    assert_eq!(call(req, "/v1/search", "post").await.0, 200);
    let s = stats(&srv).await;
    assert!(s["unavailable"].as_str().is_some_and(|m| m.contains("injected")), "{s}");
    let metrics = reqwest::get(format!("{}/metrics", srv.base)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("swav_index_writable 0"), "the metric must show the index refusing writes");

    drop(srv);
    let index = reopen(dir.path());
    assert!(index.contains("before"), "an acknowledged item was lost");
    assert!(!index.contains("refused") && !index.contains("after"), "a refused item appeared after the restart");
    assert_eq!(index.len(), 1);
    assert!(index.stats().unavailable.is_none(), "a restart recovers");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_log_write_answers_503_and_loses_nothing() {
    log_failure_poisons_writes_keeps_reads_and_a_restart_recovers(FaultPoint::LogWrite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_log_fsync_answers_503_and_the_refused_write_never_appears() {
    log_failure_poisons_writes_keeps_reads_and_a_restart_recovers(FaultPoint::LogSync).await;
}

async fn wait_for(srv: &InProcess, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = stats(srv).await;
        if f(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn snapshot_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("snapshot"))
        .collect();
    v.sort();
    v
}

async fn snapshot_failure_is_retried_and_the_write_succeeds(point: FaultPoint) {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Injector::default());
    // Every write makes a snapshot due.
    let opts = IndexOptions { snapshot_log_bytes: 1, ..IndexOptions::default() };
    let srv = server(dir.path(), opts, faults.clone()).await;
    faults.fail(point);
    for i in 0..3 {
        let (status, body) = add(&srv, &format!("s{i}"), 10 + i).await;
        assert_eq!(status, 200, "a durable write must succeed even when its snapshot fails: {body}");
    }
    let s = wait_for(&srv, "a failed snapshot", |s| s["snapshot_failures"].as_u64() >= Some(1)).await;
    assert_eq!(s["snapshots"], 0, "{s}");
    assert!(snapshot_dirs(dir.path()).is_empty(), "a failed snapshot left files: {:?}", snapshot_dirs(dir.path()));
    let metrics = reqwest::get(format!("{}/metrics", srv.base)).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("swav_index_snapshot_failures_total ") && !l.ends_with(" 0")), "{metrics}");

    // Healed: the retry (after its backoff) succeeds without another write.
    faults.heal();
    let s = wait_for(&srv, "the retried snapshot", |s| s["snapshots"].as_u64() >= Some(1)).await;
    assert_eq!(s["snapshot_seq"], 3, "{s}");
    assert!(s["unavailable"].is_null());
    assert_eq!(add(&srv, "later", 20).await.0, 200);

    drop(srv);
    let index = reopen(dir.path());
    for id in ["s0", "s1", "s2", "later"] {
        assert!(index.contains(id), "{id} lost");
    }
    assert_eq!(index.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_snapshot_write_is_retried_and_costs_no_write() {
    snapshot_failure_is_retried_and_the_write_succeeds(FaultPoint::SnapshotWrite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_snapshot_rename_is_retried_and_costs_no_write() {
    snapshot_failure_is_retried_and_the_write_succeeds(FaultPoint::SnapshotRename).await;
}
