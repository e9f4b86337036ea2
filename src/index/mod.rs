//! A durable nearest-neighbour index over unit vectors with string ids, clusters and
//! JSON metadata. It knows nothing of models beyond their identity.
//!
//! Durability: every write is a checksummed record in an append-only log, fsync'd before
//! `add`/`delete` return. Snapshots hold every live item and the sequence number of the last
//! record they include, so the log can be emptied afterwards and replay skips what they hold.
//! Concurrency: one RwLock over the item table and graph for readers, one Mutex that
//! serialises writers; graph inserts run outside the RwLock, and items become visible only
//! once their insert has finished.

mod backend;
mod codec;
mod collector;
#[cfg(test)]
mod compact_tests;
mod error;
mod faults;
#[cfg(test)]
mod fuzz;
mod graph;
mod location;
pub mod milvus;
#[cfg(test)]
mod reach;
mod metadata;
mod snapshot;
mod store;
mod wal;

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use codec::ItemRecord;
use graph::{Graph, GraphParams};
use store::State;
use wal::{Op, Wal};

pub use backend::{BackendStats, IndexBackend, Thumbnail, open_existing, open_or_create};
pub use collector::IndexCollector;
pub use location::{IndexLocation, MilvusAddress};
pub use milvus::{MilvusIndex, MilvusOptions, ReadConsistency};
pub use error::{IndexError, ModelMismatch};
pub use faults::{FaultPoint, Faults, NoFaults};
pub use metadata::Metadata;
pub use wal::TornTail;

const IDENTITY_FILE: &str = "index.json";
const LOG_FILE: &str = "wal.log";
const LOCK_FILE: &str = "LOCK";
/// Format 2 gave the log the file header shared by swav's files. Format 1 indexes (logs without
/// it) are read, and upgraded the first time they are opened for writing (`wal::upgrade`).
const FORMAT_VERSION: u32 = 2;
const FIRST_FORMAT: u32 = 1;
/// Longest accepted id, in bytes.
pub const MAX_ID_BYTES: usize = 1024;
/// Largest accepted thumbnail, in bytes: thumbnails are small previews, not the images.
pub const MAX_THUMBNAIL_BYTES: usize = 1 << 20;
/// Largest vector dimension: far above any embedding we serve, and small enough that sizes
/// computed from it (bytes per vector, per snapshot) cannot overflow.
pub const MAX_DIM: usize = 1 << 16;
/// First wait before a failed snapshot is retried; it doubles up to the maximum.
const SNAPSHOT_RETRY_FIRST: Duration = Duration::from_millis(500);
const SNAPSHOT_RETRY_MAX: Duration = Duration::from_secs(60);
/// Items per step of a compaction's rebuild, between updates of its progress.
const COMPACT_CHUNK: usize = 4096;
/// Examples listed per cluster by [`Index::clusters`].
const CLUSTER_EXAMPLES: usize = 5;

/// The model whose vectors the index holds. An index only opens with the same identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    pub sha256: String,
    pub dim: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct IndexOptions {
    /// HNSW links per node and layer (M).
    pub m: usize,
    pub ef_construction: usize,
    /// `ef` used when a search does not give one.
    pub ef_search: usize,
    /// Compaction starts by itself once tombstones are this fraction of the graph...
    pub compact_ratio: f64,
    /// ...and at least this many.
    pub compact_min_tombstones: usize,
    /// A snapshot is taken (and the log emptied) once the log grows past this.
    pub snapshot_log_bytes: u64,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            m: 16,
            ef_construction: 200,
            ef_search: 64,
            compact_ratio: 0.2,
            compact_min_tombstones: 1000,
            snapshot_log_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewItem {
    pub id: String,
    pub vector: Vec<f32>,
    pub cluster: u32,
    pub metadata: Option<Metadata>,
    /// A small encoded image (PNG, JPEG or WebP, at most [`MAX_THUMBNAIL_BYTES`]) shown for the item.
    pub thumbnail: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemInfo {
    pub id: String,
    pub cluster: u32,
    pub metadata: Option<Metadata>,
}

/// A search result: the item as `get` returns it, and its score. In JSON the item's fields sit
/// beside `score`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    #[serde(flatten)]
    pub item: ItemInfo,
    /// Cosine similarity to the query.
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterInfo {
    pub id: u32,
    pub size: usize,
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterItems {
    pub cluster: u32,
    pub total: usize,
    pub items: Vec<ItemInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AddReport {
    /// Items written (new or replacing).
    pub added: usize,
    /// How many of them replaced an existing id.
    pub replaced: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CompactReport {
    pub items: usize,
    pub tombstones_removed: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IndexStats {
    pub model: ModelIdentity,
    pub items: usize,
    pub tombstones: usize,
    pub clusters: usize,
    pub log_bytes: u64,
    pub last_seq: u64,
    pub snapshot_seq: u64,
    pub searches: u64,
    pub snapshots: u64,
    /// Snapshots that failed (each is retried with backoff; the log keeps every write meanwhile).
    pub snapshot_failures: u64,
    pub last_snapshot_seconds: f64,
    pub compactions: u64,
    /// The running compaction's progress, if one is running.
    pub compaction: Option<CompactionProgress>,
    /// Why the index refuses writes, if a log write or fsync failed (reads still work).
    pub unavailable: Option<String>,
    pub read_only: bool,
    pub options: IndexOptions,
    /// What recovery cut off the end of the log when this index was opened.
    pub recovered_torn_tail: Option<TornTail>,
    /// Whether opening loaded the snapshot's graph (true) or had to build one (false).
    pub graph_restored: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CompactionProgress {
    /// Items already in the new graph.
    pub done: usize,
    pub total: usize,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    format: u32,
    model: ModelIdentity,
}

struct Writer {
    /// None when the index is open read-only.
    wal: Option<Wal>,
    next_seq: u64,
}

impl Writer {
    fn wal(&mut self, dir: &Path) -> Result<&mut Wal, IndexError> {
        self.wal.as_mut().ok_or_else(|| IndexError::ReadOnly(dir.to_path_buf()))
    }
}

/// Numbers that readers (stats, metrics) get without any lock, so that a long write,
/// snapshot or compaction never holds up a scrape or an async route.
#[derive(Default)]
struct Counters {
    items: AtomicUsize,
    tombstones: AtomicUsize,
    clusters: AtomicUsize,
    log_bytes: AtomicU64,
    last_seq: AtomicU64,
    snapshot_seq: AtomicU64,
    searches: AtomicU64,
    snapshots: AtomicU64,
    snapshot_failures: AtomicU64,
    compactions: AtomicU64,
    last_snapshot_micros: AtomicU64,
}

/// The one compaction allowed at a time, and what it has done so far.
#[derive(Default)]
struct Compaction {
    running: AtomicBool,
    done: AtomicUsize,
    total: AtomicUsize,
    /// Writes made while the new graph is built, carried over into it at the swap.
    journal: Mutex<Option<Vec<Op>>>,
}

struct Inner {
    dir: PathBuf,
    identity: ModelIdentity,
    opts: IndexOptions,
    state: RwLock<State>,
    writer: Mutex<Writer>,
    counters: Counters,
    compaction: Compaction,
    /// One snapshot at a time; the writer lock is held only while one is captured.
    snapshotting: Mutex<()>,
    /// Wakes the background snapshot thread; None when read-only.
    snapshot_due: Option<mpsc::Sender<()>>,
    unavailable: Mutex<Option<String>>,
    faults: Arc<dyn Faults>,
    recovered: Option<TornTail>,
    graph_restored: bool,
    /// Holds an exclusive flock for as long as the index is open for writing.
    _lock: Option<fs::File>,
}

/// A handle to an open index; cheap to clone, all methods take `&self`.
#[derive(Clone)]
pub struct Index {
    inner: Arc<Inner>,
}

/// Whether an open may change files (the server, the indexer) or only reads them (`stats`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReadWrite,
    ReadOnly,
}

/// What opening read from disk, before anything on disk is changed.
struct Recovered {
    state: State,
    logs_good_len: u64,
    /// Logs in the framing of index format 1, with their bytes of whole records.
    legacy_logs: Vec<(PathBuf, u64)>,
    torn: Option<TornTail>,
    partial: Vec<PathBuf>,
    damaged: Vec<(u64, PathBuf)>,
    snapshot_seq: u64,
    next_seq: u64,
    graph_restored: bool,
    /// A snapshot whose graph had to be rebuilt slot for slot: stored back so the next start
    /// does not rebuild it again.
    store_graph_in: Option<PathBuf>,
    replayed: usize,
}

impl Index {
    /// Opens the index in `dir`, creating an empty one if the directory is missing or empty.
    /// Loads the newest readable snapshot (falling back to the one before it), replays the
    /// log after it, and cuts off a torn last record.
    pub fn open_or_create(dir: &Path, identity: ModelIdentity, opts: IndexOptions) -> Result<Index, IndexError> {
        Index::open_with_faults(dir, identity, opts, Arc::new(NoFaults))
    }

    /// As [`Index::open_or_create`], with I/O steps that `faults` may fail (for tests).
    pub fn open_with_faults(dir: &Path, identity: ModelIdentity, opts: IndexOptions, faults: Arc<dyn Faults>) -> Result<Index, IndexError> {
        validate_options(&identity, &opts)?;
        fs::create_dir_all(dir).map_err(IndexError::io("cannot create index directory", dir))?;
        let lock = lock_dir(dir)?;
        let format = check_identity(dir, &identity)?;
        Index::open_mode(dir, identity, opts, format, Mode::ReadWrite, Some(lock), faults)
    }

    /// Opens an existing index with the model identity it records (for tools that need no
    /// model: compaction). Fails if `dir` holds no index.
    pub fn open(dir: &Path, opts: IndexOptions) -> Result<Index, IndexError> {
        let file = read_identity(dir)?;
        Index::open_or_create(dir, file.model, opts)
    }

    /// Opens an existing index without changing any file: no lock file, no cut of a torn log
    /// tail (it is only left out), no graph stored, nothing removed. Writes are refused.
    /// With `identity`, refuses an index made by another model.
    pub fn open_read_only(dir: &Path, identity: Option<&ModelIdentity>, opts: IndexOptions) -> Result<Index, IndexError> {
        let file = read_identity(dir)?;
        check_format(dir, file.format)?;
        if let Some(want) = identity {
            check_same_model(dir, &file.model, want)?;
        }
        validate_options(&file.model, &opts)?;
        Index::open_mode(dir, file.model, opts, file.format, Mode::ReadOnly, None, Arc::new(NoFaults))
    }

    fn open_mode(dir: &Path, identity: ModelIdentity, opts: IndexOptions, format: u32, mode: Mode, lock: Option<fs::File>, faults: Arc<dyn Faults>) -> Result<Index, IndexError> {
        let started = Instant::now();
        let mut r = recover(dir, &identity, &opts, format < FORMAT_VERSION)?;
        if let Some(t) = &r.torn {
            tracing::warn!(index = %dir.display(), offset = t.offset, bytes = t.bytes, reason = %t.reason,
                "dropped a torn last record from the log (a write that was never acknowledged)");
        }
        // Only now, with everything read and checked, may the files change.
        let wal = match mode {
            Mode::ReadOnly => None,
            Mode::ReadWrite => {
                snapshot::remove_partial(&r.partial)?;
                for (seq, d) in &r.damaged {
                    snapshot::set_aside(dir, d, *seq)?;
                }
                if let Some(snapshot_dir) = &r.store_graph_in {
                    snapshot::store_graph(snapshot_dir, &r.state.graph)?;
                }
                if format < FORMAT_VERSION {
                    r.logs_good_len = wal::upgrade(dir, &dir.join(LOG_FILE), &r.legacy_logs, r.logs_good_len)?;
                    write_identity(dir, &IdentityFile { format: FORMAT_VERSION, model: identity.clone() })?;
                    tracing::info!(index = %dir.display(), from = format, to = FORMAT_VERSION, logs = r.legacy_logs.len(), "index format upgraded");
                }
                Some(Wal::open(dir, &dir.join(LOG_FILE), r.logs_good_len, Arc::clone(&faults))?)
            }
        };
        tracing::info!(index = %dir.display(), items = r.state.live_len(), replayed = r.replayed,
            seconds = started.elapsed().as_secs_f64(), read_only = (mode == Mode::ReadOnly), "index opened");
        let (tx, rx) = mpsc::channel();
        let inner = Inner {
            dir: dir.to_path_buf(),
            identity,
            opts,
            writer: Mutex::new(Writer { wal, next_seq: r.next_seq }),
            counters: Counters::default(),
            compaction: Compaction::default(),
            snapshotting: Mutex::new(()),
            snapshot_due: (mode == Mode::ReadWrite).then_some(tx),
            unavailable: Mutex::new(None),
            faults,
            recovered: r.torn,
            graph_restored: r.graph_restored,
            state: RwLock::new(r.state),
            _lock: lock,
        };
        inner.count(&inner.state.read());
        let c = &inner.counters;
        c.log_bytes.store(r.logs_good_len, Ordering::Relaxed);
        c.last_seq.store(r.next_seq - 1, Ordering::Relaxed);
        c.snapshot_seq.store(r.snapshot_seq, Ordering::Relaxed);
        let inner = Arc::new(inner);
        if mode == Mode::ReadWrite {
            spawn_snapshotter(&inner, rx);
        }
        Ok(Index { inner })
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.inner.identity
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Adds or replaces items. When this returns Ok they are in the fsync'd log.
    pub fn add(&self, items: Vec<NewItem>) -> Result<AddReport, IndexError> {
        let records = self.inner.prepare(items)?;
        if records.is_empty() {
            return Ok(AddReport { added: 0, replaced: 0 });
        }
        let inner = &self.inner;
        let mut w = inner.writer.lock();
        let seq = w.next_seq;
        let op = Op::Add(records);
        inner.log(&mut w, seq, &op)?;
        let Op::Add(records) = op else { unreachable!("built as Add above") };
        inner.journal(|| Op::Add(records.clone()));
        let report = inner.apply_add(records);
        inner.after_write();
        drop(w);
        Ok(report)
    }

    /// Deletes an item; false if there was none. When this returns Ok(true) the delete is durable.
    pub fn delete(&self, id: &str) -> Result<bool, IndexError> {
        let inner = &self.inner;
        let mut w = inner.writer.lock();
        if !inner.state.read().by_id.contains_key(id) {
            return Ok(false);
        }
        let seq = w.next_seq;
        inner.log(&mut w, seq, &Op::Delete(id.to_string()))?;
        inner.journal(|| Op::Delete(id.to_string()));
        {
            let mut st = inner.state.write();
            st.remove(id);
            inner.count(&st);
        }
        inner.after_write();
        drop(w);
        Ok(true)
    }

    pub fn get(&self, id: &str) -> Option<ItemInfo> {
        let st = self.inner.state.read();
        st.by_id.get(id).map(|&slot| item_info(&st, slot))
    }

    /// The item's thumbnail; None if the id is unknown or the item has none.
    pub fn thumbnail(&self, id: &str) -> Option<Arc<[u8]>> {
        let st = self.inner.state.read();
        st.by_id.get(id).and_then(|&slot| st.slots[slot].thumbnail.clone())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.inner.state.read().by_id.contains_key(id)
    }

    /// The stored (unit-length) vector of an item.
    pub fn vector(&self, id: &str) -> Option<Vec<f32>> {
        let st = self.inner.state.read();
        st.by_id.get(id).map(|&slot| st.graph.vectors().get(slot).to_vec())
    }

    pub fn len(&self) -> usize {
        self.inner.counters.items.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` nearest live items to `query` by cosine, best first. `ef` defaults to the
    /// index's `ef_search` and is raised to `k`. With `cluster`, only that cluster's items are
    /// considered, inside the graph search.
    pub fn search(&self, query: &[f32], k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Vec<Hit>, IndexError> {
        let q = unit_vector(query, self.inner.identity.dim, "query")?;
        Ok(self.inner.search_unit(&q, k, ef, cluster, None))
    }

    /// Like [`Index::search`] with a stored item's vector as the query; the item itself is
    /// left out of the results. None if the id is unknown.
    pub fn search_by_id(&self, id: &str, k: usize, ef: Option<usize>, cluster: Option<u32>) -> Option<Vec<Hit>> {
        let q = self.vector(id)?;
        Some(self.inner.search_unit(&q, k, ef, cluster, Some(id)))
    }

    /// Every non-empty cluster, by id, with its size and a few member ids.
    pub fn clusters(&self) -> Vec<ClusterInfo> {
        let st = self.inner.state.read();
        st.clusters
            .iter()
            .map(|(&id, members)| ClusterInfo {
                id,
                size: members.len(),
                examples: members.iter().take(CLUSTER_EXAMPLES).map(|s| s.to_string()).collect(),
            })
            .collect()
    }

    /// A page of a cluster's members, ordered by id.
    pub fn cluster_items(&self, cluster: u32, limit: usize, offset: usize) -> ClusterItems {
        let st = self.inner.state.read();
        let Some(members) = st.clusters.get(&cluster) else {
            return ClusterItems { cluster, total: 0, items: Vec::new() };
        };
        let items = members
            .iter()
            .skip(offset)
            .take(limit)
            .filter_map(|id| st.by_id.get(id).map(|&slot| item_info(&st, slot)))
            .collect();
        ClusterItems { cluster, total: members.len(), items }
    }

    /// Writes a snapshot of every live item now, and sets the log up to it aside. Writes
    /// wait only while the items are copied, not while they are written out.
    pub fn snapshot(&self) -> Result<(), IndexError> {
        self.inner.snapshot()
    }

    /// Rebuilds the graph without tombstones beside the live one, swaps it in under a short
    /// lock, then snapshots. Searches and writes continue meanwhile; writes made during the
    /// rebuild are carried over. Does nothing when there are no tombstones. A second call while
    /// one runs gets [`IndexError::CompactionRunning`].
    pub fn compact(&self) -> Result<CompactReport, IndexError> {
        self.inner.compact()
    }

    /// Snapshots so that the next open replays nothing. Dropping without `close` is safe too.
    pub fn close(self) -> Result<(), IndexError> {
        self.snapshot()
    }

    /// The index's numbers, read without taking any lock that a write holds.
    pub fn stats(&self) -> IndexStats {
        let inner = &self.inner;
        let c = &inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let running = inner.compaction.running.load(Ordering::Acquire);
        IndexStats {
            model: inner.identity.clone(),
            items: c.items.load(Ordering::Relaxed),
            tombstones: c.tombstones.load(Ordering::Relaxed),
            clusters: c.clusters.load(Ordering::Relaxed),
            log_bytes: get(&c.log_bytes),
            last_seq: get(&c.last_seq),
            snapshot_seq: get(&c.snapshot_seq),
            searches: get(&c.searches),
            snapshots: get(&c.snapshots),
            snapshot_failures: get(&c.snapshot_failures),
            last_snapshot_seconds: get(&c.last_snapshot_micros) as f64 / 1e6,
            compactions: get(&c.compactions),
            compaction: running.then(|| inner.compaction.progress()),
            unavailable: inner.unavailable.lock().clone(),
            read_only: inner.snapshot_due.is_none(),
            options: inner.opts.clone(),
            recovered_torn_tail: inner.recovered.clone(),
            graph_restored: inner.graph_restored,
        }
    }

    /// Checks the graph's shape and that every live item is reachable (for tests).
    #[cfg(test)]
    fn check_graph(&self) -> Result<(), String> {
        let st = self.inner.state.read();
        st.graph.check(&|s| st.slots[s].live)
    }
}

impl Compaction {
    fn progress(&self) -> CompactionProgress {
        CompactionProgress { done: self.done.load(Ordering::Relaxed), total: self.total.load(Ordering::Relaxed) }
    }
}

/// Marks the compaction finished however it ends.
struct CompactionGuard<'a>(&'a Compaction);

impl Drop for CompactionGuard<'_> {
    fn drop(&mut self) {
        *self.0.journal.lock() = None;
        self.0.running.store(false, Ordering::Release);
    }
}

/// Reads the snapshots and logs and rebuilds the state, changing nothing on disk. A snapshot
/// that cannot be read is passed over for the one before it, provided the log segments lead
/// from that one to now without a gap.
fn recover(dir: &Path, identity: &ModelIdentity, opts: &IndexOptions, legacy: bool) -> Result<Recovered, IndexError> {
    let dim = identity.dim;
    let (snaps, partial) = snapshot::list(dir)?;
    let logs = wal::read_all(dir, &dir.join(LOG_FILE), dim, legacy)?;
    let newest_named = snaps.last().map_or(0, |(s, _)| *s);
    let mut damaged = Vec::new();
    let mut first_error = None;
    let mut chosen = None;
    for (i, (seq, sdir)) in snaps.iter().enumerate().rev() {
        match snapshot::load(sdir, *seq, dim) {
            Ok(s) => {
                chosen = Some(s);
                break;
            }
            Err(e) => {
                tracing::error!(snapshot = %sdir.display(), error = %e, "snapshot unreadable; trying the one before it");
                damaged.push((*seq, sdir.clone()));
                first_error.get_or_insert(e);
                if i + 2 <= snaps.len() {
                    break; // only the two newest are kept with the log that leads on from them
                }
            }
        }
    }
    if let Some(e) = first_error {
        // A fallback is only good if the log holds every write since the snapshot it falls
        // back to, up to (at least) the damaged one's.
        let base = chosen.as_ref().map_or(0, |s: &snapshot::Snapshot| s.seq);
        let after: Vec<u64> = logs.records.iter().map(|(s, _)| *s).filter(|&s| s > base).collect();
        let gapless = after.iter().enumerate().all(|(i, &s)| s == base + 1 + i as u64);
        let reaches = after.last().copied().unwrap_or(base) >= newest_named;
        if !(gapless && reaches) {
            return Err(e);
        }
        tracing::warn!(index = %dir.display(), base, "recovering from an older snapshot and the log");
    }
    let snapshot_seq = chosen.as_ref().map_or(0, |s| s.seq);
    let params = graph_params(opts);
    let mut graph_restored = false;
    let mut store_graph_in = None;
    let mut state = match chosen {
        Some(s) => {
            let graph = snapshot::load_graph(&s.dir, &s.slots, params, dim);
            graph_restored = graph.is_some();
            if !graph_restored && !s.slots.is_empty() && s.slots.iter().all(|(live, _)| *live) {
                store_graph_in = Some(s.dir.clone());
            }
            State::restore(dim, params, s.slots, graph)
        }
        None => State::restore(dim, params, Vec::new(), None),
    };
    let last_log_seq = logs.records.last().map_or(0, |(s, _)| *s);
    let replayed = replay(&mut state, logs.records, snapshot_seq);
    Ok(Recovered {
        state,
        logs_good_len: logs.good_len,
        legacy_logs: logs.legacy,
        torn: logs.torn,
        partial,
        damaged,
        snapshot_seq,
        next_seq: snapshot_seq.max(last_log_seq).max(newest_named) + 1,
        graph_restored,
        store_graph_in,
        replayed,
    })
}

/// Takes due snapshots off the request path. A failure is logged, counted, and retried after
/// a backoff that doubles up to a minute; the log keeps every write meanwhile. The thread ends
/// when the index is dropped.
fn spawn_snapshotter(inner: &Arc<Inner>, rx: mpsc::Receiver<()>) {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let spawned = std::thread::Builder::new().name("swav-snapshot".into()).spawn(move || {
        let mut backoff = Duration::ZERO;
        loop {
            if backoff.is_zero() {
                if rx.recv().is_err() {
                    return;
                }
            } else {
                let until = Instant::now() + backoff;
                while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
                    if let Err(mpsc::RecvTimeoutError::Disconnected) = rx.recv_timeout(left) {
                        return;
                    }
                }
            }
            while rx.try_recv().is_ok() {}
            let Some(inner) = weak.upgrade() else { return };
            if backoff.is_zero() && !inner.snapshot_is_due() {
                continue;
            }
            match inner.snapshot() {
                Ok(()) => backoff = Duration::ZERO,
                Err(e) => {
                    inner.counters.snapshot_failures.fetch_add(1, Ordering::Relaxed);
                    backoff = (backoff * 2).clamp(SNAPSHOT_RETRY_FIRST, SNAPSHOT_RETRY_MAX);
                    tracing::error!(index = %inner.dir.display(), error = %e, retry_in = ?backoff, "snapshot failed; the log still holds every write");
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the snapshot thread; snapshots happen only at shutdown");
    }
}

impl Inner {
    /// Checks and normalises a batch. Within a batch the last item with an id wins.
    fn prepare(&self, items: Vec<NewItem>) -> Result<Vec<ItemRecord>, IndexError> {
        let mut last: HashMap<String, usize> = HashMap::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            check_id(&it.id)?;
            last.insert(it.id.clone(), i);
        }
        let mut out = Vec::with_capacity(last.len());
        for (i, it) in items.into_iter().enumerate() {
            if last.get(&it.id) != Some(&i) {
                continue;
            }
            let vector = unit_vector(&it.vector, self.identity.dim, &format!("vector of '{}'", it.id))?;
            if let Some(t) = it.thumbnail.as_ref().filter(|t| t.len() > MAX_THUMBNAIL_BYTES) {
                return Err(IndexError::InvalidInput(format!(
                    "the thumbnail of '{}' is {} bytes, over the limit of {MAX_THUMBNAIL_BYTES}",
                    it.id,
                    t.len()
                )));
            }
            out.push(ItemRecord { id: it.id, cluster: it.cluster, metadata: it.metadata, vector, thumbnail: it.thumbnail });
        }
        Ok(out)
    }

    /// Appends a record to the log (durably) and advances the sequence. A failure poisons
    /// the index for writes.
    fn log(&self, w: &mut Writer, seq: u64, op: &Op) -> Result<(), IndexError> {
        let wal = w.wal(&self.dir)?;
        let result = wal.append(seq, op);
        let len = wal.len();
        if let Err(IndexError::Poisoned(_, why)) = &result {
            self.unavailable.lock().get_or_insert_with(|| why.clone());
        }
        result?;
        w.next_seq += 1;
        self.counters.log_bytes.store(len, Ordering::Relaxed);
        self.counters.last_seq.store(seq, Ordering::Relaxed);
        Ok(())
    }

    /// Hands a write to a running compaction, which carries it over into its new graph.
    fn journal(&self, op: impl FnOnce() -> Op) {
        if let Some(j) = self.compaction.journal.lock().as_mut() {
            j.push(op());
        }
    }

    /// Publishes the item table's counts for lock-free readers.
    fn count(&self, st: &State) {
        let c = &self.counters;
        c.items.store(st.live_len(), Ordering::Release);
        c.tombstones.store(st.tombstones, Ordering::Relaxed);
        c.clusters.store(st.clusters.len(), Ordering::Relaxed);
    }

    /// Puts logged items into the graph and publishes them. Called with the writer lock held.
    fn apply_add(&self, records: Vec<ItemRecord>) -> AddReport {
        let (graph, base) = {
            let mut st = self.state.write();
            let base = st.reserve(&records);
            (Arc::clone(&st.graph), base)
        };
        let points: Vec<(&[f32], usize)> =
            records.iter().enumerate().map(|(i, r)| (&r.vector[..], base + i)).collect();
        graph.insert(&points);
        let mut st = self.state.write();
        let replaced = records.iter().filter(|r| st.by_id.contains_key(r.id.as_str())).count();
        for slot in base..base + records.len() {
            st.publish(slot);
        }
        self.count(&st);
        AddReport { added: records.len(), replaced }
    }

    fn snapshot_is_due(&self) -> bool {
        self.counters.log_bytes.load(Ordering::Relaxed) >= self.opts.snapshot_log_bytes
    }

    /// Wakes the snapshot thread when the log is long; starts a compaction in the background
    /// when tombstones pile up. Never does either in the caller's request.
    fn after_write(self: &Arc<Self>) {
        if self.snapshot_is_due()
            && let Some(tx) = &self.snapshot_due
        {
            let _ = tx.send(());
        }
        let tombstones = self.counters.tombstones.load(Ordering::Relaxed);
        let slots = tombstones + self.counters.items.load(Ordering::Relaxed);
        let due = tombstones >= self.opts.compact_min_tombstones
            && tombstones as f64 >= self.opts.compact_ratio * slots as f64;
        if due && !self.compaction.running.load(Ordering::Acquire) {
            let inner = Arc::clone(self);
            std::thread::spawn(move || match inner.compact() {
                Ok(_) | Err(IndexError::CompactionRunning { .. }) => {}
                Err(e) => tracing::error!(index = %inner.dir.display(), error = %e, "background compaction failed"),
            });
        }
    }

    fn search_unit(&self, q: &[f32], k: usize, ef: Option<usize>, cluster: Option<u32>, exclude: Option<&str>) -> Vec<Hit> {
        self.counters.searches.fetch_add(1, Ordering::Relaxed);
        let st = self.state.read();
        let candidates = match cluster {
            Some(c) => st.clusters.get(&c).map_or(0, |m| m.len()),
            None => st.live_len(),
        };
        let want = k.min(candidates.saturating_sub(exclude.is_some() as usize));
        if want == 0 {
            return Vec::new();
        }
        let ef = ef.unwrap_or(self.opts.ef_search).max(want);
        let accept = |slot: usize| {
            let s = &st.slots[slot];
            s.live && cluster.is_none_or(|c| s.cluster == c) && exclude != Some(&*s.id)
        };
        let mut hits = if cluster.is_some() && exact_is_cheaper(candidates, st.live_len(), ef) {
            exact_scan(&st, q, want, &accept, cluster)
        } else {
            // Every node of the graph is a live, published item unless there are tombstones or
            // inserts in flight; only then does the search need the filter.
            let everything_live = cluster.is_none() && exclude.is_none() && st.tombstones + st.pending == 0;
            let filter: Option<&dyn Fn(usize) -> bool> = if everything_live { None } else { Some(&accept) };
            st.graph.search(q, want, ef, filter)
        };
        if hits.len() < want {
            // The graph can miss members of a scattered filtered set; an exact scan over the
            // candidates is then complete.
            hits = exact_scan(&st, q, want, &accept, cluster);
        }
        prefetch_records(&st, &hits);
        hits.into_iter()
            .map(|(slot, score)| Hit { item: item_info(&st, slot), score })
            .collect()
    }

    /// Captures the items under the writer lock (so they match the log's sequence exactly),
    /// sets the log up to there aside, and writes the snapshot with no lock held.
    fn snapshot(&self) -> Result<(), IndexError> {
        let _one = self.snapshotting.lock();
        let started = Instant::now();
        let (seq, slots, vectors, graph) = {
            let mut w = self.writer.lock();
            let seq = w.next_seq - 1;
            let wal = w.wal(&self.dir)?;
            if seq == self.counters.snapshot_seq.load(Ordering::Acquire) && wal.len() == 0 && snapshot_exists(&self.dir, seq)? {
                return Ok(());
            }
            if let Some(why) = wal.poisoned() {
                return Err(IndexError::Poisoned(self.dir.join(LOG_FILE), why.to_string()));
            }
            let (slots, vectors, graph) = {
                let st = self.state.read();
                let v = st.graph.vectors();
                let floats = v.all();
                let n = (st.slots.len() * self.identity.dim).min(floats.len());
                (st.slots.clone(), floats[..n].to_vec(), st.graph.encode())
            };
            // An empty log has nothing to set aside (and a retry after a failed snapshot must
            // not replace the segment that an earlier attempt set aside under this seq).
            if wal.len() > 0 {
                let rotated = wal.rotate(seq);
                if let Err(IndexError::Poisoned(_, why)) = &rotated {
                    self.unavailable.lock().get_or_insert_with(|| why.clone());
                }
                rotated?;
            }
            self.counters.log_bytes.store(0, Ordering::Relaxed);
            (seq, slots, vectors, graph)
        };
        let dim = self.identity.dim;
        let mut enc = snapshot::Encoder::new(dim, seq, slots.len());
        for (slot, s) in slots.iter().enumerate() {
            // Tombstones keep their place: the graph dump refers to slots by number.
            let (metadata, thumbnail) = if s.live { (s.metadata.as_ref(), s.thumbnail.as_deref()) } else { (None, None) };
            enc.push(s.live, &s.id, s.cluster, metadata, &vectors[slot * dim..(slot + 1) * dim], thumbnail);
        }
        drop((slots, vectors));
        snapshot::write(&self.dir, seq, enc, &graph, &*self.faults)?;
        // Only now are the log segments up to `seq` redundant (the previous snapshot's are
        // kept with it, for a fallback).
        self.counters.snapshot_seq.store(seq, Ordering::Release);
        snapshot::prune(&self.dir)?;
        let micros = started.elapsed().as_micros() as u64;
        self.counters.last_snapshot_micros.store(micros, Ordering::Relaxed);
        self.counters.snapshots.fetch_add(1, Ordering::Relaxed);
        tracing::info!(index = %self.dir.display(), seq, seconds = micros as f64 / 1e6, "snapshot written");
        Ok(())
    }

    fn compact(&self) -> Result<CompactReport, IndexError> {
        let started = Instant::now();
        let c = &self.compaction;
        if c.running.swap(true, Ordering::AcqRel) {
            return Err(IndexError::CompactionRunning { done: c.done.load(Ordering::Relaxed), total: c.total.load(Ordering::Relaxed) });
        }
        let _running = CompactionGuard(c);
        let slots = {
            let mut w = self.writer.lock();
            w.wal(&self.dir)?;
            let st = self.state.read();
            if st.tombstones == 0 {
                return Ok(CompactReport { items: st.live_len(), tombstones_removed: 0, seconds: started.elapsed().as_secs_f64() });
            }
            c.done.store(0, Ordering::Relaxed);
            c.total.store(st.live_len(), Ordering::Relaxed);
            *c.journal.lock() = Some(Vec::new());
            st.live_slots()
        };
        // The new graph is built with no lock of the index held: searches and writes go on.
        let graph = Graph::new(graph_params(&self.opts), self.identity.dim, slots.len());
        for (n, chunk) in slots.chunks(COMPACT_CHUNK).enumerate() {
            let points: Vec<(&[f32], usize)> =
                chunk.iter().enumerate().map(|(i, (_, it))| (&it.vector[..], n * COMPACT_CHUNK + i)).collect();
            graph.insert(&points);
            c.done.fetch_add(chunk.len(), Ordering::Relaxed);
        }
        let (items, tombstones) = {
            let _w = self.writer.lock();
            let journal = c.journal.lock().take().unwrap_or_default();
            let mut fresh = State::restore(self.identity.dim, graph_params(&self.opts), slots, Some(graph));
            replay(&mut fresh, journal.into_iter().map(|op| (1, op)).collect(), 0);
            let mut st = self.state.write();
            let tombstones = st.tombstones;
            let old = std::mem::replace(&mut *st, fresh);
            self.count(&st);
            let items = st.live_len();
            drop(st);
            drop(old);
            (items, tombstones)
        };
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        // The new slot layout goes into a snapshot now (else a restart would load the old one
        // and replay); if that fails, the snapshot thread retries it.
        if let Err(e) = self.snapshot() {
            self.counters.snapshot_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(index = %self.dir.display(), error = %e, "snapshot after compaction failed; will retry");
            if let Some(tx) = &self.snapshot_due {
                let _ = tx.send(());
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(index = %self.dir.display(), items, tombstones, seconds, "index compacted");
        Ok(CompactReport { items, tombstones_removed: tombstones, seconds })
    }
}

/// A filtered graph search visits about `ef · items / members` nodes before it holds `ef`
/// members; an exact scan of the members touches `members` vectors. Pick the smaller.
fn exact_is_cheaper(members: usize, items: usize, ef: usize) -> bool {
    (members as u128).pow(2) <= (ef as u128) * (items as u128)
}

fn exact_scan(st: &State, q: &[f32], k: usize, accept: &dyn Fn(usize) -> bool, cluster: Option<u32>) -> Vec<(usize, f32)> {
    let slots: Vec<usize> = match cluster {
        Some(c) => st.clusters.get(&c).map_or(Vec::new(), |m| m.iter().filter_map(|id| st.by_id.get(id).copied()).collect()),
        None => st.by_id.values().copied().collect(),
    };
    let vectors = st.graph.vectors();
    let mut scored: Vec<(usize, f32)> =
        slots.into_iter().filter(|&s| accept(s)).map(|s| (s, graph::dot(q, vectors.get(s)))).collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.truncate(k);
    scored
}

/// Starts loading every hit's record, id and metadata before they are read. They sit apart in
/// memory, and reading them one by one queued their cache misses; started together, the
/// misses overlap, which raised single-thread queries/s most at small ef.
fn prefetch_records(st: &State, hits: &[(usize, f32)]) {
    for &(slot, _) in hits {
        graph::prefetch(std::slice::from_ref(&st.slots[slot]));
    }
    for &(slot, _) in hits {
        let s = &st.slots[slot];
        graph::prefetch(s.id.as_bytes());
        if let Some(m) = &s.metadata {
            graph::prefetch(m.get().as_bytes());
        }
    }
}

fn item_info(st: &State, slot: usize) -> ItemInfo {
    let s = &st.slots[slot];
    ItemInfo { id: s.id.to_string(), cluster: s.cluster, metadata: s.metadata.clone() }
}

fn graph_params(opts: &IndexOptions) -> GraphParams {
    GraphParams { m: opts.m, ef_construction: opts.ef_construction }
}

/// Applies the log records the snapshot does not hold; returns how many.
fn replay(state: &mut State, records: Vec<(u64, Op)>, snapshot_seq: u64) -> usize {
    let mut replayed = 0;
    for (_, op) in records.into_iter().filter(|(seq, _)| *seq > snapshot_seq) {
        match op {
            Op::Add(items) => state.add_now(&items),
            Op::Delete(id) => {
                state.remove(&id);
            }
        }
        replayed += 1;
    }
    replayed
}

fn validate_options(identity: &ModelIdentity, opts: &IndexOptions) -> Result<(), IndexError> {
    let bad = |m: String| Err(IndexError::InvalidInput(m));
    if identity.dim == 0 || identity.dim > MAX_DIM {
        return bad(format!("the model's vector dimension must be between 1 and {MAX_DIM}, got {}", identity.dim));
    }
    if !(2..=255).contains(&opts.m) {
        return bad(format!("M must be between 2 and 255, got {}", opts.m));
    }
    if opts.ef_construction < opts.m || opts.ef_search == 0 {
        return bad("ef_construction must be at least M, and ef_search positive".into());
    }
    Ok(())
}

/// Whether `id` is acceptable as an item id (so callers can refuse before expensive work).
pub fn check_id(id: &str) -> Result<(), IndexError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(IndexError::InvalidInput(format!(
            "item ids must be 1 to {MAX_ID_BYTES} bytes long (got {} bytes)",
            id.len()
        )));
    }
    Ok(())
}

/// The vector scaled to unit length, after checking its size and values.
pub(crate) fn unit_vector(v: &[f32], dim: usize, what: &str) -> Result<Vec<f32>, IndexError> {
    if v.len() != dim {
        return Err(IndexError::InvalidInput(format!("{what} has {} values, the index expects {dim}", v.len())));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(IndexError::InvalidInput(format!("{what} contains NaN or infinity")));
    }
    // In f64: squares of f32 values as large as 1e30 or as small as 1e-30 stay finite and
    // non-zero there, while in f32 they overflow to infinity or vanish.
    let norm = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return Err(IndexError::InvalidInput(format!("{what} has zero length and no direction")));
    }
    Ok(v.iter().map(|&x| (f64::from(x) / norm) as f32).collect())
}

/// Takes an exclusive advisory lock so that two processes never write one index.
fn lock_dir(dir: &Path) -> Result<fs::File, IndexError> {
    let path = dir.join(LOCK_FILE);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(IndexError::io("cannot open lock file", &path))?;
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(IndexError::Locked(dir.to_path_buf()));
    }
    Ok(f)
}

/// The identity file of an existing index.
fn read_identity(dir: &Path) -> Result<IdentityFile, IndexError> {
    let path = dir.join(IDENTITY_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(IndexError::InvalidInput(format!("{} holds no index (no {IDENTITY_FILE})", dir.display())));
        }
        Err(e) => return Err(IndexError::io("cannot read", &path)(e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| IndexError::corrupt(&path, format!("unreadable identity file: {e}")))
}

fn check_same_model(dir: &Path, found: &ModelIdentity, want: &ModelIdentity) -> Result<(), IndexError> {
    if found.sha256 != want.sha256 || found.name != want.name || found.dim != want.dim {
        return Err(IndexError::ModelMismatch(Box::new(error::ModelMismatch {
            dir: dir.to_path_buf(),
            found: found.clone(),
            want: want.clone(),
        })));
    }
    Ok(())
}

fn snapshot_exists(dir: &Path, seq: u64) -> Result<bool, IndexError> {
    Ok(snapshot::list(dir)?.0.iter().any(|(s, _)| *s == seq))
}

fn check_format(dir: &Path, format: u32) -> Result<(), IndexError> {
    if !(FIRST_FORMAT..=FORMAT_VERSION).contains(&format) {
        return Err(IndexError::corrupt(dir.join(IDENTITY_FILE), format!("unknown index format {format}")));
    }
    Ok(())
}

/// Refuses an index made for another model; records the identity of a new one. Returns the
/// index's format.
fn check_identity(dir: &Path, identity: &ModelIdentity) -> Result<u32, IndexError> {
    let path = dir.join(IDENTITY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let file: IdentityFile = serde_json::from_slice(&bytes)
                .map_err(|e| IndexError::corrupt(&path, format!("unreadable identity file: {e}")))?;
            check_format(dir, file.format)?;
            check_same_model(dir, &file.model, identity)?;
            Ok(file.format)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let has_data = dir.join(LOG_FILE).metadata().is_ok_and(|m| m.len() > 0)
                || fs::read_dir(dir)
                    .map_err(IndexError::io("cannot list", dir))?
                    .flatten()
                    .any(|e| { let n = e.file_name().to_string_lossy().into_owned(); n.starts_with("snapshot-") || n.starts_with("wal-") });
            if has_data {
                return Err(IndexError::corrupt(&path, "missing, but the directory holds index data"));
            }
            write_identity(dir, &IdentityFile { format: FORMAT_VERSION, model: identity.clone() })?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                snapshot::sync_dir(parent)?;
            }
            Ok(FORMAT_VERSION)
        }
        Err(e) => Err(IndexError::io("cannot read", &path)(e)),
    }
}

/// Writes the identity file atomically and durably: a crash leaves the old one or the new one.
fn write_identity(dir: &Path, file: &IdentityFile) -> Result<(), IndexError> {
    let path = dir.join(IDENTITY_FILE);
    let json = serde_json::to_vec_pretty(file).unwrap_or_default();
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    fs::write(&tmp, json)
        .and_then(|()| fs::File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(IndexError::io("cannot write", &path))?;
    snapshot::sync_dir(dir)
}
