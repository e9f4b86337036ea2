//! Compaction beside the live graph: writes during the rebuild are carried over, a second
//! compaction is refused while one runs, and there is nothing to do without tombstones.

use std::sync::atomic::{AtomicBool, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Index, IndexError, IndexOptions, ModelIdentity, NewItem};

const DIM: usize = 16;

fn open(dir: &std::path::Path) -> Index {
    let identity = ModelIdentity { name: "compact".into(), sha256: "22".repeat(32), dim: DIM };
    let opts = IndexOptions { m: 8, ef_construction: 32, compact_min_tombstones: usize::MAX, ..IndexOptions::default() };
    Index::open_or_create(dir, identity, opts).unwrap()
}

fn item(id: String, rng: &mut StdRng) -> NewItem {
    NewItem { id, vector: (0..DIM).map(|_| rng.random::<f32>() - 0.5).collect(), cluster: 0, metadata: None, thumbnail: None }
}

#[test]
fn compaction_with_nothing_to_compact_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let index = open(dir.path());
    index.add((0..50).map(|i| item(format!("n{i}"), &mut rng)).collect()).unwrap();
    let report = index.compact().unwrap();
    assert_eq!((report.items, report.tombstones_removed), (50, 0));
    let s = index.stats();
    assert_eq!((s.compactions, s.snapshots), (0, 0), "nothing to compact must rebuild and write nothing");
}

#[test]
fn writes_during_a_compaction_are_carried_over_and_a_second_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let index = open(dir.path());
    index.add((0..6000).map(|i| item(format!("c{i}"), &mut rng)).collect()).unwrap();
    for i in 0..600 {
        index.delete(&format!("c{i}")).unwrap();
    }
    let finished = AtomicBool::new(false);
    let (written, deleted, refused) = std::thread::scope(|s| {
        let compaction = s.spawn(|| {
            let r = index.compact();
            finished.store(true, Ordering::Release);
            r
        });
        let mut rng = StdRng::seed_from_u64(3);
        let (mut written, mut deleted, mut refused) = (Vec::new(), Vec::new(), None);
        let mut n = 0;
        while !finished.load(Ordering::Acquire) || n < 20 {
            let id = format!("w{n}");
            index.add(vec![item(id.clone(), &mut rng)]).unwrap();
            written.push(id);
            let victim = format!("c{}", 600 + n);
            assert!(index.delete(&victim).unwrap());
            deleted.push(victim);
            if refused.is_none() && index.stats().compaction.is_some() {
                refused = Some(index.compact());
            }
            n += 1;
        }
        let report = compaction.join().unwrap().unwrap();
        assert!(report.tombstones_removed >= 600);
        (written, deleted, refused)
    });
    match refused {
        Some(Err(IndexError::CompactionRunning { done, total })) => assert!(done <= total),
        Some(Ok(r)) if r.tombstones_removed == 0 => {} // it had already finished
        other => panic!("a second compaction during the first must be refused, got {other:?}"),
    }
    for id in &written {
        let v = index.vector(id).unwrap_or_else(|| panic!("{id}, written during the compaction, was lost"));
        assert_eq!(index.search(&v, 1, Some(64), None).unwrap()[0].item.id, *id);
    }
    for id in &deleted {
        assert!(!index.contains(id), "{id}, deleted during the compaction, came back");
    }
    assert_eq!(index.len(), 6000 - 600 - deleted.len() + written.len());
    index.check_graph().unwrap();
    drop(index);
    let index = open(dir.path());
    assert_eq!(index.len(), 6000 - 600 - deleted.len() + written.len());
    assert!(written.iter().all(|id| index.contains(id)) && deleted.iter().all(|id| !index.contains(id)));
}
