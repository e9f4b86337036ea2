//! Compares hnsw_rs distance kernels on unit vectors: build time, recall@10 against exact
//! search, and single-thread queries/s for a few `ef` values.
//!
//! Data: Fashion-MNIST pixels, projected to 128-d by a fixed random Gaussian matrix and
//! L2-normalised (a stand-in for model embeddings with real cluster structure).
//!
//! Run: cargo run --example index_distance_bench -- [/usr/share/datasets/fashion-mnist] [queries]
use std::time::Instant;

use hnsw_rs::prelude::*;

#[path = "support/fashion.rs"]
mod fashion;
use fashion::fashion_vectors;


/// CPU seconds of this thread or process: the machine is shared, so wall time is noise.
fn cpu_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
const K: usize = 10;

fn exact(base: &[Vec<f32>], q: &[f32]) -> Vec<usize> {
    let mut s: Vec<(usize, f32)> = base.iter().enumerate().map(|(i, b)| (i, b.iter().zip(q).map(|(x, y)| x * y).sum())).collect();
    s.select_nth_unstable_by(K, |a, b| b.1.total_cmp(&a.1));
    s.truncate(K);
    s.into_iter().map(|x| x.0).collect()
}

fn run<D: Distance<f32> + Default + Send + Sync>(name: &str, d: D, base: &[Vec<f32>], queries: &[Vec<f32>], truth: &[Vec<usize>]) {
    let t = Instant::now();
    let c = cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID);
    let h: Hnsw<f32, D> = Hnsw::new(16, base.len(), 16, 200, d);
    let data: Vec<(&[f32], usize)> = base.iter().enumerate().map(|(i, v)| (&v[..], i)).collect();
    h.parallel_insert_slice(&data);
    let build = t.elapsed().as_secs_f64();
    let build_cpu = cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID) - c;
    let tmp = std::env::temp_dir().join(format!("swav-dump-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let t = Instant::now();
    h.file_dump(&tmp, "g").expect("dump");
    let dump = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let io = HnswIo::new(&tmp, "g");
    let reloaded: Hnsw<f32, D> = io.load_hnsw_with_dist(D::default()).expect("reload");
    println!("{name:>10} dump {dump:.2}s, reload {:.2}s ({} points)", t.elapsed().as_secs_f64(), reloaded.get_nb_point());
    drop(reloaded);
    std::fs::remove_dir_all(&tmp).ok();
    for ef in [16, 32, 64, 128] {
        for filtered in [false, true] {
            let pass = |_: &usize| true;
            let filter: Option<&dyn FilterT> = if filtered { Some(&pass) } else { None };
            let t = cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID);
            let mut hits = 0usize;
            for (q, tr) in queries.iter().zip(truth) {
                let res = h.search_filter(q, K, ef, filter);
                hits += res.iter().filter(|n| tr.contains(&n.d_id)).count();
            }
            let secs = cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID) - t;
            println!(
                "{name:>10} build {build:6.2}s wall {build_cpu:6.2}s cpu | ef {ef:>3} filter {filtered:5} recall@10 {:.4} queries/cpu-s {:8.0}",
                hits as f64 / (K * queries.len()) as f64,
                queries.len() as f64 / secs
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).cloned().unwrap_or("/usr/share/datasets/fashion-mnist".into());
    let nq: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let (base, queries) = fashion_vectors(&dir);
    let queries = &queries[..nq];
    let t = Instant::now();
    let truth: Vec<Vec<usize>> = queries.iter().map(|q| exact(&base, q)).collect();
    println!("{} base, {} queries, exact search {:.2}s", base.len(), queries.len(), t.elapsed().as_secs_f64());
    run("DistL2", DistL2 {}, &base, queries, &truth);
    run("DistDot", DistDot {}, &base, queries, &truth);
    run("DistCosine", DistCosine {}, &base, queries, &truth);
}
