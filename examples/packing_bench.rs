//! onnxruntime's time per image with and without batch packing (`src/engine/packing.rs`): one
//! single-threaded session each, the same batches of real Fashion-MNIST images, alternating rounds,
//! thread CPU time.
//!
//! Run: cargo run --release --example packing_bench -- [BUNDLE] [BATCH] [ROUNDS]
//! (default models/fashion-mnist, 16, 4; needs `dataset-fashion-mnist`)
use swav::bundle::Bundle;
use swav::engine::{BatchPacking, Engine, EngineOptions};

#[path = "support/fashion.rs"]
mod fashion;

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let bundle_dir = args.next().unwrap_or("models/fashion-mnist".into());
    let batch: usize = args.next().map_or(16, |s| s.parse().expect("BATCH is a number"));
    let rounds: usize = args.next().map_or(4, |s| s.parse().expect("ROUNDS is a number"));
    let bundle = Bundle::load(std::path::Path::new(&bundle_dir)).expect("bundle");
    let engine = |batch_packing| {
        let options = EngineOptions { intra_threads: 1, workers: 1, batch_packing, ..EngineOptions::default() };
        Engine::new(&bundle, &options).expect("engine")
    };
    let (plain, packed) = (engine(BatchPacking::Never), engine(BatchPacking::Always));
    println!("packing factor: {:?}", packed.packing_factor());
    // The test images' pixels in [0, 1] are the default model's input tensors (1×28×28).
    let images: Vec<f32> = fashion::read_idx_images("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
        .into_iter()
        .take(4800)
        .flatten()
        .collect();
    assert_eq!(plain.tensor_len(), 784, "this benchmark feeds 28×28 grayscale images");
    let calls = images.len() / (batch * plain.tensor_len());
    for round in 1..=rounds {
        for (name, e) in [("unpacked", &plain), ("packed", &packed)] {
            let start = thread_cpu_seconds();
            for chunk in images.chunks_exact(batch * e.tensor_len()).take(calls) {
                e.run(chunk, batch).expect("run");
            }
            let per_image = (thread_cpu_seconds() - start) / (calls * batch) as f64 * 1e6;
            println!("round {round} {name:>8}: {per_image:.1} µs per image (batch {batch}, {} images)", calls * batch);
        }
    }
}
