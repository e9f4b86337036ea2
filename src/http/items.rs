//! The index routes: add, get and delete items; search by image, vector or id; list clusters;
//! compact. Without `--index` every one of them answers 404 `index_not_enabled`.

use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::Digest;
use prometheus::{Histogram, HistogramOpts};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AppState;
use super::error::ApiError;
use super::images::{infer_images, infer_images_with_thumbnails};
use super::input::{decode_base64, next_part, open_multipart, part_bytes, read_images};
use crate::bundle::ClusterSource;
use crate::engine::ImageOutput;
use crate::index::{ClusterInfo, ClusterItems, CompactReport, Hit, Index, IndexCollector, IndexError, IndexStats, NewItem};
use crate::metrics::Metrics;

const DEFAULT_K: usize = 10;
const MAX_K: usize = 1000;
const MAX_EF: usize = 10_000;
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The index as the HTTP layer holds it, with the metrics only requests can measure.
#[derive(Clone)]
pub struct IndexHandle {
    pub index: Index,
    search_seconds: Histogram,
}

impl IndexHandle {
    /// Registers the index's metrics (sizes, log, snapshots, search latency) with `metrics`.
    pub fn new(index: Index, metrics: &Metrics) -> IndexHandle {
        let search_seconds = Histogram::with_opts(
            HistogramOpts::new("index_search_duration_seconds", "Time in the index per search query (graph search only)")
                .buckets(vec![0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05]),
        )
        .expect("static metric");
        let registered = IndexCollector::new(index.clone()).and_then(|c| metrics.registry.register(Box::new(c)));
        let registered = registered.and_then(|()| metrics.registry.register(Box::new(search_seconds.clone())));
        if let Err(e) = registered {
            tracing::warn!(error = %e, "index metrics not registered");
        }
        IndexHandle { index, search_seconds }
    }
}

fn handle(state: &AppState) -> Result<&IndexHandle, ApiError> {
    state.index.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "index_not_enabled",
            "this server has no index; start it with --index DIR to use items, search and clusters",
        )
    })
}

fn index_error(e: IndexError) -> ApiError {
    match e {
        IndexError::InvalidInput(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", m),
        IndexError::Poisoned(..) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "index_unavailable", e.to_string()),
        IndexError::CompactionRunning { .. } => ApiError::new(StatusCode::CONFLICT, "compaction_running", e.to_string()),
        other => ApiError::internal(format!("index error: {other}")),
    }
}

fn item_not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "item_not_found", format!("no item with id {id:?}"))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError::invalid_params(e.body_text()))
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v).map_err(|e| ApiError::invalid_params(e.body_text()))
}

/// Runs blocking index work (fsync, graph inserts) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("index task failed: {e}")))
}

fn content_type(req: &Request) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default()
}

async fn read_json(req: Request, expected: &str) -> Result<Value, ApiError> {
    let body = Bytes::from_request(req, &()).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("body_too_large", format!("the request body is over the size limit: {}", e.body_text()))
        } else {
            ApiError::bad_request("bad_body", format!("could not read the request body: {}", e.body_text()))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not valid JSON ({expected}): {e}")))
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
}

// ------------------------------------------------------------------ POST /v1/items

#[derive(Deserialize)]
struct AddBody {
    items: Vec<AddItem>,
}

#[derive(Deserialize)]
struct AddItem {
    id: String,
    image: String,
    #[serde(default)]
    metadata: Option<Value>,
}

#[derive(Serialize)]
pub struct AddResponse {
    added: usize,
    ids: Vec<String>,
}

struct Upload {
    id: String,
    image: Bytes,
    metadata: Option<Value>,
}

pub async fn add_items(State(state): State<AppState>, req: Request) -> Result<Json<AddResponse>, ApiError> {
    let h = handle(&state)?.clone();
    let uploads = match content_type(&req).as_str() {
        "application/json" => uploads_from_json(req).await?,
        "multipart/form-data" => uploads_from_multipart(req).await?,
        other => {
            return Err(ApiError::unsupported_media_type(format!(
                "Content-Type {other:?} is not accepted; send application/json {{\"items\": [{{\"id\", \"image\" (base64), \"metadata\"}}]}} \
                 or multipart/form-data whose file parts are named by item id"
            )));
        }
    };
    if uploads.is_empty() {
        return Err(invalid("no items given"));
    }
    if uploads.len() > state.limits.max_images {
        return Err(ApiError::too_large(
            "too_many_images",
            format!("the request has {} images, over the limit of {} per request", uploads.len(), state.limits.max_images),
        ));
    }
    for (i, u) in uploads.iter().enumerate() {
        crate::index::check_id(&u.id).map_err(|e| invalid(format!("item {i}: {e}")))?;
    }
    let (meta, images): (Vec<(String, Option<Value>)>, Vec<Bytes>) =
        uploads.into_iter().map(|u| ((u.id, u.metadata), u.image)).unzip();
    let outputs = infer_images_with_thumbnails(&state, images).await?;
    let ids: Vec<String> = meta.iter().map(|(id, _)| id.clone()).collect();
    let items = meta
        .into_iter()
        .zip(outputs)
        .map(|((id, metadata), (out, thumbnail))| NewItem { cluster: cluster_of(&out), vector: out.embedding, id, metadata, thumbnail })
        .collect();
    let index = h.index.clone();
    let report = blocking(move || index.add(items)).await?.map_err(index_error)?;
    Ok(Json(AddResponse { added: report.added, ids }))
}

/// The item's cluster: the prototype with the highest score, or for a model without prototypes
/// the nearest k-means centroid, or 0 when it has neither (see [`crate::bundle::ClusterSource`]).
pub fn cluster_of(out: &ImageOutput) -> u32 {
    let scores = if out.prototype_scores.is_empty() { &out.centroid_scores } else { &out.prototype_scores };
    scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

async fn uploads_from_json(req: Request) -> Result<Vec<Upload>, ApiError> {
    let value = read_json(req, "expected {\"items\": [...]}").await?;
    let body: AddBody = serde_json::from_value(value)
        .map_err(|e| invalid(format!("expected {{\"items\": [{{\"id\": string, \"image\": base64, \"metadata\": any}}]}}: {e}")))?;
    body.items
        .into_iter()
        .enumerate()
        .map(|(i, it)| {
            let image = decode_base64(&it.image)
                .map_err(|e| ApiError::bad_request("invalid_base64", format!("item {i} ({}): not valid base64: {e}", it.id)))?;
            Ok(Upload { id: it.id, image: Bytes::from(image), metadata: it.metadata })
        })
        .collect()
}

async fn uploads_from_multipart(req: Request) -> Result<Vec<Upload>, ApiError> {
    let mut multipart = open_multipart(req).await?;
    let mut uploads = Vec::new();
    while let Some(field) = next_part(&mut multipart).await? {
        // The part's file name is the id when it has one, else its field name.
        let id = field.file_name().or(field.name()).unwrap_or_default().to_string();
        let image = part_bytes(field).await?;
        uploads.push(Upload { id, image, metadata: None });
    }
    Ok(uploads)
}

// ------------------------------------------------------------------ items by id

/// `GET /v1/items/{id}` and `GET /v1/items/{id}/thumbnail`. Ids may hold '/', so both share
/// the catch-all route; the rule is read on the path as sent, before percent-decoding: a path
/// that ends in a literal `/thumbnail` asks for the thumbnail of the id before it. An item whose
/// own id ends in "/thumbnail" is fetched with that slash sent as `%2F`, which is what
/// `encodeURIComponent` and every URL-encoding client send anyway.
pub async fn get_item(
    State(state): State<AppState>,
    OriginalUri(uri): OriginalUri,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let h = handle(&state)?;
    let id = path(id)?;
    // The path as sent: a %2F in it is still three characters here.
    if uri.path().ends_with(THUMBNAIL_SUFFIX) && id.len() > THUMBNAIL_SUFFIX.len() {
        // The suffix is plain ASCII, so it ends the decoded id exactly as it ends the raw one.
        let id = &id[..id.len() - THUMBNAIL_SUFFIX.len()];
        return thumbnail(&h.index, id, &headers);
    }
    h.index.get(&id).map(|item| Json(item).into_response()).ok_or_else(|| item_not_found(&id))
}

const THUMBNAIL_SUFFIX: &str = "/thumbnail";

/// The stored thumbnail with its type, an ETag from its bytes (a replaced item gets a new one),
/// and `private, no-cache`: browsers keep it but ask again, answered by 304 while it is the same,
/// and no shared cache keeps what may sit behind an API key.
fn thumbnail(index: &Index, id: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let Some(bytes) = index.thumbnail(id) else {
        if !index.contains(id) {
            return Err(item_not_found(id));
        }
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "thumbnail_not_found",
            format!("item {id:?} has no thumbnail (added before thumbnails existed, or with --thumbnails=false)"),
        ));
    };
    let digest = sha2::Sha256::digest(&bytes);
    let etag = format!("\"{}\"", hex::encode(&digest[..16]));
    let cache = [
        (header::CACHE_CONTROL, "private, no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)], cache).into_response());
    }
    let kind = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Png) => "image/png",
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::WebP) => "image/webp",
        _ => "application/octet-stream",
    };
    Ok(([(header::CONTENT_TYPE, kind.to_string()), (header::ETAG, etag)], cache, Body::from(bytes.to_vec())).into_response())
}

pub async fn delete_item(State(state): State<AppState>, id: Result<Path<String>, PathRejection>) -> Result<StatusCode, ApiError> {
    let index = handle(&state)?.index.clone();
    let id = path(id)?;
    let key = id.clone();
    match blocking(move || index.delete(&key)).await?.map_err(index_error)? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(item_not_found(&id)),
    }
}

// ------------------------------------------------------------------ POST /v1/search

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    k: Option<usize>,
    ef: Option<usize>,
    cluster: Option<u32>,
}

#[derive(Serialize)]
pub struct SearchResponse {
    results: Vec<Vec<Hit>>,
}

enum Queries {
    Vectors(Vec<Vec<f32>>),
    Id(String),
}

pub async fn search(
    State(state): State<AppState>,
    q: Result<Query<SearchQuery>, QueryRejection>,
    req: Request,
) -> Result<Json<SearchResponse>, ApiError> {
    let h = handle(&state)?.clone();
    let q = query(q)?;
    let k = q.k.unwrap_or(DEFAULT_K);
    if !(1..=MAX_K).contains(&k) {
        return Err(ApiError::invalid_params(format!("k must be between 1 and {MAX_K}, got {k}")));
    }
    if let Some(ef) = q.ef.filter(|ef| !(1..=MAX_EF).contains(ef)) {
        return Err(ApiError::invalid_params(format!("ef must be between 1 and {MAX_EF}, got {ef}")));
    }
    if q.cluster.is_some() {
        clustered(&state)?;
    }
    let queries = read_queries(&state, req).await?;
    let (ef, cluster) = (q.ef, q.cluster);
    let results = blocking(move || -> Result<Vec<Vec<Hit>>, ApiError> {
        let timed = |f: &dyn Fn() -> Result<Vec<Hit>, ApiError>| {
            let started = Instant::now();
            let r = f();
            h.search_seconds.observe(started.elapsed().as_secs_f64());
            r
        };
        match queries {
            Queries::Id(id) => {
                let hits = timed(&|| h.index.search_by_id(&id, k, ef, cluster).ok_or_else(|| item_not_found(&id)))?;
                Ok(vec![hits])
            }
            Queries::Vectors(vs) => vs
                .iter()
                .map(|v| timed(&|| h.index.search(v, k, ef, cluster).map_err(index_error)))
                .collect(),
        }
    })
    .await??;
    Ok(Json(SearchResponse { results }))
}

/// A search body is an image in any `/v1/embed` form, `{"vector": [...]}`, or `{"id": "..."}`.
async fn read_queries(state: &AppState, req: Request) -> Result<Queries, ApiError> {
    if content_type(&req) != "application/json" {
        let images = read_images(req, state.limits.max_images).await?;
        return Ok(Queries::Vectors(embed(state, images).await?));
    }
    let value = read_json(req, "expected {\"vector\": [...]}, {\"id\": \"...\"} or {\"images\": [...]}").await?;
    let shape = "the JSON body must be {\"vector\": [numbers]}, {\"id\": string} or {\"images\": [base64, ...]}";
    let obj = value.as_object().ok_or_else(|| invalid(shape))?;
    if obj.len() != 1 {
        return Err(invalid(shape));
    }
    if let Some(v) = obj.get("vector") {
        let v: Vec<f32> = serde_json::from_value(v.clone()).map_err(|e| invalid(format!("\"vector\" must be an array of numbers: {e}")))?;
        return Ok(Queries::Vectors(vec![v]));
    }
    if let Some(id) = obj.get("id") {
        return id.as_str().map(|s| Queries::Id(s.to_string())).ok_or_else(|| invalid("\"id\" must be a string"));
    }
    if obj.contains_key("images") {
        // Hand the body back to the shared reader so the base64 rules and limits are the same.
        let body = Body::from(serde_json::to_vec(&value).unwrap_or_default());
        let req = Request::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let images = read_images(req, state.limits.max_images).await?;
        return Ok(Queries::Vectors(embed(state, images).await?));
    }
    Err(invalid(shape))
}

async fn embed(state: &AppState, images: Vec<Bytes>) -> Result<Vec<Vec<f32>>, ApiError> {
    Ok(infer_images(state, images).await?.into_iter().map(|o| o.embedding).collect())
}

// ------------------------------------------------------------------ clusters and maintenance

#[derive(Serialize)]
pub struct ClustersResponse {
    clusters: Vec<ClusterInfo>,
}

pub async fn clusters(State(state): State<AppState>) -> Result<Json<ClustersResponse>, ApiError> {
    let h = handle(&state)?;
    clustered(&state)?;
    Ok(Json(ClustersResponse { clusters: h.index.clusters() }))
}

/// The number of clusters; an error when the model has neither prototypes nor centroids.
fn clustered(state: &AppState) -> Result<usize, ApiError> {
    match state.model.manifest.cluster_source() {
        ClusterSource::None => Err(ApiError::no_clusters()),
        source => Ok(source.count()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<usize>,
    offset: Option<usize>,
}

pub async fn cluster_items(
    State(state): State<AppState>,
    id: Result<Path<u32>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<ClusterItems>, ApiError> {
    let h = handle(&state)?;
    let cluster = path(id)?;
    let q = query(q)?;
    let k = clustered(&state)?;
    if cluster as usize >= k {
        let what = match state.model.manifest.cluster_source() {
            ClusterSource::Centroids(_) => "k-means centroids",
            _ => "prototypes",
        };
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "cluster_not_found",
            format!("no cluster {cluster}: the model has {k} {what} (0 to {})", k.saturating_sub(1)),
        ));
    }
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid_params(format!("limit must be between 1 and {MAX_PAGE}, got {limit}")));
    }
    Ok(Json(h.index.cluster_items(cluster, limit, q.offset.unwrap_or(0))))
}

pub async fn stats(State(state): State<AppState>) -> Result<Json<IndexStats>, ApiError> {
    Ok(Json(handle(&state)?.index.stats()))
}

pub async fn compact(State(state): State<AppState>) -> Result<Json<CompactReport>, ApiError> {
    let index = handle(&state)?.index.clone();
    Ok(Json(blocking(move || index.compact()).await?.map_err(index_error)?))
}
