//! The index in a Milvus collection (`--index milvus://HOST:PORT/COLLECTION`), so that `swav serve`
//! keeps no state of its own and any number of replicas can share one store that shards and
//! replicates by itself.
//!
//! # Why gRPC and not the RESTful API
//! Milvus 2.3's RESTful API (v1, `/v1/vector/collections/create` and friends, served by the proxy's
//! `httpserver/handler_v1.go`) creates only one fixed schema: an Int64 primary key, one float
//! vector, a dynamic field, an `AUTOINDEX` index with a metric and no parameters, and Bounded
//! consistency; its queries and searches always read with Bounded staleness. The schema this
//! backend needs cannot be made with it: a VarChar primary key (the item id), an indexed Int64
//! `cluster` field for filtered search, a JSON `metadata` field, HNSW with our `M` and
//! `efConstruction`, and Strong reads. So it speaks Milvus's gRPC API, with `tonic` and the
//! `.proto` files Milvus publishes (vendored in `proto/milvus` at tag v2.3.5 and compiled by
//! `build.rs` without `protoc`). The same API serves Milvus standalone and a distributed cluster.
//!
//! # Schema
//! `id` VarChar(1024) primary key; `vector` FloatVector(dim), HNSW, inner product on unit vectors
//! (= cosine, as the local index); `cluster` Int64 with a sorted scalar index; `metadata` JSON
//! (`{"v": ...}`, or `{}` for none, because Milvus 2.3 has no null); `thumbnail` VarChar holding
//! base64 (thumbnails whose encoding does not fit are not stored). The model's identity and the
//! HNSW parameters are the collection's description (JSON), checked at every open like the local
//! index's `index.json`. The collection, its two indexes and its load are made on first use.
//!
//! # Consistency
//! `--milvus-consistency` (`SWAV_MILVUS_CONSISTENCY`, [`ReadConsistency`]) sets the level of the
//! reads that serve requests: get, thumbnail, search (by image, vector or id), clusters and their
//! pages, and the item counts of stats and compact. Milvus decides what a read may miss by its
//! guarantee timestamp: a query node answers once it has consumed its channel up to it. Milvus
//! 2.3's proxy (`parseGuaranteeTsFromConsistency` in `internal/proxy/util.go`, called by
//! `task_search.go` and `task_query.go`) computes it for three levels and takes the client's for
//! Session:
//! - `strong` (the default): the time the read reaches the proxy. It sees every write Milvus
//!   acknowledged before, through any replica, and waits for the next time tick to get it
//!   (`proxy.timeTickInterval`, 200 ms on 2.3.5), idle or not.
//! - `session`: read-your-writes within this process. An upsert's answer carries the write's
//!   timestamp (`MutationResult.timestamp`); the largest this process has seen is sent as the
//!   guarantee, so a read waits only while this process's own last write is not yet consumed, and
//!   then sees it (and everything before it). Milvus 2.3.5 answers a delete with timestamp 0, so
//!   the first Session read after a delete takes a timestamp from Milvus's timestamp oracle
//!   (`AllocTimestamp`, one more round trip) in its place: allocated after the delete was
//!   acknowledged, it is later than the delete's. Writes through other replicas may be missed
//!   until the query node has consumed them. Before this process
//!   wrote anything it sends 1, as pymilvus does: the proxy passes a Session guarantee through
//!   unchanged, and the query node (`waitTSafe`) serves any guarantee at or below what it has
//!   consumed at once, so 0 would read the same; 1 is Milvus's own "eventually" value.
//! - `bounded`: the proxy's time minus `common.gracefulTime` (5 s by default): no wait unless the
//!   query node lags further behind; writes of the last few seconds, this process's own included,
//!   may be missed.
//! - `eventually`: 1, no wait at all; whatever the query node has consumed.
//!
//! Two reads stay Strong whatever the level, because they decide what a write does and must see
//! every acknowledged write, from any process: the presence query ([`IndexBackend::present`]) that
//! `swav index build` uses to skip ids already stored (resume) and that an add uses to count what
//! it replaced, and the existence check that a delete makes first (a delete of an item another
//! replica added a moment ago must not answer 404). Writes return after Milvus acknowledged them
//! (they are in its write-ahead log, which survives a restart), at every level.
//!
//! # Failures
//! Every call has a deadline (`--milvus-timeout`). A connection refused, a deadline passed, or a
//! Milvus that is not serving yet gives [`IndexError::Unavailable`] (503 `index_unavailable` with
//! `Retry-After` over HTTP); an answer that is an error gives [`IndexError::Store`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::backend::{BackendStats, IndexBackend, Thumbnail};
use super::location::MilvusAddress;
use super::{
    AddReport, ClusterInfo, ClusterItems, CompactReport, Hit, IndexError, IndexOptions, ItemInfo, MAX_ID_BYTES, Metadata, ModelIdentity,
    NewItem, ModelMismatch, check_id, unit_vector,
};

#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto {
    pub mod common {
        tonic::include_proto!("milvus.proto.common");
    }
    pub mod schema {
        tonic::include_proto!("milvus.proto.schema");
    }
    pub mod feder {
        tonic::include_proto!("milvus.proto.feder");
    }
    pub mod msg {
        tonic::include_proto!("milvus.proto.msg");
    }
    pub mod milvus {
        tonic::include_proto!("milvus.proto.milvus");
    }
}

use proto::common::{ConsistencyLevel, DslType, KeyValuePair, PlaceholderGroup, PlaceholderType, PlaceholderValue};
use proto::milvus::milvus_service_client::MilvusServiceClient;
use proto::milvus as m;
use proto::schema::{self as s, DataType, FieldData, field_data, scalar_field, vector_field};

/// Our description's format; a collection with another (or none) was not made by swav.
const DESCRIPTION_FORMAT: u32 = 1;
const FIELD_ID: &str = "id";
const FIELD_VECTOR: &str = "vector";
const FIELD_CLUSTER: &str = "cluster";
const FIELD_METADATA: &str = "metadata";
const FIELD_THUMBNAIL: &str = "thumbnail";
/// Milvus's largest VarChar.
const MAX_VARCHAR: usize = 65_535;
/// Member ids listed per cluster by `clusters`, as the local index.
const CLUSTER_EXAMPLES: usize = 5;
/// Ids per `id in [...]` expression.
const IDS_PER_QUERY: usize = 1000;
/// Query vectors per search request, to bound the size of one request and of its answer.
const QUERIES_PER_SEARCH: usize = 1024;
/// Count queries in flight at once for `clusters`.
const COUNTS_IN_FLIGHT: usize = 8;
/// How long opening waits for a new collection to be loaded into memory.
const LOAD_WAIT: Duration = Duration::from_secs(120);
/// An always-true filter (query needs one for counts).
const ALL: &str = "cluster >= 0";
/// Milvus's `common.Status.code` values that mean "not serving yet, try again": the service is
/// not ready, unavailable, over its memory or rate limits, or the collection is not loaded yet
/// (as after a restart).
const RETRYABLE_CODES: [i32; 5] = [1, 2, 3, 4, 101];

/// The consistency level of the reads that serve requests (the module doc says which reads, and
/// what each level may miss). Strong is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReadConsistency {
    /// Every write acknowledged before the read, through any replica; waits for a time tick.
    #[default]
    Strong,
    /// This process's own writes (read-your-writes); others' once Milvus has consumed them.
    Session,
    /// Writes older than Milvus's graceful time (5 s by default); no wait.
    Bounded,
    /// Whatever Milvus has consumed; no wait.
    Eventually,
}

impl ReadConsistency {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadConsistency::Strong => "strong",
            ReadConsistency::Session => "session",
            ReadConsistency::Bounded => "bounded",
            ReadConsistency::Eventually => "eventually",
        }
    }
}

impl std::fmt::Display for ReadConsistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the Milvus backend connects.
#[derive(Debug, Clone)]
pub struct MilvusOptions {
    /// The deadline of every request to Milvus.
    pub timeout: Duration,
    /// Sent as Milvus's `authorization` header (a `user:password` pair or an API token).
    pub token: Option<String>,
    /// The level of the reads that serve requests.
    pub consistency: ReadConsistency,
}

impl Default for MilvusOptions {
    fn default() -> Self {
        MilvusOptions { timeout: Duration::from_secs(5), token: None, consistency: ReadConsistency::Strong }
    }
}

/// Which consistency one read needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The read serves a request: the level chosen with `--milvus-consistency`.
    Serving,
    /// The read decides what a write does (presence, existence before a delete): always Strong.
    Strong,
}

/// The `consistency_level` and `guarantee_timestamp` of a read at `level`; `last_write` is the
/// largest timestamp of this process's acknowledged writes (0 before the first).
fn read_level(read: Read, level: ReadConsistency, last_write: u64) -> (ConsistencyLevel, u64) {
    match (read, level) {
        (Read::Strong, _) | (Read::Serving, ReadConsistency::Strong) => (ConsistencyLevel::Strong, 0),
        // 1 and not 0 before the first write: Milvus's "eventually" value (as pymilvus sends).
        (Read::Serving, ReadConsistency::Session) => (ConsistencyLevel::Session, last_write.max(1)),
        (Read::Serving, ReadConsistency::Bounded) => (ConsistencyLevel::Bounded, 0),
        (Read::Serving, ReadConsistency::Eventually) => (ConsistencyLevel::Eventually, 0),
    }
}

/// What the collection's description holds.
#[derive(Debug, Serialize, Deserialize)]
struct Description {
    swav_index: u32,
    model: ModelIdentity,
    m: usize,
    ef_construction: usize,
}

#[derive(Clone)]
struct Auth(Option<AsciiMetadataValue>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = MilvusServiceClient<InterceptedService<Channel, Auth>>;

struct StoreMetrics {
    seconds: HistogramVec,
    errors: IntCounterVec,
}

/// A Milvus collection as an index backend. Its methods block the calling thread on a small
/// runtime of its own, so they run from `spawn_blocking` like the local index's.
pub struct MilvusIndex {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    address: MilvusAddress,
    identity: ModelIdentity,
    opts: IndexOptions,
    timeout: Duration,
    consistency: ReadConsistency,
    /// The largest `MutationResult.timestamp` of this process's writes: Session reads' guarantee.
    last_write: AtomicU64,
    /// Writes acknowledged without a timestamp (Milvus 2.3.5's deletes) since a Session read last
    /// took one from Milvus's timestamp oracle in their place.
    untimed_writes: AtomicU64,
    metrics: StoreMetrics,
}

impl Drop for MilvusIndex {
    fn drop(&mut self) {
        // Dropping a runtime waits for its threads, which may not happen inside async code.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Why a call failed, before it becomes an [`IndexError`].
fn transport_error(op: &str, e: tonic::Status) -> IndexError {
    use tonic::Code;
    match e.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::ResourceExhausted | Code::Aborted => {
            IndexError::Unavailable(format!("{op}: {}", e.message()))
        }
        _ => IndexError::Store(format!("{op}: {} ({:?})", e.message(), e.code())),
    }
}

// `error_code` is deprecated in favour of `code`, but Milvus 2.3 still sets only it on some errors.
#[allow(deprecated)]
fn check_status(op: &str, status: Option<&proto::common::Status>) -> Result<(), IndexError> {
    let Some(st) = status else { return Ok(()) };
    if st.error_code == 0 && st.code == 0 {
        return Ok(());
    }
    let why = format!("{op}: {} (code {}, error_code {})", st.reason, st.code, st.error_code);
    if st.retriable || RETRYABLE_CODES.contains(&st.code) {
        Err(IndexError::Unavailable(why))
    } else {
        Err(IndexError::Store(why))
    }
}

fn kv(key: &str, value: impl ToString) -> KeyValuePair {
    KeyValuePair { key: key.into(), value: value.to_string() }
}

/// `text` as a string literal of Milvus's filter expressions (a C-style double-quoted string).
fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn ids_in(ids: &[impl AsRef<str>]) -> String {
    let list: Vec<String> = ids.iter().map(|id| literal(id.as_ref())).collect();
    format!("{FIELD_ID} in [{}]", list.join(", "))
}

fn cluster_filter(cluster: Option<u32>, exclude: Option<&str>) -> String {
    let mut parts = Vec::new();
    if let Some(c) = cluster {
        parts.push(format!("{FIELD_CLUSTER} == {c}"));
    }
    if let Some(id) = exclude {
        parts.push(format!("{FIELD_ID} != {}", literal(id)));
    }
    parts.join(" && ")
}

fn metadata_json(m: Option<&Metadata>) -> Vec<u8> {
    match m {
        Some(m) => format!("{{\"v\":{}}}", m.get()).into_bytes(),
        None => b"{}".to_vec(),
    }
}

fn metadata_from(bytes: &[u8]) -> Result<Option<Metadata>, IndexError> {
    #[derive(Deserialize)]
    struct Wrapped<'a> {
        #[serde(borrow)]
        v: Option<&'a RawValue>,
    }
    let w: Wrapped = serde_json::from_slice(bytes).map_err(|e| IndexError::Store(format!("unreadable metadata in Milvus: {e}")))?;
    Ok(w.v.map(Metadata::from_raw))
}

fn scalar(name: &str, kind: DataType, data: scalar_field::Data) -> FieldData {
    FieldData {
        r#type: kind as i32,
        field_name: name.into(),
        field: Some(field_data::Field::Scalars(s::ScalarField { data: Some(data) })),
        ..FieldData::default()
    }
}

/// Columns of a query or search answer, by field name.
struct Columns<'a>(HashMap<&'a str, &'a FieldData>);

impl<'a> Columns<'a> {
    fn new(fields: &'a [FieldData]) -> Columns<'a> {
        Columns(fields.iter().map(|f| (f.field_name.as_str(), f)).collect())
    }

    fn scalar(&self, name: &str) -> Result<&'a scalar_field::Data, IndexError> {
        match self.0.get(name).and_then(|f| f.field.as_ref()) {
            Some(field_data::Field::Scalars(s::ScalarField { data: Some(d) })) => Ok(d),
            _ => Err(IndexError::Store(format!("Milvus's answer lacks the field '{name}'"))),
        }
    }

    fn strings(&self, name: &str) -> Result<&'a [String], IndexError> {
        match self.scalar(name)? {
            scalar_field::Data::StringData(a) => Ok(&a.data),
            _ => Err(IndexError::Store(format!("field '{name}' is not a string in Milvus's answer"))),
        }
    }

    fn longs(&self, name: &str) -> Result<&'a [i64], IndexError> {
        match self.scalar(name)? {
            scalar_field::Data::LongData(a) => Ok(&a.data),
            _ => Err(IndexError::Store(format!("field '{name}' is not an Int64 in Milvus's answer"))),
        }
    }

    fn json(&self, name: &str) -> Result<&'a [Vec<u8>], IndexError> {
        match self.scalar(name)? {
            scalar_field::Data::JsonData(a) => Ok(&a.data),
            _ => Err(IndexError::Store(format!("field '{name}' is not JSON in Milvus's answer"))),
        }
    }

    fn vectors(&self, name: &str) -> Result<(usize, &'a [f32]), IndexError> {
        match self.0.get(name).and_then(|f| f.field.as_ref()) {
            Some(field_data::Field::Vectors(v)) => match &v.data {
                Some(vector_field::Data::FloatVector(a)) => Ok((usize::try_from(v.dim).unwrap_or(0), &a.data)),
                _ => Err(IndexError::Store(format!("field '{name}' is not a float vector in Milvus's answer"))),
            },
            _ => Err(IndexError::Store(format!("Milvus's answer lacks the field '{name}'"))),
        }
    }

    /// Row `i`'s item (id, cluster, metadata) from columns that hold `n` rows.
    fn item(&self, i: usize, ids: &[String]) -> Result<ItemInfo, IndexError> {
        let clusters = self.longs(FIELD_CLUSTER)?;
        let metadata = self.json(FIELD_METADATA)?;
        let (Some(id), Some(&cluster), Some(meta)) = (ids.get(i), clusters.get(i), metadata.get(i)) else {
            return Err(IndexError::Store("Milvus's answer has columns of different lengths".into()));
        };
        let cluster = u32::try_from(cluster).map_err(|_| IndexError::Store(format!("item {id:?} has cluster {cluster} in Milvus")))?;
        Ok(ItemInfo { id: id.clone(), cluster, metadata: metadata_from(meta)? })
    }
}

impl MilvusIndex {
    /// Connects, creates the collection with its indexes on first use, checks that it holds this
    /// model's vectors, and waits until it is loaded.
    pub fn open_or_create(address: &MilvusAddress, identity: ModelIdentity, opts: IndexOptions, milvus: MilvusOptions) -> Result<MilvusIndex, IndexError> {
        super::validate_options(&identity, &opts)?;
        MilvusIndex::connect(address, Some(identity), opts, milvus, true)
    }

    /// Opens an existing collection made by swav; with `identity`, refuses one made by another
    /// model, and without it adopts the collection's own (`swav index stats`).
    pub fn open_existing(address: &MilvusAddress, identity: Option<ModelIdentity>, opts: IndexOptions, milvus: MilvusOptions) -> Result<MilvusIndex, IndexError> {
        MilvusIndex::connect(address, identity, opts, milvus, false)
    }

    fn connect(address: &MilvusAddress, want: Option<ModelIdentity>, opts: IndexOptions, milvus: MilvusOptions, create: bool) -> Result<MilvusIndex, IndexError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("swav-milvus")
            .enable_all()
            .build()
            .map_err(|e| IndexError::Unavailable(format!("cannot start the Milvus client's runtime: {e}")))?;
        let endpoint = Endpoint::from_shared(format!("http://{}:{}", bracketed(&address.host), address.port))
            .map_err(|e| IndexError::InvalidInput(format!("bad Milvus address {address}: {e}")))?
            .connect_timeout(milvus.timeout)
            .timeout(milvus.timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let token = match &milvus.token {
            Some(t) => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(t);
                Some(MetadataValue::try_from(encoded).map_err(|e| IndexError::InvalidInput(format!("bad Milvus token: {e}")))?)
            }
            None => None,
        };
        // Lazy: a Milvus that is down now is connected to (again) by a later call.
        let channel = {
            let _guard = runtime.enter();
            endpoint.connect_lazy()
        };
        let client = MilvusServiceClient::with_interceptor(channel, Auth(token))
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let metrics = StoreMetrics {
            seconds: HistogramVec::new(
                HistogramOpts::new("index_store_request_duration_seconds", "Time per request to the index store (Milvus), by operation")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["op"],
            )
            .expect("static metric"),
            errors: IntCounterVec::new(
                Opts::new("index_store_errors_total", "Failed requests to the index store (Milvus), by operation and kind"),
                &["op", "kind"],
            )
            .expect("static metric"),
        };
        // Until the collection's description is read, a stand-in that matches nothing.
        let stand_in = ModelIdentity { name: String::new(), sha256: String::new(), dim: 0 };
        let mut index = MilvusIndex {
            runtime: Some(runtime),
            client,
            address: address.clone(),
            identity: want.clone().unwrap_or(stand_in),
            opts,
            timeout: milvus.timeout,
            consistency: milvus.consistency,
            last_write: AtomicU64::new(0),
            untimed_writes: AtomicU64::new(0),
            metrics,
        };
        let found = index.prepare(create)?;
        if let Some(want) = want.filter(|w| *w != found.model) {
            return Err(IndexError::ModelMismatch(Box::new(ModelMismatch {
                dir: PathBuf::from(address.to_string()),
                found: found.model,
                want,
            })));
        }
        index.identity = found.model;
        index.opts.m = found.m;
        index.opts.ef_construction = found.ef_construction;
        index.load()?;
        Ok(index)
    }

    /// Runs one request with the deadline, counting its time and failures.
    fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, IndexError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let fut = f(self.client.clone());
        let rt = self.runtime.as_ref().expect("the runtime lives as long as the index");
        let timeout = self.timeout;
        // The deadline is made inside the runtime: its timer belongs to the runtime.
        let result = match rt.block_on(async move { tokio::time::timeout(timeout, fut).await }) {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(transport_error(op, status)),
            Err(_) => Err(IndexError::Unavailable(format!("{op}: no answer from Milvus within {:?}", self.timeout))),
        };
        self.metrics.seconds.with_label_values(&[op]).observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.count_error(op, e);
        }
        result
    }

    fn count_error(&self, op: &str, e: &IndexError) {
        let kind = if matches!(e, IndexError::Unavailable(_)) { "unavailable" } else { "refused" };
        self.metrics.errors.with_label_values(&[op, kind]).inc();
    }

    /// [`MilvusIndex::call`] for answers that carry a `common.Status`.
    fn checked<T, F, Fut>(&self, op: &'static str, status: fn(&T) -> Option<&proto::common::Status>, f: F) -> Result<T, IndexError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let r = self.call(op, f)?;
        check_status(op, status(&r)).inspect_err(|e| self.count_error(op, e))?;
        Ok(r)
    }

    fn name(&self) -> String {
        self.address.collection.clone()
    }

    /// Creates what is missing (when `create`) and returns the collection's description.
    fn prepare(&self, create: bool) -> Result<Description, IndexError> {
        let has = self.checked("has_collection", |r: &m::BoolResponse| r.status.as_ref(), |mut c| {
            let req = m::HasCollectionRequest { collection_name: self.name(), ..Default::default() };
            async move { c.has_collection(req).await }
        })?;
        if !has.value {
            if !create {
                return Err(IndexError::InvalidInput(format!("Milvus has no collection {}", self.address)));
            }
            self.create_collection()?;
        }
        let found = self.read_description()?;
        if create && found.model == self.identity {
            self.ensure_indexes()?;
        }
        Ok(found)
    }

    fn description(&self) -> Description {
        Description {
            swav_index: DESCRIPTION_FORMAT,
            model: self.identity.clone(),
            m: self.opts.m,
            ef_construction: self.opts.ef_construction,
        }
    }

    fn create_collection(&self) -> Result<(), IndexError> {
        let field = |id: i64, name: &str, kind: DataType, params: Vec<KeyValuePair>| s::FieldSchema {
            field_id: id,
            name: name.into(),
            data_type: kind as i32,
            type_params: params,
            ..Default::default()
        };
        let schema = s::CollectionSchema {
            name: self.name(),
            description: serde_json::to_string(&self.description()).expect("plain struct"),
            fields: vec![
                s::FieldSchema { is_primary_key: true, ..field(100, FIELD_ID, DataType::VarChar, vec![kv("max_length", MAX_ID_BYTES)]) },
                field(101, FIELD_VECTOR, DataType::FloatVector, vec![kv("dim", self.identity.dim)]),
                field(102, FIELD_CLUSTER, DataType::Int64, Vec::new()),
                field(103, FIELD_METADATA, DataType::Json, Vec::new()),
                field(104, FIELD_THUMBNAIL, DataType::VarChar, vec![kv("max_length", MAX_VARCHAR)]),
            ],
            ..Default::default()
        };
        let result = self.checked("create_collection", |r: &proto::common::Status| Some(r), |mut c| {
            let req = m::CreateCollectionRequest {
                collection_name: self.name(),
                schema: prost::Message::encode_to_vec(&schema),
                shards_num: 1,
                consistency_level: ConsistencyLevel::Strong as i32,
                ..Default::default()
            };
            async move { c.create_collection(req).await }
        });
        match result {
            Ok(_) => {
                tracing::info!(collection = %self.address, "created the Milvus collection");
                Ok(())
            }
            // Another replica may have created it meanwhile; the identity check decides.
            Err(IndexError::Store(why)) if why.contains("already exist") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn read_description(&self) -> Result<Description, IndexError> {
        let d = self.checked("describe_collection", |r: &m::DescribeCollectionResponse| r.status.as_ref(), |mut c| {
            let req = m::DescribeCollectionRequest { collection_name: self.name(), ..Default::default() };
            async move { c.describe_collection(req).await }
        })?;
        let schema = d.schema.unwrap_or_default();
        let found: Description = serde_json::from_str(&schema.description).map_err(|_| {
            IndexError::Store(format!(
                "Milvus collection {} was not made by swav (its description is {:?}); use another collection name",
                self.address, schema.description
            ))
        })?;
        if found.swav_index != DESCRIPTION_FORMAT {
            return Err(IndexError::Store(format!("Milvus collection {} has swav index format {}, expected {DESCRIPTION_FORMAT}", self.address, found.swav_index)));
        }
        Ok(found)
    }

    fn ensure_indexes(&self) -> Result<(), IndexError> {
        let wanted = [
            (
                FIELD_VECTOR,
                vec![
                    kv("index_type", "HNSW"),
                    kv("metric_type", "IP"),
                    kv("params", serde_json::json!({"M": self.opts.m, "efConstruction": self.opts.ef_construction})),
                ],
            ),
            (FIELD_CLUSTER, vec![kv("index_type", "STL_SORT")]),
        ];
        for (field, params) in wanted {
            let described = self.call("describe_index", |mut c| {
                let req = m::DescribeIndexRequest { collection_name: self.name(), field_name: field.into(), index_name: field.into(), ..Default::default() };
                async move { c.describe_index(req).await }
            })?;
            if check_status("describe_index", described.status.as_ref()).is_ok() && !described.index_descriptions.is_empty() {
                continue;
            }
            self.checked("create_index", |r: &proto::common::Status| Some(r), |mut c| {
                let req = m::CreateIndexRequest {
                    collection_name: self.name(),
                    field_name: field.into(),
                    index_name: field.into(),
                    extra_params: params,
                    ..Default::default()
                };
                async move { c.create_index(req).await }
            })?;
        }
        Ok(())
    }

    fn load(&self) -> Result<(), IndexError> {
        self.checked("load_collection", |r: &proto::common::Status| Some(r), |mut c| {
            let req = m::LoadCollectionRequest { collection_name: self.name(), replica_number: 1, ..Default::default() };
            async move { c.load_collection(req).await }
        })?;
        let started = Instant::now();
        loop {
            if self.loaded()? {
                return Ok(());
            }
            if started.elapsed() > LOAD_WAIT {
                return Err(IndexError::Unavailable(format!("Milvus collection {} was not loaded within {LOAD_WAIT:?}", self.address)));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn loaded(&self) -> Result<bool, IndexError> {
        let state = self.checked("get_load_state", |r: &m::GetLoadStateResponse| r.status.as_ref(), |mut c| {
            let req = m::GetLoadStateRequest { collection_name: self.name(), ..Default::default() };
            async move { c.get_load_state(req).await }
        })?;
        Ok(state.state == proto::common::LoadState::Loaded as i32)
    }

    /// The `consistency_level` and `guarantee_timestamp` for a read of this kind now.
    fn level(&self, read: Read) -> Result<(i32, u64), IndexError> {
        if read == Read::Serving && self.consistency == ReadConsistency::Session {
            self.time_untimed_writes()?;
        }
        let (level, guarantee) = read_level(read, self.consistency, self.last_write.load(Ordering::Acquire));
        Ok((level as i32, guarantee))
    }

    /// Remembers a write's timestamp for later Session reads. Milvus 2.3.5 answers a delete with
    /// timestamp 0 (its upserts and inserts carry theirs): such a write is counted instead, for
    /// the next Session read to time.
    fn wrote(&self, r: &m::MutationResult) {
        if r.timestamp == 0 {
            self.untimed_writes.fetch_add(1, Ordering::AcqRel);
        } else {
            self.last_write.fetch_max(r.timestamp, Ordering::AcqRel);
        }
    }

    /// After writes acknowledged without a timestamp, one from Milvus's timestamp oracle stands in
    /// for theirs: it is allocated after they were acknowledged, so it is later than each of them,
    /// and a read that waits for it sees them.
    fn time_untimed_writes(&self) -> Result<(), IndexError> {
        let untimed = self.untimed_writes.load(Ordering::Acquire);
        if untimed == 0 {
            return Ok(());
        }
        let r = self.checked("alloc_timestamp", |r: &m::AllocTimestampResponse| r.status.as_ref(), |mut c| async move {
            c.alloc_timestamp(m::AllocTimestampRequest::default()).await
        })?;
        if r.timestamp == 0 {
            return Err(IndexError::Store("alloc_timestamp: Milvus returned timestamp 0".into()));
        }
        self.last_write.fetch_max(r.timestamp, Ordering::AcqRel);
        // Writes counted meanwhile stay counted, for the next read.
        let _ = self.untimed_writes.compare_exchange(untimed, 0, Ordering::AcqRel, Ordering::Acquire);
        Ok(())
    }

    fn query(&self, read: Read, expr: String, fields: &[&str], limit: Option<usize>) -> Result<m::QueryResults, IndexError> {
        let output_fields = fields.iter().map(|f| f.to_string()).collect();
        let (consistency_level, guarantee_timestamp) = self.level(read)?;
        self.checked("query", |r: &m::QueryResults| r.status.as_ref(), |mut c| {
            let req = m::QueryRequest {
                collection_name: self.name(),
                expr,
                output_fields,
                query_params: limit.map(|l| vec![kv("limit", l)]).unwrap_or_default(),
                consistency_level,
                guarantee_timestamp,
                use_default_consistency: false,
                ..Default::default()
            };
            async move { c.query(req).await }
        })
    }

    fn items(&self, read: Read, expr: String, limit: Option<usize>) -> Result<Vec<ItemInfo>, IndexError> {
        let r = self.query(read, expr, &[FIELD_ID, FIELD_CLUSTER, FIELD_METADATA], limit)?;
        let cols = Columns::new(&r.fields_data);
        let ids = cols.strings(FIELD_ID)?;
        (0..ids.len()).map(|i| cols.item(i, ids)).collect()
    }

    /// A count, at the serving level.
    fn count_query(&self, expr: String) -> Result<m::QueryRequest, IndexError> {
        let (consistency_level, guarantee_timestamp) = self.level(Read::Serving)?;
        Ok(m::QueryRequest {
            collection_name: self.name(),
            expr,
            output_fields: vec!["count(*)".into()],
            consistency_level,
            guarantee_timestamp,
            use_default_consistency: false,
            ..Default::default()
        })
    }

    fn count_of(r: &m::QueryResults) -> Result<usize, IndexError> {
        let cols = Columns::new(&r.fields_data);
        let n = cols.longs("count(*)")?.first().copied().unwrap_or(0);
        usize::try_from(n).map_err(|_| IndexError::Store(format!("Milvus counted {n} items")))
    }

    fn count(&self, expr: String) -> Result<usize, IndexError> {
        let req = self.count_query(expr)?;
        let r = self.checked("count", |r: &m::QueryResults| r.status.as_ref(), |mut c| async move { c.query(req).await })?;
        Self::count_of(&r)
    }

    fn search_unit(&self, q: &[f32], k: usize, ef: Option<usize>, filter: String) -> Result<Vec<Hit>, IndexError> {
        let mut results = self.search_units(std::slice::from_ref(&q), k, ef, filter)?;
        Ok(results.pop().unwrap_or_default())
    }

    /// One search request for all of `queries` (unit vectors), one result list per query.
    fn search_units(&self, queries: &[impl AsRef<[f32]>], k: usize, ef: Option<usize>, filter: String) -> Result<Vec<Vec<Hit>>, IndexError> {
        let ef = ef.unwrap_or(self.opts.ef_search).max(k);
        let values: Vec<Vec<u8>> = queries.iter().map(|q| q.as_ref().iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let nq = i64::try_from(values.len()).map_err(|_| IndexError::InvalidInput(format!("{} queries in one search", values.len())))?;
        let group = PlaceholderGroup {
            placeholders: vec![PlaceholderValue { tag: "$0".into(), r#type: PlaceholderType::FloatVector as i32, values }],
        };
        let (consistency_level, guarantee_timestamp) = self.level(Read::Serving)?;
        let r = self.checked("search", |r: &m::SearchResults| r.status.as_ref(), |mut c| {
            let req = m::SearchRequest {
                collection_name: self.name(),
                dsl: filter,
                dsl_type: DslType::BoolExprV1 as i32,
                placeholder_group: prost::Message::encode_to_vec(&group),
                output_fields: vec![FIELD_CLUSTER.into(), FIELD_METADATA.into()],
                search_params: vec![
                    kv("anns_field", FIELD_VECTOR),
                    kv("topk", k),
                    kv("metric_type", "IP"),
                    kv("params", serde_json::json!({ "ef": ef })),
                    kv("round_decimal", -1),
                ],
                nq,
                consistency_level,
                guarantee_timestamp,
                use_default_consistency: false,
                ..Default::default()
            };
            async move { c.search(req).await }
        })?;
        let Some(data) = r.results else { return Ok(vec![Vec::new(); queries.len()]) };
        let ids = match data.ids.as_ref().and_then(|ids| ids.id_field.as_ref()) {
            Some(s::i_ds::IdField::StrId(a)) => a.data.as_slice(),
            None => &[],
            Some(_) => return Err(IndexError::Store("Milvus returned integer ids for a VarChar key".into())),
        };
        if ids.is_empty() {
            return Ok(vec![Vec::new(); queries.len()]);
        }
        // The hits of all queries in one run, query after query; `topks` says how many each has.
        if data.topks.len() != queries.len() {
            return Err(IndexError::Store(format!("Milvus answered {} result lists for {} queries", data.topks.len(), queries.len())));
        }
        let cols = Columns::new(&data.fields_data);
        let mut out = Vec::with_capacity(queries.len());
        let mut at = 0usize;
        for &n in &data.topks {
            let n = usize::try_from(n).map_err(|_| IndexError::Store(format!("Milvus answered {n} hits for a query")))?;
            let end = at
                .checked_add(n)
                .filter(|&end| end <= ids.len())
                .ok_or_else(|| IndexError::Store("Milvus's hit counts add up to more ids than it returned".into()))?;
            let hits = (at..end)
                .map(|i| {
                    let score = *data.scores.get(i).ok_or_else(|| IndexError::Store("Milvus returned fewer scores than ids".into()))?;
                    Ok(Hit { item: cols.item(i, ids)?, score })
                })
                .collect::<Result<Vec<Hit>, IndexError>>()?;
            out.push(hits);
            at = end;
        }
        Ok(out)
    }

    fn vector(&self, id: &str) -> Result<Option<Vec<f32>>, IndexError> {
        let r = self.query(Read::Serving, ids_in(&[id]), &[FIELD_ID, FIELD_VECTOR], None)?;
        let cols = Columns::new(&r.fields_data);
        if cols.strings(FIELD_ID)?.is_empty() {
            return Ok(None);
        }
        let (dim, values) = cols.vectors(FIELD_VECTOR)?;
        if dim != self.identity.dim || values.len() < dim {
            return Err(IndexError::Store(format!("Milvus returned a vector of {} values for {id:?}, expected {}", values.len(), self.identity.dim)));
        }
        Ok(Some(values[..dim].to_vec()))
    }

    fn ids_of_cluster(&self, cluster: u32, limit: Option<usize>) -> Result<Vec<String>, IndexError> {
        let r = self.query(Read::Serving, format!("{FIELD_CLUSTER} == {cluster}"), &[FIELD_ID], limit)?;
        Ok(Columns::new(&r.fields_data).strings(FIELD_ID)?.to_vec())
    }

    fn collection_id(&self) -> Result<i64, IndexError> {
        let d = self.checked("describe_collection", |r: &m::DescribeCollectionResponse| r.status.as_ref(), |mut c| {
            let req = m::DescribeCollectionRequest { collection_name: self.name(), ..Default::default() };
            async move { c.describe_collection(req).await }
        })?;
        Ok(d.collection_id)
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_string() }
}

impl IndexBackend for MilvusIndex {
    fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    fn add(&self, items: Vec<NewItem>) -> Result<AddReport, IndexError> {
        // The last of repeated ids wins, as in the local index.
        let mut last: HashMap<String, usize> = HashMap::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            check_id(&it.id)?;
            last.insert(it.id.clone(), i);
        }
        let n = last.len();
        if n == 0 {
            return Ok(AddReport { added: 0, replaced: 0 });
        }
        let mut ids = Vec::with_capacity(n);
        let mut vectors = Vec::with_capacity(n * self.identity.dim);
        let mut clusters = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut thumbnails = Vec::with_capacity(n);
        for (i, it) in items.into_iter().enumerate() {
            if last.get(&it.id) != Some(&i) {
                continue;
            }
            vectors.extend(unit_vector(&it.vector, self.identity.dim, &format!("vector of '{}'", it.id))?);
            clusters.push(i64::from(it.cluster));
            metadata.push(metadata_json(it.metadata.as_ref()));
            let thumbnail = it.thumbnail.map(|t| base64::engine::general_purpose::STANDARD.encode(t)).unwrap_or_default();
            if thumbnail.len() > MAX_VARCHAR {
                tracing::warn!(id = %it.id, bytes = thumbnail.len(), "thumbnail too large for Milvus; stored without it");
                thumbnails.push(String::new());
            } else {
                thumbnails.push(thumbnail);
            }
            ids.push(it.id);
        }
        let replaced = self.present(&ids)?.len();
        let fields = vec![
            scalar(FIELD_ID, DataType::VarChar, scalar_field::Data::StringData(s::StringArray { data: ids })),
            FieldData {
                r#type: DataType::FloatVector as i32,
                field_name: FIELD_VECTOR.into(),
                field: Some(field_data::Field::Vectors(s::VectorField {
                    dim: self.identity.dim as i64,
                    data: Some(vector_field::Data::FloatVector(s::FloatArray { data: vectors })),
                })),
                ..FieldData::default()
            },
            scalar(FIELD_CLUSTER, DataType::Int64, scalar_field::Data::LongData(s::LongArray { data: clusters })),
            scalar(FIELD_METADATA, DataType::Json, scalar_field::Data::JsonData(s::JsonArray { data: metadata })),
            scalar(FIELD_THUMBNAIL, DataType::VarChar, scalar_field::Data::StringData(s::StringArray { data: thumbnails })),
        ];
        let rows = u32::try_from(n).map_err(|_| IndexError::InvalidInput(format!("{n} items in one write")))?;
        let written = self.checked("upsert", |r: &m::MutationResult| r.status.as_ref(), |mut c| {
            let req = m::UpsertRequest { collection_name: self.name(), fields_data: fields, num_rows: rows, ..Default::default() };
            async move { c.upsert(req).await }
        })?;
        self.wrote(&written);
        Ok(AddReport { added: n, replaced })
    }

    fn delete(&self, id: &str) -> Result<bool, IndexError> {
        // Strong: an item another replica has just added must be deleted, not answered 404.
        if self.items(Read::Strong, ids_in(&[id]), None)?.is_empty() {
            return Ok(false);
        }
        let written = self.checked("delete", |r: &m::MutationResult| r.status.as_ref(), |mut c| {
            let req = m::DeleteRequest { collection_name: self.name(), expr: ids_in(&[id]), ..Default::default() };
            async move { c.delete(req).await }
        })?;
        self.wrote(&written);
        Ok(true)
    }

    fn get(&self, id: &str) -> Result<Option<ItemInfo>, IndexError> {
        Ok(self.items(Read::Serving, ids_in(&[id]), None)?.into_iter().next())
    }

    /// Always Strong: a build's resume skips what this answers, and an add counts it as replaced.
    fn present(&self, ids: &[String]) -> Result<HashSet<String>, IndexError> {
        let mut found = HashSet::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let r = self.query(Read::Strong, ids_in(chunk), &[FIELD_ID], None)?;
            found.extend(Columns::new(&r.fields_data).strings(FIELD_ID)?.iter().cloned());
        }
        Ok(found)
    }

    fn thumbnail(&self, id: &str) -> Result<Thumbnail, IndexError> {
        let r = self.query(Read::Serving, ids_in(&[id]), &[FIELD_ID, FIELD_THUMBNAIL], None)?;
        let cols = Columns::new(&r.fields_data);
        if cols.strings(FIELD_ID)?.is_empty() {
            return Ok(Thumbnail::NoItem);
        }
        let text = cols.strings(FIELD_THUMBNAIL)?.first().map(String::as_str).unwrap_or("");
        if text.is_empty() {
            return Ok(Thumbnail::NoThumbnail);
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| IndexError::Store(format!("unreadable thumbnail of {id:?} in Milvus: {e}")))?;
        Ok(Thumbnail::Bytes(bytes.into()))
    }

    fn search(&self, query: &[f32], k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Vec<Hit>, IndexError> {
        let q = unit_vector(query, self.identity.dim, "query")?;
        self.search_unit(&q, k, ef, cluster_filter(cluster, None))
    }

    fn search_many(&self, queries: &[Vec<f32>], k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Vec<Vec<Hit>>, IndexError> {
        let units = queries.iter().map(|q| unit_vector(q, self.identity.dim, "query")).collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(units.len());
        for chunk in units.chunks(QUERIES_PER_SEARCH) {
            out.extend(self.search_units(chunk, k, ef, cluster_filter(cluster, None))?);
        }
        Ok(out)
    }

    fn search_by_id(&self, id: &str, k: usize, ef: Option<usize>, cluster: Option<u32>) -> Result<Option<Vec<Hit>>, IndexError> {
        let Some(q) = self.vector(id)? else { return Ok(None) };
        self.search_unit(&q, k, ef, cluster_filter(cluster, Some(id))).map(Some)
    }

    fn clusters(&self, count: usize) -> Result<Vec<ClusterInfo>, IndexError> {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        // One count per cluster, several in flight: Milvus 2.3 has no group-by.
        let requests: Vec<(u32, m::QueryRequest)> =
            (0..count).map(|c| Ok((c, self.count_query(format!("{FIELD_CLUSTER} == {c}"))?))).collect::<Result<_, IndexError>>()?;
        let client = self.client.clone();
        let timeout = self.timeout;
        let rt = self.runtime.as_ref().expect("the runtime lives as long as the index");
        let started = Instant::now();
        let sizes: Result<Vec<(u32, usize)>, IndexError> = rt.block_on(async move {
            let counts = futures::stream::iter(requests).map(|(c, req)| {
                let mut client = client.clone();
                async move {
                    let r = match tokio::time::timeout(timeout, client.query(req)).await {
                        Ok(Ok(r)) => r.into_inner(),
                        Ok(Err(status)) => return Err(transport_error("count", status)),
                        Err(_) => return Err(IndexError::Unavailable(format!("count: no answer from Milvus within {timeout:?}"))),
                    };
                    check_status("count", r.status.as_ref())?;
                    Ok((c, Self::count_of(&r)?))
                }
            });
            counts.buffered(COUNTS_IN_FLIGHT).try_collect().await
        });
        self.metrics.seconds.with_label_values(&["clusters"]).observe(started.elapsed().as_secs_f64());
        let sizes = sizes.inspect_err(|e| self.count_error("clusters", e))?;
        sizes
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .map(|(c, size)| {
                let mut examples = self.ids_of_cluster(c, Some(CLUSTER_EXAMPLES))?;
                examples.sort();
                Ok(ClusterInfo { id: c, size, examples })
            })
            .collect()
    }

    /// Ordered by id, as the local index: the cluster's ids are fetched and sorted here, since
    /// Milvus 2.3 cannot sort a query.
    fn cluster_items(&self, cluster: u32, limit: usize, offset: usize) -> Result<ClusterItems, IndexError> {
        let mut ids = self.ids_of_cluster(cluster, None)?;
        ids.sort();
        let total = ids.len();
        let page: Vec<&String> = ids.iter().skip(offset).take(limit).collect();
        if page.is_empty() {
            return Ok(ClusterItems { cluster, total, items: Vec::new() });
        }
        let mut items = self.items(Read::Serving, ids_in(&page), None)?;
        items.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ClusterItems { cluster, total, items })
    }

    fn stats(&self) -> Result<BackendStats, IndexError> {
        let items = self.count(ALL.into())?;
        Ok(BackendStats::Remote(serde_json::json!({
            "backend": "milvus",
            "model": self.identity,
            "items": items,
            "collection": self.address.to_string(),
            "consistency": self.consistency.as_str(),
            "timeout_seconds": self.timeout.as_secs_f64(),
            "options": { "m": self.opts.m, "ef_construction": self.opts.ef_construction, "ef_search": self.opts.ef_search },
        })))
    }

    /// Milvus compacts its segments by itself; this asks it to start now and returns at once.
    fn compact(&self) -> Result<CompactReport, IndexError> {
        let started = Instant::now();
        let id = self.collection_id()?;
        self.checked("compact", |r: &m::ManualCompactionResponse| r.status.as_ref(), |mut c| {
            let req = m::ManualCompactionRequest { collection_id: id, ..Default::default() };
            async move { c.manual_compaction(req).await }
        })?;
        let items = self.count(ALL.into())?;
        Ok(CompactReport { items, tombstones_removed: 0, seconds: started.elapsed().as_secs_f64() })
    }

    /// Ready when Milvus answers in time, says it is healthy, and has the collection loaded (after
    /// a restart it is healthy a while before its collections are loaded again).
    fn check_ready(&self) -> Result<(), IndexError> {
        let r = self.checked("check_health", |r: &m::CheckHealthResponse| r.status.as_ref(), |mut c| async move {
            c.check_health(m::CheckHealthRequest {}).await
        })?;
        if !r.is_healthy {
            return Err(IndexError::Unavailable(format!("Milvus reports itself unhealthy: {}", r.reasons.join("; "))));
        }
        if !self.loaded()? {
            return Err(IndexError::Unavailable(format!("Milvus collection {} is not loaded yet", self.address)));
        }
        Ok(())
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![Box::new(self.metrics.seconds.clone()), Box::new(self.metrics.errors.clone())]
    }

    /// Every acknowledged write is already in Milvus's log; nothing to do.
    fn close(&self) -> Result<(), IndexError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_what_would_end_or_bend_the_string() {
        assert_eq!(literal("a/b.png"), r#""a/b.png""#);
        assert_eq!(literal(r#"say "hi" \ bye"#), r#""say \"hi\" \\ bye""#);
        assert_eq!(literal("line\nbreak\r\t"), r#""line\nbreak\r\t""#);
        assert_eq!(literal("\u{1}\u{7f}é"), "\"\\u0001\\u007fé\"");
        assert_eq!(ids_in(&["a", "b\""]), r#"id in ["a", "b\""]"#);
    }

    #[test]
    fn filters_combine_cluster_and_exclusion() {
        assert_eq!(cluster_filter(None, None), "");
        assert_eq!(cluster_filter(Some(3), None), "cluster == 3");
        assert_eq!(cluster_filter(Some(3), Some("x")), r#"cluster == 3 && id != "x""#);
        assert_eq!(cluster_filter(None, Some("x")), r#"id != "x""#);
    }

    #[test]
    fn metadata_round_trips_through_its_wrapper() {
        let m = Metadata::from_json(r#"{"n": 1, "tags": ["a"]}"#.into()).unwrap();
        assert_eq!(metadata_from(&metadata_json(Some(&m))).unwrap(), Some(m));
        assert_eq!(metadata_from(&metadata_json(None)).unwrap(), None);
        let null = Metadata::from_json("null".into()).unwrap();
        assert_eq!(metadata_json(Some(&null)), br#"{"v":null}"#);
        assert!(metadata_from(b"not json").is_err());
    }

    #[test]
    #[allow(deprecated)]
    fn status_codes_split_into_retryable_and_refused() {
        let st = |code: i32, retriable: bool| proto::common::Status { code, retriable, reason: "r".into(), ..Default::default() };
        assert!(check_status("op", Some(&st(0, false))).is_ok());
        assert!(check_status("op", None).is_ok());
        assert!(matches!(check_status("op", Some(&st(101, false))), Err(IndexError::Unavailable(_))));
        assert!(matches!(check_status("op", Some(&st(65535, true))), Err(IndexError::Unavailable(_))));
        assert!(matches!(check_status("op", Some(&st(1100, false))), Err(IndexError::Store(_))));
        let old_style = proto::common::Status { error_code: 1, reason: "unexpected".into(), ..Default::default() };
        assert!(matches!(check_status("op", Some(&old_style)), Err(IndexError::Store(_))));
    }

    #[test]
    fn reads_that_decide_a_write_stay_strong_and_session_sends_this_process_last_write() {
        use ReadConsistency::*;
        for level in [Strong, Session, Bounded, Eventually] {
            assert_eq!(read_level(Read::Strong, level, 42), (ConsistencyLevel::Strong, 0), "{level}");
        }
        assert_eq!(read_level(Read::Serving, Strong, 42), (ConsistencyLevel::Strong, 0));
        assert_eq!(read_level(Read::Serving, Session, 42), (ConsistencyLevel::Session, 42));
        // Before this process wrote: no wait, as Milvus's own "eventually" guarantee.
        assert_eq!(read_level(Read::Serving, Session, 0), (ConsistencyLevel::Session, 1));
        // The proxy computes these two from its own clock.
        assert_eq!(read_level(Read::Serving, Bounded, 42), (ConsistencyLevel::Bounded, 0));
        assert_eq!(read_level(Read::Serving, Eventually, 42), (ConsistencyLevel::Eventually, 0));
        assert_eq!(MilvusOptions::default().consistency, Strong);
        assert_eq!([Strong, Session, Bounded, Eventually].map(ReadConsistency::as_str), ["strong", "session", "bounded", "eventually"]);
    }

    #[test]
    fn a_refused_connection_is_unavailable_not_a_hang() {
        // A loopback port nobody listens on: opening fails fast with Unavailable.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = MilvusAddress { host: "127.0.0.1".into(), port, collection: "c".into() };
        let identity = ModelIdentity { name: "m".into(), sha256: "s".into(), dim: 4 };
        let started = Instant::now();
        let opts = MilvusOptions { timeout: Duration::from_secs(2), ..MilvusOptions::default() };
        let err = MilvusIndex::open_or_create(&address, identity, IndexOptions::default(), opts).err().expect("nothing listens there");
        assert!(matches!(err, IndexError::Unavailable(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    }
}
