//! ONNX Runtime sessions (one per worker, CPU or CUDA) that run a batch tensor through the model,
//! on the CPU also a batch-packed rewrite of it (`packing.rs`) for batches that fill its rows.
//!
//! The engine knows tensors and the bundle's output names; nothing of HTTP or image formats.

pub mod batcher;
mod packing;
mod runtime;
mod wire;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use parking_lot::Mutex;

use crate::bundle::Bundle;
pub use runtime::{INSTALL_HINT, resolve_library};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("ONNX Runtime library not found (searched: {0}); {hint}", hint = INSTALL_HINT)]
    LibraryNotFound(String),
    #[error("ONNX Runtime library could not be loaded: {0}; {hint}", hint = INSTALL_HINT)]
    LibraryLoad(String),
    #[error("execution provider {provider} is not available: {reason}")]
    Provider { provider: String, reason: String },
    #[error("cannot load model {path}: {reason}")]
    Session { path: PathBuf, reason: String },
    #[error("model does not match its manifest: {0}")]
    Model(String),
    #[error("inference failed: {0}")]
    Run(String),
    #[error("bad input batch: {0}")]
    Input(String),
}

/// Whether CPU sessions run the model with images packed into the channels of its narrow first
/// layers (see `packing.rs`): the same outputs, less work where ONNX Runtime pads those layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchPacking {
    /// On CPUs with AVX-512, where ONNX Runtime computes convolutions in blocks of 16 channels.
    Auto,
    /// On any CPU (for tests and measurements; it costs time where blocks are 8 channels).
    Always,
    Never,
}

impl FromStr for BatchPacking {
    type Err = String;
    fn from_str(s: &str) -> Result<BatchPacking, String> {
        match s {
            "auto" => Ok(BatchPacking::Auto),
            "always" => Ok(BatchPacking::Always),
            "never" => Ok(BatchPacking::Never),
            _ => Err(format!("invalid batch packing {s:?}: expected auto, always or never")),
        }
    }
}

impl BatchPacking {
    fn applies(self) -> bool {
        match self {
            BatchPacking::Always => true,
            BatchPacking::Never => false,
            BatchPacking::Auto => cpu_blocks_are_16_floats(),
        }
    }
}

/// ONNX Runtime's MLAS picks its 16-channel NCHWc kernels exactly when AVX-512F is usable.
fn cpu_blocks_are_16_floats() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Channels in one block of ONNX Runtime's NCHWc layout with AVX-512: what packing fills.
const PACKING_BLOCK: usize = 16;

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA device ordinal; failing to register it is an error.
    Cuda(i32),
    /// CUDA device 0 if it can be registered, otherwise CPU.
    Auto,
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        let err = || format!("invalid device {s:?}: expected cpu, cuda, cuda:N or auto");
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(err)?;
                n.parse::<i32>().ok().filter(|n| *n >= 0).map(Device::Cuda).ok_or_else(err)
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Auto => f.write_str("auto"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: Device,
    /// Intra-op threads per session.
    pub intra_threads: usize,
    /// Number of sessions (workers that may run concurrently).
    pub workers: usize,
    /// Explicit path to libonnxruntime.so; otherwise searched (see [`resolve_library`]).
    pub ort_lib: Option<PathBuf>,
    /// CPU only; CUDA sessions always run the model as it is.
    pub batch_packing: BatchPacking,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Cpu,
            intra_threads: default_intra_threads(1),
            workers: 1,
            ort_lib: None,
            batch_packing: BatchPacking::Auto,
        }
    }
}

/// Cores divided among the workers, at least one thread each.
pub fn default_intra_threads(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / workers.max(1)).max(1)
}

/// The model's outputs for a batch, row-major. An output the model lacks (see the manifest) has
/// dimension 0 and no values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelOutputs {
    pub n: usize,
    pub embedding_dim: usize,
    pub projection_dim: usize,
    pub num_prototypes: usize,
    pub num_centroids: usize,
    pub embedding: Vec<f32>,
    pub projection: Vec<f32>,
    pub prototype_scores: Vec<f32>,
    pub centroid_scores: Vec<f32>,
}

/// The outputs for one image; empty where the model lacks one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageOutput {
    pub embedding: Vec<f32>,
    pub projection: Vec<f32>,
    pub prototype_scores: Vec<f32>,
    pub centroid_scores: Vec<f32>,
}

impl ModelOutputs {
    pub fn image(&self, i: usize) -> ImageOutput {
        let row = |v: &[f32], d: usize| v[i * d..(i + 1) * d].to_vec();
        ImageOutput {
            embedding: row(&self.embedding, self.embedding_dim),
            projection: row(&self.projection, self.projection_dim),
            prototype_scores: row(&self.prototype_scores, self.num_prototypes),
            centroid_scores: row(&self.centroid_scores, self.num_centroids),
        }
    }

    pub fn into_images(self) -> Vec<ImageOutput> {
        (0..self.n).map(|i| self.image(i)).collect()
    }
}

struct OutputNames {
    embedding: (String, usize),
    projection: Option<(String, usize)>,
    prototype_scores: Option<(String, usize)>,
    centroid_scores: Option<(String, usize)>,
}

impl OutputNames {
    fn present(&self) -> impl Iterator<Item = &(String, usize)> {
        [Some(&self.embedding), self.projection.as_ref(), self.prototype_scores.as_ref(), self.centroid_scores.as_ref()]
            .into_iter()
            .flatten()
    }
}

/// One worker's sessions: the model as it is, and the packed rewrite when it is used.
struct Worker {
    plain: Session,
    packed: Option<Session>,
}

pub struct Engine {
    sessions: Vec<Mutex<Worker>>,
    /// Images per packed row when the workers have packed sessions.
    packing: Option<usize>,
    next: AtomicUsize,
    provider: &'static str,
    input_name: String,
    input_shape: [usize; 3],
    outputs: OutputNames,
}

impl Engine {
    /// Creates `options.workers` sessions for the bundle's model on the requested device.
    pub fn new(bundle: &Bundle, options: &EngineOptions) -> Result<Engine, EngineError> {
        let env = runtime::environment(options.ort_lib.as_deref())?;
        let mut sessions = Vec::new();
        let mut provider = "cpu";
        for _ in 0..options.workers.max(1) {
            let (session, used) = build_session(env, bundle, options)?;
            provider = used;
            sessions.push(Mutex::new(Worker { plain: session, packed: None }));
        }
        let m = &bundle.manifest;
        let mut engine = Engine {
            sessions,
            packing: None,
            next: AtomicUsize::new(0),
            provider,
            input_name: m.input.name.clone(),
            input_shape: [m.input.channels as usize, m.input.height as usize, m.input.width as usize],
            outputs: {
                let spec = |o: &crate::bundle::OutputSpec| (o.name.clone(), o.dim);
                OutputNames {
                    embedding: spec(&m.outputs.embedding),
                    projection: m.outputs.projection.as_ref().map(spec),
                    prototype_scores: m.outputs.prototype_scores.as_ref().map(spec),
                    centroid_scores: m.outputs.centroid_scores.as_ref().map(spec),
                }
            },
        };
        engine.check_signature()?;
        if engine.provider == "cpu" && options.batch_packing.applies() {
            engine.add_packed_sessions(env, bundle, options);
        }
        Ok(engine)
    }

    /// Gives every worker a session of the packed model, if the model has layers to pack and
    /// the packed model gives the same outputs as the original. Any failure leaves the engine
    /// unpacked, with a warning: packing only ever saves time.
    fn add_packed_sessions(&mut self, env: &ort::environment::Environment, bundle: &Bundle, options: &EngineOptions) {
        let model = match std::fs::read(&bundle.model_path) {
            Ok(bytes) => bytes,
            Err(e) => return tracing::warn!(error = %e, "batch packing off: cannot read the model"),
        };
        let packed = match packing::pack(&model, PACKING_BLOCK) {
            Ok(Some(p)) => p,
            Ok(None) => return tracing::debug!("batch packing: no narrow layers to pack"),
            Err(e) => return tracing::warn!(error = %e, "batch packing off: cannot rewrite the model"),
        };
        let mut sessions = Vec::with_capacity(self.sessions.len());
        for _ in 0..self.sessions.len() {
            match session_with(env, bundle, options, None, Some(&packed.model)) {
                Ok(s) => sessions.push(s),
                Err(e) => return tracing::warn!(error = %e, "batch packing off: the packed model does not load"),
            }
        }
        if let Err(reason) = self.check_packed(&mut sessions[0], packed.factor) {
            return tracing::warn!(%reason, "batch packing off: the packed model's outputs differ from the model's");
        }
        for (worker, session) in self.sessions.iter().zip(sessions) {
            worker.lock().packed = Some(session);
        }
        self.packing = Some(packed.factor);
        tracing::info!(
            images_per_row = packed.factor,
            convolutions = packed.convolutions,
            channels = packed.channels,
            "batch packing: batches that are a multiple of images_per_row run packed"
        );
    }

    /// Runs the packed and the original model on the same pseudo-random batch and compares
    /// every output.
    fn check_packed(&self, packed: &mut Session, factor: usize) -> Result<(), String> {
        let n = 2 * factor;
        let mut state = 0x9e37_79b9_u32;
        let batch: Vec<f32> = (0..n * self.tensor_len())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect();
        let want = self.run_session(&mut self.sessions[0].lock().plain, &batch, n).map_err(|e| e.to_string())?;
        let got = self.run_session(packed, &batch, n).map_err(|e| e.to_string())?;
        for (name, a, b) in [
            ("embedding", &want.embedding, &got.embedding),
            ("projection", &want.projection, &got.projection),
            ("prototype_scores", &want.prototype_scores, &got.prototype_scores),
            ("centroid_scores", &want.centroid_scores, &got.centroid_scores),
        ] {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            // A NaN anywhere must fail the check, so no `f32::max`, which drops NaNs.
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, |m, d| if d.is_nan() || d > m { d } else { m });
            if worst.is_nan() || worst > 1e-4 * scale {
                return Err(format!("{name} differs by up to {worst}"));
            }
        }
        Ok(())
    }

    /// Images per packed row, when batches that are a multiple of it run packed.
    pub fn packing_factor(&self) -> Option<usize> {
        self.packing
    }

    /// "cpu" or "cuda": the execution provider the sessions run on.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    pub fn workers(&self) -> usize {
        self.sessions.len()
    }

    /// Floats per image in a batch (C×H×W).
    pub fn tensor_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    fn check_signature(&self) -> Result<(), EngineError> {
        let worker = self.sessions[0].lock();
        let session = &worker.plain;
        let has_input = session.inputs().iter().any(|i| i.name() == self.input_name);
        if !has_input {
            return Err(EngineError::Model(format!("the graph has no input named {:?}", self.input_name)));
        }
        for (name, _) in self.outputs.present() {
            if !session.outputs().iter().any(|o| o.name() == name) {
                return Err(EngineError::Model(format!("the graph has no output named {name:?}")));
            }
        }
        Ok(())
    }

    /// Runs every session once on batches of 1, the packing factor (the packed session) and
    /// `max_batch` so the first request pays no set-up cost, and checks the output shapes against
    /// the manifest.
    pub fn warm_up(&self, max_batch: usize) -> Result<(), EngineError> {
        for worker in &self.sessions {
            for n in [Some(1), self.packing, Some(max_batch.max(1))].into_iter().flatten() {
                let zeros = vec![0.5f32; n * self.tensor_len()];
                self.run_on(&mut worker.lock(), &zeros, n)?;
            }
        }
        Ok(())
    }

    /// Runs a batch of `n` images (`batch` is N×C×H×W, row-major) on a free session.
    pub fn run(&self, batch: &[f32], n: usize) -> Result<ModelOutputs, EngineError> {
        if n == 0 || batch.len() != n * self.tensor_len() {
            return Err(EngineError::Input(format!(
                "expected {n} × {} floats, got {}",
                self.tensor_len(),
                batch.len()
            )));
        }
        let mut guard = self.acquire();
        self.run_on(&mut guard, batch, n)
    }

    /// A free session if there is one, else wait on the next in rotation.
    fn acquire(&self) -> parking_lot::MutexGuard<'_, Worker> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.sessions.len();
        (0..count)
            .find_map(|i| self.sessions[(start + i) % count].try_lock())
            .unwrap_or_else(|| self.sessions[start % count].lock())
    }

    /// The packed session for batches it can take, else the model as it is.
    fn run_on(&self, worker: &mut Worker, batch: &[f32], n: usize) -> Result<ModelOutputs, EngineError> {
        let session = match (&mut worker.packed, self.packing) {
            (Some(packed), Some(factor)) if n.is_multiple_of(factor) => packed,
            _ => &mut worker.plain,
        };
        self.run_session(session, batch, n)
    }

    fn run_session(&self, session: &mut Session, batch: &[f32], n: usize) -> Result<ModelOutputs, EngineError> {
        let [c, h, w] = self.input_shape;
        let run_err = |e: ort::Error| EngineError::Run(e.to_string());
        let input = TensorRef::from_array_view(([n, c, h, w], batch)).map_err(run_err)?;
        let outputs = session
            .run(ort::inputs![self.input_name.as_str() => input])
            .map_err(run_err)?;
        let extract = |output: Option<&(String, usize)>| -> Result<Vec<f32>, EngineError> {
            let Some((name, dim)) = output else {
                return Ok(Vec::new());
            };
            let value = outputs
                .get(name.as_str())
                .ok_or_else(|| EngineError::Model(format!("output {name:?} missing")))?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(run_err)?;
            let expected = [n as i64, *dim as i64];
            if shape.as_ref() != expected {
                return Err(EngineError::Model(format!(
                    "output {name:?} has shape {:?}, manifest says {expected:?}",
                    shape.as_ref()
                )));
            }
            Ok(data.to_vec())
        };
        let dim = |o: &Option<(String, usize)>| o.as_ref().map_or(0, |(_, d)| *d);
        let o = &self.outputs;
        Ok(ModelOutputs {
            n,
            embedding_dim: o.embedding.1,
            projection_dim: dim(&o.projection),
            num_prototypes: dim(&o.prototype_scores),
            num_centroids: dim(&o.centroid_scores),
            embedding: extract(Some(&o.embedding))?,
            projection: extract(o.projection.as_ref())?,
            prototype_scores: extract(o.prototype_scores.as_ref())?,
            centroid_scores: extract(o.centroid_scores.as_ref())?,
        })
    }
}

/// One session on the requested device; returns the provider actually used.
fn build_session(
    env: &ort::environment::Environment,
    bundle: &Bundle,
    options: &EngineOptions,
) -> Result<(Session, &'static str), EngineError> {
    match options.device {
        Device::Cpu => Ok((session_with(env, bundle, options, None, None)?, "cpu")),
        Device::Cuda(id) => Ok((session_with(env, bundle, options, Some(id), None)?, "cuda")),
        Device::Auto => match session_with(env, bundle, options, Some(0), None) {
            Ok(s) => {
                tracing::info!("device auto: using CUDA device 0");
                Ok((s, "cuda"))
            }
            Err(e) => {
                tracing::info!(reason = %e, "device auto: CUDA unavailable, using CPU");
                Ok((session_with(env, bundle, options, None, None)?, "cpu"))
            }
        },
    }
}

fn session_with(
    env: &ort::environment::Environment,
    bundle: &Bundle,
    options: &EngineOptions,
    cuda: Option<i32>,
    rewritten: Option<&[u8]>,
) -> Result<Session, EngineError> {
    let session_err = |reason: String| EngineError::Session {
        path: bundle.model_path.clone(),
        reason,
    };
    let mut builder = Session::builder(env)
        .map_err(|e| session_err(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| session_err(e.to_string()))?
        .with_intra_threads(options.intra_threads.max(1))
        .map_err(|e| session_err(e.to_string()))?
        // Spinning threads would steal the cores that decode images between batches.
        .with_intra_op_spinning(false)
        .map_err(|e| session_err(e.to_string()))?;
    if let Some(id) = cuda {
        let ep = ort::ep::CUDA::default().with_device_id(id).build().error_on_failure();
        builder = builder.with_execution_providers([ep]).map_err(|e| EngineError::Provider {
            provider: format!("cuda:{id}"),
            reason: e.to_string(),
        })?;
    }
    let committed = match rewritten {
        Some(model) => builder.commit_from_memory(model),
        None => builder.commit_from_file(&bundle.model_path),
    };
    committed.map_err(|e| {
        if cuda.is_some() {
            EngineError::Provider {
                provider: format!("cuda:{}", cuda.unwrap_or(0)),
                reason: e.to_string(),
            }
        } else {
            session_err(e.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert_eq!("auto".parse::<Device>(), Ok(Device::Auto));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", ""] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
    }

    #[test]
    fn output_rows_are_split_per_image() {
        let out = ModelOutputs {
            n: 2,
            embedding_dim: 2,
            projection_dim: 1,
            num_prototypes: 3,
            embedding: vec![1.0, 2.0, 3.0, 4.0],
            projection: vec![5.0, 6.0],
            prototype_scores: vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            ..ModelOutputs::default()
        };
        let imgs = out.into_images();
        assert_eq!(imgs[1].embedding, vec![3.0, 4.0]);
        assert_eq!(imgs[1].projection, vec![6.0]);
        assert_eq!(imgs[0].prototype_scores, vec![0.1, 0.2, 0.3]);
        assert!(imgs[0].centroid_scores.is_empty(), "an output the model lacks stays empty");
    }
}
