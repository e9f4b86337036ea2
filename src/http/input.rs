//! Everything a handler reads from a request: the media type, the body under its limits, the
//! three image forms (a raw body, multipart file parts, JSON base64), the items of
//! `POST /v1/items`, the body of `POST /v1/search`, and the query string and path parameters.
//! Each maps what it cannot read to the API error a client should see (400, 413, 415, 422).

use axum::body::Bytes;
use axum::extract::multipart::Field;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, Multipart, Path, Query, Request};
use axum::http::{StatusCode, header};
use base64::Engine as _;

use super::error::{ApiError, ErrorCode};
use super::json::{self, Caps, Text};
use super::RequestLimits;
use crate::index::Metadata;

const ACCEPTED: &str = "send image/* or application/octet-stream (one image), multipart/form-data (file parts) \
                        or application/json {\"images\": [base64, ...]}";

/// The request's media type, lowercased and without parameters; empty when it has none.
pub(super) fn content_type(req: &Request) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// The query string as `T`; a bad one is 422 `invalid_parameters`. Handlers take the extractor's
/// `Result` and call this where the check belongs in their order of checks.
pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError::invalid_parameters(e.body_text()))
}

/// A path parameter as `T`; a bad one is 422 `invalid_parameters`.
pub(super) fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v).map_err(|e| ApiError::invalid_parameters(e.body_text()))
}

// ------------------------------------------------------------------ images

/// Reads the images from any accepted request form, in input order, enforcing `max_images`.
pub async fn read_images(req: Request, max_images: usize) -> Result<Vec<Bytes>, ApiError> {
    let images = match content_type(&req).as_str() {
        "" => {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType, format!("missing Content-Type; {ACCEPTED}")));
        }
        "multipart/form-data" => read_multipart(req, max_images).await?,
        "application/json" => read_json(req, max_images).await?,
        t if t.starts_with("image/") || t == "application/octet-stream" => vec![read_body(req).await?],
        other => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!("Content-Type {other} is not accepted; {ACCEPTED}"),
            ));
        }
    };
    if images.len() > max_images {
        return Err(too_many(images.len(), max_images));
    }
    Ok(images)
}

fn too_many(got: usize, max: usize) -> ApiError {
    ApiError::new(
        ErrorCode::TooManyImages,
        format!("the request has {got} images, over the limit of {max} per request"),
    )
}

fn body_error(status: StatusCode, detail: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::BodyTooLarge, format!("the request body is over the size limit: {detail}"))
    } else {
        ApiError::new(ErrorCode::BadBody, format!("could not read the request body: {detail}"))
    }
}

/// The whole body, under the router's body limit (413 past it).
async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, &())
        .await
        .map_err(|e| body_error(e.status(), e.body_text()))
}

/// A multipart body, as JSON errors: a bad header is 400.
async fn open_multipart(req: Request) -> Result<Multipart, ApiError> {
    Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::new(ErrorCode::BadMultipart, e.body_text()))
}

/// The next part, or None after the last; a malformed body is 400 and an over-limit one 413.
async fn next_part(multipart: &mut Multipart) -> Result<Option<Field<'_>>, ApiError> {
    multipart.next_field().await.map_err(|e| multipart_error(e.status(), e.body_text()))
}

/// A part's whole content, with the same error mapping as [`next_part`].
async fn part_bytes(field: Field<'_>) -> Result<Bytes, ApiError> {
    field.bytes().await.map_err(|e| multipart_error(e.status(), e.body_text()))
}

async fn read_multipart(req: Request, max_images: usize) -> Result<Vec<Bytes>, ApiError> {
    let mut multipart = open_multipart(req).await?;
    let mut images = Vec::new();
    while let Some(field) = next_part(&mut multipart).await? {
        let is_file = field.file_name().is_some()
            || field
                .content_type()
                .is_some_and(|t| t.starts_with("image/") || t == "application/octet-stream");
        if !is_file {
            continue;
        }
        if images.len() == max_images {
            return Err(too_many(max_images + 1, max_images));
        }
        images.push(part_bytes(field).await?);
    }
    if images.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoImages,
            "the multipart body has no file parts (give each image a filename or an image/* content type)",
        ));
    }
    Ok(images)
}

fn multipart_error(status: StatusCode, detail: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        body_error(status, detail)
    } else {
        ApiError::new(ErrorCode::BadMultipart, format!("malformed multipart body: {detail}"))
    }
}

async fn read_json(req: Request, max_images: usize) -> Result<Vec<Bytes>, ApiError> {
    let body = read_body(req).await?;
    let caps = Caps { images: max_images, vector: 0 };
    let images = json::parse(&body, caps, "{\"images\": [base64, ...]}")?.images.unwrap_or_default();
    decode_images(&images)
}

/// Decodes the base64 images of a JSON body; at least one is required.
fn decode_images(images: &[Text<'_>]) -> Result<Vec<Bytes>, ApiError> {
    if images.is_empty() {
        return Err(ApiError::invalid_request("\"images\" must hold at least one base64 image"));
    }
    images
        .iter()
        .enumerate()
        .map(|(i, s)| decode_base64(&s.0).map(Bytes::from).map_err(|e| {
            ApiError::new(ErrorCode::InvalidBase64, format!("image {i}: not valid base64: {e}"))
        }))
        .collect()
}

/// Standard base64, optionally as a `data:...;base64,` URL, whitespace ignored.
pub fn decode_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let payload = match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(";base64,").map_or(rest, |(_, p)| p),
        None => s,
    };
    if !payload.bytes().any(|b| b.is_ascii_whitespace()) {
        return base64::engine::general_purpose::STANDARD.decode(payload);
    }
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(compact)
}

// ------------------------------------------------------------------ POST /v1/items

/// One item to add, as read from the request.
pub(super) struct Upload {
    pub id: String,
    pub image: Bytes,
    pub metadata: Option<Metadata>,
}

const ITEMS_SHAPE: &str = "{\"items\": [{\"id\": string, \"image\": base64, \"metadata\": any}]}";

/// The items of `POST /v1/items`: JSON `{"items": [...]}`, or multipart file parts named by id.
pub(super) async fn read_uploads(req: Request, limits: &RequestLimits) -> Result<Vec<Upload>, ApiError> {
    match content_type(&req).as_str() {
        "application/json" => uploads_from_json(req, limits).await,
        "multipart/form-data" => uploads_from_multipart(req, limits.max_images).await,
        other => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!(
                "Content-Type {other:?} is not accepted; send application/json {{\"items\": [{{\"id\", \"image\" (base64), \"metadata\"}}]}} \
                 or multipart/form-data whose file parts are named by item id"
            ),
        )),
    }
}

async fn uploads_from_json(req: Request, limits: &RequestLimits) -> Result<Vec<Upload>, ApiError> {
    let body = read_body(req).await?;
    let caps = Caps { images: limits.max_images, vector: 0 };
    let items = json::parse(&body, caps, ITEMS_SHAPE)?
        .items
        .ok_or_else(|| ApiError::invalid_request(format!("expected {ITEMS_SHAPE}")))?;
    let max_meta = limits.max_metadata_bytes;
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

// ------------------------------------------------------------------ POST /v1/search

/// What `POST /v1/search` asks for.
pub(super) enum SearchBody {
    /// Images in any `/v1/embed` form, or JSON `{"images": [...]}`.
    Images(Vec<Bytes>),
    Vector(Vec<f32>),
    Id(String),
}

/// A search body: an image in any `/v1/embed` form, `{"vector": [...]}` of `dim` numbers, or
/// `{"id": "..."}`. The JSON body is dropped before this returns, so decoded images do not keep
/// it alive while they wait for the model.
pub(super) async fn read_search(req: Request, max_images: usize, dim: usize) -> Result<SearchBody, ApiError> {
    if content_type(&req) != "application/json" {
        return Ok(SearchBody::Images(read_images(req, max_images).await?));
    }
    let shape = "{\"vector\": [numbers]}, {\"id\": string} or {\"images\": [base64, ...]}";
    let body = read_body(req).await?;
    let caps = Caps { images: max_images, vector: dim };
    let parsed = json::parse(&body, caps, shape)?;
    if parsed.keys() != 1 {
        return Err(ApiError::invalid_request(format!("the JSON body must be {shape}")));
    }
    if let Some(v) = parsed.vector {
        return Ok(SearchBody::Vector(v));
    }
    if let Some(id) = parsed.id {
        return Ok(SearchBody::Id(id));
    }
    if let Some(images) = parsed.images {
        return Ok(SearchBody::Images(decode_images(&images)?));
    }
    Err(ApiError::invalid_request(format!("the JSON body must be {shape}")))
}

#[cfg(test)]
mod tests {
    use super::decode_base64;

    #[test]
    fn base64_accepts_data_urls_and_whitespace() {
        assert_eq!(decode_base64("aGk=").expect("plain"), b"hi");
        assert_eq!(decode_base64("data:image/png;base64,aGk=").expect("data url"), b"hi");
        assert_eq!(decode_base64("aG\nk=").expect("newline"), b"hi");
        assert!(decode_base64("!!!").is_err());
    }
}
