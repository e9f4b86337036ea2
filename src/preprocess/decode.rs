//! Decoding with limits checked from the header, first frame only, EXIF orientation applied.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};

use super::{DecodeLimits, PreprocessError};

const SUPPORTED: &[ImageFormat] = &[
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
];

/// Largest decoded sample size (RGBA 16-bit), used to cap the decoder's own allocations.
const MAX_BYTES_PER_PIXEL: u64 = 8;

/// Decodes one image, refusing bombs before allocating for them.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(PreprocessError::TooManyBytes {
            got: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Undecodable(e.to_string()))?;
    let format = reader
        .format()
        .ok_or_else(|| PreprocessError::Undecodable("not a recognised image format".into()))?;
    if !SUPPORTED.contains(&format) {
        return Err(PreprocessError::UnsupportedFormat(format!("{format:?}")));
    }
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(MAX_BYTES_PER_PIXEL) + (16 << 20));
    reader.limits(image_limits);

    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::Undecodable(format!("image has zero size {width}x{height}")));
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    // A broken EXIF block must not reject an otherwise good image: PIL ignores it too.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let jpeg = if format == ImageFormat::Jpeg { super::jpeg::decode(bytes)? } else { None };
    let mut img = match jpeg {
        Some(img) => img,
        None => DynamicImage::from_decoder(decoder).map_err(classify)?,
    };
    img.apply_orientation(orientation);
    Ok(img)
}

/// Width and height from the header alone, or `None` when the header does not parse (the full
/// decode then reports why).
pub fn header_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

fn classify(err: ImageError) -> PreprocessError {
    match err {
        ImageError::Limits(e) => PreprocessError::DecoderLimit(e.to_string()),
        ImageError::Unsupported(e) => PreprocessError::UnsupportedFormat(e.to_string()),
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::Truncated(e.to_string())
        }
        ImageError::IoError(e) => PreprocessError::Truncated(e.to_string()),
        other => {
            let msg = other.to_string();
            let lower = msg.to_ascii_lowercase();
            if ["eof", "end of", "not enough bytes", "truncated"].iter().any(|n| lower.contains(n)) {
                PreprocessError::Truncated(msg)
            } else {
                PreprocessError::Undecodable(msg)
            }
        }
    }
}
