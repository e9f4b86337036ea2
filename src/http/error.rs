//! The one error shape of the API: `{"error": {"code": "...", "message": "..."}}` with the right status.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::batcher::BatchError;
use crate::preprocess::{ErrorClass, PreprocessError};

/// Seconds a client is asked to wait after an overload refusal.
const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Answered before the request body was read: the connection cannot carry another request,
    /// and `Connection: close` tells the client so.
    pub close: bool,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            close: false,
        }
    }

    /// The same error, answered before the request body was read.
    pub fn before_body(self) -> ApiError {
        ApiError { close: true, ..self }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn invalid_params(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameters", message)
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// The model has no learned prototypes (a backbone-only import), so nothing can be assigned.
    pub fn no_prototypes() -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_prototypes",
            "this model has no prototypes (it was imported from a backbone-only checkpoint), so images cannot be \
             assigned to them; /v1/embed and /v1/search work, and /v1/clusters when the bundle was imported \
             with --cluster-images",
        )
    }

    /// The model has no projection head (a backbone-only import).
    pub fn no_projection() -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_projection",
            "this model has no projection head (it was imported from a backbone-only checkpoint); \
             use output=embedding",
        )
    }

    /// The model has neither prototypes nor k-means centroids, so the index's items are not clustered.
    pub fn no_clusters() -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_clusters",
            "this model has neither prototypes nor k-means centroids, so items are not clustered; import the \
             checkpoint again with `swav import --cluster-images DIR --clusters K` to cluster them",
        )
    }

    /// A preprocessing failure for image number `index` of the request.
    pub fn from_preprocess(index: usize, err: &PreprocessError) -> ApiError {
        let status = match err.class() {
            ErrorClass::Invalid => StatusCode::BAD_REQUEST,
            ErrorClass::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorClass::Unsupported => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        };
        ApiError::new(status, err.code(), format!("image {index}: {err}"))
    }
}

impl From<BatchError> for ApiError {
    fn from(err: BatchError) -> ApiError {
        match err {
            BatchError::Overloaded { .. } => ApiError {
                retry_after: Some(RETRY_AFTER_SECS),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", err.to_string())
            },
            BatchError::ShuttingDown => ApiError {
                retry_after: Some(RETRY_AFTER_SECS),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", err.to_string())
            },
            BatchError::Inference(_) | BatchError::BadInput(_) => ApiError::internal(err.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}
