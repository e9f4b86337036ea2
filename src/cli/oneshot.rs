//! `swav embed FILE…` and `swav assign FILE…`: the server's code path without the server.
//! Same preprocessing, same engine, same response builders, so the JSON equals the server's.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use rayon::prelude::*;

use super::ModelArgs;
use crate::engine::{Engine, ImageOutput};
use crate::http::responses::{self, AssignOptions, OutputKind};
use crate::preprocess::Preprocessor;

/// Images per inference run; the same default as the server's batcher.
const BATCH: usize = 32;

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Which vector to print.
    #[arg(long, env = "SWAV_EMBED_OUTPUT", default_value = "embedding", value_parser = ["embedding", "projection"])]
    pub output: String,
    /// Image files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AssignArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// How many clusters to list per image (default 5, at most the number of prototypes).
    #[arg(long, env = "SWAV_TOP_K")]
    pub top_k: Option<usize>,
    /// Softmax temperature for the probabilities (default 0.1).
    #[arg(long, env = "SWAV_TEMPERATURE")]
    pub temperature: Option<f64>,
    /// Image files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

pub fn embed(args: EmbedArgs) -> anyhow::Result<ExitCode> {
    let kind = OutputKind::parse(Some(&args.output)).map_err(anyhow::Error::msg)?;
    if kind == OutputKind::Projection && args.model.load_bundle()?.manifest.outputs.projection.is_none() {
        anyhow::bail!("this model has no projection head (a backbone-only import); use --output embedding");
    }
    let (bundle, outputs) = infer_files(&args.model, &args.files)?;
    print_json(&responses::embed_response(&bundle.manifest, kind, &outputs))
}

pub fn assign(args: AssignArgs) -> anyhow::Result<ExitCode> {
    let bundle = args.model.load_bundle()?;
    if bundle.manifest.prototypes().is_none() {
        anyhow::bail!("this model has no prototypes (a backbone-only import), so images cannot be assigned to them");
    }
    let options = AssignOptions::new(args.top_k, args.temperature, bundle.manifest.num_prototypes)
        .map_err(anyhow::Error::msg)?;
    let (bundle, outputs) = infer_files(&args.model, &args.files)?;
    print_json(&responses::assign_response(&bundle.manifest, options, &outputs))
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string(value).context("cannot serialise the result")?);
    Ok(ExitCode::SUCCESS)
}

pub(super) fn infer_files(model: &ModelArgs, files: &[PathBuf]) -> anyhow::Result<(crate::bundle::Bundle, Vec<ImageOutput>)> {
    let (bundle, engine, _) = model.load(1)?;
    let preprocessor = Preprocessor::new(&bundle.manifest.input, model.decode_limits());
    let tensors = prepare_files(&preprocessor, files)?;
    let outputs = run_batches(&engine, &tensors)?;
    Ok((bundle, outputs))
}

/// Decodes every file in parallel; fails listing every bad file with its reason.
fn prepare_files(preprocessor: &Preprocessor, files: &[PathBuf]) -> anyhow::Result<Vec<Vec<f32>>> {
    let results: Vec<Result<Vec<f32>, String>> = files.par_iter().map(|f| prepare_file(preprocessor, f)).collect();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if !errors.is_empty() {
        let joined: Vec<&str> = errors.iter().map(|e| e.as_str()).collect();
        anyhow::bail!("{} of {} files could not be used:\n  {}", errors.len(), files.len(), joined.join("\n  "));
    }
    Ok(results.into_iter().filter_map(Result::ok).collect())
}

fn prepare_file(preprocessor: &Preprocessor, path: &Path) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    preprocessor.prepare(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn run_batches(engine: &Engine, tensors: &[Vec<f32>]) -> anyhow::Result<Vec<ImageOutput>> {
    let mut outputs = Vec::with_capacity(tensors.len());
    for chunk in tensors.chunks(BATCH) {
        let batch: Vec<f32> = chunk.iter().flatten().copied().collect();
        outputs.extend(engine.run(&batch, chunk.len())?.into_images());
    }
    Ok(outputs)
}
