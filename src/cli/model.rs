//! Flags shared by every command that loads a model bundle.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::bundle::Bundle;
use crate::engine::{BatchPacking, Device, Engine, EngineOptions, default_intra_threads};
use crate::preprocess::DecodeLimits;

/// Where the bundled default model lives, relative to the working directory or the source tree.
pub const DEFAULT_MODEL_DIR: &str = "models/fashion-mnist";

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model bundle directory (model.onnx + manifest.json). Default: models/fashion-mnist.
    #[arg(long, env = "SWAV_MODEL", value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Execution device: cpu, cuda, cuda:N, or auto (CUDA if it can be used, else CPU).
    #[arg(long, env = "SWAV_DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: Device,
    /// Path to libonnxruntime.so (also read from ORT_DYLIB_PATH). Default: searched next to the
    /// binary, in ./.ort, /usr/local/lib and /opt/onnxruntime/lib.
    #[arg(long, env = "SWAV_ORT_LIB", value_name = "FILE")]
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per worker. Default: cores / workers.
    #[arg(long, env = "SWAV_INTRA_THREADS")]
    pub intra_threads: Option<usize>,
    /// On the CPU, run batches with images packed into the channels of the model's narrow first
    /// layers: auto (on CPUs with AVX-512, where ONNX Runtime computes convolutions 16 channels at
    /// a time, so a layer of 8 channels wastes half its work unpacked), always, or never. The
    /// outputs are the same (checked when the model loads); batches that are not a multiple of
    /// the packing run unpacked.
    #[arg(long, env = "SWAV_BATCH_PACKING", default_value = "auto", value_parser = parse_batch_packing)]
    pub batch_packing: BatchPacking,
    /// Largest image accepted, in pixels (width × height, read from the header before decoding).
    #[arg(long, env = "SWAV_MAX_PIXELS", default_value_t = DecodeLimits::default().max_pixels)]
    pub max_pixels: u64,
    /// Largest encoded image accepted, in bytes.
    #[arg(long, env = "SWAV_MAX_IMAGE_BYTES", default_value_t = DecodeLimits::default().max_bytes)]
    pub max_image_bytes: usize,
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse()
}

fn parse_batch_packing(s: &str) -> Result<BatchPacking, String> {
    s.parse()
}

impl ModelArgs {
    pub fn bundle_dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &self.model {
            return Ok(dir.clone());
        }
        let candidates = [
            PathBuf::from(DEFAULT_MODEL_DIR),
            Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL_DIR),
        ];
        candidates.iter().find(|p| p.join("manifest.json").is_file()).cloned().with_context(|| {
            format!("no --model given and the default model {DEFAULT_MODEL_DIR} was not found; pass --model DIR or set SWAV_MODEL")
        })
    }

    pub fn load_bundle(&self) -> anyhow::Result<Bundle> {
        let dir = self.bundle_dir()?;
        Bundle::load(&dir).with_context(|| format!("cannot load model bundle {}", dir.display()))
    }

    pub fn engine_options(&self, workers: usize) -> EngineOptions {
        EngineOptions {
            device: self.device,
            intra_threads: self.intra_threads.unwrap_or_else(|| default_intra_threads(workers)),
            workers,
            ort_lib: self.ort_lib.clone(),
            batch_packing: self.batch_packing,
        }
    }

    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_pixels: self.max_pixels,
            max_bytes: self.max_image_bytes,
        }
    }

    /// Loads the bundle and creates the engine, with errors that name the bundle.
    pub fn load(&self, workers: usize) -> anyhow::Result<(Bundle, Engine, EngineOptions)> {
        let bundle = self.load_bundle()?;
        let options = self.engine_options(workers);
        let engine = Engine::new(&bundle, &options)?;
        tracing::info!(
            model = %bundle.manifest.name,
            provider = engine.provider(),
            workers,
            intra_threads = options.intra_threads,
            "model loaded"
        );
        Ok((bundle, engine, options))
    }
}
