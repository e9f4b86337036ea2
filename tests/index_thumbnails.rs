//! Thumbnails in `swav::index`: stored with their item through the log, snapshots and
//! compaction, gone with it, and absent (not an error) in indexes written before they existed.
mod index_support;

use std::path::Path;

use index_support::*;
use swav::index::{Index, IndexError, MAX_THUMBNAIL_BYTES, NewItem};

fn thumb(i: usize) -> Vec<u8> {
    format!("\u{89}PNG thumbnail of {i}").into_bytes()
}

fn with_thumbnails(data: &[(Vec<f32>, u32)], prefix: &str) -> Vec<NewItem> {
    let mut items = items(data, prefix);
    for (i, it) in items.iter_mut().enumerate() {
        // Every third item has none, so both kinds share a log record and a snapshot.
        it.thumbnail = (i % 3 != 0).then(|| thumb(i));
    }
    items
}

fn assert_thumbnails(index: &Index, n: usize, prefix: &str, deleted: &[usize]) {
    for i in 0..n {
        let got = index.thumbnail(&format!("{prefix}{i}"));
        let want = (i % 3 != 0 && !deleted.contains(&i)).then(|| thumb(i));
        assert_eq!(got.as_deref(), want.as_deref(), "thumbnail of {prefix}{i}");
    }
}

#[test]
fn thumbnails_survive_replay_snapshot_and_compaction_and_go_with_their_item() {
    let dir = tempfile::tempdir().unwrap();
    let data = clustered(60, 3, 0.5, 21);
    {
        let index = open(dir.path());
        index.add(with_thumbnails(&data[..30], "t")).unwrap();
        assert_thumbnails(&index, 30, "t", &[]);
        // Dropped without close: only the log holds them.
    }
    {
        let index = open(dir.path());
        assert_thumbnails(&index, 30, "t", &[]);
        index.snapshot().unwrap();
        assert_eq!(index.stats().log_bytes, 0);
    }
    let index = open(dir.path());
    assert_thumbnails(&index, 30, "t", &[]);
    assert!(index.delete("t1").unwrap());
    assert!(index.thumbnail("t1").is_none(), "a deleted item's thumbnail must go with it");
    // Replacing an item without a thumbnail drops the old one.
    let mut replacement = items(&data[2..3], "x");
    replacement[0].id = "t2".into();
    index.add(replacement).unwrap();
    assert!(index.thumbnail("t2").is_none(), "a replaced item keeps no stale thumbnail");
    let report = index.compact().unwrap();
    assert_eq!(report.tombstones_removed, 2);
    assert_thumbnails(&index, 30, "t", &[1, 2]);
    drop(index);
    let index = open(dir.path());
    assert_eq!(index.stats().log_bytes, 0, "compaction ends in a snapshot");
    assert_thumbnails(&index, 30, "t", &[1, 2]);
    assert!(index.get("t2").is_some() && index.get("t1").is_none());
}

#[test]
fn an_oversized_thumbnail_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let index = open(dir.path());
    let mut batch = items(&clustered(2, 1, 0.1, 3), "b");
    batch[1].thumbnail = Some(vec![0; MAX_THUMBNAIL_BYTES + 1]);
    let err = index.add(batch).unwrap_err();
    assert!(matches!(&err, IndexError::InvalidInput(m) if m.contains("thumbnail")), "{err}");
    assert!(index.is_empty());
    assert_eq!(index.stats().log_bytes, 0);
}

/// `tests/fixtures/index_v1` was written by swav before thumbnails existed (snapshot version 1
/// and add records of op 1): 40 items `old0..old39` from `clustered(40, 2, 0.5, 5)` in the
/// snapshot, then `late0..late9` (`clustered(10, 2, 0.5, 6)`) and the deletion of `old0` in
/// the log.
#[test]
fn an_index_written_before_thumbnails_opens_and_takes_new_ones() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/index_v1");
    let dir = tempfile::tempdir().unwrap();
    for entry in walk(&fixture) {
        let dest = dir.path().join(entry.strip_prefix(&fixture).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dest).unwrap();
    }
    let old = clustered(40, 2, 0.5, 5);
    let late = clustered(10, 2, 0.5, 6);
    {
        let index = open(dir.path());
        assert_eq!(index.len(), 49);
        assert!(!index.contains("old0"));
        for (i, (v, _)) in old.iter().enumerate().skip(1) {
            assert_eq!(index.search(v, 1, Some(100), None).unwrap()[0].item.id, format!("old{i}"));
            assert!(index.thumbnail(&format!("old{i}")).is_none());
        }
        assert_eq!(index.search(&late[3].0, 1, Some(100), None).unwrap()[0].item.id, "late3");
        assert_eq!(index.get("old5").unwrap().metadata.map(|m| m.to_value()), Some(serde_json::json!({"n": 5})));
        index.add(with_thumbnails(&clustered(3, 1, 0.5, 7), "new")).unwrap();
        index.snapshot().unwrap();
    }
    let index = open(dir.path());
    assert_eq!(index.len(), 52);
    assert_thumbnails(&index, 3, "new", &[]);
    assert!(index.thumbnail("old5").is_none());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}
