//! Recall@10 and single-thread queries/s of `swav::index` on given vectors, for the benchmark
//! script (benchmarks/bench_index.py), which runs hnswlib and faiss on the same files. The
//! hnsw_rs crate runs here too, with the same M and ef_construction, as the baseline that
//! swav's own graph replaced.
//!
//! Run: cargo run --release --example index_bench -- BASE.f32 QUERIES.f32 TRUTH.i32 DIM EF[,EF...]
//! Files are raw little-endian arrays: BASE n×DIM, QUERIES q×DIM, TRUTH q×10 (exact neighbours).
//! Prints one JSON object per line.
use std::time::Instant;

use hnsw_rs::prelude::{DistL2, Hnsw};
use swav::index::{Index, IndexOptions, ModelIdentity, NewItem};

fn read_f32(path: &str) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read_i32(path: &str) -> Vec<i32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

/// Times `search` over every query and prints recall@10 against `truth`.
fn report(library: &str, ef: usize, queries: &[f32], dim: usize, truth: &[i32], search: impl Fn(&[f32]) -> Vec<i32>) {
    let q = queries.len() / dim;
    let t = Instant::now();
    let mut hits = 0;
    for (qi, query) in queries.chunks(dim).enumerate() {
        let want = &truth[qi * 10..qi * 10 + 10];
        hits += search(query).iter().filter(|id| want.contains(id)).count();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"library\": \"{library}\", \"ef\": {ef}, \"recall_at_10\": {:.4}, \"queries_per_second\": {:.0}}}",
        hits as f64 / (10 * q) as f64,
        q as f64 / secs
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert!(a.len() == 6, "usage: index_bench BASE.f32 QUERIES.f32 TRUTH.i32 DIM EF[,EF...]");
    let dim: usize = a[4].parse().expect("DIM");
    let efs: Vec<usize> = a[5].split(',').map(|s| s.parse().expect("EF")).collect();
    let (base, queries, truth) = (read_f32(&a[1]), read_f32(&a[2]), read_i32(&a[3]));
    let n = base.len() / dim;
    let opts = IndexOptions::default();

    let dir = tempfile::tempdir().expect("tempdir");
    let identity = ModelIdentity { name: "bench".into(), sha256: "0".repeat(64), dim };
    let index = Index::open_or_create(dir.path(), identity, opts.clone()).expect("open");
    let t = Instant::now();
    for (b, chunk) in base.chunks(dim * 1000).enumerate() {
        let items = chunk
            .chunks(dim)
            .enumerate()
            .map(|(i, v)| NewItem { id: (b * 1000 + i).to_string(), vector: v.to_vec(), cluster: 0, metadata: None, thumbnail: None })
            .collect();
        index.add(items).expect("add");
    }
    let build = t.elapsed().as_secs_f64();
    println!("{{\"library\": \"swav\", \"build_seconds\": {build:.2}, \"n\": {n}}}");
    for &ef in &efs {
        report("swav", ef, &queries, dim, &truth, |q| {
            index.search(q, 10, Some(ef), None).expect("search").iter().map(|h| h.item.id.parse().unwrap_or(-1)).collect()
        });
    }
    drop(index);
    if std::env::var_os("INDEX_BENCH_SWAV_ONLY").is_some() {
        return;
    }

    // The crate swav used before: DistL2 on unit vectors, SIMD on, parallel insert.
    let t = Instant::now();
    let hnsw = Hnsw::<f32, DistL2>::new(opts.m, n, 16, opts.ef_construction, DistL2 {});
    let units: Vec<Vec<f32>> = base.chunks(dim).map(unit).collect();
    let refs: Vec<(&Vec<f32>, usize)> = units.iter().enumerate().map(|(i, v)| (v, i)).collect();
    hnsw.parallel_insert(&refs);
    println!("{{\"library\": \"hnsw_rs\", \"build_seconds\": {:.2}, \"n\": {n}}}", t.elapsed().as_secs_f64());
    for &ef in &efs {
        report("hnsw_rs", ef, &queries, dim, &truth, |q| {
            hnsw.search(&unit(q), 10, ef).iter().map(|x| x.d_id as i32).collect()
        });
    }
}
