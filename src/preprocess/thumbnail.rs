//! The small preview the index keeps of each item: the preprocessed image (what the model saw),
//! shrunk to at most [`MAX_SIDE`] pixels on its long side.

use image::ExtendedColorType;
use image::ImageEncoder;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;

use super::pixels::Plane;
use super::resize::resize_bilinear;

/// Longest side of a thumbnail, in pixels.
pub const MAX_SIDE: usize = 128;
/// JPEG quality of colour thumbnails: previews, where a few kB per item matter more than detail.
const JPEG_QUALITY: u8 = 85;

/// Encodes `plane` as a thumbnail: gray images as PNG (small and lossless at these sizes),
/// colour ones as JPEG (a fraction of a PNG's size for photographs).
pub fn encode(plane: &Plane) -> Result<Vec<u8>, String> {
    let long = plane.width.max(plane.height);
    let scaled;
    let plane = if long > MAX_SIDE {
        // At least one pixel on the short side, however thin the image.
        let w = (plane.width * MAX_SIDE / long).max(1);
        let h = (plane.height * MAX_SIDE / long).max(1);
        scaled = resize_bilinear(plane.clone(), w, h);
        &scaled
    } else {
        plane
    };
    let (w, h) = (plane.width as u32, plane.height as u32);
    let mut out = Vec::new();
    let result = match plane.channels {
        1 => PngEncoder::new(&mut out).write_image(&plane.data, w, h, ExtendedColorType::L8),
        3 => JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY).write_image(&plane.data, w, h, ExtendedColorType::Rgb8),
        c => return Err(format!("no thumbnail for images of {c} channels")),
    };
    result.map_err(|e| format!("cannot encode the thumbnail: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_is_png_colour_is_jpeg_and_large_images_shrink() {
        let gray = Plane { width: 28, height: 28, channels: 1, data: (0..28 * 28).map(|i| i as u8).collect() };
        let png = encode(&gray).unwrap();
        let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
        assert_eq!((img.width(), img.height()), (28, 28));
        assert_eq!(img.to_luma8().into_raw(), gray.data, "small gray images are kept exactly");

        let colour = Plane { width: 300, height: 150, channels: 3, data: vec![200; 300 * 150 * 3] };
        let jpeg = encode(&colour).unwrap();
        let img = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
        assert_eq!((img.width(), img.height()), (128, 64));

        let thin = Plane { width: 1000, height: 1, channels: 1, data: vec![0; 1000] };
        let img = image::load_from_memory(&encode(&thin).unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), (128, 1));
    }
}
