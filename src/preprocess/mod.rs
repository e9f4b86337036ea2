//! Bytes → decoded image (with limits, EXIF orientation, colour rules) → model input tensor,
//! exactly as `docs/bundle.md` specifies and the trainer's evaluation transform does.

mod decode;
mod jpeg;
pub mod pixels;
pub mod resize;
pub mod thumbnail;

use crate::bundle::InputSpec;
pub use decode::decode;
use pixels::Plane;

/// Guards against decompression bombs and oversized uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width × height accepted, read from the header before decoding.
    pub max_pixels: u64,
    /// Largest encoded size of one image.
    pub max_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 40_000_000,
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

/// How the caller should treat a failure: bad data, too big, or a format we do not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Not a readable image (maps to HTTP 400).
    Invalid,
    /// Over a limit (413).
    TooLarge,
    /// A recognised format this build does not decode (415).
    Unsupported,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PreprocessError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("the image data is truncated: {0}")]
    Truncated(String),
    #[error("the data is not a decodable image: {0}")]
    Undecodable(String),
    #[error("the image is {got} bytes, over the limit of {limit} bytes")]
    TooManyBytes { got: usize, limit: usize },
    #[error("the image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels", pixels = *width as u64 * *height as u64)]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the image is {width}x{height}; resized to the model's input it would be {resized_width}x{resized_height} = {pixels} pixels, over the limit of {limit} pixels", pixels = resized_width.saturating_mul(*resized_height))]
    ResizedTooLarge { width: u32, height: u32, resized_width: u64, resized_height: u64, limit: u64 },
    #[error("decoding the image would exceed the memory limit: {0}")]
    DecoderLimit(String),
    #[error("image format {0} is not supported (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)")]
    UnsupportedFormat(String),
}

impl PreprocessError {
    pub fn class(&self) -> ErrorClass {
        match self {
            PreprocessError::Empty | PreprocessError::Truncated(_) | PreprocessError::Undecodable(_) => {
                ErrorClass::Invalid
            }
            PreprocessError::TooManyBytes { .. }
            | PreprocessError::TooManyPixels { .. }
            | PreprocessError::ResizedTooLarge { .. }
            | PreprocessError::DecoderLimit(_) => ErrorClass::TooLarge,
            PreprocessError::UnsupportedFormat(_) => ErrorClass::Unsupported,
        }
    }

    /// Stable machine-readable code, used in API errors and as the metrics' `reason`.
    pub fn code(&self) -> &'static str {
        match self {
            PreprocessError::Empty => "empty_image",
            PreprocessError::Truncated(_) => "truncated_image",
            PreprocessError::Undecodable(_) => "undecodable_image",
            PreprocessError::TooManyBytes { .. } | PreprocessError::DecoderLimit(_) => "image_too_large",
            PreprocessError::TooManyPixels { .. } | PreprocessError::ResizedTooLarge { .. } => "too_many_pixels",
            PreprocessError::UnsupportedFormat(_) => "unsupported_image_format",
        }
    }
}

/// Most pixels, before and after resizing, of an image that [`Preprocessor::is_small`] accepts.
pub const SMALL_IMAGE_PIXELS: u64 = 64 * 64;
/// Most encoded bytes of such an image.
const SMALL_IMAGE_BYTES: usize = 32 * 1024;

/// Turns encoded images into the model's input tensors.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    input: InputSpec,
    limits: DecodeLimits,
}

impl Preprocessor {
    pub fn new(input: &InputSpec, limits: DecodeLimits) -> Preprocessor {
        Preprocessor {
            input: input.clone(),
            limits,
        }
    }

    pub fn limits(&self) -> DecodeLimits {
        self.limits
    }

    /// Length of one tensor returned by [`Preprocessor::prepare`] (C×H×W).
    pub fn tensor_len(&self) -> usize {
        self.input.tensor_len()
    }

    /// Whether preparing `bytes` is cheap enough (a few microseconds: at most 64×64 pixels in and
    /// out, read from the header) to do where the request arrives rather than on a decode pool:
    /// for such images the hand-off to another thread costs more than the decoding.
    pub fn is_small(&self, bytes: &[u8]) -> bool {
        let crop = u64::from(self.input.crop.width) * u64::from(self.input.crop.height);
        if bytes.len() > SMALL_IMAGE_BYTES || crop > SMALL_IMAGE_PIXELS {
            return false;
        }
        let Some((width, height)) = decode::header_dimensions(bytes) else {
            return false;
        };
        let (w, h) = resize::shorter_side_size(width as usize, height as usize, self.input.resize.size as usize);
        u64::from(width) * u64::from(height) <= SMALL_IMAGE_PIXELS && (w as u64) * (h as u64) <= SMALL_IMAGE_PIXELS
    }

    /// Decodes `bytes` and returns the C×H×W tensor with values in [0, 1].
    pub fn prepare(&self, bytes: &[u8]) -> Result<Vec<f32>, PreprocessError> {
        let plane = self.prepare_plane(bytes)?;
        Ok(to_chw(&plane))
    }

    /// Like [`Preprocessor::prepare`], plus, when `thumbnail` is set, a thumbnail of the
    /// preprocessed image (see [`thumbnail::encode`]). A thumbnail that cannot be encoded is left
    /// out, not an error.
    pub fn prepare_item(&self, bytes: &[u8], thumbnail: bool) -> Result<(Vec<f32>, Option<Vec<u8>>), PreprocessError> {
        if !thumbnail {
            return Ok((self.prepare(bytes)?, None));
        }
        let plane = self.prepare_plane(bytes)?;
        let thumb = thumbnail::encode(&plane)
            .map_err(|e| tracing::warn!(error = %e, "no thumbnail for an image"))
            .ok();
        Ok((to_chw(&plane), thumb))
    }

    /// Like [`Preprocessor::prepare`] but stops before the float conversion (8-bit H×W×C).
    pub fn prepare_plane(&self, bytes: &[u8]) -> Result<Plane, PreprocessError> {
        // Refused from the header alone, so an extreme aspect ratio costs no decoding (the
        // decoder reports the other limits first, in its own order).
        let header = decode::header_dimensions(bytes).filter(|&(w, h)| {
            w > 0 && h > 0 && u64::from(w) * u64::from(h) <= self.limits.max_pixels && bytes.len() <= self.limits.max_bytes
        });
        if let Some((width, height)) = header {
            self.check_resized(width as usize, height as usize)?;
        }
        let img = decode(bytes, &self.limits)?;
        let plane = pixels::to_plane(img, self.input.channels as usize);
        self.resize_and_crop(plane)
    }

    fn resize_and_crop(&self, plane: Plane) -> Result<Plane, PreprocessError> {
        let (w, h) = self.check_resized(plane.width, plane.height)?;
        let resized = resize::resize_bilinear(plane, w, h);
        Ok(resize::center_crop(
            &resized,
            self.input.crop.width as usize,
            self.input.crop.height as usize,
        ))
    }
}

impl Preprocessor {
    /// The resized size, unless an extreme aspect ratio makes it far larger than the original;
    /// the error names the original size, the one the client knows.
    fn check_resized(&self, width: usize, height: usize) -> Result<(usize, usize), PreprocessError> {
        let size = self.input.resize.size as usize;
        let (w, h) = resize::shorter_side_size(width, height, size);
        if (w as u64).saturating_mul(h as u64) > self.limits.max_pixels {
            return Err(PreprocessError::ResizedTooLarge {
                width: width.min(u32::MAX as usize) as u32,
                height: height.min(u32::MAX as usize) as u32,
                resized_width: w as u64,
                resized_height: h as u64,
                limit: self.limits.max_pixels,
            });
        }
        Ok((w, h))
    }
}

/// H×W×C bytes → C×H×W floats in [0, 1].
fn to_chw(plane: &Plane) -> Vec<f32> {
    let (c, hw) = (plane.channels, plane.width * plane.height);
    let mut out = vec![0f32; c * hw];
    for (i, px) in plane.data.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            out[ch * hw + i] = f32::from(v) / 255.0;
        }
    }
    out
}
