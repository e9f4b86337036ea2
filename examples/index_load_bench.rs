//! Time to reopen a 60k x 128-d index: from its snapshot's stored graph, and by rebuilding
//! the graph (what happens when the stored graph is missing or damaged).
//!
//! Run: cargo run --example index_load_bench -- [/usr/share/datasets/fashion-mnist]
use std::time::Instant;

use swav::index::{Index, IndexOptions, ModelIdentity, NewItem};

#[path = "support/fashion.rs"]
mod fashion;
use fashion::{DIM, fashion_vectors};

fn open(dir: &std::path::Path) -> Index {
    let id = ModelIdentity { name: "bench".into(), sha256: "0".repeat(64), dim: DIM };
    Index::open_or_create(dir, id, IndexOptions::default()).expect("open")
}

fn main() {
    let data = std::env::args().nth(1).unwrap_or("/usr/share/datasets/fashion-mnist".into());
    let (base, _) = fashion_vectors(&data);
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let index = open(dir.path());
    for (b, chunk) in base.chunks(1000).enumerate() {
        let items = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| NewItem { id: format!("{}", b * 1000 + i), vector: v.clone(), cluster: 0, metadata: None, thumbnail: None })
            .collect();
        index.add(items).expect("add");
    }
    println!("add 60k in batches of 1000: {:.2}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    index.snapshot().expect("snapshot");
    println!("snapshot: {:.2}s", t.elapsed().as_secs_f64());
    drop(index);
    let t = Instant::now();
    let index = open(dir.path());
    println!("reopen with stored graph: {:.2}s (restored: {})", t.elapsed().as_secs_f64(), index.stats().graph_restored);
    drop(index);
    for e in std::fs::read_dir(dir.path()).expect("ls").flatten() {
        let g = e.path().join("graph.bin");
        if g.exists() {
            std::fs::remove_file(g).expect("rm");
        }
    }
    let t = Instant::now();
    let index = open(dir.path());
    println!("reopen rebuilding the graph: {:.2}s (restored: {})", t.elapsed().as_secs_f64(), index.stats().graph_restored);
    let size: u64 = walk(dir.path());
    println!("index directory: {:.1} MiB", size as f64 / (1 << 20) as f64);
}

fn walk(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p).map_or(0, |rd| {
        rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) }).sum()
    })
}
