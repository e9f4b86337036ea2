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
//!
//! Room in the queue is a FIFO semaphore with one permit per image: an admitted image holds one
//! from admission until a worker takes it off the queue. A request that finds no room may wait
//! for it ([`Batcher::reserve`]), its body unread, up to `admission_wait`: clients that retry a
//! refusal at once are paced by the queue instead of burning the CPU on refusals, and being
//! first come first served, a waiting request is not overtaken by later ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use parking_lot::Mutex;
use tokio::sync::{Semaphore, oneshot, watch};

use super::{Engine, EngineError, ImageOutput, ModelOutputs};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    pub max_batch_size: usize,
    /// How long the first image of a batch may wait for company; zero takes only what is queued.
    pub max_delay: Duration,
    /// Images that may wait; one more is refused with [`BatchError::Overloaded`].
    pub queue_capacity: usize,
    /// How long a request that finds no room may wait for it before it is refused; zero refuses
    /// at once.
    pub admission_wait: Duration,
    /// Requests that may wait for room at once; past it they are refused at once.
    pub max_waiting: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            // 64 served more images per second than 32 for the default model, most with
            // multi-image requests (BENCHMARKS.md, "What was tried and dropped").
            max_batch_size: 64,
            max_delay: Duration::from_micros(500),
            queue_capacity: 1024,
            // As long as a refused client is asked to wait (Retry-After), so waiting costs a
            // client no more than a refusal that it honours.
            admission_wait: Duration::from_secs(1),
            // A quarter of the default connection limit: waiting requests never hold them all.
            max_waiting: 256,
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
    /// Holds a permit of the queue's room, given back when a worker takes the job.
    holds_room: bool,
}

pub struct Batcher {
    tx: Sender<Job>,
    /// Images announced but not queued yet (being read or decoded).
    incoming: Arc<AtomicUsize>,
    /// 16 × the moving average of images per admitted request (see [`Batcher::typical_request`]).
    typical_x16: AtomicU64,
    /// One permit per image the queue can still take (see the module's documentation).
    room: Arc<Semaphore>,
    /// Requests waiting in [`Batcher::reserve`].
    waiting: AtomicUsize,
    /// Set by [`Batcher::stop_waiting`].
    stopping: watch::Sender<bool>,
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
            // Permits are counted in u32.
            queue_capacity: config.queue_capacity.clamp(1, u32::MAX as usize),
            ..config
        };
        let room = Arc::new(Semaphore::new(config.queue_capacity));
        let (tx, rx) = crossbeam_channel::bounded::<Job>(config.queue_capacity);
        let gather_lock = Arc::new(Mutex::new(()));
        let incoming = Arc::new(AtomicUsize::new(0));
        let workers = workers.max(1);
        for i in 0..workers {
            let worker = Worker {
                rx: rx.clone(),
                gather_lock: Arc::clone(&gather_lock),
                incoming: Arc::clone(&incoming),
                room: Arc::clone(&room),
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
            room,
            waiting: AtomicUsize::new(0),
            stopping: watch::Sender::new(false),
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
        Announced { batcher: self, holds_room: false }
    }

    /// Announces all `n` images of a request, or none: refuses when the queue cannot take them
    /// all, counting those already queued and those announced or reserved by other requests.
    /// Called before decoding, so a request that would be refused costs no decoding, and one that
    /// is admitted finds room for every image (the overload goes to whole requests, not to parts
    /// of them).
    pub fn admit(&self, n: usize) -> Result<Vec<Announced<'_>>, BatchError> {
        Room { batcher: self, images: 0 }.admit(n)
    }

    /// Images in a recent request: a moving average over admissions, for callers that must
    /// guess a request's size before reading it. At least 1.
    pub fn typical_request(&self) -> usize {
        (self.typical_x16.load(Ordering::Relaxed) as usize).div_ceil(16).max(1)
    }

    fn note_request(&self, n: usize) {
        // Weight 1/8 for the newest; concurrent updates may lose one, which a guess can afford.
        let typical = self.typical_x16.load(Ordering::Relaxed);
        let n = n.min(self.config.queue_capacity) as u64;
        self.typical_x16.store((typical * 7 + n * 16) / 8, Ordering::Relaxed);
    }

    /// Room for `n` images now (capped at the queue's capacity), or a refusal. For callers that
    /// do not yet know how many images a request holds: taken before its body is read, it makes
    /// a refusal under overload cost almost nothing.
    pub fn try_reserve(&self, n: usize) -> Result<Room<'_>, BatchError> {
        self.take(n.min(self.config.queue_capacity)).ok_or_else(|| self.refused(1))
    }

    /// Like [`Batcher::try_reserve`], but without room now it waits for room, first come first
    /// served, up to `admission_wait`. Refuses at once when `max_waiting` requests wait
    /// already, and ends the wait with [`BatchError::ShuttingDown`] at [`Batcher::stop_waiting`].
    pub async fn reserve(&self, n: usize) -> Result<Room<'_>, BatchError> {
        let n = n.min(self.config.queue_capacity);
        if let Some(room) = self.take(n) {
            return Ok(room);
        }
        let mut stop = self.stopping.subscribe();
        if self.config.admission_wait.is_zero() || *stop.borrow() {
            return Err(self.refused(1));
        }
        let Some(_waiting) = self.enlist() else {
            return Err(self.refused(1));
        };
        tokio::select! {
            // Dropping an unfinished acquire gives back what it had been assigned.
            taken = self.room.acquire_many(n as u32) => match taken {
                Ok(permits) => {
                    permits.forget();
                    Ok(Room { batcher: self, images: n })
                }
                Err(_) => Err(BatchError::ShuttingDown),
            },
            () = tokio::time::sleep(self.config.admission_wait) => Err(self.refused(1)),
            _ = stop.wait_for(|stopping| *stopping) => Err(BatchError::ShuttingDown),
        }
    }

    /// Ends every wait in [`Batcher::reserve`], and the waits to come, with
    /// [`BatchError::ShuttingDown`]: at shutdown, requests that wait for room would otherwise
    /// hold it up. Requests that find room are still admitted.
    pub fn stop_waiting(&self) {
        self.stopping.send_replace(true);
    }

    fn take(&self, n: usize) -> Option<Room<'_>> {
        let permits = self.room.try_acquire_many(u32::try_from(n).ok()?).ok()?;
        permits.forget();
        Some(Room { batcher: self, images: n })
    }

    fn enlist(&self) -> Option<Waiting<'_>> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let waiting = Waiting(self);
        self.metrics.admission_waiting.inc();
        // Over the bound, `waiting` is dropped here and undoes its count.
        (before < self.config.max_waiting).then_some(waiting)
    }

    fn refused(&self, images: usize) -> BatchError {
        self.metrics.overloaded.inc_by(images as u64);
        BatchError::Overloaded {
            capacity: self.config.queue_capacity,
        }
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
            holds_room: announced.holds_room,
        };
        let sent = self.tx.try_send(job);
        let mut announced = announced;
        if sent.is_ok() {
            // The job in the queue holds the image's room now.
            announced.holds_room = false;
        }
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

/// Room in the queue for some images, reserved before a request's body is read; given back
/// when dropped unless [`Room::admit`] turns it into announced images.
pub struct Room<'a> {
    batcher: &'a Batcher,
    images: usize,
}

impl<'a> Room<'a> {
    /// [`Batcher::admit`] for a request whose images are now counted, using this room first:
    /// what it holds beyond `n` is given back, and what `n` needs beyond it must be free now.
    pub fn admit(mut self, n: usize) -> Result<Vec<Announced<'a>>, BatchError> {
        let batcher = self.batcher;
        batcher.note_request(n);
        if n > self.images {
            let Some(mut more) = batcher.take(n - self.images) else {
                return Err(batcher.refused(n));
            };
            self.images += std::mem::take(&mut more.images);
        }
        // The images' room moves to their announcements; the rest goes back on drop.
        self.images -= n;
        batcher.incoming.fetch_add(n, Ordering::AcqRel);
        Ok((0..n).map(|_| Announced { batcher, holds_room: true }).collect())
    }

    /// Images this room holds.
    pub fn images(&self) -> usize {
        self.images
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if self.images > 0 {
            self.batcher.room.add_permits(self.images);
        }
    }
}

/// A request counted in [`Batcher::reserve`]'s waiters while it lives.
struct Waiting<'a>(&'a Batcher);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.admission_waiting.dec();
    }
}

/// An image on its way to the batcher; see [`Batcher::announce`].
pub struct Announced<'a> {
    batcher: &'a Batcher,
    /// Holds a permit of the queue's room (admitted, not merely announced).
    holds_room: bool,
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
        if self.holds_room {
            self.batcher.room.add_permits(1);
        }
    }
}

struct Worker {
    rx: Receiver<Job>,
    gather_lock: Arc<Mutex<()>>,
    incoming: Arc<AtomicUsize>,
    room: Arc<Semaphore>,
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
        // Room taken off the queue, given back once per batch rather than per image.
        let mut freed = 0;
        self.accept(&mut jobs, &mut freed, first);
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
            self.accept(&mut jobs, &mut freed, job);
        }
        self.room.add_permits(freed);
        Some(jobs)
    }

    fn accept(&self, jobs: &mut Vec<Job>, freed: &mut usize, job: Job) {
        self.metrics.queue_depth.dec();
        *freed += usize::from(job.holds_room);
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
