//! Recall@10 and single-thread queries/s of `swav::index` on given vectors, for the benchmark
//! script (benchmarks/bench_index.py), which runs hnswlib and faiss on the same files.
//!
//! Run: cargo run --release --example index_bench -- BASE.f32 QUERIES.f32 TRUTH.i32 DIM EF[,EF...]
//! Files are raw little-endian arrays: BASE n×DIM, QUERIES q×DIM, TRUTH q×10 (exact neighbours).
//! Prints one JSON object per line.
use std::time::Instant;

use swav::index::{Index, IndexOptions, ModelIdentity, NewItem};

fn read_f32(path: &str) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read_i32(path: &str) -> Vec<i32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert!(a.len() == 6, "usage: index_bench BASE.f32 QUERIES.f32 TRUTH.i32 DIM EF[,EF...]");
    let dim: usize = a[4].parse().expect("DIM");
    let efs: Vec<usize> = a[5].split(',').map(|s| s.parse().expect("EF")).collect();
    let (base, queries, truth) = (read_f32(&a[1]), read_f32(&a[2]), read_i32(&a[3]));
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = ModelIdentity { name: "bench".into(), sha256: "0".repeat(64), dim };
    let index = Index::open_or_create(dir.path(), identity, IndexOptions::default()).expect("open");
    let t = Instant::now();
    for (b, chunk) in base.chunks(dim * 1000).enumerate() {
        let items = chunk
            .chunks(dim)
            .enumerate()
            .map(|(i, v)| NewItem { id: (b * 1000 + i).to_string(), vector: v.to_vec(), cluster: 0, metadata: None })
            .collect();
        index.add(items).expect("add");
    }
    let build = t.elapsed().as_secs_f64();
    println!("{{\"library\": \"swav (hnsw_rs)\", \"build_seconds\": {build:.2}, \"n\": {}}}", base.len() / dim);
    let q = queries.len() / dim;
    for ef in efs {
        let t = Instant::now();
        let mut hits = 0;
        for (qi, query) in queries.chunks(dim).enumerate() {
            let res = index.search(query, 10, Some(ef), None).expect("search");
            let want = &truth[qi * 10..qi * 10 + 10];
            hits += res.iter().filter(|h| want.contains(&h.id.parse::<i32>().unwrap_or(-1))).count();
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{{\"library\": \"swav (hnsw_rs)\", \"ef\": {ef}, \"recall_at_10\": {:.4}, \"queries_per_second\": {:.0}}}",
            hits as f64 / (10 * q) as f64,
            q as f64 / secs
        );
    }
}
