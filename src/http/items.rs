//! The index routes: add, get and delete items; search by image, vector or id; list clusters;
//! compact. Without `--index` every one of them answers 404 `index_not_enabled`.

use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::Digest;
use prometheus::{Histogram, HistogramOpts};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::{ApiError, ErrorCode};
use super::images::{infer_images, infer_images_with_thumbnails, room_for_a_request};
use super::input::{decode_base64, decode_images, next_part, open_multipart, part_bytes, read_body, read_images, too_many};
use super::json::{self, Caps};
use crate::bundle::ClusterSource;
use crate::engine::ImageOutput;
use crate::index::{ClusterInfo, ClusterItems, CompactReport, Hit, Index, IndexCollector, IndexStats, Metadata, NewItem};
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
            ErrorCode::IndexNotEnabled,
            "this server has no index; start it with --index DIR to use items, search and clusters",
        )
    })
}

fn item_not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::ItemNotFound, format!("no item with id {id:?}"))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError::new(ErrorCode::InvalidParameters, e.body_text()))
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v).map_err(|e| ApiError::new(ErrorCode::InvalidParameters, e.body_text()))
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

fn invalid_params(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidParameters, message)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

// ------------------------------------------------------------------ POST /v1/items

#[derive(Serialize)]
pub struct AddResponse {
    added: usize,
    ids: Vec<String>,
}

struct Upload {
    id: String,
    image: Bytes,
    metadata: Option<Metadata>,
}

pub async fn add_items(State(state): State<AppState>, req: Request) -> Result<Json<AddResponse>, ApiError> {
    let h = handle(&state)?.clone();
    room_for_a_request(&state)?;
    let uploads = match content_type(&req).as_str() {
        "application/json" => uploads_from_json(&state, req).await?,
        "multipart/form-data" => uploads_from_multipart(req, state.limits.max_images).await?,
        other => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "Content-Type {other:?} is not accepted; send application/json {{\"items\": [{{\"id\", \"image\" (base64), \"metadata\"}}]}} \
                     or multipart/form-data whose file parts are named by item id"
                ),
            ));
        }
    };
    if uploads.is_empty() {
        return Err(invalid("no items given"));
    }
    for (i, u) in uploads.iter().enumerate() {
        crate::index::check_id(&u.id).map_err(|e| invalid(format!("item {i}: {e}")))?;
    }
    let (meta, images): (Vec<(String, Option<Metadata>)>, Vec<Bytes>) =
        uploads.into_iter().map(|u| ((u.id, u.metadata), u.image)).unzip();
    let outputs = infer_images_with_thumbnails(&state, images).await?;
    let ids: Vec<String> = meta.iter().map(|(id, _)| id.clone()).collect();
    let items = meta
        .into_iter()
        .zip(outputs)
        .map(|((id, metadata), (out, thumbnail))| NewItem { cluster: cluster_of(&out), vector: out.embedding, id, metadata, thumbnail })
        .collect();
    let index = h.index.clone();
    let report = blocking(move || index.add(items)).await??;
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

const ITEMS_SHAPE: &str = "{\"items\": [{\"id\": string, \"image\": base64, \"metadata\": any}]}";

async fn uploads_from_json(state: &AppState, req: Request) -> Result<Vec<Upload>, ApiError> {
    let body = read_body(req).await?;
    let caps = Caps { images: state.limits.max_images, vector: 0 };
    let items = json::parse(&body, caps, ITEMS_SHAPE)?.items.ok_or_else(|| invalid(format!("expected {ITEMS_SHAPE}")))?;
    let max_meta = state.limits.max_metadata_bytes;
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| {
            let metadata = it.metadata.map(|m| {
                if m.get().len() > max_meta {
                    return Err(ApiError::new(
                        ErrorCode::MetadataTooLarge,
                        format!("item {i} ({}): its metadata is {} bytes, over the limit of {max_meta}", it.id, m.get().len()),
                    ));
                }
                Ok(Metadata::from_raw(m))
            });
            let metadata = metadata.transpose()?;
            let image = decode_base64(&it.image.0)
                .map_err(|e| ApiError::new(ErrorCode::InvalidBase64, format!("item {i} ({}): not valid base64: {e}", it.id)))?;
            Ok(Upload { id: it.id, image: Bytes::from(image), metadata })
        })
        .collect()
}

/// Parts are counted as they arrive: the one over the limit is refused before it is read.
async fn uploads_from_multipart(req: Request, max_images: usize) -> Result<Vec<Upload>, ApiError> {
    let mut multipart = open_multipart(req).await?;
    let mut uploads = Vec::new();
    while let Some(field) = next_part(&mut multipart).await? {
        if uploads.len() == max_images {
            return Err(too_many(max_images + 1, max_images));
        }
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
            ErrorCode::ThumbnailNotFound,
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
    match blocking(move || index.delete(&key)).await?? {
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
        return Err(invalid_params(format!("k must be between 1 and {MAX_K}, got {k}")));
    }
    if let Some(ef) = q.ef.filter(|ef| !(1..=MAX_EF).contains(ef)) {
        return Err(invalid_params(format!("ef must be between 1 and {MAX_EF}, got {ef}")));
    }
    if let Some(c) = q.cluster {
        check_cluster(&state, c)?;
    }
    let queries = read_queries(&state, &h, req).await?;
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
                .map(|v| timed(&|| h.index.search(v, k, ef, cluster).map_err(ApiError::from)))
                .collect(),
        }
    })
    .await??;
    Ok(Json(SearchResponse { results }))
}

/// A search body is an image in any `/v1/embed` form, `{"vector": [...]}`, or `{"id": "..."}`.
async fn read_queries(state: &AppState, h: &IndexHandle, req: Request) -> Result<Queries, ApiError> {
    if content_type(&req) != "application/json" {
        room_for_a_request(state)?;
        let images = read_images(req, state.limits.max_images).await?;
        return Ok(Queries::Vectors(embed(state, images).await?));
    }
    let shape = "{\"vector\": [numbers]}, {\"id\": string} or {\"images\": [base64, ...]}";
    let body = read_body(req).await?;
    let caps = Caps { images: state.limits.max_images, vector: h.index.identity().dim };
    let parsed = json::parse(&body, caps, shape)?;
    if parsed.keys() != 1 {
        return Err(invalid(format!("the JSON body must be {shape}")));
    }
    if let Some(v) = parsed.vector {
        return Ok(Queries::Vectors(vec![v]));
    }
    if let Some(id) = parsed.id {
        return Ok(Queries::Id(id));
    }
    if let Some(images) = parsed.images {
        let images = decode_images(&images)?;
        drop(body);
        return Ok(Queries::Vectors(embed(state, images).await?));
    }
    Err(invalid(format!("the JSON body must be {shape}")))
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
    check_cluster(&state, cluster)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(invalid_params(format!("limit must be between 1 and {MAX_PAGE}, got {limit}")));
    }
    Ok(Json(h.index.cluster_items(cluster, limit, q.offset.unwrap_or(0))))
}

/// A cluster the model does not have is a 404, on every route.
fn check_cluster(state: &AppState, cluster: u32) -> Result<(), ApiError> {
    let k = clustered(state)?;
    if cluster as usize >= k {
        let what = match state.model.manifest.cluster_source() {
            ClusterSource::Centroids(_) => "k-means centroids",
            _ => "prototypes",
        };
        return Err(ApiError::new(
            ErrorCode::ClusterNotFound,
            format!("no cluster {cluster}: the model has {k} {what} (0 to {})", k.saturating_sub(1)),
        ));
    }
    Ok(())
}

pub async fn stats(State(state): State<AppState>) -> Result<Json<IndexStats>, ApiError> {
    Ok(Json(handle(&state)?.index.stats()))
}

pub async fn compact(State(state): State<AppState>) -> Result<Json<CompactReport>, ApiError> {
    let index = handle(&state)?.index.clone();
    Ok(Json(blocking(move || index.compact()).await??))
}
