//! JPEG through libjpeg-turbo's decoder (mozjpeg), the library PIL uses, so that decoded pixels
//! equal the trainer's exactly. The `image` crate's decoder differs by up to ±4 per value in
//! chroma upsampling, which breaks the 2/255 parity target on colour JPEGs.
//!
//! libjpeg reports fatal errors by unwinding out of its callbacks; we catch that here.

use std::panic::{AssertUnwindSafe, catch_unwind};

use image::{DynamicImage, GrayImage, RgbImage};
use mozjpeg::{ColorSpace, Decompress};
use mozjpeg_sys::{J_MESSAGE_CODE, jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};

use super::PreprocessError;

/// Payload of the unwind we start when the data ends early (libjpeg would pad it with gray).
const TRUNCATED: &str = "premature end of JPEG data";
const JWRN_JPEG_EOF: J_MESSAGE_CODE = mozjpeg_sys::JWRN_JPEG_EOF;

extern "C-unwind" fn on_fatal(cinfo: &mut jpeg_common_struct) {
    // SAFETY: libjpeg always sets `err` before calling its handlers.
    let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
    std::panic::resume_unwind(Box::new(format!("libjpeg error code {code}")));
}

extern "C-unwind" fn on_message(cinfo: &mut jpeg_common_struct, level: std::os::raw::c_int) {
    // SAFETY: as above.
    let code = unsafe { cinfo.err.as_ref() }.map_or(0, |e| e.msg_code);
    // Level -1 is a warning; a truncated file is an error for us (PIL refuses it too).
    if level == -1 && code == JWRN_JPEG_EOF {
        std::panic::resume_unwind(Box::new(TRUNCATED));
    }
}

fn error_manager() -> jpeg_error_mgr {
    // SAFETY: jpeg_std_error fully initialises the zeroed struct; we then replace the handlers
    // that would print or call exit().
    unsafe {
        let mut err: jpeg_error_mgr = std::mem::zeroed();
        jpeg_std_error(&mut err);
        err.error_exit = Some(on_fatal);
        err.emit_message = Some(on_message);
        err
    }
}

/// Decodes YCbCr, RGB and grayscale JPEGs; `Ok(None)` for other colour spaces (CMYK, YCCK),
/// which the caller decodes with the `image` crate.
pub fn decode(bytes: &[u8]) -> Result<Option<DynamicImage>, PreprocessError> {
    let result = catch_unwind(AssertUnwindSafe(|| decode_inner(bytes)));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "libjpeg error".into());
            if msg == TRUNCATED {
                Err(PreprocessError::Truncated(msg))
            } else {
                Err(PreprocessError::Undecodable(msg))
            }
        }
    }
}

fn decode_inner(bytes: &[u8]) -> Result<Option<DynamicImage>, PreprocessError> {
    let bad = |e: std::io::Error| PreprocessError::Undecodable(format!("JPEG: {e}"));
    let d = Decompress::with_err(error_manager()).from_mem(bytes).map_err(bad)?;
    let (width, height) = (d.width() as u32, d.height() as u32);
    let size_err = || PreprocessError::Undecodable("JPEG: decoded size does not match the header".into());
    match d.color_space() {
        ColorSpace::JCS_GRAYSCALE => {
            let mut started = d.grayscale().map_err(bad)?;
            let data = started.read_scanlines::<u8>().map_err(bad)?;
            started.finish().map_err(bad)?;
            let img = GrayImage::from_raw(width, height, data).ok_or_else(size_err)?;
            Ok(Some(DynamicImage::ImageLuma8(img)))
        }
        ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB => {
            let mut started = d.rgb().map_err(bad)?;
            let data = started.read_scanlines::<u8>().map_err(bad)?;
            started.finish().map_err(bad)?;
            let img = RgbImage::from_raw(width, height, data).ok_or_else(size_err)?;
            Ok(Some(DynamicImage::ImageRgb8(img)))
        }
        _ => Ok(None),
    }
}
