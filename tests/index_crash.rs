//! A crasher in the style of Qdrant's: a child process writes seeded items and deletes,
//! printing each acknowledged operation, and is SIGKILLed at random moments, round after
//! round. After every kill the index must hold every acknowledged write, nothing that was
//! never attempted, and each id once.
//!
//! The child is this same test binary, re-run with `SWAV_INDEX_CRASHER_DIR` set.
mod index_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use index_support::*;
use rand::{Rng, SeedableRng};
use swav::index::{Index, IndexError, IndexOptions, NewItem};

const TEST_NAME: &str = "sigkill_rounds_lose_no_acknowledged_write";
const DIR_VAR: &str = "SWAV_INDEX_CRASHER_DIR";
const ROUND_VAR: &str = "SWAV_INDEX_CRASHER_ROUND";
const BATCH: usize = 8;
const ROUNDS: u64 = 8;

/// Small thresholds so that kills also land inside snapshots and background compactions.
fn options() -> IndexOptions {
    IndexOptions { snapshot_log_bytes: 16 << 10, compact_min_tombstones: 4, compact_ratio: 0.05, ..IndexOptions::default() }
}

fn vector_of(id: &str) -> Vec<f32> {
    let seed = id.bytes().fold(1469598103934665603u64, |h, b| (h ^ b as u64).wrapping_mul(1099511628211));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    unit((0..DIM).map(|_| rng.random::<f32>() - 0.5).collect())
}

fn id_of(round: u64, batch: usize, j: usize) -> String {
    format!("r{round}-b{batch}-{j}")
}

/// Which item the child deletes right after acknowledging batch `batch`, if any.
fn delete_after(round: u64, batch: usize) -> Option<String> {
    (batch >= 3 && batch % 2 == 1).then(|| id_of(round, batch - 3, batch % BATCH))
}

fn open_retrying(dir: &Path) -> Index {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Index::open_or_create(dir, identity(), options()) {
            Ok(index) => return index,
            // The killed child's lock goes away with its file descriptors, which can take a moment.
            Err(IndexError::Locked(_)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("index failed to reopen after a kill: {e}"),
        }
    }
}

/// Child role: write until killed, acknowledging each durable operation on stdout.
fn run_child(dir: &Path, round: u64) {
    let index = open_retrying(dir);
    let mut out = std::io::stdout().lock();
    for batch in 0..100_000 {
        let items = (0..BATCH)
            .map(|j| {
                let id = id_of(round, batch, j);
                NewItem { vector: vector_of(&id), cluster: (j % 3) as u32, metadata: Some(swav::index::Metadata::from_value(&serde_json::json!({"b": batch}))), id, thumbnail: None }
            })
            .collect();
        index.add(items).expect("child add");
        writeln!(out, "ACK ADD {round} {batch}").unwrap();
        out.flush().unwrap();
        if let Some(victim) = delete_after(round, batch) {
            assert!(index.delete(&victim).expect("child delete"), "child: {victim} should exist");
            writeln!(out, "ACK DEL {victim}").unwrap();
            out.flush().unwrap();
        }
        if batch % 11 == 5 {
            index.snapshot().expect("child snapshot");
        }
    }
}

/// What the parent knows: ids that must be present or absent, and ids that may be either
/// (the operation in flight when the kill came).
#[derive(Default)]
struct Expected {
    present: BTreeSet<String>,
    absent: BTreeSet<String>,
    maybe: BTreeSet<String>,
}

fn run_round(dir: &Path, round: u64, kill_after: Duration, exp: &mut Expected) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
        .env(DIR_VAR, dir)
        .env(ROUND_VAR, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL child");
    let status = child.wait().unwrap();
    let lines = reader.join().unwrap();
    assert!(status.code().is_none(), "child exited by itself ({status}); it must be killed:\n{}", lines.join("\n"));

    let mut last_batch: Option<usize> = None;
    let mut last_deleted: Option<String> = None;
    // The test harness prints "test NAME ... " without a newline, so the first ACK shares its line.
    for line in lines.iter().filter_map(|l| l.find("ACK ").map(|i| &l[i + 4..])) {
        if let Some(rest) = line.strip_prefix("DEL ") {
            exp.present.remove(rest);
            exp.absent.insert(rest.to_string());
            last_deleted = Some(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("ADD ") {
            let batch: usize = rest.split(' ').nth(1).and_then(|b| b.parse().ok()).expect("ADD line");
            exp.present.extend((0..BATCH).map(|j| id_of(round, batch, j)));
            last_batch = Some(batch);
        }
    }
    // In flight: the delete following the last acknowledged add, or else the next add.
    exp.maybe.clear();
    let pending_delete = last_batch.and_then(|b| delete_after(round, b)).filter(|v| last_deleted.as_ref() != Some(v));
    match pending_delete {
        Some(victim) => {
            exp.present.remove(&victim);
            exp.maybe.insert(victim);
        }
        None => exp.maybe.extend((0..BATCH).map(|j| id_of(round, last_batch.map_or(0, |b| b + 1), j))),
    }
}

fn verify(dir: &Path, exp: &mut Expected, round: u64) -> usize {
    let index = open_retrying(dir);
    for id in &exp.present {
        assert!(index.contains(id), "round {round}: acknowledged {id} is missing");
        let hits = index.search(&vector_of(id), 1, Some(128), None).unwrap();
        assert_eq!(&hits[0].item.id, id, "round {round}: {id} does not find itself first");
    }
    for id in &exp.absent {
        assert!(!index.contains(id), "round {round}: acknowledged delete of {id} undone");
    }
    // No phantoms and no duplicates: every stored id is accounted for, exactly once.
    let mut stored: BTreeMap<String, usize> = BTreeMap::new();
    for c in index.clusters() {
        for item in index.cluster_items(c.id, usize::MAX, 0).items {
            *stored.entry(item.id).or_default() += 1;
        }
    }
    assert_eq!(stored.len(), index.len(), "round {round}: cluster lists and item count disagree");
    for (id, n) in &stored {
        assert_eq!(*n, 1, "round {round}: {id} stored {n} times");
        assert!(exp.present.contains(id) || exp.maybe.contains(id), "round {round}: phantom id {id}");
    }
    // An in-flight operation that made it is now as durable as any other.
    for id in std::mem::take(&mut exp.maybe) {
        if stored.contains_key(&id) {
            exp.present.insert(id);
        } else {
            exp.absent.insert(id);
        }
    }
    assert_eq!(index.stats().items, stored.len(), "round {round}: stats disagree with the stored ids");
    index.len()
}

#[test]
fn sigkill_rounds_lose_no_acknowledged_write() {
    if let Some(dir) = std::env::var_os(DIR_VAR) {
        let round = std::env::var(ROUND_VAR).ok().and_then(|r| r.parse().ok()).expect("round number");
        run_child(Path::new(&dir), round);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut exp = Expected::default();
    let mut sizes = Vec::new();
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(rng.random_range(150..900));
        run_round(dir.path(), round, kill_after, &mut exp);
        sizes.push(verify(dir.path(), &mut exp, round));
    }
    eprintln!("index size after each of {ROUNDS} kills: {sizes:?}; {} acknowledged deletes", exp.absent.len());
    assert!(exp.present.len() > 50, "children acknowledged too little to test anything: {sizes:?}");
    assert!(!exp.absent.is_empty(), "no delete was ever acknowledged: {sizes:?}");
}
