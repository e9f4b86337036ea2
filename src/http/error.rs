//! The one error shape of the API: `{"error": {"code": "...", "message": "..."}}` with the right status.
//!
//! Every code the API can answer is a variant of [`ErrorCode`], which alone decides the code's
//! text, its HTTP status and whether it carries `Retry-After`. `openapi.yaml` lists the same
//! codes as an `enum` (a test in `tests/api.rs` keeps the two equal). Error types of the layers
//! below convert with `From`, so a handler writes `?`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Serialize, Serializer};

use crate::engine::batcher::BatchError;
use crate::index::IndexError;
use crate::preprocess::PreprocessError;

/// Seconds a client is asked to wait after a refusal that retrying soon may cure.
const RETRY_AFTER_SECS: u64 = 1;

/// The stable machine-readable error codes. Renaming one breaks clients: add a new one instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum ErrorCode {
    // 400: the request or an image in it is malformed.
    BadBody,
    BadMultipart,
    InvalidJson,
    InvalidBase64,
    NoImages,
    MalformedRequest,
    AmbiguousFraming,
    EmptyImage,
    TruncatedImage,
    UndecodableImage,
    // 401
    Unauthorized,
    // 404
    NotFound,
    IndexNotEnabled,
    ItemNotFound,
    ThumbnailNotFound,
    ClusterNotFound,
    // 405
    MethodNotAllowed,
    // 409: the model or the index cannot do this now.
    NoPrototypes,
    NoProjection,
    NoClusters,
    CompactionRunning,
    // 413
    BodyTooLarge,
    TooManyImages,
    MetadataTooLarge,
    ImageTooLarge,
    TooManyPixels,
    // 414
    UriTooLong,
    // 415
    UnsupportedMediaType,
    UnsupportedImageFormat,
    // 422: well-formed, but a value is out of range or the JSON body's fields are wrong.
    InvalidRequest,
    InvalidParameters,
    // 429
    Overloaded,
    // 431
    HeadersTooLarge,
    // 500
    InternalError,
    // 503
    NotReady,
    ShuttingDown,
    ServerBusy,
    IndexUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            BadBody | BadMultipart | InvalidJson | InvalidBase64 | NoImages | MalformedRequest | AmbiguousFraming
            | EmptyImage | TruncatedImage | UndecodableImage => StatusCode::BAD_REQUEST,
            Unauthorized => StatusCode::UNAUTHORIZED,
            NotFound | IndexNotEnabled | ItemNotFound | ThumbnailNotFound | ClusterNotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            NoPrototypes | NoProjection | NoClusters | CompactionRunning => StatusCode::CONFLICT,
            BodyTooLarge | TooManyImages | MetadataTooLarge | ImageTooLarge | TooManyPixels => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            UriTooLong => StatusCode::URI_TOO_LONG,
            UnsupportedMediaType | UnsupportedImageFormat => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            InvalidRequest | InvalidParameters => StatusCode::UNPROCESSABLE_ENTITY,
            Overloaded => StatusCode::TOO_MANY_REQUESTS,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            NotReady | ShuttingDown | ServerBusy | IndexUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// `Retry-After` for the refusals that pass by themselves. A poisoned index does not: it
    /// needs a restart.
    pub fn retry_after(self) -> Option<u64> {
        use ErrorCode::*;
        matches!(self, Overloaded | ShuttingDown | NotReady | ServerBusy).then_some(RETRY_AFTER_SECS)
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&PreprocessError> for ErrorCode {
    fn from(err: &PreprocessError) -> ErrorCode {
        match err {
            PreprocessError::Empty => ErrorCode::EmptyImage,
            PreprocessError::Truncated(_) => ErrorCode::TruncatedImage,
            PreprocessError::Undecodable(_) => ErrorCode::UndecodableImage,
            PreprocessError::TooManyBytes { .. } | PreprocessError::DecoderLimit(_) => ErrorCode::ImageTooLarge,
            PreprocessError::TooManyPixels { .. } | PreprocessError::ResizedTooLarge { .. } => ErrorCode::TooManyPixels,
            PreprocessError::UnsupportedFormat(_) => ErrorCode::UnsupportedImageFormat,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Answered before the request body was read: the connection cannot carry another request,
    /// and `Connection: close` tells the client so.
    pub close: bool,
    /// Seconds for `Retry-After`: the code's own rule, or set where the cause passes by itself.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            close: false,
            retry_after: code.retry_after(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The same error, answered before the request body was read.
    pub fn before_body(self) -> ApiError {
        ApiError { close: true, ..self }
    }

    /// A field of the JSON body is wrong (422).
    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    /// A query or path parameter is wrong (422).
    pub fn invalid_parameters(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidParameters, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InternalError, message)
    }

    /// The model has no learned prototypes (a backbone-only import), so nothing can be assigned.
    pub fn no_prototypes() -> ApiError {
        ApiError::new(
            ErrorCode::NoPrototypes,
            "this model has no prototypes (it was imported from a backbone-only checkpoint), so images cannot be \
             assigned to them; /v1/embed and /v1/search work, and /v1/clusters when the bundle was imported \
             with --cluster-images",
        )
    }

    /// The model has no projection head (a backbone-only import).
    pub fn no_projection() -> ApiError {
        ApiError::new(
            ErrorCode::NoProjection,
            "this model has no projection head (it was imported from a backbone-only checkpoint); \
             use output=embedding",
        )
    }

    /// The model has neither prototypes nor k-means centroids, so the index's items are not clustered.
    pub fn no_clusters() -> ApiError {
        ApiError::new(
            ErrorCode::NoClusters,
            "this model has neither prototypes nor k-means centroids, so items are not clustered; import the \
             checkpoint again with `swav import --cluster-images DIR --clusters K` to cluster them",
        )
    }
}

impl From<BatchError> for ApiError {
    fn from(err: BatchError) -> ApiError {
        let code = match err {
            BatchError::Overloaded { .. } => ErrorCode::Overloaded,
            BatchError::ShuttingDown => ErrorCode::ShuttingDown,
            BatchError::Inference(_) | BatchError::BadInput(_) => ErrorCode::InternalError,
        };
        ApiError::new(code, err.to_string())
    }
}

impl From<IndexError> for ApiError {
    fn from(err: IndexError) -> ApiError {
        match err {
            IndexError::InvalidInput(m) => ApiError::new(ErrorCode::InvalidRequest, m),
            IndexError::Poisoned(..) => ApiError::new(ErrorCode::IndexUnavailable, err.to_string()),
            // A remote store that is down or slow may be back soon, unlike a poisoned log.
            IndexError::Unavailable(_) => ApiError {
                retry_after: Some(RETRY_AFTER_SECS),
                ..ApiError::new(ErrorCode::IndexUnavailable, err.to_string())
            },
            IndexError::CompactionRunning { .. } => ApiError::new(ErrorCode::CompactionRunning, err.to_string()),
            other => ApiError::internal(format!("index error: {other}")),
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
        let status = self.status();
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::ErrorClass;

    #[test]
    fn codes_serialise_as_their_snake_case_text() {
        assert_eq!(serde_json::to_value(ErrorCode::TooManyPixels).expect("json"), "too_many_pixels");
        assert_eq!(ErrorCode::InternalError.to_string(), "internal_error");
        assert_eq!(ErrorCode::UriTooLong.as_str(), "uri_too_long");
    }

    /// The preprocessor names its errors for the metrics; the API must answer the same names,
    /// with the status its class implies.
    #[test]
    fn preprocess_errors_keep_their_code_and_class() {
        let samples = [
            PreprocessError::Empty,
            PreprocessError::Truncated(String::new()),
            PreprocessError::Undecodable(String::new()),
            PreprocessError::TooManyBytes { got: 2, limit: 1 },
            PreprocessError::TooManyPixels { width: 2, height: 2, limit: 1 },
            PreprocessError::ResizedTooLarge { width: 2, height: 2, resized_width: 2, resized_height: 2, limit: 1 },
            PreprocessError::DecoderLimit(String::new()),
            PreprocessError::UnsupportedFormat(String::new()),
        ];
        for e in &samples {
            let code = ErrorCode::from(e);
            assert_eq!(code.as_str(), e.code(), "{e:?}");
            let status = match e.class() {
                ErrorClass::Invalid => StatusCode::BAD_REQUEST,
                ErrorClass::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                ErrorClass::Unsupported => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            };
            assert_eq!(code.status(), status, "{e:?}");
        }
    }
}
