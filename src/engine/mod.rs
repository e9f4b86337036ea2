//! ONNX Runtime sessions (one per worker, CPU or CUDA) that run a batch tensor through the model.
//!
//! The engine knows tensors and the bundle's output names; nothing of HTTP or image formats.

pub mod batcher;
mod runtime;

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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Cpu,
            intra_threads: default_intra_threads(1),
            workers: 1,
            ort_lib: None,
        }
    }
}

/// Cores divided among the workers, at least one thread each.
pub fn default_intra_threads(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / workers.max(1)).max(1)
}

/// All three outputs for a batch, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOutputs {
    pub n: usize,
    pub embedding_dim: usize,
    pub projection_dim: usize,
    pub num_prototypes: usize,
    pub embedding: Vec<f32>,
    pub projection: Vec<f32>,
    pub prototype_scores: Vec<f32>,
}

/// The three outputs for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOutput {
    pub embedding: Vec<f32>,
    pub projection: Vec<f32>,
    pub prototype_scores: Vec<f32>,
}

impl ModelOutputs {
    pub fn image(&self, i: usize) -> ImageOutput {
        let row = |v: &[f32], d: usize| v[i * d..(i + 1) * d].to_vec();
        ImageOutput {
            embedding: row(&self.embedding, self.embedding_dim),
            projection: row(&self.projection, self.projection_dim),
            prototype_scores: row(&self.prototype_scores, self.num_prototypes),
        }
    }

    pub fn into_images(self) -> Vec<ImageOutput> {
        (0..self.n).map(|i| self.image(i)).collect()
    }
}

struct OutputNames {
    embedding: (String, usize),
    projection: (String, usize),
    prototype_scores: (String, usize),
}

pub struct Engine {
    sessions: Vec<Mutex<Session>>,
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
            sessions.push(Mutex::new(session));
        }
        let m = &bundle.manifest;
        let engine = Engine {
            sessions,
            next: AtomicUsize::new(0),
            provider,
            input_name: m.input.name.clone(),
            input_shape: [m.input.channels as usize, m.input.height as usize, m.input.width as usize],
            outputs: OutputNames {
                embedding: (m.outputs.embedding.name.clone(), m.outputs.embedding.dim),
                projection: (m.outputs.projection.name.clone(), m.outputs.projection.dim),
                prototype_scores: (m.outputs.prototype_scores.name.clone(), m.outputs.prototype_scores.dim),
            },
        };
        engine.check_signature()?;
        Ok(engine)
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
        let session = self.sessions[0].lock();
        let has_input = session.inputs().iter().any(|i| i.name() == self.input_name);
        if !has_input {
            return Err(EngineError::Model(format!("the graph has no input named {:?}", self.input_name)));
        }
        for (name, _) in [&self.outputs.embedding, &self.outputs.projection, &self.outputs.prototype_scores] {
            if !session.outputs().iter().any(|o| o.name() == name) {
                return Err(EngineError::Model(format!("the graph has no output named {name:?}")));
            }
        }
        Ok(())
    }

    /// Runs every session once on batches of 1 and `max_batch` so the first request pays no set-up cost,
    /// and checks the output shapes against the manifest.
    pub fn warm_up(&self, max_batch: usize) -> Result<(), EngineError> {
        for session in &self.sessions {
            for n in [1, max_batch.max(1)] {
                let zeros = vec![0.5f32; n * self.tensor_len()];
                self.run_on(&mut session.lock(), &zeros, n)?;
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
    fn acquire(&self) -> parking_lot::MutexGuard<'_, Session> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.sessions.len();
        (0..count)
            .find_map(|i| self.sessions[(start + i) % count].try_lock())
            .unwrap_or_else(|| self.sessions[start % count].lock())
    }

    fn run_on(&self, session: &mut Session, batch: &[f32], n: usize) -> Result<ModelOutputs, EngineError> {
        let [c, h, w] = self.input_shape;
        let run_err = |e: ort::Error| EngineError::Run(e.to_string());
        let input = TensorRef::from_array_view(([n, c, h, w], batch)).map_err(run_err)?;
        let outputs = session
            .run(ort::inputs![self.input_name.as_str() => input])
            .map_err(run_err)?;
        let extract = |(name, dim): &(String, usize)| -> Result<Vec<f32>, EngineError> {
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
        Ok(ModelOutputs {
            n,
            embedding_dim: self.outputs.embedding.1,
            projection_dim: self.outputs.projection.1,
            num_prototypes: self.outputs.prototype_scores.1,
            embedding: extract(&self.outputs.embedding)?,
            projection: extract(&self.outputs.projection)?,
            prototype_scores: extract(&self.outputs.prototype_scores)?,
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
        Device::Cpu => Ok((session_with(env, bundle, options, None)?, "cpu")),
        Device::Cuda(id) => Ok((session_with(env, bundle, options, Some(id))?, "cuda")),
        Device::Auto => match session_with(env, bundle, options, Some(0)) {
            Ok(s) => {
                tracing::info!("device auto: using CUDA device 0");
                Ok((s, "cuda"))
            }
            Err(e) => {
                tracing::info!(reason = %e, "device auto: CUDA unavailable, using CPU");
                Ok((session_with(env, bundle, options, None)?, "cpu"))
            }
        },
    }
}

fn session_with(
    env: &ort::environment::Environment,
    bundle: &Bundle,
    options: &EngineOptions,
    cuda: Option<i32>,
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
    builder.commit_from_file(&bundle.model_path).map_err(|e| {
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
        };
        let imgs = out.into_images();
        assert_eq!(imgs[1].embedding, vec![3.0, 4.0]);
        assert_eq!(imgs[1].projection, vec![6.0]);
        assert_eq!(imgs[0].prototype_scores, vec![0.1, 0.2, 0.3]);
    }
}
