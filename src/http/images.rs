//! `/v1/embed` and `/v1/assign`: read images, preprocess them (large ones on the decode pool), batch them.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use futures::future::try_join_all;
use serde::Deserialize;

use super::AppState;
use super::error::{ApiError, ErrorCode};
use super::input::{query, read_images};
use super::responses::{self, AssignOptions, AssignResponse, EmbedResponse, OutputKind};
use crate::engine::ImageOutput;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedQuery {
    output: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignQuery {
    top_k: Option<usize>,
    temperature: Option<f64>,
}

pub async fn embed(
    State(state): State<AppState>,
    q: Result<Query<EmbedQuery>, QueryRejection>,
    req: Request,
) -> Result<Json<EmbedResponse>, ApiError> {
    let q = query(q)?;
    let kind = OutputKind::parse(q.output.as_deref()).map_err(ApiError::invalid_parameters)?;
    if kind == OutputKind::Projection && state.model.manifest.outputs.projection.is_none() {
        return Err(ApiError::no_projection());
    }
    let outputs = infer_request(&state, req).await?;
    Ok(Json(responses::embed_response(&state.model.manifest, kind, &outputs)))
}

pub async fn assign(
    State(state): State<AppState>,
    q: Result<Query<AssignQuery>, QueryRejection>,
    req: Request,
) -> Result<Json<AssignResponse>, ApiError> {
    let q = query(q)?;
    if state.model.manifest.prototypes().is_none() {
        return Err(ApiError::no_prototypes());
    }
    let options = AssignOptions::new(q.top_k, q.temperature, state.model.manifest.num_prototypes)
        .map_err(ApiError::invalid_parameters)?;
    let outputs = infer_request(&state, req).await?;
    Ok(Json(responses::assign_response(&state.model.manifest, options, &outputs)))
}

/// Every image of the request through preprocess and the batcher, outputs in input order.
pub async fn infer_request(state: &AppState, req: Request) -> Result<Vec<ImageOutput>, ApiError> {
    room_for_a_request(state)?;
    let images = read_images(req, state.limits.max_images).await?;
    infer_images(state, images).await
}

/// Refuses before the body is read unless the queue could take a request of the size recent
/// requests had. Under overload, clients that retry at once would otherwise have their bodies
/// read and parsed only to be refused by [`infer_images`], which cost most of the goodput under
/// overload (BENCHMARKS.md, "Overload"). Near a full queue this
/// refuses some requests smaller than the recent ones that would have fitted.
pub fn room_for_a_request(state: &AppState) -> Result<(), ApiError> {
    let typical = state.batcher.typical_request().min(state.limits.max_images);
    state.batcher.check_room(typical).map_err(|e| ApiError::from(e).before_body())
}

/// Preprocesses and infers already-read images; the first failure fails the whole request and
/// withdraws its other images from the queue.
pub async fn infer_images(state: &AppState, images: Vec<Bytes>) -> Result<Vec<ImageOutput>, ApiError> {
    Ok(infer(state, images, false).await?.into_iter().map(|(out, _)| out).collect())
}

/// Like [`infer_images`], with a thumbnail of each preprocessed image where the server keeps them.
pub async fn infer_images_with_thumbnails(state: &AppState, images: Vec<Bytes>) -> Result<Vec<(ImageOutput, Option<Vec<u8>>)>, ApiError> {
    infer(state, images, state.thumbnails).await
}

async fn infer(state: &AppState, images: Vec<Bytes>, thumbnails: bool) -> Result<Vec<(ImageOutput, Option<Vec<u8>>)>, ApiError> {
    // Admitted before decoding, so an overload costs no decoding; announced, so that a batch
    // being gathered waits for these images.
    let announced = state.batcher.admit(images.len())?;
    try_join_all(images.into_iter().zip(announced).enumerate().map(|(i, (bytes, announced))| async move {
        let (tensor, thumbnail) = prepare(state, i, bytes, thumbnails).await?;
        let out = announced.submit(tensor).await.map_err(ApiError::from)?;
        Ok((out, thumbnail))
    }))
    .await
}

/// Decodes on the bounded blocking pool so the async runtime never spends long decoding. Images
/// of at most 64×64 pixels are the exception: they decode in microseconds, less than the
/// hand-off to the pool costs (measured: BENCHMARKS.md, "Serving").
async fn prepare(state: &AppState, index: usize, bytes: Bytes, thumbnail: bool) -> Result<(Vec<f32>, Option<Vec<u8>>), ApiError> {
    let (result, decoding) = if state.preprocessor.is_small(&bytes) {
        let started = Instant::now();
        (state.preprocessor.prepare_item(&bytes, thumbnail), started.elapsed())
    } else {
        let _permit = state
            .decode_permits
            .acquire()
            .await
            .map_err(|_| ApiError::internal("decode pool closed"))?;
        let preprocessor = state.preprocessor.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || preprocessor.prepare_item(&bytes, thumbnail))
            .await
            .map_err(|e| ApiError::internal(format!("decode task failed: {e}")))?;
        (result, started.elapsed())
    };
    let metrics = &state.metrics;
    metrics.decode_seconds.observe(decoding.as_secs_f64());
    match result {
        Ok(tensor) => {
            metrics.images_decoded.inc();
            Ok(tensor)
        }
        Err(e) => {
            metrics.images_rejected.with_label_values(&[e.code()]).inc();
            Err(ApiError::new(ErrorCode::from(&e), format!("image {index}: {e}")))
        }
    }
}
