//! Dynamic batching: a bounded queue in front of the engine's sessions.
//!
//! Each worker thread owns the queue while it gathers a batch (up to `max_batch_size` images,
//! waiting at most `max_delay` after the first), then releases it and runs inference, so the
//! next worker can gather while this one computes. Batches therefore grow with load. A full
//! queue refuses at once instead of buffering without bound, and images whose caller has gone
//! away are dropped before they reach the model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{Engine, EngineError, ImageOutput, ModelOutputs};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    pub max_batch_size: usize,
    /// How long the first image of a batch may wait for company; zero takes only what is queued.
    pub max_delay: Duration,
    /// Images that may wait; one more is refused with [`BatchError::Overloaded`].
    pub queue_capacity: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_batch_size: 32,
            max_delay: Duration::from_micros(500),
            queue_capacity: 1024,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("the server is overloaded: {capacity} images are already queued; retry shortly")]
    Overloaded { capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("bad tensor: {0}")]
    BadInput(String),
}

/// What the batcher runs; the engine in production, a fake in tests.
pub trait BatchRunner: Send + Sync + 'static {
    /// Floats per image.
    fn tensor_len(&self) -> usize;
    fn run_batch(&self, batch: &[f32], n: usize) -> Result<ModelOutputs, EngineError>;
}

impl BatchRunner for Engine {
    fn tensor_len(&self) -> usize {
        Engine::tensor_len(self)
    }
    fn run_batch(&self, batch: &[f32], n: usize) -> Result<ModelOutputs, EngineError> {
        self.run(batch, n)
    }
}

struct Job {
    tensor: Vec<f32>,
    reply: oneshot::Sender<Result<ImageOutput, BatchError>>,
    enqueued: Instant,
}

pub struct Batcher {
    tx: Sender<Job>,
    config: BatcherConfig,
    tensor_len: usize,
    workers: usize,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts `workers` inference threads (use one per engine session).
    pub fn new(runner: Arc<dyn BatchRunner>, workers: usize, config: BatcherConfig, metrics: Arc<Metrics>) -> Batcher {
        let config = BatcherConfig {
            max_batch_size: config.max_batch_size.max(1),
            queue_capacity: config.queue_capacity.max(1),
            ..config
        };
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue_capacity);
        let gather_lock = Arc::new(Mutex::new(()));
        let workers = workers.max(1);
        for i in 0..workers {
            let worker = Worker {
                rx: rx.clone(),
                gather_lock: Arc::clone(&gather_lock),
                runner: Arc::clone(&runner),
                config,
                metrics: Arc::clone(&metrics),
            };
            std::thread::Builder::new()
                .name(format!("swav-infer-{i}"))
                .spawn(move || worker.run())
                .expect("spawning an inference thread");
        }
        Batcher {
            tx,
            config,
            tensor_len: runner.tensor_len(),
            workers,
            metrics,
        }
    }

    pub fn config(&self) -> BatcherConfig {
        self.config
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Queues one image tensor and waits for its outputs. Refuses at once when the queue is full.
    /// Dropping the returned future before it completes withdraws the image from its batch.
    pub async fn submit(&self, tensor: Vec<f32>) -> Result<ImageOutput, BatchError> {
        if tensor.len() != self.tensor_len {
            return Err(BatchError::BadInput(format!(
                "expected {} floats, got {}",
                self.tensor_len,
                tensor.len()
            )));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            tensor,
            reply,
            enqueued: Instant::now(),
        };
        match self.tx.try_send(job) {
            Ok(()) => self.metrics.queue_depth.inc(),
            Err(TrySendError::Full(_)) => {
                self.metrics.overloaded.inc();
                return Err(BatchError::Overloaded {
                    capacity: self.config.queue_capacity,
                });
            }
            Err(TrySendError::Disconnected(_)) => return Err(BatchError::ShuttingDown),
        }
        rx.await.unwrap_or(Err(BatchError::ShuttingDown))
    }
}

struct Worker {
    rx: Receiver<Job>,
    gather_lock: Arc<Mutex<()>>,
    runner: Arc<dyn BatchRunner>,
    config: BatcherConfig,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(self) {
        while let Some(jobs) = self.gather() {
            if !jobs.is_empty() {
                self.infer(jobs);
            }
        }
    }

    /// Next batch of live jobs; `None` once the batcher is gone and the queue drained.
    fn gather(&self) -> Option<Vec<Job>> {
        let _turn = self.gather_lock.lock();
        let first = self.rx.recv().ok()?;
        let deadline = Instant::now() + self.config.max_delay;
        let mut jobs = Vec::with_capacity(self.config.max_batch_size);
        self.accept(&mut jobs, first);
        let mut received = 1;
        while received < self.config.max_batch_size {
            let next = match self.rx.try_recv() {
                Ok(job) => Some(job),
                Err(TryRecvError::Disconnected) => None,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        None
                    } else {
                        match self.rx.recv_timeout(deadline - now) {
                            Ok(job) => Some(job),
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
                        }
                    }
                }
            };
            let Some(job) = next else { break };
            received += 1;
            self.accept(&mut jobs, job);
        }
        Some(jobs)
    }

    fn accept(&self, jobs: &mut Vec<Job>, job: Job) {
        self.metrics.queue_depth.dec();
        if job.reply.is_closed() {
            self.metrics.cancelled.inc();
            return;
        }
        self.metrics.queue_seconds.observe(job.enqueued.elapsed().as_secs_f64());
        jobs.push(job);
    }

    fn infer(&self, jobs: Vec<Job>) {
        let n = jobs.len();
        let mut batch = Vec::with_capacity(n * self.runner.tensor_len());
        for job in &jobs {
            batch.extend_from_slice(&job.tensor);
        }
        self.metrics.batch_size.observe(n as f64);
        let started = Instant::now();
        let result = self.runner.run_batch(&batch, n);
        self.metrics.inference_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(outputs) => {
                for (i, job) in jobs.into_iter().enumerate() {
                    // The caller may have gone while we computed; nothing to do then.
                    let _ = job.reply.send(Ok(outputs.image(i)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batch = n, "inference failed");
                let msg = e.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(BatchError::Inference(msg.clone())));
                }
            }
        }
    }
}
