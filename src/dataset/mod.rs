//! Exports Fashion-MNIST's IDX files as PNG folders (`DIR/<class-name>/<00000>.png`), the
//! layout `swav index build` and the benchmarks read.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

/// Class names in label order, as file-system friendly folder names.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid IDX file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot encode {path}: {reason}")]
    Encode { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ExportReport {
    pub images: usize,
    pub written: usize,
    pub already_present: usize,
}

/// Writes every image of `split` as an 8-bit grayscale PNG. Files already present are kept,
/// so a rerun finishes an interrupted export; each file appears whole or not at all.
pub fn export_fashion_mnist(data_dir: &Path, split: Split, out: &Path) -> Result<ExportReport, DatasetError> {
    let images_path = data_dir.join(format!("{}-images-idx3-ubyte.gz", split.prefix()));
    let labels_path = data_dir.join(format!("{}-labels-idx1-ubyte.gz", split.prefix()));
    let images = read_idx(&images_path, 3)?;
    let labels = read_idx(&labels_path, 1)?;
    let (dims, pixels) = images;
    let (_, labels) = labels;
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    if labels.len() != n {
        return Err(DatasetError::Format {
            path: labels_path,
            reason: format!("{} labels for {n} images", labels.len()),
        });
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= FASHION_MNIST_CLASSES.len()) {
        return Err(DatasetError::Format { path: labels_path, reason: format!("label {bad} is not 0..9") });
    }
    for class in FASHION_MNIST_CLASSES {
        let d = out.join(class);
        fs::create_dir_all(&d).map_err(|source| DatasetError::Write { path: d, source })?;
    }
    let written: Vec<bool> = (0..n)
        .into_par_iter()
        .map(|i| {
            let path = out.join(FASHION_MNIST_CLASSES[labels[i] as usize]).join(format!("{i:05}.png"));
            if path.exists() {
                return Ok(false);
            }
            write_png(&path, &pixels[i * h * w..(i + 1) * h * w], w as u32, h as u32)?;
            Ok(true)
        })
        .collect::<Result<_, DatasetError>>()?;
    let fresh = written.iter().filter(|&&w| w).count();
    Ok(ExportReport { images: n, written: fresh, already_present: n - fresh })
}

fn write_png(path: &Path, pixels: &[u8], w: u32, h: u32) -> Result<(), DatasetError> {
    let img = image::GrayImage::from_raw(w, h, pixels.to_vec())
        .ok_or_else(|| DatasetError::Encode { path: path.to_path_buf(), reason: "pixel count".into() })?;
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| DatasetError::Encode { path: tmp.clone(), reason: e.to_string() })?;
    fs::rename(&tmp, path).map_err(|source| DatasetError::Write { path: path.to_path_buf(), source })
}

/// Reads a gzip'd IDX file of unsigned bytes: its dimensions and data. The header is checked
/// before any data is kept: its sizes are multiplied with checked arithmetic, and the data is
/// read no further than the header promises, so a damaged or crafted header gives an error,
/// never an overflow or an allocation larger than the file.
fn read_idx(path: &Path, ndim: usize) -> Result<(Vec<usize>, Vec<u8>), DatasetError> {
    let read_err = |source| DatasetError::Read { path: path.to_path_buf(), source };
    let bad = |reason: String| DatasetError::Format { path: path.to_path_buf(), reason };
    let file = fs::File::open(path).map_err(read_err)?;
    let mut gz = flate2::read::GzDecoder::new(file);
    let mut header = vec![0u8; 4 + 4 * ndim];
    gz.read_exact(&mut header).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => bad("shorter than its header".into()),
        _ => read_err(e),
    })?;
    let (dims, len) = idx_header(&header, ndim).map_err(bad)?;
    // One byte more than promised shows whether the file runs on past its data.
    let limit = u64::try_from(len).map_or(u64::MAX, |l| l.saturating_add(1));
    let mut data = Vec::new();
    gz.take(limit).read_to_end(&mut data).map_err(read_err)?;
    if data.len() > len {
        return Err(bad(format!("holds more than the {len} data bytes its header promises")));
    }
    if data.len() < len {
        return Err(bad(format!("holds {} data bytes, its header promises {len}", data.len())));
    }
    Ok((dims, data))
}

/// The dimensions in an IDX header of unsigned bytes with `ndim` dimensions, and their
/// product: the number of data bytes that must follow.
fn idx_header(header: &[u8], ndim: usize) -> Result<(Vec<usize>, usize), String> {
    let (magic, sizes) = header.split_at(4);
    if magic[..2] != [0, 0] {
        return Err(format!("magic number starts {:#04x} {:#04x}, not 0 0", magic[0], magic[1]));
    }
    if magic[2] != 0x08 {
        return Err(format!("data type {:#04x} is not unsigned bytes (0x08)", magic[2]));
    }
    if usize::from(magic[3]) != ndim {
        return Err(format!("has {} dimensions, expected {ndim}", magic[3]));
    }
    let dims: Vec<usize> = sizes
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    if let Some(axis) = dims.iter().position(|&d| d == 0) {
        return Err(format!("dimension {axis} is 0"));
    }
    let len = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let len = len.ok_or_else(|| format!("dimensions {dims:?} overflow a byte count"))?;
    Ok((dims, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(path: &Path, bytes: &[u8]) {
        let mut e = flate2::write::GzEncoder::new(fs::File::create(path).unwrap(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap();
    }

    fn fake_split(dir: &Path, labels: &[u8]) {
        let n = labels.len() as u32;
        let mut img = vec![0, 0, 8, 3];
        for d in [n, 2, 3] {
            img.extend_from_slice(&d.to_be_bytes());
        }
        img.extend((0..n * 6).map(|i| (i * 7) as u8));
        gz(&dir.join("t10k-images-idx3-ubyte.gz"), &img);
        let mut lab = vec![0, 0, 8, 1];
        lab.extend_from_slice(&n.to_be_bytes());
        lab.extend_from_slice(labels);
        gz(&dir.join("t10k-labels-idx1-ubyte.gz"), &lab);
    }

    #[test]
    fn exports_pngs_by_class_and_is_idempotent() {
        let data = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        fake_split(data.path(), &[9, 0, 9]);
        let r = export_fashion_mnist(data.path(), Split::Test, out.path()).unwrap();
        assert_eq!((r.images, r.written, r.already_present), (3, 3, 0));
        let img = image::open(out.path().join("ankle-boot/00002.png")).unwrap().to_luma8();
        assert_eq!((img.width(), img.height()), (3, 2));
        assert_eq!(img.as_raw(), &(12..18).map(|i| (i * 7) as u8).collect::<Vec<_>>());
        assert!(out.path().join("t-shirt/00001.png").exists());
        let again = export_fashion_mnist(data.path(), Split::Test, out.path()).unwrap();
        assert_eq!((again.written, again.already_present), (0, 3));
    }

    #[test]
    fn damaged_idx_files_are_named_in_the_error() {
        let data = tempfile::tempdir().unwrap();
        fake_split(data.path(), &[1, 12]);
        let err = export_fashion_mnist(data.path(), Split::Test, data.path()).unwrap_err().to_string();
        assert!(err.contains("t10k-labels") && err.contains("label 12"), "{err}");
        let err = export_fashion_mnist(data.path(), Split::Train, data.path()).unwrap_err().to_string();
        assert!(err.contains("train-images-idx3-ubyte.gz"), "{err}");
    }

    /// An IDX file with header bytes `magic`, dimensions `dims` and `data` bytes of data.
    fn idx(dir: &Path, magic: [u8; 4], dims: &[u32], data: usize) -> PathBuf {
        let path = dir.join("x-idx3-ubyte.gz");
        let mut bytes = magic.to_vec();
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend((0..data).map(|i| i as u8));
        gz(&path, &bytes);
        path
    }

    #[test]
    fn a_valid_idx_file_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (dims, data) = read_idx(&idx(dir.path(), [0, 0, 8, 3], &[2, 3, 1], 6), 3).unwrap();
        assert_eq!((dims, data), (vec![2, 3, 1], vec![0, 1, 2, 3, 4, 5]));
    }

    /// Every crafted or damaged header gives an error naming the file and the reason; none
    /// panics, overflows or allocates what the header claims.
    #[test]
    fn crafted_idx_headers_give_errors() {
        let dir = tempfile::tempdir().unwrap();
        let big = u32::MAX;
        let cases: [([u8; 4], &[u32], usize, &str); 11] = [
            ([0, 0, 8, 3], &[big, big, big], 6, "overflow a byte count"),
            ([0, 0, 8, 3], &[65536, 65536, 1], 6, "holds 6 data bytes, its header promises 4294967296"),
            ([0, 0, 8, 3], &[big, big, 1], 0, "holds 0 data bytes"),
            ([0, 0, 8, 3], &[2, 3, 1], 5, "holds 5 data bytes, its header promises 6"),
            ([0, 0, 8, 3], &[2, 3, 1], 7, "holds more than the 6 data bytes"),
            ([0, 0, 8, 3], &[2, 0, 1], 0, "dimension 1 is 0"),
            ([0, 0, 8, 3], &[0, 3, 1], 0, "dimension 0 is 0"),
            ([0, 0, 8, 3], &[2, 3], 0, "shorter than its header"),
            ([1, 0, 8, 3], &[2, 3, 1], 6, "magic number starts 0x01 0x00"),
            ([0, 0, 0x0d, 3], &[2, 3, 1], 6, "data type 0x0d is not unsigned bytes"),
            ([0, 0, 8, 2], &[2, 3, 1], 6, "has 2 dimensions, expected 3"),
        ];
        for (magic, dims, data, want) in cases {
            let path = idx(dir.path(), magic, dims, data);
            let err = read_idx(&path, 3).unwrap_err();
            assert!(matches!(err, DatasetError::Format { .. }), "{dims:?}: {err}");
            let err = err.to_string();
            assert!(err.contains("x-idx3-ubyte.gz") && err.contains(want), "{dims:?}: {err}");
        }
        let not_gzip = dir.path().join("plain-idx1-ubyte.gz");
        fs::write(&not_gzip, [0, 0, 8, 1, 0, 0, 0, 1, 7]).unwrap();
        let err = read_idx(&not_gzip, 1).unwrap_err().to_string();
        assert!(err.contains("plain-idx1-ubyte.gz"), "{err}");
    }
}
