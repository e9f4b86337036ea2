//! Admission by request size: a body declared over the limit is refused before it is read, and
//! bodies in flight share one server-wide byte budget.
//!
//! The budget bounds the memory of requests in total, where the body limit bounds one. A
//! request holds its share from admission until its handler returns: the declared
//! `Content-Length`, or the whole body limit when the length is not declared (chunked). Past
//! the budget the answer is 503 with Retry-After, at once and without reading the body.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::body::HttpBody as _;

use super::AppState;
use super::error::{ApiError, ErrorCode};

pub async fn admit_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let max = state.limits.max_body_bytes as u64;
    let hint = req.body().size_hint();
    if hint.lower() > max {
        return ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("the request body is {} bytes (Content-Length), over the limit of {max} bytes", hint.lower()),
        )
        .before_body()
        .into_response();
    }
    let reserve = hint.exact().unwrap_or(max);
    let permit = if reserve == 0 {
        None
    } else {
        let bytes = u32::try_from(reserve).unwrap_or(u32::MAX);
        match state.inflight_bytes.clone().try_acquire_many_owned(bytes) {
            Ok(p) => Some(p),
            Err(_) => {
                return ApiError::new(
                    ErrorCode::ServerBusy,
                    "the server is reading as many request bytes as it holds at once; retry shortly",
                )
                .before_body()
                .into_response();
            }
        }
    };
    let response = next.run(req).await;
    drop(permit);
    response
}
