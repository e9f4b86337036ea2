//! Mutated files fed to every decoder and to the opener: no panic, and either the same items,
//! a fallback, or a clear error. Checksums are recomputed after mutating, so that the
//! structural checks behind them are what is exercised, not only the CRC.

use std::fs;
use std::path::Path;

use proptest::prelude::*;

use super::codec::ItemRecord;
use super::graph::{Graph, GraphParams};
use super::{Index, IndexOptions, ModelIdentity, NewItem, snapshot, wal};

const DIM: usize = 4;
const PARAMS: GraphParams = GraphParams { m: 4, ef_construction: 16 };

fn vector(i: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|d| ((i * 7 + d * 13) % 11) as f32 - 5.0 + 0.5).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn graph_of(n: usize) -> (Vec<u8>, Vec<f32>) {
    let vectors: Vec<Vec<f32>> = (0..n).map(vector).collect();
    let g = Graph::new(PARAMS, DIM, n);
    let points: Vec<(&[f32], usize)> = vectors.iter().enumerate().map(|(i, v)| (&v[..], i)).collect();
    g.insert(&points);
    (g.encode(), vectors.concat())
}

/// Applies byte flips and an optional cut, then rewrites the trailing CRC-32 over the rest.
fn mutate(bytes: &[u8], flips: &[(prop::sample::Index, u8)], cut: Option<prop::sample::Index>, fix_crc: bool) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if !b.is_empty() {
        for (at, x) in flips {
            let i = at.index(b.len());
            b[i] ^= *x;
        }
    }
    if let Some(c) = cut {
        b.truncate(c.index(b.len() + 1));
    }
    if fix_crc && b.len() >= 4 {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }
    b
}

fn identity() -> ModelIdentity {
    ModelIdentity { name: "fuzz".into(), sha256: "00".repeat(32), dim: DIM }
}

fn opts() -> IndexOptions {
    IndexOptions { m: PARAMS.m, ef_construction: PARAMS.ef_construction, ..IndexOptions::default() }
}

fn ids_of(index: &Index) -> Vec<String> {
    let mut ids: Vec<String> = index.clusters().iter().flat_map(|c| index.cluster_items(c.id, 1000, 0).items).map(|i| i.id).collect();
    ids.sort();
    ids
}

/// An index with a snapshot (items and graph) and a log behind it.
fn sample_index(dir: &Path) -> Vec<String> {
    let index = Index::open_or_create(dir, identity(), opts()).unwrap();
    let items = |r: std::ops::Range<usize>| {
        r.map(|i| NewItem { id: format!("i{i}"), vector: vector(i), cluster: (i % 3) as u32, metadata: Some(super::Metadata::from_value(&serde_json::json!({"i": i}))), thumbnail: (i % 2 == 0).then(|| vec![i as u8; 3]) })
            .collect::<Vec<_>>()
    };
    index.add(items(0..40)).unwrap();
    index.delete("i3").unwrap();
    index.snapshot().unwrap();
    index.add(items(40..50)).unwrap();
    index.delete("i41").unwrap();
    let ids = ids_of(&index);
    drop(index);
    ids
}

fn snapshot_dir(dir: &Path) -> std::path::PathBuf {
    fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with("snapshot-")).unwrap()
}

fn flips() -> impl Strategy<Value = Vec<(prop::sample::Index, u8)>> {
    proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn a_mutated_graph_file_decodes_to_an_error_or_a_searchable_graph(
        flips in flips(), cut in proptest::option::of(any::<prop::sample::Index>()), fix in any::<bool>(),
    ) {
        let (bytes, vectors) = graph_of(60);
        let bad = mutate(&bytes, &flips, cut, fix);
        if let Ok(g) = Graph::decode(&bad, PARAMS, DIM, vectors) {
            for i in 0..60 {
                let hits = g.search(&vector(i), 3, 8, None);
                prop_assert!(hits.iter().all(|(s, _)| *s < 60));
            }
        }
    }

    #[test]
    fn a_mutated_snapshot_file_decodes_to_an_error_or_items(
        flips in flips(), cut in proptest::option::of(any::<prop::sample::Index>()), fix in any::<bool>(),
    ) {
        let mut enc = snapshot::Encoder::new(DIM, 5, 8);
        for i in 0..8 {
            let meta = super::Metadata::from_value(&serde_json::json!({"n": i}));
            enc.push(i % 3 != 0, &format!("s{i}"), i as u32, Some(&meta), &vector(i), Some(&[1, 2, 3]));
        }
        let bad = mutate(&enc.finish(), &flips, cut, fix);
        if let Ok(s) = snapshot::decode(&bad, DIM, Path::new("x")) {
            prop_assert!(s.slots.iter().all(|(_, it): &(bool, ItemRecord)| it.vector.len() == DIM));
        }
    }

    #[test]
    fn a_mutated_log_scans_to_an_error_or_records(
        flips in flips(), cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open_or_create(dir.path(), identity(), opts()).unwrap();
        for i in 0..6 {
            index.add(vec![NewItem { id: format!("l{i}"), vector: vector(i), cluster: 0, metadata: None, thumbnail: None }]).unwrap();
        }
        index.delete("l2").unwrap();
        drop(index);
        let log = fs::read(dir.path().join("wal.log")).unwrap();
        let bad = mutate(&log, &flips, cut, false);
        if let Ok(scan) = wal::scan(&bad, Path::new("x"), DIM) {
            prop_assert!(scan.records.len() <= 7);
            prop_assert!(scan.good_len as usize <= bad.len());
        }
    }
}

proptest! {
    // Whole openings are slower (a directory per case): fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn opening_an_index_with_a_mutated_file_gives_its_items_a_fallback_or_an_error(
        which in 0..3usize, flips in flips(), cut in proptest::option::of(any::<prop::sample::Index>()), fix in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let want = sample_index(dir.path());
        let snap = snapshot_dir(dir.path());
        let (path, crc) = match which {
            0 => (snap.join("graph.bin"), fix),
            1 => (snap.join("items.bin"), fix),
            _ => (dir.path().join("wal.log"), false),
        };
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, mutate(&bytes, &flips, cut, crc)).unwrap();
        match Index::open_or_create(dir.path(), identity(), opts()) {
            Ok(index) => {
                if which == 0 {
                    // graph.bin only saves a rebuild: the items are the same whatever it holds.
                    prop_assert_eq!(ids_of(&index), want.clone());
                }
                for id in ids_of(&index) {
                    let v = index.vector(&id).unwrap();
                    prop_assert!(!index.search(&v, 5, Some(50), None).unwrap().is_empty());
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
