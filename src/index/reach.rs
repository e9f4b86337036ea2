//! Search finds every stored item: deletes and re-adds of the same ids, with identical vectors
//! among the tombstones, must not leave a live item that no search reaches (issue 21), and the
//! graph keeps its shape (every live node reachable on level 0, lists within their caps), also
//! with many live copies of one vector,
//! through random inserts, deletes and compaction.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Index, IndexOptions, ModelIdentity, NewItem};

const DIM: usize = 16;

fn identity() -> ModelIdentity {
    ModelIdentity { name: "reach".into(), sha256: "11".repeat(32), dim: DIM }
}

fn open(dir: &Path) -> Index {
    // Small lists fill (and crowd) sooner, which is where reachability was lost.
    let opts = IndexOptions { m: 6, ef_construction: 48, compact_min_tombstones: usize::MAX, ..IndexOptions::default() };
    Index::open_or_create(dir, identity(), opts).unwrap()
}

fn random_unit(rng: &mut StdRng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|_| rng.random::<f32>() - 0.5).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn item(id: &str, v: &[f32]) -> NewItem {
    NewItem { id: id.to_string(), vector: v.to_vec(), cluster: 0, metadata: None, thumbnail: None }
}

/// Every live item is found by a search with its own vector, and the graph is whole.
fn assert_all_findable(index: &Index, when: &str) {
    index.check_graph().unwrap_or_else(|e| panic!("{when}: {e}"));
    let live: Vec<String> = index.inner.state.read().by_id.keys().map(|k| k.to_string()).collect();
    let mut lost = Vec::new();
    for id in &live {
        let v = index.vector(id).unwrap();
        let hits = index.search(&v, 10, Some(64), None).unwrap();
        if !hits.iter().any(|h| &h.item.id == id) {
            lost.push(id.clone());
        }
    }
    assert!(lost.is_empty(), "{when}: {} of {} stored items not found by their own vector: {lost:?}", lost.len(), live.len());
}

fn background(index: &Index, rng: &mut StdRng, n: usize) {
    let items: Vec<NewItem> = (0..n).map(|i| item(&format!("bg{i}"), &random_unit(rng))).collect();
    index.add(items).unwrap();
}

#[test]
fn a_sequential_delete_and_re_add_loop_leaves_every_item_findable() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    let index = open(dir.path());
    background(&index, &mut rng, 300);
    // Five ids, each re-added with its own vector, with one shared by all (a duplicate image),
    // or with a near-duplicate of that one.
    let own: Vec<Vec<f32>> = (0..5).map(|_| random_unit(&mut rng)).collect();
    let shared = random_unit(&mut rng);
    for step in 0..2000 {
        let k = rng.random_range(0..5);
        let id = format!("x{k}");
        if rng.random_bool(0.4) {
            let _ = index.delete(&id).unwrap();
        } else {
            let v = match rng.random_range(0..3) {
                0 => own[k].clone(),
                1 => shared.clone(),
                _ => shared.iter().map(|x| x + 1e-4 * (rng.random::<f32>() - 0.5)).collect(),
            };
            index.add(vec![item(&id, &v)]).unwrap();
        }
        if step % 250 == 249 {
            assert_all_findable(&index, &format!("live, step {step}"));
        }
    }
    assert!(index.stats().tombstones > 1000);
    assert_all_findable(&index, "live, at the end");
    drop(index);
    let index = open(dir.path());
    assert_all_findable(&index, "after a restart");
    index.snapshot().unwrap();
    drop(index);
    let index = open(dir.path());
    assert!(index.stats().graph_restored);
    assert_all_findable(&index, "after a restart from a snapshot with its graph");
}

#[test]
fn concurrent_writers_of_one_image_under_the_same_ids_leave_every_item_findable() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(22);
    let index = open(dir.path());
    background(&index, &mut rng, 200);
    let image = random_unit(&mut rng);
    std::thread::scope(|s| {
        for w in 0..2u64 {
            let (index, image) = (index.clone(), image.clone());
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + w);
                for _ in 0..400 {
                    let id = format!("d{}", rng.random_range(0..5));
                    index.add(vec![item(&id, &image)]).unwrap();
                }
            });
        }
        for d in 0..2u64 {
            let index = index.clone();
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(200 + d);
                for _ in 0..300 {
                    let _ = index.delete(&format!("d{}", rng.random_range(0..5))).unwrap();
                }
            });
        }
    });
    for i in 0..5 {
        index.add(vec![item(&format!("d{i}"), &image)]).unwrap();
    }
    let hits = index.search(&image, 10, Some(64), None).unwrap();
    let found = hits.iter().filter(|h| h.item.id.starts_with('d')).count();
    assert_eq!(found, 5, "all five copies of the image must be found: {hits:?}");
    assert_all_findable(&index, "live");
    drop(index);
    let index = open(dir.path());
    assert_all_findable(&index, "after a restart");
}

#[test]
fn the_graph_keeps_its_shape_through_random_inserts_deletes_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(23);
    let index = open(dir.path());
    for round in 0..20 {
        let items: Vec<NewItem> = (0..60).map(|_| item(&format!("r{}", rng.random_range(0..800)), &random_unit(&mut rng))).collect();
        index.add(items).unwrap();
        for _ in 0..25 {
            let _ = index.delete(&format!("r{}", rng.random_range(0..800))).unwrap();
        }
        if round % 5 == 4 {
            assert_all_findable(&index, &format!("round {round}"));
        }
    }
    assert!(index.stats().tombstones > 0);
    index.compact().unwrap();
    assert_eq!(index.stats().tombstones, 0);
    assert_all_findable(&index, "after compaction");
    drop(index);
    let index = open(dir.path());
    assert_all_findable(&index, "after compaction and a restart");
}

#[test]
fn many_copies_of_one_vector_under_different_ids_are_all_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(24);
    let index = open(dir.path());
    background(&index, &mut rng, 300);
    // Far more copies than a neighbour list holds (2M = 12 here).
    let v = random_unit(&mut rng);
    for i in 0..80 {
        index.add(vec![item(&format!("copy{i}"), &v)]).unwrap();
    }
    index.check_graph().unwrap();
    let hits = index.search(&v, 100, Some(200), None).unwrap();
    assert_eq!(hits.iter().filter(|h| h.item.id.starts_with("copy")).count(), 80, "every copy must be found");
    drop(index);
    let index = open(dir.path());
    index.check_graph().unwrap();
}
