//! Decoded image → 8-bit interleaved plane with the manifest's channel count
//! (steps 3–5 of the preprocessing rule in `docs/bundle.md`).

use image::DynamicImage;

/// 8-bit interleaved pixels, `channels` is 1 (L) or 3 (RGB).
#[derive(Debug, Clone, PartialEq)]
pub struct Plane {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

/// `round(v / 257)` without floating point; no 16-bit value sits exactly on a half.
#[inline]
fn to8(v: u16) -> u8 {
    ((u32::from(v) + 128) / 257) as u8
}

/// `round(c * a / 255 + 255 * (255 - a) / 255)`; the numerator is never an odd multiple of 127.5.
#[inline]
fn over_white(c: u8, a: u8) -> u8 {
    let (c, a) = (u32::from(c), u32::from(a));
    ((c * a + 255 * (255 - a) + 127) / 255) as u8
}

/// PIL's ITU-R 601-2 luma in integer form.
#[inline]
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

/// Either gray or RGB, alpha already composited.
enum Colour {
    Gray(Vec<u8>),
    Rgb(Vec<u8>),
}

fn composite<const N: usize>(px: &[u8]) -> Vec<u8> {
    px.chunks_exact(N)
        .flat_map(|p| {
            let a = p[N - 1];
            p[..N - 1].iter().map(move |&c| over_white(c, a))
        })
        .collect()
}

fn narrow(px: &[u16]) -> Vec<u8> {
    px.iter().map(|&v| to8(v)).collect()
}

fn flatten(img: DynamicImage) -> Colour {
    match img {
        DynamicImage::ImageLuma8(b) => Colour::Gray(b.into_raw()),
        DynamicImage::ImageLumaA8(b) => Colour::Gray(composite::<2>(b.as_raw())),
        DynamicImage::ImageRgb8(b) => Colour::Rgb(b.into_raw()),
        DynamicImage::ImageRgba8(b) => Colour::Rgb(composite::<4>(b.as_raw())),
        DynamicImage::ImageLuma16(b) => Colour::Gray(narrow(b.as_raw())),
        DynamicImage::ImageLumaA16(b) => Colour::Gray(composite::<2>(&narrow(b.as_raw()))),
        DynamicImage::ImageRgb16(b) => Colour::Rgb(narrow(b.as_raw())),
        DynamicImage::ImageRgba16(b) => Colour::Rgb(composite::<4>(&narrow(b.as_raw()))),
        // Float images (e.g. from TIFF) have no PIL counterpart; image's own 8-bit conversion is used.
        other => Colour::Rgb(composite::<4>(other.to_rgba8().as_raw())),
    }
}

/// Composites alpha over white and converts to `channels` (1 or 3).
pub fn to_plane(img: DynamicImage, channels: usize) -> Plane {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = match (flatten(img), channels) {
        (Colour::Gray(g), 1) => g,
        (Colour::Gray(g), _) => g.iter().flat_map(|&v| [v, v, v]).collect(),
        (Colour::Rgb(rgb), 1) => rgb.chunks_exact(3).map(|p| luma(p[0], p[1], p[2])).collect(),
        (Colour::Rgb(rgb), _) => rgb,
    };
    Plane { width, height, channels: if channels == 1 { 1 } else { 3 }, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_rounds_like_pil() {
        assert_eq!(to8(0), 0);
        assert_eq!(to8(128), 0); // 0.498
        assert_eq!(to8(129), 1); // 0.502
        assert_eq!(to8(65535), 255);
        for v in (0..=65535u32).step_by(7) {
            assert_eq!(u32::from(to8(v as u16)), (f64::from(v) / 257.0).round() as u32);
        }
    }

    #[test]
    fn alpha_composites_over_white() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(0, 255), 0);
        assert_eq!(over_white(100, 128), 177); // 50.2 + 127.0
        for c in 0..=255u32 {
            for a in (0..=255u32).step_by(5) {
                let exact = (f64::from(c * a) / 255.0 + 255.0 * f64::from(255 - a) / 255.0).round() as u32;
                assert_eq!(u32::from(over_white(c as u8, a as u8)), exact, "c={c} a={a}");
            }
        }
    }

    #[test]
    fn luma_uses_pil_integer_rule() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
    }

    #[test]
    fn gray_is_replicated_for_three_channels() {
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_raw(2, 1, vec![10, 200]).expect("size"));
        assert_eq!(to_plane(img, 3).data, vec![10, 10, 10, 200, 200, 200]);
    }
}
