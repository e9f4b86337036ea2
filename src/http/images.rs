//! `/v1/embed` and `/v1/assign`: read images, preprocess them (large ones on the decode pool), batch them.

use std::future::Future;
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
use crate::engine::batcher::Room;

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
    let (images, room) = read_with_room(state, read_images(req, state.limits.max_images)).await?;
    infer_images(state, room, images).await
}

/// Runs `read` (the reading of a request's body) once the queue has room for a request of the
/// size recent requests had, waiting for it up to the batcher's admission wait; refuses before
/// the body is read when there is none. Under overload, clients that retry at once would
/// otherwise have their bodies read and parsed only to be refused by [`infer_images`], and
/// refusing them at once lets them burn the CPU on retries (BENCHMARKS.md, "Overload").
///
/// The room is kept for the request while its body arrives, for at most the admission wait too,
/// so that a client sending its body slowly cannot hold the queue's room; a request that
/// arrives later is admitted by whatever room is free then.
///
/// `read` is not polled before the wait is over, and the request's share of the byte budget is
/// taken at the first read of its body ([`super::limits`]), so a waiting request holds none.
pub async fn read_with_room<'s, T>(
    state: &'s AppState,
    read: impl Future<Output = Result<T, ApiError>>,
) -> Result<(T, Option<Room<'s>>), ApiError> {
    let typical = state.batcher.typical_request().min(state.limits.max_images);
    let room = state.batcher.reserve(typical).await.map_err(|e| ApiError::from(e).before_body())?;
    let hold = state.batcher.config().admission_wait;
    if hold.is_zero() {
        // Without waiting, a check that there is room: the body is read without holding it.
        drop(room);
        return Ok((read.await?, None));
    }
    tokio::pin!(read);
    tokio::select! {
        read = &mut read => Ok((read?, Some(room))),
        () = tokio::time::sleep(hold) => {
            drop(room);
            Ok((read.await?, None))
        }
    }
}

/// Preprocesses and infers already-read images; the first failure fails the whole request and
/// withdraws its other images from the queue. `room`, reserved before the body was read, is
/// used first.
pub async fn infer_images(state: &AppState, room: Option<Room<'_>>, images: Vec<Bytes>) -> Result<Vec<ImageOutput>, ApiError> {
    Ok(infer(state, room, images, false).await?.into_iter().map(|(out, _)| out).collect())
}

/// Like [`infer_images`], with a thumbnail of each preprocessed image where the server keeps them.
pub async fn infer_images_with_thumbnails(
    state: &AppState,
    room: Option<Room<'_>>,
    images: Vec<Bytes>,
) -> Result<Vec<(ImageOutput, Option<Vec<u8>>)>, ApiError> {
    infer(state, room, images, state.thumbnails).await
}

async fn infer(
    state: &AppState,
    room: Option<Room<'_>>,
    images: Vec<Bytes>,
    thumbnails: bool,
) -> Result<Vec<(ImageOutput, Option<Vec<u8>>)>, ApiError> {
    // Admitted before decoding, so an overload costs no decoding; announced, so that a batch
    // being gathered waits for these images.
    let announced = match room {
        Some(room) => room.admit(images.len())?,
        None => state.batcher.admit(images.len())?,
    };
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
