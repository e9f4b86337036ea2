//! Recovery of `swav::index` from unclean stops and damaged files.
mod index_support;

use std::fs;
use std::path::Path;

use index_support::*;
use swav::index::{Index, IndexError, IndexOptions, Metadata, NewItem};

fn log_path(dir: &Path) -> std::path::PathBuf {
    dir.join("wal.log")
}

/// Every `data[i]` for `i` in `range` must find its own item `{prefix}{i}` first.
fn assert_finds_itself(index: &Index, data: &[(Vec<f32>, u32)], range: std::ops::Range<usize>, prefix: &str) {
    for (i, (v, _)) in data.iter().enumerate().take(range.end).skip(range.start) {
        let hits = index.search(v, 1, Some(100), None).unwrap();
        assert_eq!(hits[0].item.id, format!("{prefix}{i}"), "{prefix}{i} is not its own nearest neighbour");
    }
}

#[test]
fn log_is_replayed_after_an_unclean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(400, 4, 0.8, 11);
    {
        let index = open(dir.path());
        for chunk in items(&data, "u").chunks(50) {
            index.add(chunk.to_vec()).unwrap();
        }
        assert!(index.delete("u3").unwrap());
        // Dropped without close(): nothing but the log holds these writes.
    }
    let index = open(dir.path());
    let stats = index.stats();
    assert_eq!((stats.items, stats.last_seq, stats.snapshot_seq), (399, 9, 0));
    assert!(stats.recovered_torn_tail.is_none());
    assert!(!index.contains("u3"));
    assert_finds_itself(&index, &data, 4..400, "u");
}

#[test]
fn snapshot_plus_later_log_records_are_both_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(200, 2, 0.5, 12);
    {
        let index = open(dir.path());
        index.add(items(&data[..100], "s")).unwrap();
        index.snapshot().unwrap();
        assert_eq!(index.stats().log_bytes, 0, "snapshot must empty the log");
        let mut rest = items(&data, "s");
        index.add(rest.split_off(100)).unwrap();
        assert!(index.delete("s0").unwrap());
    }
    let index = open(dir.path());
    assert_eq!(index.len(), 199);
    assert!(!index.contains("s0") && index.contains("s150"));
    assert_finds_itself(&index, &data, 1..200, "s");
}

#[test]
fn a_crash_between_snapshot_and_log_truncation_replays_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(100, 2, 0.5, 13);
    let old_log = {
        let index = open(dir.path());
        index.add(items(&data[..60], "c")).unwrap();
        assert!(index.delete("c1").unwrap());
        let log = fs::read(log_path(dir.path())).unwrap();
        index.snapshot().unwrap();
        log
    };
    // Put back the log the snapshot already covers, as if truncation never happened.
    fs::write(log_path(dir.path()), old_log).unwrap();
    let index = open(dir.path());
    assert_eq!(index.len(), 59);
    assert!(!index.contains("c1"));
    assert_eq!(index.stats().last_seq, 2);
    index.add(items(&data[60..61], "new")).unwrap();
    assert_eq!(index.stats().last_seq, 3, "sequence numbers must continue after the snapshot's");
}

#[test]
fn a_torn_last_record_is_dropped_reported_and_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(90, 3, 0.5, 14);
    let full_len = {
        let index = open(dir.path());
        index.add(items(&data[..30], "a")).unwrap();
        index.add(items(&data[30..60], "b")).unwrap();
        index.stats().log_bytes
    };
    let good_len = {
        let log = fs::read(log_path(dir.path())).unwrap();
        assert_eq!(log.len() as u64, full_len);
        // The second record, written half-way.
        let cut = log.len() - 100;
        fs::write(log_path(dir.path()), &log[..cut]).unwrap();
        // The first record's length: everything before the second one.
        let index = open(dir.path());
        let stats = index.stats();
        let torn = stats.recovered_torn_tail.expect("torn tail must be reported");
        assert!(torn.reason.contains("cut short"), "{}", torn.reason);
        assert_eq!(stats.items, 30);
        assert!(index.contains("a0") && !index.contains("b0"));
        assert_eq!(fs::metadata(log_path(dir.path())).unwrap().len(), torn.offset, "log not cut back");
        // Writing after recovery must land after the good prefix and survive another restart.
        index.add(items(&data[60..], "c")).unwrap();
        torn.offset
    };
    let index = open(dir.path());
    assert!(index.stats().recovered_torn_tail.is_none());
    assert_eq!(index.len(), 60);
    assert!(good_len > 0 && index.contains("c29") && !index.contains("b0"));
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(10, 1, 0.5, 15);
    open(dir.path()).add(items(&data, "g")).unwrap();
    let mut log = fs::read(log_path(dir.path())).unwrap();
    log.extend_from_slice(&[0u8; 7]);
    fs::write(log_path(dir.path()), &log).unwrap();
    let index = open(dir.path());
    assert_eq!(index.len(), 10);
    assert!(index.stats().recovered_torn_tail.unwrap().reason.contains("incomplete record header"));
}

#[test]
fn a_corrupt_record_in_the_middle_refuses_to_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(40, 2, 0.5, 16);
    {
        let index = open(dir.path());
        index.add(items(&data[..20], "x")).unwrap();
        index.add(items(&data[20..], "y")).unwrap();
    }
    let mut log = fs::read(log_path(dir.path())).unwrap();
    log[40] ^= 0x5a; // inside the first record's payload
    fs::write(log_path(dir.path()), &log).unwrap();
    let err = Index::open_or_create(dir.path(), identity(), IndexOptions::default()).err().expect("must refuse");
    let msg = err.to_string();
    assert!(matches!(err, IndexError::Corrupt { .. }), "{msg}");
    assert!(msg.contains("wal.log") && msg.contains("checksum"), "{msg}");
    assert_eq!(fs::read(log_path(dir.path())).unwrap(), log, "a refused open modified the log");
}

#[test]
fn a_garbage_snapshot_refuses_to_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let index = open(dir.path());
        index.add(items(&clustered(20, 2, 0.5, 17), "z")).unwrap();
        index.close().unwrap();
    }
    let snap_dir = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
        .expect("a snapshot directory")
        .path();
    let file = snap_dir.join("items.bin");
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    let err = Index::open_or_create(dir.path(), identity(), IndexOptions::default()).err().expect("must refuse");
    assert!(err.to_string().contains("items.bin") && err.to_string().contains("checksum"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), bytes);
}

#[test]
fn a_half_written_snapshot_directory_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    {
        let index = open(dir.path());
        index.add(items(&clustered(20, 2, 0.5, 18), "h")).unwrap();
    }
    let partial = dir.path().join(".tmp-snapshot-99");
    fs::create_dir(&partial).unwrap();
    fs::write(partial.join("items.bin"), b"half").unwrap();
    let index = open(dir.path());
    assert_eq!(index.len(), 20);
    assert!(!partial.exists(), "partial snapshot left behind");
}

#[test]
fn a_snapshot_with_tombstones_reopens_with_its_stored_graph() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(300, 3, 0.8, 19);
    {
        let index = open(dir.path());
        index.add(items(&data, "t")).unwrap();
        for i in 0..10 {
            assert!(index.delete(&format!("t{i}")).unwrap());
        }
        index.close().unwrap();
    }
    let index = open(dir.path());
    let stats = index.stats();
    assert!(stats.graph_restored, "the snapshot's graph was not used");
    assert_eq!((stats.items, stats.tombstones, stats.log_bytes), (290, 10, 0));
    assert!(!index.contains("t0"));
    assert_finds_itself(&index, &data, 10..300, "t");
    let hits = index.search(&data[0].0, 20, None, None).unwrap();
    assert!(hits.iter().all(|h| h.item.id != "t0"), "tombstone came back after reopening");

    // A damaged graph file costs a rebuild, never data.
    drop(index);
    let snap = fs::read_dir(dir.path()).unwrap().flatten().find(|e| e.file_name().to_string_lossy().starts_with("snapshot-")).unwrap().path();
    let graph_file = snap.join("graph.bin");
    let mut bytes = fs::read(&graph_file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&graph_file, bytes).unwrap();
    let index = open(dir.path());
    assert!(!index.stats().graph_restored);
    assert_eq!(index.len(), 290);
    assert_finds_itself(&index, &data, 10..300, "t");
}

#[test]
fn an_empty_index_snapshots_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).close().unwrap();
    let index = open(dir.path());
    assert!(index.is_empty());
    index.add(items(&clustered(3, 1, 0.5, 20), "e")).unwrap();
    assert_eq!(index.len(), 3);
}

#[test]
fn a_snapshot_without_its_graph_file_gets_it_back_after_one_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(400, 8, 1.0, 21);
    {
        let index = open(dir.path());
        index.add(items(&data, "g")).unwrap();
        index.close().unwrap();
    }
    // As an index written before swav stored graphs this way: items only.
    let snap = fs::read_dir(dir.path()).unwrap().flatten().find(|e| e.file_name().to_string_lossy().starts_with("snapshot-")).unwrap().path();
    fs::remove_file(snap.join("graph.bin")).unwrap();
    let index = open(dir.path());
    assert!(!index.stats().graph_restored, "there was no graph to restore");
    assert_finds_itself(&index, &data, 0..400, "g");
    drop(index);
    assert!(!snap.join("graph.bin.tmp").exists());
    let index = open(dir.path());
    assert!(index.stats().graph_restored, "the rebuilt graph must have been stored for the next start");
    assert_eq!(index.len(), 400);
    assert_finds_itself(&index, &data, 0..400, "g");
}

fn snapshot_dirs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("snapshot-")).collect();
    v.sort();
    v
}

#[test]
fn the_last_two_snapshots_are_kept_and_a_damaged_newest_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(120, 3, 0.8, 22);
    {
        let index = open(dir.path());
        for (n, chunk) in items(&data, "k").chunks(30).enumerate() {
            index.add(chunk.to_vec()).unwrap();
            if n < 3 {
                index.snapshot().unwrap();
            }
        }
        assert!(index.delete("k5").unwrap());
    }
    let snaps = snapshot_dirs(dir.path());
    assert_eq!(snaps.len(), 2, "keep exactly the two newest snapshots: {snaps:?}");
    // The newest one, damaged: the one before it and the log since then hold everything.
    let newest = snaps.last().unwrap().clone();
    let file = newest.join("items.bin");
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    let index = open(dir.path());
    assert_eq!(index.len(), 119);
    assert!(!index.contains("k5") && index.contains("k119"));
    assert_finds_itself(&index, &data, 6..120, "k");
    assert!(!newest.exists(), "the damaged snapshot must be set aside, not used again");
    assert!(fs::read_dir(dir.path()).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with("damaged-snapshot-")));
    index.add(items(&data[..1], "after")).unwrap();
    index.close().unwrap();
    let index = open(dir.path());
    assert_eq!(index.len(), 120);
}

#[test]
fn two_damaged_snapshots_refuse_to_open_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(60, 2, 0.8, 23);
    {
        let index = open(dir.path());
        index.add(items(&data[..30], "z")).unwrap();
        index.snapshot().unwrap();
        index.add(items(&data[30..], "y")).unwrap();
        index.snapshot().unwrap();
    }
    for snap in snapshot_dirs(dir.path()) {
        let file = snap.join("items.bin");
        let mut bytes = fs::read(&file).unwrap();
        bytes[40] ^= 0x10;
        fs::write(&file, &bytes).unwrap();
    }
    let before: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    let err = Index::open_or_create(dir.path(), identity(), IndexOptions::default()).err().expect("must refuse");
    assert!(matches!(err, IndexError::Corrupt { .. }), "{err}");
    let after: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(before, after);
}

/// The items of `tests/fixtures/index_log_v1`, as the code before the log's file header (index
/// format 1) wrote it: `a0..a11` (`clustered(12, 2, 0.5, 21)`), snapshot; `b0..b7` (seed 22),
/// delete `a0`, snapshot; `c0..c5` (seed 23, no thumbnails), `d0..d3` (seed 24), delete `b1`,
/// then dropped without close. Every third item of a batch has metadata `{"n": i, "p": prefix}`
/// and, in batches with thumbnails, every second one the thumbnail `[i; 5 + i]`. So the
/// directory holds two snapshots, a set-aside log segment and a current log, with add records
/// of op 1 and op 3 and deletions.
fn log_v1_batch(n: usize, seed: u64, prefix: &str, thumbnails: bool) -> Vec<NewItem> {
    let mut batch = items(&clustered(n, 2, 0.5, seed), prefix);
    for (i, it) in batch.iter_mut().enumerate() {
        if i % 3 == 0 {
            it.metadata = Some(Metadata::from_value(&serde_json::json!({"n": i, "p": prefix})));
        }
        if thumbnails && i % 2 == 0 {
            it.thumbnail = Some(vec![i as u8; 5 + i]);
        }
    }
    batch
}

fn log_v1_items() -> Vec<NewItem> {
    let mut all = Vec::new();
    for (n, seed, prefix, thumbnails) in [(12, 21, "a", true), (8, 22, "b", true), (6, 23, "c", false), (4, 24, "d", true)] {
        all.extend(log_v1_batch(n, seed, prefix, thumbnails));
    }
    all.retain(|it| it.id != "a0" && it.id != "b1");
    all
}

fn assert_holds(index: &Index, want: &[NewItem]) {
    assert_eq!(index.len(), want.len());
    for it in want {
        let got = index.get(&it.id).unwrap_or_else(|| panic!("{} lost", it.id));
        assert_eq!(got.cluster, it.cluster, "{}", it.id);
        assert_eq!(got.metadata.map(|m| m.to_value()), it.metadata.as_ref().map(|m| m.to_value()), "{}", it.id);
        assert_eq!(index.thumbnail(&it.id).as_deref(), it.thumbnail.as_deref(), "{}", it.id);
        let v = index.vector(&it.id).unwrap();
        let cos: f32 = v.iter().zip(&it.vector).map(|(a, b)| a * b).sum();
        assert!(cos > 0.9999, "{}: {cos}", it.id);
        assert_eq!(index.search(&it.vector, 1, Some(100), None).unwrap()[0].item.id, it.id);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            fs::create_dir_all(&dest).unwrap();
            copy_dir(&p, &dest);
        } else {
            fs::copy(&p, &dest).unwrap();
        }
    }
}

fn log_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
    logs.sort();
    logs
}

/// An index of format 1 (logs without the file header) reads as it is when opened read-only,
/// and is upgraded to format 2 by the first open for writing, keeping every item.
#[test]
fn an_index_with_version_1_logs_opens_and_keeps_every_item() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/index_log_v1");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture, dir.path());
    let want = log_v1_items();
    assert_eq!(want.len(), 28);
    let logs = log_files(dir.path());
    assert_eq!(logs.len(), 2, "a segment and the current log: {logs:?}");
    let before: Vec<Vec<u8>> = logs.iter().map(|p| fs::read(p).unwrap()).collect();
    assert!(before.iter().all(|b| !b.is_empty() && !b.starts_with(b"SWAVWAL1")));
    {
        let index = Index::open_read_only(dir.path(), Some(&identity()), IndexOptions::default()).unwrap();
        assert_holds(&index, &want);
        let after: Vec<Vec<u8>> = logs.iter().map(|p| fs::read(p).unwrap()).collect();
        assert_eq!(after, before, "a read-only open changed a log");
    }
    {
        let index = open(dir.path());
        assert_holds(&index, &want);
        let stats = index.stats();
        assert_eq!((stats.snapshot_seq, stats.last_seq, stats.recovered_torn_tail), (3, 6, None));
        let identity_file: serde_json::Value = serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(identity_file["format"], 2);
        for (path, old) in logs.iter().zip(&before) {
            let new = fs::read(path).unwrap();
            assert!(new.starts_with(b"SWAVWAL1") && new.ends_with(old), "{} not upgraded in place", path.display());
            assert_eq!(new.len(), old.len() + 12);
        }
        index.add(items(&clustered(1, 1, 0.5, 25), "e")).unwrap();
    }
    let index = open(dir.path());
    let mut more = want.clone();
    more.extend(items(&clustered(1, 1, 0.5, 25), "e"));
    assert_holds(&index, &more);
    index.close().unwrap();
    assert_holds(&open(dir.path()), &more);
}
