//! The three ways a request carries images: a raw body, multipart file parts, or JSON base64.

use axum::body::Bytes;
use axum::extract::multipart::Field;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{StatusCode, header};
use base64::Engine as _;

use super::error::{ApiError, ErrorCode};
use super::json::{self, Caps, Text};

const ACCEPTED: &str = "send image/* or application/octet-stream (one image), multipart/form-data (file parts) \
                        or application/json {\"images\": [base64, ...]}";

/// Reads the images from any accepted request form, in input order, enforcing `max_images`.
pub async fn read_images(req: Request, max_images: usize) -> Result<Vec<Bytes>, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let images = match content_type.as_deref() {
        None | Some("") => return Err(ApiError::new(ErrorCode::UnsupportedMediaType, format!("missing Content-Type; {ACCEPTED}"))),
        Some("multipart/form-data") => read_multipart(req, max_images).await?,
        Some("application/json") => read_json(req, max_images).await?,
        Some(t) if t.starts_with("image/") || t == "application/octet-stream" => vec![read_body(req).await?],
        Some(other) => {
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

pub(super) fn too_many(got: usize, max: usize) -> ApiError {
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

pub(super) async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, &())
        .await
        .map_err(|e| body_error(e.status(), e.body_text()))
}

/// A multipart body, as JSON errors: a bad header is 400.
pub(super) async fn open_multipart(req: Request) -> Result<Multipart, ApiError> {
    Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::new(ErrorCode::BadMultipart, e.body_text()))
}

/// The next part, or None after the last; a malformed body is 400 and an over-limit one 413.
pub(super) async fn next_part(multipart: &mut Multipart) -> Result<Option<Field<'_>>, ApiError> {
    multipart.next_field().await.map_err(|e| multipart_error(e.status(), e.body_text()))
}

/// A part's whole content, with the same error mapping as [`next_part`].
pub(super) async fn part_bytes(field: Field<'_>) -> Result<Bytes, ApiError> {
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
pub(super) fn decode_images(images: &[Text<'_>]) -> Result<Vec<Bytes>, ApiError> {
    if images.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "\"images\" must hold at least one base64 image",
        ));
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
