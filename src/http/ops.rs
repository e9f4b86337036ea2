//! Operational routes: liveness, readiness, metrics and the model description.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;

use super::AppState;
use super::error::{ApiError, ErrorCode};
use crate::bundle::{ClusterSource, InputSpec, Outputs};

#[derive(Serialize)]
pub struct Status {
    status: &'static str,
}

pub async fn health() -> Json<Status> {
    Json(Status { status: "ok" })
}

pub async fn ready(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    if !state.ready.load(Ordering::Acquire) {
        return Err(ApiError::new(ErrorCode::NotReady, "the model is loading or warming up"));
    }
    super::items::ready(&state).await?;
    Ok(Json(Status { status: "ready" }))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

#[derive(Serialize)]
pub struct ModelResponse {
    name: String,
    description: String,
    created_utc: Option<String>,
    backbone: Option<String>,
    schema_version: u32,
    model_sha256: String,
    input: InputSpec,
    outputs: Outputs,
    num_prototypes: usize,
    /// What /v1/clusters groups by: "prototypes", "centroids" (k-means at import) or "none".
    clusters: &'static str,
    dataset: serde_json::Value,
    evaluation: Option<serde_json::Value>,
    execution_provider: String,
    device: String,
    intra_threads: usize,
    batching: Batching,
    limits: Limits,
}

#[derive(Serialize)]
struct Batching {
    max_batch_size: usize,
    max_delay_us: u64,
    queue_capacity: usize,
    workers: usize,
}

#[derive(Serialize)]
struct Limits {
    max_images_per_request: usize,
    max_body_bytes: usize,
    max_pixels: u64,
    max_image_bytes: usize,
}

pub async fn model(State(state): State<AppState>) -> Json<ModelResponse> {
    let m = &state.model.manifest;
    let batching = state.batcher.config();
    let decode = state.preprocessor.limits();
    Json(ModelResponse {
        name: m.name.clone(),
        description: m.description.clone(),
        created_utc: m.created_utc.clone(),
        backbone: m.backbone.clone(),
        schema_version: m.schema_version,
        model_sha256: m.model_sha256.clone(),
        input: m.input.clone(),
        outputs: m.outputs.clone(),
        num_prototypes: m.num_prototypes,
        clusters: match m.cluster_source() {
            ClusterSource::Prototypes(_) => "prototypes",
            ClusterSource::Centroids(_) => "centroids",
            ClusterSource::None => "none",
        },
        dataset: m.dataset.clone(),
        evaluation: m.evaluation.clone(),
        execution_provider: state.model.provider.clone(),
        device: state.model.device.clone(),
        intra_threads: state.model.intra_threads,
        batching: Batching {
            max_batch_size: batching.max_batch_size,
            max_delay_us: batching.max_delay.as_micros() as u64,
            queue_capacity: batching.queue_capacity,
            workers: state.batcher.workers(),
        },
        limits: Limits {
            max_images_per_request: state.limits.max_images,
            max_body_bytes: state.limits.max_body_bytes,
            max_pixels: decode.max_pixels,
            max_image_bytes: decode.max_bytes,
        },
    })
}
