//! Dynamic batching: a bounded queue in front of the engine's sessions.
//!
//! Each worker thread owns the queue while it gathers a batch (up to `max_batch_size` images,
//! waiting at most `max_delay` after the first), then releases it and runs inference, so the
//! next worker can gather while this one computes. Batches therefore grow with load. A full
//! queue refuses at once instead of buffering without bound, and images whose caller has gone
//! away are dropped before they reach the model.
//!
//! A batch waits for company only while more images are on their way: callers announce an image
//! before decoding it ([`Batcher::announce`]). A lone request therefore never pays `max_delay`
//! (a fixed wait made a lone client slower: BENCHMARKS.md, "What was tried and dropped").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
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
            // 64 served more images per second than 32 for the default model, most with
            // multi-image requests (BENCHMARKS.md, "What was tried and dropped").
            max_batch_size: 64,
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
    /// Images announced but not queued yet (being read or decoded).
    incoming: Arc<AtomicUsize>,
    /// 16 × the moving average of images per admitted request (see [`Batcher::typical_request`]).
    typical_x16: AtomicU64,
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
        let incoming = Arc::new(AtomicUsize::new(0));
        let workers = workers.max(1);
        for i in 0..workers {
            let worker = Worker {
                rx: rx.clone(),
                gather_lock: Arc::clone(&gather_lock),
                incoming: Arc::clone(&incoming),
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
            incoming,
            typical_x16: AtomicU64::new(16),
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

    /// Tells the workers an image is coming (it is being decoded), so a batch being gathered
    /// waits for it. The announcement ends when the returned guard is dropped or submitted.
    pub fn announce(&self) -> Announced<'_> {
        self.incoming.fetch_add(1, Ordering::AcqRel);
        Announced { batcher: self }
    }

    /// Announces all `n` images of a request, or none: refuses when the queue cannot take them
    /// all, counting those already queued and those announced by other requests. Called before
    /// decoding, so a request that would be refused costs no decoding, and one that is admitted
    /// finds room for every image (the overload goes to whole requests, not to parts of them).
    pub fn admit(&self, n: usize) -> Result<Vec<Announced<'_>>, BatchError> {
        let capacity = self.config.queue_capacity;
        // Weight 1/8 for the newest; concurrent updates may lose one, which a guess can afford.
        let typical = self.typical_x16.load(Ordering::Relaxed);
        self.typical_x16.store((typical * 7 + (n.min(capacity) as u64) * 16) / 8, Ordering::Relaxed);
        let mut announced = self.incoming.load(Ordering::Acquire);
        loop {
            if self.tx.len().saturating_add(announced).saturating_add(n) > capacity {
                self.metrics.overloaded.inc_by(n as u64);
                return Err(BatchError::Overloaded { capacity });
            }
            match self.incoming.compare_exchange_weak(announced, announced + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => announced = now,
            }
        }
        Ok((0..n).map(|_| Announced { batcher: self }).collect())
    }

    /// Images in a recent request: a moving average over [`Batcher::admit`] calls, for callers
    /// that must guess a request's size before reading it. At least 1.
    pub fn typical_request(&self) -> usize {
        (self.typical_x16.load(Ordering::Relaxed) as usize).div_ceil(16).max(1)
    }

    /// Refuses at once unless the queue has room for `n` more images now (capped at its whole
    /// capacity). For callers that do not yet know how many images a request holds: checked
    /// before its body is read, it makes a refusal under overload cost almost nothing.
    pub fn check_room(&self, n: usize) -> Result<(), BatchError> {
        let capacity = self.config.queue_capacity;
        let taken = self.tx.len().saturating_add(self.incoming.load(Ordering::Acquire));
        if taken.saturating_add(n.min(capacity)) > capacity {
            self.metrics.overloaded.inc();
            return Err(BatchError::Overloaded { capacity });
        }
        Ok(())
    }

    /// Queues one image tensor and waits for its outputs. Refuses at once when the queue is full.
    /// Dropping the returned future before it completes withdraws the image from its batch.
    pub async fn submit(&self, tensor: Vec<f32>) -> Result<ImageOutput, BatchError> {
        self.announce().submit(tensor).await
    }

    async fn enqueue(&self, tensor: Vec<f32>, announced: Announced<'_>) -> Result<ImageOutput, BatchError> {
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
        let sent = self.tx.try_send(job);
        // Only after the job is in the queue, so a gathering worker never sees neither.
        drop(announced);
        match sent {
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

/// An image on its way to the batcher; see [`Batcher::announce`].
pub struct Announced<'a> {
    batcher: &'a Batcher,
}

impl Announced<'_> {
    /// Queues the announced image's tensor and waits for its outputs (see [`Batcher::submit`]).
    pub async fn submit(self, tensor: Vec<f32>) -> Result<ImageOutput, BatchError> {
        let batcher = self.batcher;
        batcher.enqueue(tensor, self).await
    }
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        self.batcher.incoming.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Worker {
    rx: Receiver<Job>,
    gather_lock: Arc<Mutex<()>>,
    incoming: Arc<AtomicUsize>,
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
                    if now >= deadline || self.incoming.load(Ordering::Acquire) == 0 {
                        None
                    } else {
                        self.rx.recv_timeout(deadline - now).ok()
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
