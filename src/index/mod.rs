//! A durable nearest-neighbour index over unit vectors with string ids, clusters and
//! JSON metadata. It knows nothing of models beyond their identity.
//!
//! Durability: every write is a checksummed record in an append-only log, fsync'd before
//! `add`/`delete` return. Snapshots hold every live item and the sequence number of the last
//! record they include, so the log can be emptied afterwards and replay skips what they hold.
//! Concurrency: one RwLock over the item table and graph for readers, one Mutex that
//! serialises writers; graph inserts run outside the RwLock, and items become visible only
//! once their insert has finished.

mod codec;
mod collector;
mod error;
mod graph;
mod snapshot;
mod store;
mod wal;

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use codec::ItemRecord;
use graph::GraphParams;
use store::State;
use wal::{Op, Wal};

pub use collector::IndexCollector;
pub use error::{IndexError, ModelMismatch};
pub use wal::TornTail;

const IDENTITY_FILE: &str = "index.json";
const LOG_FILE: &str = "wal.log";
const LOCK_FILE: &str = "LOCK";
const FORMAT_VERSION: u32 = 1;
/// Longest accepted id, in bytes.
pub const MAX_ID_BYTES: usize = 1024;
/// Largest accepted thumbnail, in bytes: thumbnails are small previews, not the images.
pub const MAX_THUMBNAIL_BYTES: usize = 1 << 20;
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
    pub metadata: Option<Value>,
    /// A small encoded image (PNG, JPEG or WebP, at most [`MAX_THUMBNAIL_BYTES`]) shown for the item.
    pub thumbnail: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemInfo {
    pub id: String,
    pub cluster: u32,
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub id: String,
    /// Cosine similarity to the query.
    pub score: f32,
    pub cluster: u32,
    pub metadata: Option<Value>,
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
    pub last_snapshot_seconds: f64,
    pub compactions: u64,
    pub options: IndexOptions,
    /// What recovery cut off the end of the log when this index was opened.
    pub recovered_torn_tail: Option<TornTail>,
    /// Whether opening loaded the snapshot's graph (true) or had to build one (false).
    pub graph_restored: bool,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    format: u32,
    model: ModelIdentity,
}

struct Writer {
    wal: Wal,
    next_seq: u64,
    snapshot_seq: u64,
}

struct Inner {
    dir: PathBuf,
    identity: ModelIdentity,
    opts: IndexOptions,
    state: RwLock<State>,
    writer: Mutex<Writer>,
    searches: AtomicU64,
    snapshots: AtomicU64,
    compactions: AtomicU64,
    last_snapshot_micros: AtomicU64,
    compacting: AtomicBool,
    recovered: Option<TornTail>,
    graph_restored: bool,
    /// Holds an exclusive flock for as long as the index is open.
    _lock: fs::File,
}

/// A handle to an open index; cheap to clone, all methods take `&self`.
#[derive(Clone)]
pub struct Index {
    inner: Arc<Inner>,
}

impl Index {
    /// Opens the index in `dir`, creating an empty one if the directory is missing or empty.
    /// Loads the newest snapshot, replays the log after it, and cuts off a torn last record.
    pub fn open_or_create(dir: &Path, identity: ModelIdentity, opts: IndexOptions) -> Result<Index, IndexError> {
        validate_options(&identity, &opts)?;
        fs::create_dir_all(dir).map_err(IndexError::io("cannot create index directory", dir))?;
        let lock = lock_dir(dir)?;
        check_identity(dir, &identity)?;
        let snap = snapshot::load_latest(dir, identity.dim)?;
        let (wal, scan) = Wal::open(&dir.join(LOG_FILE), identity.dim)?;
        if let Some(t) = &scan.torn {
            tracing::warn!(index = %dir.display(), offset = t.offset, bytes = t.bytes, reason = %t.reason,
                "dropped a torn last record from the log (a write that was never acknowledged)");
        }
        let snapshot_seq = snap.as_ref().map_or(0, |s| s.seq);
        let last_log_seq = scan.records.last().map_or(0, |(s, _)| *s);
        let started = Instant::now();
        let mut graph_restored = false;
        // Where the graph had to be rebuilt slot for slot (no tombstones), it is stored back
        // into the snapshot so the next start does not rebuild it again.
        let mut store_rebuilt_graph_in = None;
        let mut state = match snap {
            Some(s) => {
                let graph = snapshot::load_graph(&s.dir, &s.slots, graph_params(&opts), identity.dim);
                graph_restored = graph.is_some();
                if !graph_restored && !s.slots.is_empty() && s.slots.iter().all(|(live, _)| *live) {
                    store_rebuilt_graph_in = Some(s.dir.clone());
                }
                State::restore(identity.dim, graph_params(&opts), s.slots, graph)
            }
            None => State::restore(identity.dim, graph_params(&opts), Vec::new(), None),
        };
        if let Some(snapshot_dir) = store_rebuilt_graph_in {
            snapshot::store_graph(&snapshot_dir, &state.graph)?;
        }
        let replayed = replay(&mut state, scan.records, snapshot_seq);
        tracing::info!(index = %dir.display(), items = state.live_len(), replayed,
            seconds = started.elapsed().as_secs_f64(), "index opened");
        snapshot::remove_older(dir, snapshot_seq)?;
        let writer = Writer { wal, next_seq: snapshot_seq.max(last_log_seq) + 1, snapshot_seq };
        let inner = Inner {
            dir: dir.to_path_buf(),
            identity,
            opts,
            state: RwLock::new(state),
            writer: Mutex::new(writer),
            searches: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            last_snapshot_micros: AtomicU64::new(0),
            compacting: AtomicBool::new(false),
            recovered: scan.torn,
            graph_restored,
            _lock: lock,
        };
        Ok(Index { inner: Arc::new(inner) })
    }

    /// Opens an existing index with the model identity it records (for tools that need no
    /// model: stats, compaction). Fails if `dir` holds no index.
    pub fn open(dir: &Path, opts: IndexOptions) -> Result<Index, IndexError> {
        let path = dir.join(IDENTITY_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IndexError::InvalidInput(format!("{} holds no index (no {IDENTITY_FILE})", dir.display())));
            }
            Err(e) => return Err(IndexError::io("cannot read", &path)(e)),
        };
        let file: IdentityFile = serde_json::from_slice(&bytes)
            .map_err(|e| IndexError::corrupt(&path, format!("unreadable identity file: {e}")))?;
        Index::open_or_create(dir, file.model, opts)
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
        w.wal.append(seq, &op)?;
        w.next_seq += 1;
        let Op::Add(records) = op else { unreachable!("built as Add above") };
        let report = inner.apply_add(records);
        inner.after_write(&mut w)?;
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
        w.wal.append(seq, &Op::Delete(id.to_string()))?;
        w.next_seq += 1;
        inner.state.write().remove(id);
        inner.after_write(&mut w)?;
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
        self.inner.state.read().live_len()
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

    /// Writes a snapshot of every live item and empties the log.
    pub fn snapshot(&self) -> Result<(), IndexError> {
        let mut w = self.inner.writer.lock();
        self.inner.snapshot_locked(&mut w)
    }

    /// Rebuilds the graph without tombstones, then snapshots. Searches continue meanwhile;
    /// writes wait.
    pub fn compact(&self) -> Result<CompactReport, IndexError> {
        self.inner.compact()
    }

    /// Snapshots so that the next open replays nothing. Dropping without `close` is safe too.
    pub fn close(self) -> Result<(), IndexError> {
        self.snapshot()
    }

    pub fn stats(&self) -> IndexStats {
        let inner = &self.inner;
        let (log_bytes, last_seq, snapshot_seq) = {
            let w = inner.writer.lock();
            (w.wal.len(), w.next_seq - 1, w.snapshot_seq)
        };
        let st = inner.state.read();
        IndexStats {
            model: inner.identity.clone(),
            items: st.live_len(),
            tombstones: st.tombstones,
            clusters: st.clusters.len(),
            log_bytes,
            last_seq,
            snapshot_seq,
            searches: inner.searches.load(Ordering::Relaxed),
            snapshots: inner.snapshots.load(Ordering::Relaxed),
            last_snapshot_seconds: inner.last_snapshot_micros.load(Ordering::Relaxed) as f64 / 1e6,
            compactions: inner.compactions.load(Ordering::Relaxed),
            options: inner.opts.clone(),
            recovered_torn_tail: inner.recovered.clone(),
            graph_restored: inner.graph_restored,
        }
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
        AddReport { added: records.len(), replaced }
    }

    /// Snapshot when the log is long; compaction in the background when tombstones pile up.
    fn after_write(self: &Arc<Self>, w: &mut Writer) -> Result<(), IndexError> {
        if w.wal.len() >= self.opts.snapshot_log_bytes {
            self.snapshot_locked(w)?;
        }
        let (tombstones, slots) = {
            let st = self.state.read();
            (st.tombstones, st.slots.len())
        };
        let due = tombstones >= self.opts.compact_min_tombstones
            && tombstones as f64 >= self.opts.compact_ratio * slots as f64;
        if due && !self.compacting.swap(true, Ordering::AcqRel) {
            let inner = Arc::clone(self);
            std::thread::spawn(move || {
                if let Err(e) = inner.compact() {
                    tracing::error!(index = %inner.dir.display(), error = %e, "background compaction failed");
                }
                inner.compacting.store(false, Ordering::Release);
            });
        }
        Ok(())
    }

    fn search_unit(&self, q: &[f32], k: usize, ef: Option<usize>, cluster: Option<u32>, exclude: Option<&str>) -> Vec<Hit> {
        self.searches.fetch_add(1, Ordering::Relaxed);
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
            .map(|(slot, score)| {
                let info = item_info(&st, slot);
                Hit { id: info.id, score, cluster: info.cluster, metadata: info.metadata }
            })
            .collect()
    }

    fn snapshot_locked(&self, w: &mut Writer) -> Result<(), IndexError> {
        let seq = w.next_seq - 1;
        if seq == w.snapshot_seq && w.wal.len() == 0 && seq > 0 {
            return Ok(());
        }
        let started = Instant::now();
        let enc = {
            let st = self.state.read();
            let mut enc = snapshot::Encoder::new(self.identity.dim, seq, st.slots.len());
            let vectors = st.graph.vectors();
            for (slot, s) in st.slots.iter().enumerate() {
                // Tombstones keep their place: the graph dump refers to slots by number.
                let (metadata, thumbnail) = if s.live { (s.metadata.as_deref(), s.thumbnail.as_deref()) } else { (None, None) };
                enc.push(s.live, &s.id, s.cluster, metadata, vectors.get(slot), thumbnail);
            }
            (enc, Arc::clone(&st.graph))
        };
        let (enc, graph) = enc;
        snapshot::write(&self.dir, seq, enc, &graph)?;
        // Only now is the log redundant: a crash before this line replays it over the snapshot,
        // skipping records the snapshot already holds.
        w.wal.reset()?;
        w.snapshot_seq = seq;
        snapshot::remove_older(&self.dir, seq)?;
        let micros = started.elapsed().as_micros() as u64;
        self.last_snapshot_micros.store(micros, Ordering::Relaxed);
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        tracing::info!(index = %self.dir.display(), seq, seconds = micros as f64 / 1e6, "snapshot written");
        Ok(())
    }

    fn compact(&self) -> Result<CompactReport, IndexError> {
        let started = Instant::now();
        let mut w = self.writer.lock();
        let (slots, tombstones) = {
            let st = self.state.read();
            (st.live_slots(), st.tombstones)
        };
        let items = slots.len();
        let fresh = State::restore(self.identity.dim, graph_params(&self.opts), slots, None);
        *self.state.write() = fresh;
        self.snapshot_locked(&mut w)?;
        self.compactions.fetch_add(1, Ordering::Relaxed);
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
/// memory, and reading them one by one queued their cache misses (16 % of a search at ef 10);
/// started together, the misses overlap: single-thread queries/s at ef 10 to 64 rose 6 to 25 %
/// (BENCHMARKS.md, "Index").
fn prefetch_records(st: &State, hits: &[(usize, f32)]) {
    for &(slot, _) in hits {
        graph::prefetch(std::slice::from_ref(&st.slots[slot]));
    }
    for &(slot, _) in hits {
        let s = &st.slots[slot];
        graph::prefetch(s.id.as_bytes());
        if let Some(m) = &s.metadata {
            graph::prefetch(std::slice::from_ref(&**m));
        }
    }
}

fn item_info(st: &State, slot: usize) -> ItemInfo {
    let s = &st.slots[slot];
    ItemInfo { id: s.id.to_string(), cluster: s.cluster, metadata: s.metadata.as_deref().cloned() }
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
    if identity.dim == 0 {
        return bad("the model's vector dimension must be positive".into());
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
fn unit_vector(v: &[f32], dim: usize, what: &str) -> Result<Vec<f32>, IndexError> {
    if v.len() != dim {
        return Err(IndexError::InvalidInput(format!("{what} has {} values, the index expects {dim}", v.len())));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(IndexError::InvalidInput(format!("{what} contains NaN or infinity")));
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return Err(IndexError::InvalidInput(format!("{what} has zero length and no direction")));
    }
    Ok(v.iter().map(|x| x / norm).collect())
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

/// Refuses an index made for another model; records the identity of a new one.
fn check_identity(dir: &Path, identity: &ModelIdentity) -> Result<(), IndexError> {
    let path = dir.join(IDENTITY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let file: IdentityFile = serde_json::from_slice(&bytes)
                .map_err(|e| IndexError::corrupt(&path, format!("unreadable identity file: {e}")))?;
            if file.format != FORMAT_VERSION {
                return Err(IndexError::corrupt(&path, format!("unknown index format {}", file.format)));
            }
            let found = file.model;
            if found.sha256 != identity.sha256 || found.name != identity.name || found.dim != identity.dim {
                return Err(IndexError::ModelMismatch(Box::new(error::ModelMismatch {
                    dir: dir.to_path_buf(),
                    found,
                    want: identity.clone(),
                })));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let has_data = dir.join(LOG_FILE).metadata().is_ok_and(|m| m.len() > 0)
                || fs::read_dir(dir)
                    .map_err(IndexError::io("cannot list", dir))?
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("snapshot-"));
            if has_data {
                return Err(IndexError::corrupt(&path, "missing, but the directory holds index data"));
            }
            let file = IdentityFile { format: FORMAT_VERSION, model: identity.clone() };
            let json = serde_json::to_vec_pretty(&file).unwrap_or_default();
            let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
            fs::write(&tmp, json)
                .and_then(|()| fs::File::open(&tmp)?.sync_all())
                .and_then(|()| fs::rename(&tmp, &path))
                .map_err(IndexError::io("cannot write", &path))?;
            snapshot::sync_dir(dir)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                snapshot::sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) => Err(IndexError::io("cannot read", &path)(e)),
    }
}
