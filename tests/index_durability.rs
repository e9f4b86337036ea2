//! Recovery of `swav::index` from unclean stops and damaged files.
mod index_support;

use std::fs;
use std::path::Path;

use index_support::*;
use swav::index::{Index, IndexError, IndexOptions};

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
