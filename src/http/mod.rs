//! The REST API: routes, the three image input forms, JSON errors, auth, limits.
//!
//! This layer talks to the batcher and the preprocessor only; it knows nothing of ONNX.
//!
//! Extending it (the index routes): add a field to [`AppState`] (set in [`AppState::new`], with a
//! `with_…` builder), and merge the new routes in [`v1_routes`]; they then get auth, metrics,
//! the body limit and JSON errors like every other `/v1` route.

pub mod error;
pub mod images;
pub mod input;
pub mod items;
pub mod json;
pub mod limits;
pub mod middleware;
pub mod ops;
pub mod responses;
pub mod server;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Semaphore;
use tower_http::catch_panic::CatchPanicLayer;

use crate::bundle::Manifest;
use crate::engine::batcher::Batcher;
use crate::metrics::Metrics;
use crate::preprocess::Preprocessor;
use error::ApiError;

/// What `/v1/model` reports about the loaded model besides its manifest.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub manifest: Manifest,
    /// Execution provider in use: "cpu" or "cuda".
    pub provider: String,
    /// The device as requested ("cpu", "cuda:0", "auto").
    pub device: String,
    pub intra_threads: usize,
}

/// Per-request limits enforced by the HTTP layer (per-image limits live in the preprocessor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_images: usize,
    pub max_body_bytes: usize,
    /// Largest metadata of one item, as JSON text.
    pub max_metadata_bytes: usize,
    /// Request bodies being read or handled at once, in bytes, summed over all requests.
    pub max_inflight_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_images: 64,
            max_body_bytes: 64 * 1024 * 1024,
            max_metadata_bytes: 64 * 1024,
            max_inflight_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Shared state of every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub model: Arc<ModelInfo>,
    pub preprocessor: Arc<Preprocessor>,
    pub batcher: Arc<Batcher>,
    pub metrics: Arc<Metrics>,
    /// Set once the model is warmed up; `/ready` answers 503 until then.
    pub ready: Arc<AtomicBool>,
    pub limits: RequestLimits,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<Arc<str>>,
    /// Bounds concurrent image decodes (the CPU pool).
    pub decode_permits: Arc<Semaphore>,
    /// The nearest-neighbour index (`--index`); without it the index routes answer 404.
    pub index: Option<Arc<items::IndexHandle>>,
    /// Whether items added through the API keep a thumbnail (`--thumbnails`).
    pub thumbnails: bool,
    /// Whether `/` serves the web page (`--no-ui` turns it off).
    pub ui: bool,
    /// One permit per byte of request body in flight (`limits.max_inflight_bytes`).
    pub inflight_bytes: Arc<Semaphore>,
}

impl AppState {
    /// State with default limits, no API key, one decode slot per core, not yet ready.
    pub fn new(model: ModelInfo, preprocessor: Preprocessor, batcher: Arc<Batcher>, metrics: Arc<Metrics>) -> AppState {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        AppState {
            model: Arc::new(model),
            preprocessor: Arc::new(preprocessor),
            batcher,
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            limits: RequestLimits::default(),
            api_key: None,
            decode_permits: Arc::new(Semaphore::new(cores)),
            index: None,
            thumbnails: true,
            ui: true,
            inflight_bytes: Arc::new(Semaphore::new(RequestLimits::default().max_inflight_bytes)),
        }
    }

    /// Serves `index` (any backend) on the index routes and exports its metrics.
    pub fn with_index(self, index: impl crate::index::IndexBackend) -> AppState {
        self.with_index_backend(Arc::new(index))
    }

    pub fn with_index_backend(mut self, index: Arc<dyn crate::index::IndexBackend>) -> AppState {
        self.index = Some(Arc::new(items::IndexHandle::new(index, &self.metrics)));
        self
    }

    pub fn with_thumbnails(mut self, on: bool) -> AppState {
        self.thumbnails = on;
        self
    }

    pub fn with_ui(mut self, on: bool) -> AppState {
        self.ui = on;
        self
    }

    pub fn with_limits(mut self, limits: RequestLimits) -> AppState {
        self.limits = limits;
        self.inflight_bytes = Arc::new(Semaphore::new(limits.max_inflight_bytes.min(Semaphore::MAX_PERMITS)));
        self
    }

    pub fn with_api_key(mut self, key: Option<String>) -> AppState {
        self.api_key = key.filter(|k| !k.is_empty()).map(Arc::from);
        self
    }

    pub fn with_decode_threads(mut self, n: usize) -> AppState {
        self.decode_permits = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    pub fn mark_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        self.metrics.ready.set(1);
    }
}

/// The `/v1` routes, all behind the API key.
fn v1_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/embed", post(images::embed))
        .route("/v1/assign", post(images::assign))
        .route("/v1/model", get(ops::model))
        .route("/v1/items", post(items::add_items))
        .route("/v1/items/{*id}", get(items::get_item).delete(items::delete_item))
        .route("/v1/search", post(items::search))
        .route("/v1/clusters", get(items::clusters))
        .route("/v1/clusters/{id}/items", get(items::cluster_items))
        .route("/v1/index", get(items::stats))
        .route("/v1/index/compact", post(items::compact))
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let v1 = v1_routes().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::require_api_key,
    ));
    let page = if state.ui { crate::ui::router() } else { Router::new() };
    Router::new()
        .merge(page)
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .merge(v1)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::admit_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::observe))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::internal("internal error").into_response()
}
