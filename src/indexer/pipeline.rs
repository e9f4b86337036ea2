//! The indexing pipeline. Four stages joined by bounded channels, so memory stays flat and
//! every stage works while the others do:
//! reader thread (file bytes) → decode pool (rayon) → inference workers (batches) → index writer.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use super::sources::Source;
use crate::index::{IndexBackend, NewItem};

/// One embedded image: the vector to index and its cluster (the prototype argmax).
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub vector: Vec<f32>,
    pub cluster: u32,
}

/// What the pipeline needs from a model.
pub trait Embedder: Sync {
    /// Floats per preprocessed image.
    fn tensor_len(&self) -> usize;
    /// Decodes and preprocesses one file into its tensor and, where thumbnails are kept, an
    /// encoded thumbnail; the error is the reason shown in `rejected.tsv`.
    fn prepare(&self, bytes: &[u8]) -> Result<Prepared, String>;
    /// Embeds `n` tensors laid end to end.
    fn embed(&self, batch: &[f32], n: usize) -> anyhow::Result<Vec<Embedded>>;
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Images each worker gathers before handing them to the writer (one durable write).
    pub batch_size: usize,
    /// Most images per `Embedder::embed` call: a worker's batch runs in slices of this size.
    pub inference_batch: usize,
    /// Decoding threads.
    pub threads: usize,
    /// Inference threads, each gathering and embedding its own batches (give the embedder at
    /// least as many sessions).
    pub workers: usize,
    pub progress: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub files: usize,
    pub indexed: usize,
    pub already_present: usize,
    pub rejected: Vec<Rejected>,
    pub seconds: f64,
}

/// A preprocessed file: the model's input tensor and an optional encoded thumbnail.
pub type Prepared = (Vec<f32>, Option<Vec<u8>>);

type Decoded = (Source, Result<Prepared, String>);

/// Indexes every source not already in `index`. Bad files are collected, not fatal; model
/// and index failures are.
pub fn build(sources: Vec<Source>, embedder: &dyn Embedder, index: &dyn IndexBackend, opts: &BuildOptions) -> anyhow::Result<BuildReport> {
    let started = Instant::now();
    let files = sources.len();
    let todo = missing(sources, index)?;
    let already_present = files - todo.len();
    let batch_size = opts.batch_size.max(1);
    let sizes = Sizes { batch: batch_size, inference: opts.inference_batch.max(1) };
    let progress = progress_bar(todo.len() as u64, opts.progress);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .thread_name(|i| format!("swav-decode-{i}"))
        .build()?;

    let (raw_tx, raw_rx) = bounded::<(Source, std::io::Result<Vec<u8>>)>(batch_size * 4);
    let (dec_tx, dec_rx) = bounded::<Decoded>(batch_size * 2);
    let (add_tx, add_rx) = bounded::<Vec<NewItem>>(4);

    // One inference worker's failure stops the others, so the build ends instead of running on.
    let failed = AtomicBool::new(false);
    let (indexed, rejected) = std::thread::scope(|scope| {
        scope.spawn(move || {
            for s in todo {
                let bytes = std::fs::read(&s.path);
                if raw_tx.send((s, bytes)).is_err() {
                    return; // a later stage failed
                }
            }
        });
        scope.spawn(move || {
            pool.install(|| {
                // Stops at the first failed send (inference gave up), which in turn stops the reader.
                let _ = raw_rx.into_iter().par_bridge().try_for_each(|(s, bytes)| {
                    let r = bytes.map_err(|e| format!("cannot read: {e}")).and_then(|b| embedder.prepare(&b));
                    dec_tx.send((s, r)).map_err(|_| ())
                });
            })
        });
        let writer = scope.spawn(|| write_batches(index, add_rx, &progress));
        let inferers: Vec<_> = (0..opts.workers.max(1))
            .map(|_| {
                let (rx, tx, progress, failed) = (dec_rx.clone(), add_tx.clone(), &progress, &failed);
                scope.spawn(move || {
                    let result = infer(rx, embedder, sizes, tx, progress, failed);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        // Only the workers may hold the writer's channel open.
        drop((dec_rx, add_tx));
        let inferred: Vec<_> = inferers
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("inference worker panicked")))
            .collect();
        // The writer's error first: when it fails, inference only sees a closed channel.
        let written = writer.join().map_err(|_| anyhow::anyhow!("index writer panicked"))??;
        let mut rejected = Vec::new();
        for worker in inferred {
            rejected.extend(worker??.0);
        }
        anyhow::Ok((written, rejected))
    })?;
    progress.finish_and_clear();
    Ok(BuildReport { files, indexed, already_present, rejected, seconds: started.elapsed().as_secs_f64() })
}

fn progress_bar(len: u64, visible: bool) -> ProgressBar {
    let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} images, {per_sec}, ETA {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

#[derive(Clone, Copy)]
struct Sizes {
    batch: usize,
    inference: usize,
}

/// Gathers decoded tensors into batches, embeds them and hands them to the writer, until the
/// input ends or another worker has `failed`. Returns the rejected files and the number of images
/// embedded.
fn infer(
    rx: Receiver<Decoded>,
    embedder: &dyn Embedder,
    sizes: Sizes,
    tx: Sender<Vec<NewItem>>,
    progress: &ProgressBar,
    failed: &AtomicBool,
) -> anyhow::Result<(Vec<Rejected>, usize)> {
    let len = embedder.tensor_len();
    let mut rejected = Vec::new();
    let batch_size = sizes.batch;
    // Each id with its thumbnail.
    let mut ids: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(batch_size);
    let mut tensors = Vec::with_capacity(batch_size * len);
    let mut embedded = 0;
    let mut flush = |ids: &mut Vec<(String, Option<Vec<u8>>)>, tensors: &mut Vec<f32>| -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(ids.len());
        for start in (0..ids.len()).step_by(sizes.inference) {
            let n = sizes.inference.min(ids.len() - start);
            let embedded = embedder.embed(&tensors[start * len..(start + n) * len], n)?;
            anyhow::ensure!(embedded.len() == n, "model returned {} results for {n} images", embedded.len());
            out.extend(embedded);
        }
        let items = ids
            .drain(..)
            .zip(out)
            .map(|((id, thumbnail), e)| NewItem { id, vector: e.vector, cluster: e.cluster, metadata: None, thumbnail })
            .collect::<Vec<_>>();
        embedded += items.len();
        tensors.clear();
        tx.send(items).map_err(|_| anyhow::anyhow!("index writer stopped"))
    };
    for (source, result) in rx {
        if failed.load(Ordering::Relaxed) {
            // Another worker's error is the build's; this one just stops.
            return Ok((rejected, embedded));
        }
        match result {
            Ok((t, thumbnail)) if t.len() == len => {
                ids.push((source.id, thumbnail));
                tensors.extend_from_slice(&t);
                if ids.len() == batch_size {
                    flush(&mut ids, &mut tensors)?;
                }
            }
            Ok((t, _)) => {
                let reason = format!("preprocessed to {} values, the model takes {len}", t.len());
                rejected.push(Rejected { path: source.path, reason });
                progress.inc(1);
            }
            Err(reason) => {
                rejected.push(Rejected { path: source.path, reason });
                progress.inc(1);
            }
        }
    }
    flush(&mut ids, &mut tensors)?;
    Ok((rejected, embedded))
}

/// Ids asked about per call when looking for what a previous build already indexed.
const PRESENT_CHUNK: usize = 1000;

/// The sources whose ids the index does not hold yet (a rerun resumes where the last one stopped).
fn missing(sources: Vec<Source>, index: &dyn IndexBackend) -> anyhow::Result<Vec<Source>> {
    let mut todo = Vec::with_capacity(sources.len());
    let mut rest = sources.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<Source> = rest.by_ref().take(PRESENT_CHUNK).collect();
        let ids: Vec<String> = chunk.iter().map(|s| s.id.clone()).collect();
        let present = index.present(&ids)?;
        todo.extend(chunk.into_iter().filter(|s| !present.contains(&s.id)));
    }
    Ok(todo)
}

/// Adds batches to the index (each durable when added); returns how many items were written.
/// Batches that queued up while the previous write ran go into one write: one log sync and one
/// parallel graph insert instead of several.
fn write_batches(index: &dyn IndexBackend, rx: Receiver<Vec<NewItem>>, progress: &ProgressBar) -> anyhow::Result<usize> {
    let mut written = 0;
    while let Ok(mut batch) = rx.recv() {
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
        }
        let n = batch.len();
        index.add(batch)?;
        written += n;
        progress.inc(n as u64);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Index, IndexOptions, ModelIdentity};

    /// Files hold a number n; the "model" maps it to a 2-d vector; b"bad" does not decode.
    #[derive(Default)]
    struct Fake {
        /// Every batch fails.
        fail_embed: bool,
        /// Batches holding this number fail.
        fail_on: Option<f32>,
        /// Time each batch takes.
        delay: Duration,
        /// The most images one `embed` call was given.
        largest_call: std::sync::atomic::AtomicUsize,
    }

    impl Embedder for Fake {
        fn tensor_len(&self) -> usize {
            1
        }
        fn prepare(&self, bytes: &[u8]) -> Result<Prepared, String> {
            let n = std::str::from_utf8(bytes).ok().and_then(|s| s.parse::<f32>().ok()).ok_or("not a number")?;
            // Even numbers get a "thumbnail" (their text), odd ones none.
            Ok((vec![n], (n as u32 % 2 == 0).then(|| bytes.to_vec())))
        }
        fn embed(&self, batch: &[f32], n: usize) -> anyhow::Result<Vec<Embedded>> {
            std::thread::sleep(self.delay);
            self.largest_call.fetch_max(n, Ordering::Relaxed);
            let poisoned = self.fail_on.is_some_and(|bad| batch[..n].contains(&bad));
            anyhow::ensure!(!self.fail_embed && !poisoned, "model exploded");
            Ok(batch[..n].iter().map(|&x| Embedded { vector: vec![1.0, x], cluster: x as u32 % 3 }).collect())
        }
    }

    fn setup(n: usize) -> (tempfile::TempDir, Vec<Source>, Index) {
        let dir = tempfile::tempdir().unwrap();
        let mut sources = Vec::new();
        for i in 0..n {
            let path = dir.path().join(format!("{i}.txt"));
            std::fs::write(&path, if i % 10 == 3 { "bad".to_string() } else { i.to_string() }).unwrap();
            sources.push(Source { id: format!("{i}.txt"), path });
        }
        sources.push(Source { id: "gone".into(), path: dir.path().join("gone") });
        let identity = ModelIdentity { name: "fake".into(), sha256: "0".repeat(64), dim: 2 };
        let index = Index::open_or_create(&dir.path().join("index"), identity, IndexOptions::default()).unwrap();
        (dir, sources, index)
    }

    #[test]
    fn indexes_good_files_rejects_bad_ones_and_resumes() {
        let (_dir, sources, index) = setup(50);
        let opts = BuildOptions { batch_size: 8, inference_batch: 8, threads: 2, workers: 2, progress: false };
        let report = build(sources.clone(), &Fake::default(), &index, &opts).unwrap();
        assert_eq!((report.files, report.indexed, report.already_present), (51, 45, 0));
        let mut reasons: Vec<&str> = report.rejected.iter().map(|r| r.reason.as_str()).collect();
        reasons.sort();
        assert_eq!(reasons.len(), 6);
        assert!(reasons[0].starts_with("cannot read") && reasons[1..].iter().all(|r| *r == "not a number"), "{reasons:?}");
        assert_eq!(index.get("7.txt").unwrap().cluster, 1);
        assert_eq!(index.thumbnail("8.txt").as_deref(), Some(&b"8"[..]), "each item keeps its own thumbnail");
        assert!(index.thumbnail("7.txt").is_none());
        let again = build(sources, &Fake::default(), &index, &opts).unwrap();
        assert_eq!((again.indexed, again.already_present, again.rejected.len()), (0, 45, 6));
    }

    #[test]
    fn a_workers_batch_reaches_the_model_in_slices_of_the_inference_batch() {
        let (_dir, sources, index) = setup(100);
        let fake = Fake::default();
        let opts = BuildOptions { batch_size: 20, inference_batch: 3, threads: 2, workers: 1, progress: false };
        let report = build(sources, &fake, &index, &opts).unwrap();
        assert_eq!((report.indexed, index.len()), (90, 90));
        assert_eq!(fake.largest_call.load(Ordering::Relaxed), 3);
        // Each item keeps its own result through the slicing (the fake's cluster is n mod 3).
        assert_eq!(index.get("57.txt").unwrap().cluster, 0);
        assert_eq!(index.get("58.txt").unwrap().cluster, 1);
    }

    #[test]
    fn a_failing_model_stops_the_build_with_its_error() {
        let (_dir, sources, index) = setup(500);
        let opts = BuildOptions { batch_size: 4, inference_batch: 4, threads: 2, workers: 2, progress: false };
        let err = build(sources, &Fake { fail_embed: true, ..Fake::default() }, &index, &opts).unwrap_err();
        assert!(err.to_string().contains("model exploded"), "{err}");
        assert!(index.is_empty());
    }

    #[test]
    fn one_failing_worker_stops_the_others() {
        let (_dir, sources, index) = setup(2000);
        let fake = Fake { fail_on: Some(1.0), delay: Duration::from_millis(1), ..Fake::default() };
        let opts = BuildOptions { batch_size: 4, inference_batch: 4, threads: 2, workers: 2, progress: false };
        let err = build(sources, &fake, &index, &opts).unwrap_err();
        assert!(err.to_string().contains("model exploded"), "{err}");
        // Left to run on, the healthy worker would index all ~1,800 other good files.
        assert!(index.len() < 1000, "the healthy worker ran on: {} items indexed", index.len());
    }
}
