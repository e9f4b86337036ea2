//! Resampling and cropping with the exact arithmetic of Pillow's `Image.resize(..., BILINEAR)`.
//!
//! Pillow computes a triangle filter whose support widens with the downscale factor, turns the
//! weights into 22-bit fixed point and runs a horizontal then a vertical pass over 8-bit data.
//! Copying that arithmetic (not just the idea) makes our tensors bit-identical to the trainer's
//! rather than merely close.

use super::pixels::Plane;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output sample: first input index and the fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support is 1.0
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; negative values are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let w = bilinear((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..count {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin, count));
    }
    Coeffs { bounds, weights, ksize }
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resample_horizontal(src: &Plane, out_w: usize) -> Plane {
    let c = src.channels;
    let co = precompute(src.width, out_w);
    let mut out = vec![0u8; out_w * src.height * c];
    for y in 0..src.height {
        let row = &src.data[y * src.width * c..(y + 1) * src.width * c];
        let out_row = &mut out[y * out_w * c..(y + 1) * out_w * c];
        for (xx, &(xmin, count)) in co.bounds.iter().enumerate() {
            let k = &co.weights[xx * co.ksize..xx * co.ksize + count];
            for ch in 0..c {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    acc += i64::from(row[(xmin + i) * c + ch]) * i64::from(w);
                }
                out_row[xx * c + ch] = clip8(acc);
            }
        }
    }
    Plane { width: out_w, height: src.height, channels: c, data: out }
}

fn resample_vertical(src: &Plane, out_h: usize) -> Plane {
    let c = src.channels;
    let stride = src.width * c;
    let co = precompute(src.height, out_h);
    let mut out = vec![0u8; stride * out_h];
    for (yy, &(ymin, count)) in co.bounds.iter().enumerate() {
        let k = &co.weights[yy * co.ksize..yy * co.ksize + count];
        let out_row = &mut out[yy * stride..(yy + 1) * stride];
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (j, &w) in k.iter().enumerate() {
                acc += i64::from(src.data[(ymin + j) * stride + i]) * i64::from(w);
            }
            *o = clip8(acc);
        }
    }
    Plane { width: src.width, height: out_h, channels: c, data: out }
}

/// Pillow's bilinear resize to `out_w × out_h`; each axis is resampled only if it changes.
pub fn resize_bilinear(src: Plane, out_w: usize, out_h: usize) -> Plane {
    let horizontal = if out_w != src.width { resample_horizontal(&src, out_w) } else { src };
    if out_h != horizontal.height { resample_vertical(&horizontal, out_h) } else { horizontal }
}

/// Size after "shorter side becomes `size`, longer side truncated" (torchvision's rule).
pub fn shorter_side_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    if width <= height {
        (size, size * height / width)
    } else {
        (size * width / height, size)
    }
}

/// Python's `round` (half to even) of `diff / 2` for a non-negative integer `diff`.
fn half_round_even(diff: usize) -> usize {
    let half = diff / 2;
    if diff % 2 == 1 && half % 2 == 1 { half + 1 } else { half }
}

/// Centre crop with torchvision's offsets; the crop must fit inside the plane.
pub fn center_crop(src: &Plane, crop_w: usize, crop_h: usize) -> Plane {
    if crop_w == src.width && crop_h == src.height {
        return src.clone();
    }
    let top = half_round_even(src.height - crop_h);
    let left = half_round_even(src.width - crop_w);
    let c = src.channels;
    let mut data = Vec::with_capacity(crop_w * crop_h * c);
    for y in top..top + crop_h {
        let start = (y * src.width + left) * c;
        data.extend_from_slice(&src.data[start..start + crop_w * c]);
    }
    Plane { width: crop_w, height: crop_h, channels: c, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(width: usize, height: usize, data: Vec<u8>) -> Plane {
        Plane { width, height, channels: 1, data }
    }

    #[test]
    fn shorter_side_truncates_the_long_side() {
        assert_eq!(shorter_side_size(50, 150, 28), (28, 84));
        assert_eq!(shorter_side_size(100, 37, 28), (75, 28));
        assert_eq!(shorter_side_size(28, 28, 28), (28, 28));
    }

    #[test]
    fn crop_offsets_round_half_to_even() {
        assert_eq!(half_round_even(0), 0);
        assert_eq!(half_round_even(1), 0); // round(0.5) = 0
        assert_eq!(half_round_even(3), 2); // round(1.5) = 2
        assert_eq!(half_round_even(5), 2); // round(2.5) = 2
        assert_eq!(half_round_even(4), 2);
        let p = plane(5, 1, vec![0, 1, 2, 3, 4]);
        assert_eq!(center_crop(&p, 2, 1).data, vec![2, 3]); // left = round(1.5) = 2
    }

    #[test]
    fn constant_image_stays_constant() {
        let p = plane(97, 61, vec![137; 97 * 61]);
        let r = resize_bilinear(p, 23, 14);
        assert_eq!((r.width, r.height), (23, 14));
        assert!(r.data.iter().all(|&v| v == 137));
    }

    /// Values computed with Pillow 13: `Image.frombytes("L", (4, 1), bytes([0, 100, 200, 255])).resize((2, 1), BILINEAR)`.
    #[test]
    fn matches_pillow_on_a_small_downscale() {
        let r = resize_bilinear(plane(4, 1, vec![0, 100, 200, 255]), 2, 1);
        assert_eq!(r.data, vec![71, 209]);
    }
}
