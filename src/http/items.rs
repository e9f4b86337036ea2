//! The index routes: add, get and delete items; search by image, vector or id; list clusters;
//! compact. Without `--index` every one of them answers 404 `index_not_enabled`.

use std::sync::Arc;
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
use super::images::{infer_images, infer_images_with_thumbnails, read_with_room};
use super::input::{self, SearchBody, path, query};
use crate::bundle::ClusterSource;
use crate::engine::ImageOutput;
use crate::index::{BackendStats, ClusterInfo, ClusterItems, CompactReport, Hit, IndexBackend, IndexError, Metadata, NewItem, Thumbnail};
use crate::metrics::Metrics;

const DEFAULT_K: usize = 10;
const MAX_K: usize = 1000;
const MAX_EF: usize = 10_000;
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The index as the HTTP layer holds it (whichever backend it is), with the metrics only
/// requests can measure.
#[derive(Clone)]
pub struct IndexHandle {
    pub index: Arc<dyn IndexBackend>,
    search_seconds: Histogram,
}

impl IndexHandle {
    /// Registers the backend's own metrics and the search latency with `metrics`.
    pub fn new(index: Arc<dyn IndexBackend>, metrics: &Metrics) -> IndexHandle {
        let search_seconds = Histogram::with_opts(
            HistogramOpts::new("index_search_duration_seconds", "Time in the index per search query (graph search only)")
                .buckets(vec![0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0]),
        )
        .expect("static metric");
        let collectors = index.collectors().into_iter().chain([Box::new(search_seconds.clone()) as Box<dyn prometheus::core::Collector>]);
        for c in collectors {
            if let Err(e) = metrics.registry.register(c) {
                tracing::warn!(error = %e, "index metrics not registered");
            }
        }
        IndexHandle { index, search_seconds }
    }

    /// Runs `f` on the backend off the async runtime (fsyncs, graph work, network round trips).
    async fn call<T: Send + 'static>(&self, f: impl FnOnce(&dyn IndexBackend) -> Result<T, IndexError> + Send + 'static) -> Result<T, ApiError> {
        let index = self.index.clone();
        Ok(blocking(move || f(index.as_ref())).await??)
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

/// Runs blocking index work (fsync, graph inserts) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("index task failed: {e}")))
}


// ------------------------------------------------------------------ POST /v1/items

#[derive(Serialize)]
pub struct AddResponse {
    added: usize,
    ids: Vec<String>,
}

pub async fn add_items(State(state): State<AppState>, req: Request) -> Result<Json<AddResponse>, ApiError> {
    let h = handle(&state)?.clone();
    let (uploads, room) = read_with_room(&state, input::read_uploads(req, &state.limits)).await?;
    if uploads.is_empty() {
        return Err(ApiError::invalid_request("no items given"));
    }
    for (i, u) in uploads.iter().enumerate() {
        crate::index::check_id(&u.id).map_err(|e| ApiError::invalid_request(format!("item {i}: {e}")))?;
    }
    let (meta, images): (Vec<(String, Option<Metadata>)>, Vec<Bytes>) =
        uploads.into_iter().map(|u| ((u.id, u.metadata), u.image)).unzip();
    let outputs = infer_images_with_thumbnails(&state, room, images).await?;
    let ids: Vec<String> = meta.iter().map(|(id, _)| id.clone()).collect();
    let items = meta
        .into_iter()
        .zip(outputs)
        .map(|((id, metadata), (out, thumbnail))| NewItem { cluster: cluster_of(&out), vector: out.embedding, id, metadata, thumbnail })
        .collect();
    let report = h.call(move |index| index.add(items)).await?;
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
        let id = id.to_string();
        let key = id.clone();
        return thumbnail(h.call(move |index| index.thumbnail(&key)).await?, &id, &headers);
    }
    let key = id.clone();
    h.call(move |index| index.get(&key)).await?.map(|item| Json(item).into_response()).ok_or_else(|| item_not_found(&id))
}

const THUMBNAIL_SUFFIX: &str = "/thumbnail";

/// The stored thumbnail with its type, an ETag from its bytes (a replaced item gets a new one),
/// and `private, no-cache`: browsers keep it but ask again, answered by 304 while it is the same,
/// and no shared cache keeps what may sit behind an API key.
fn thumbnail(stored: Thumbnail, id: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let bytes = match stored {
        Thumbnail::Bytes(bytes) => bytes,
        Thumbnail::NoItem => return Err(item_not_found(id)),
        Thumbnail::NoThumbnail => {
            return Err(ApiError::new(
                ErrorCode::ThumbnailNotFound,
                format!("item {id:?} has no thumbnail (added before thumbnails existed, or with --thumbnails=false)"),
            ));
        }
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
    let h = handle(&state)?;
    let id = path(id)?;
    let key = id.clone();
    match h.call(move |index| index.delete(&key)).await? {
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
        return Err(ApiError::invalid_parameters(format!("k must be between 1 and {MAX_K}, got {k}")));
    }
    if let Some(ef) = q.ef.filter(|ef| !(1..=MAX_EF).contains(ef)) {
        return Err(ApiError::invalid_parameters(format!("ef must be between 1 and {MAX_EF}, got {ef}")));
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
                let hits = timed(&|| h.index.search_by_id(&id, k, ef, cluster)?.ok_or_else(|| item_not_found(&id)))?;
                Ok(vec![hits])
            }
            Queries::Vectors(vs) => {
                let started = Instant::now();
                let results = h.index.search_many(&vs, k, ef, cluster)?;
                // One request for all of them: each query is counted with its share of the time,
                // so that the histogram's sum stays the time spent in the index.
                let share = started.elapsed().as_secs_f64() / vs.len().max(1) as f64;
                for _ in &vs {
                    h.search_seconds.observe(share);
                }
                Ok(results)
            }
        }
    })
    .await??;
    Ok(Json(SearchResponse { results }))
}

/// The search's queries: a vector, an id, or the embeddings of the body's images.
async fn read_queries(state: &AppState, h: &IndexHandle, req: Request) -> Result<Queries, ApiError> {
    let dim = h.index.identity().dim;
    let (body, room) = if input::content_type(&req) != "application/json" {
        // Images are coming: admission before their body is read, as on /v1/embed.
        read_with_room(state, input::read_search(req, state.limits.max_images, dim)).await?
    } else {
        (input::read_search(req, state.limits.max_images, dim).await?, None)
    };
    Ok(match body {
        SearchBody::Vector(v) => Queries::Vectors(vec![v]),
        SearchBody::Id(id) => Queries::Id(id),
        SearchBody::Images(images) => {
            let outputs = infer_images(state, room, images).await?;
            Queries::Vectors(outputs.into_iter().map(|o| o.embedding).collect())
        }
    })
}

// ------------------------------------------------------------------ clusters and maintenance

#[derive(Serialize)]
pub struct ClustersResponse {
    clusters: Vec<ClusterInfo>,
}

pub async fn clusters(State(state): State<AppState>) -> Result<Json<ClustersResponse>, ApiError> {
    let h = handle(&state)?;
    let count = clustered(&state)?;
    Ok(Json(ClustersResponse { clusters: h.call(move |index| index.clusters(count)).await? }))
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
        return Err(ApiError::invalid_parameters(format!("limit must be between 1 and {MAX_PAGE}, got {limit}")));
    }
    let offset = q.offset.unwrap_or(0);
    Ok(Json(h.call(move |index| index.cluster_items(cluster, limit, offset)).await?))
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

pub async fn stats(State(state): State<AppState>) -> Result<Json<BackendStats>, ApiError> {
    Ok(Json(handle(&state)?.call(|index| index.stats()).await?))
}

pub async fn compact(State(state): State<AppState>) -> Result<Json<CompactReport>, ApiError> {
    Ok(Json(handle(&state)?.call(|index| index.compact()).await?))
}

/// Whether the index can answer, for `/ready`: Ok when there is none.
pub async fn ready(state: &AppState) -> Result<(), ApiError> {
    match &state.index {
        Some(h) => h.call(|index| index.check_ready()).await,
        None => Ok(()),
    }
}
