//! `swav index build|stats|search|compact`: the batch indexer and offline index tools.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{ModelArgs, StoreArgs, ThumbnailArgs};
use crate::bundle::Bundle;
use crate::engine::{Device, Engine};
use crate::http::items::cluster_of;
use crate::index::{IndexBackend, IndexLocation, IndexOptions, ModelIdentity};
use crate::indexer::{self, BuildOptions, BuildReport, Embedded, Embedder, Prepared};
use crate::preprocess::Preprocessor;

#[derive(Debug, Args)]
pub struct IndexArgs {
    #[command(subcommand)]
    pub command: IndexCommand,
}

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Embed a folder (or a list) of images into an index; a rerun adds only what is missing.
    Build(BuildArgs),
    /// Print the index's counts, clusters and model as JSON (reads the index, changes nothing).
    Stats(LocationArgs),
    /// Print the nearest indexed items of image files as JSON ({"results": [[...], ...]});
    /// reads the index, changes nothing.
    Search(SearchArgs),
    /// Rebuild the graph without deleted items and write a snapshot (for Milvus: ask it to
    /// compact its segments now).
    Compact(LocationArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image folder (walked recursively; ids are paths relative to it) or a text file listing
    /// image paths, one per line, relative to the file.
    #[arg(long, env = "SWAV_INDEX_INPUT", value_name = "DIR|FILELIST")]
    pub input: PathBuf,
    /// Index directory, or milvus://HOST:PORT/COLLECTION (created if missing).
    #[arg(long, env = "SWAV_INDEX_OUT", value_name = "INDEX")]
    pub out: IndexLocation,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Images each inference worker gathers per durable index write (batches queued behind a
    /// busy writer are merged into one write).
    #[arg(long, env = "SWAV_INDEX_BATCH_SIZE", default_value_t = 128, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Most images per ONNX Runtime call; a worker's batch runs in slices of this size.
    /// Default on CPU: 16, whose activations stay in a core's cache (less CPU per image than
    /// whole batches; BENCHMARKS.md, "What was tried and dropped"). Default on CUDA: the whole batch.
    #[arg(long, env = "SWAV_INDEX_INFERENCE_BATCH", value_parser = at_least_one)]
    pub inference_batch: Option<usize>,
    /// Decoding threads. Default: the number of cores.
    #[arg(long, env = "SWAV_INDEX_THREADS")]
    pub threads: Option<usize>,
    /// Inference workers, each with its own ONNX Runtime session running whole batches.
    /// Default on CPU: the number of cores, so each session runs single-threaded (intra-op
    /// threads default to cores / workers): faster than one session with as many threads, whose
    /// threads wait on each other while decoding and graph inserts take the other cores
    /// (BENCHMARKS.md, "Index"). Default on CUDA: 1.
    #[arg(long, env = "SWAV_INDEX_WORKERS")]
    pub workers: Option<usize>,
    /// Do not draw the progress bar.
    #[arg(long, env = "SWAV_NO_PROGRESS")]
    pub no_progress: bool,
    #[command(flatten)]
    pub thumbnails: ThumbnailArgs,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got '{text}'")),
    }
}

#[derive(Debug, Args)]
pub struct LocationArgs {
    /// Index directory, or milvus://HOST:PORT/COLLECTION.
    #[arg(value_name = "INDEX")]
    pub index: IndexLocation,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Index directory, or milvus://HOST:PORT/COLLECTION.
    #[arg(value_name = "INDEX")]
    pub index: IndexLocation,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Neighbours per image.
    #[arg(long, env = "SWAV_SEARCH_K", default_value_t = 10)]
    pub k: usize,
    /// Search breadth (default: the index's ef_search).
    #[arg(long, env = "SWAV_SEARCH_EF")]
    pub ef: Option<usize>,
    /// Only return items of this cluster.
    #[arg(long, env = "SWAV_SEARCH_CLUSTER")]
    pub cluster: Option<u32>,
    /// Image files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: IndexArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        IndexCommand::Build(a) => build(a),
        IndexCommand::Stats(a) => {
            let index = open_existing(&a, None, true)?;
            print_json(&index.stats().with_context(|| format!("cannot read the stats of {}", a.index))?)
        }
        IndexCommand::Search(a) => search(a),
        IndexCommand::Compact(a) => {
            let report = open_existing(&a, None, false)?.compact().with_context(|| format!("cannot compact {}", a.index))?;
            print_json(&report)
        }
    }
}

/// Opens (or creates) the index for this bundle's model; refuses one made by another model.
pub fn open_for_model(location: &IndexLocation, bundle: &Bundle, store: &StoreArgs) -> anyhow::Result<Arc<dyn IndexBackend>> {
    crate::index::open_or_create(location, identity_of(bundle), IndexOptions::default(), store.options())
        .with_context(|| format!("cannot open index {location}"))
}

fn open_existing(a: &LocationArgs, identity: Option<&ModelIdentity>, read_only: bool) -> anyhow::Result<Arc<dyn IndexBackend>> {
    crate::index::open_existing(&a.index, identity, read_only, IndexOptions::default(), a.store.options())
        .with_context(|| format!("cannot open index {}", a.index))
}

fn identity_of(bundle: &Bundle) -> ModelIdentity {
    let m = &bundle.manifest;
    ModelIdentity { name: m.name.clone(), sha256: m.model_sha256.clone(), dim: m.outputs.embedding.dim }
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(value).context("cannot serialise the result")?);
    Ok(ExitCode::SUCCESS)
}

/// Images per ONNX Runtime call on the CPU when not told: small enough that one call's
/// activations stay in a core's cache.
const CPU_INFERENCE_BATCH: usize = 16;

/// The bundle's preprocessing and engine, as the indexer sees them.
struct ModelEmbedder {
    preprocessor: Preprocessor,
    engine: Engine,
    thumbnails: bool,
}

impl Embedder for ModelEmbedder {
    fn tensor_len(&self) -> usize {
        self.preprocessor.tensor_len()
    }

    fn prepare(&self, bytes: &[u8]) -> Result<Prepared, String> {
        self.preprocessor.prepare_item(bytes, self.thumbnails).map_err(|e| e.to_string())
    }

    fn embed(&self, batch: &[f32], n: usize) -> anyhow::Result<Vec<Embedded>> {
        let outputs = self.engine.run(batch, n)?;
        Ok(outputs.into_images().into_iter().map(|o| Embedded { cluster: cluster_of(&o), vector: o.embedding }).collect())
    }
}

/// The engine for a build: `workers` sessions when given; otherwise one single-threaded session
/// per core on CPU, and one session on a GPU (where more would only split its memory).
fn load_for_build(model: &ModelArgs, workers: Option<usize>, cores: usize) -> anyhow::Result<(Bundle, Engine)> {
    let sessions = match (workers, model.device) {
        (Some(n), _) => n.max(1),
        (None, Device::Cpu) => cores,
        (None, Device::Cuda(_) | Device::Auto) => 1,
    };
    let (bundle, engine, _) = model.load(sessions)?;
    // `auto` that landed on the CPU: the CPU's default applies after all.
    if workers.is_none() && engine.provider() == "cpu" && engine.workers() < cores {
        tracing::info!(workers = cores, "on the CPU: reloading as one single-threaded session per core");
        let (bundle, engine, _) = ModelArgs { device: Device::Cpu, ..model.clone() }.load(cores)?;
        return Ok((bundle, engine));
    }
    Ok((bundle, engine))
}

fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let sources = indexer::list(&args.input)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (bundle, engine) = load_for_build(&args.model, args.workers, cores)?;
    let index = open_for_model(&args.out, &bundle, &args.store)?;
    let workers = engine.workers();
    let inference_batch = args.inference_batch.unwrap_or(if engine.provider() == "cpu" { CPU_INFERENCE_BATCH } else { args.batch_size });
    tracing::info!(workers, batch_size = args.batch_size, inference_batch, "indexing");
    let preprocessor = Preprocessor::new(&bundle.manifest.input, args.model.decode_limits());
    let embedder = ModelEmbedder { preprocessor, engine, thumbnails: args.thumbnails.thumbnails };
    let opts = BuildOptions {
        batch_size: args.batch_size,
        inference_batch,
        threads: args.threads.unwrap_or(cores),
        workers,
        progress: !args.no_progress,
    };
    let report = indexer::build(sources, &embedder, index.as_ref(), &opts)?;
    index.close().with_context(|| format!("cannot close index {}", args.out))?;
    let rejected_path = match &args.out {
        IndexLocation::Dir(dir) => dir.join("rejected.tsv"),
        // No directory of ours: beside where the build ran.
        IndexLocation::Milvus(a) => PathBuf::from(format!("rejected-{}.tsv", a.collection)),
    };
    write_rejected(&rejected_path, &report)?;
    summarise(&report, &rejected_path);
    println!("{}", serde_json::json!({
        "files": report.files,
        "indexed": report.indexed,
        "already_present": report.already_present,
        "rejected": report.rejected.len(),
        "seconds": report.seconds,
        "images_per_second": report.indexed as f64 / report.seconds.max(1e-9),
    }));
    if report.indexed == 0 && report.already_present == 0 {
        eprintln!("error: nothing could be indexed from {}", args.input.display());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn summarise(report: &BuildReport, rejected_path: &Path) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "indexed {} images in {:.1}s ({:.0}/s), {} already present, {} rejected",
        report.indexed,
        report.seconds,
        report.indexed as f64 / report.seconds.max(1e-9),
        report.already_present,
        report.rejected.len()
    );
    if !report.rejected.is_empty() {
        let _ = writeln!(err, "rejected files and reasons: {}", rejected_path.display());
    }
}

/// `path<TAB>reason` per rejected file; tabs and newlines inside a field become spaces.
fn write_rejected(path: &Path, report: &BuildReport) -> anyhow::Result<()> {
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    let mut text = String::from("path\treason\n");
    for r in &report.rejected {
        text.push_str(&format!("{}\t{}\n", clean(&r.path.to_string_lossy()), clean(&r.reason)));
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn search(args: SearchArgs) -> anyhow::Result<ExitCode> {
    let bundle = args.model.load_bundle()?;
    let location = LocationArgs { index: args.index.clone(), store: args.store.clone() };
    let index = open_existing(&location, Some(&identity_of(&bundle)), true)?;
    let (_, outputs) = super::oneshot::infer_files(&args.model, &args.files)?;
    let results = outputs
        .iter()
        .map(|o| index.search(&o.embedding, args.k, args.ef, args.cluster))
        .collect::<Result<Vec<_>, _>>()?;
    print_json(&serde_json::json!({ "results": results }))
}
