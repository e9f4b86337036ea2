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

/// Reads a gzip'd IDX file of unsigned bytes: its dimensions and data.
fn read_idx(path: &Path, ndim: usize) -> Result<(Vec<usize>, Vec<u8>), DatasetError> {
    let file = fs::File::open(path).map_err(|source| DatasetError::Read { path: path.to_path_buf(), source })?;
    let mut buf = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut buf)
        .map_err(|source| DatasetError::Read { path: path.to_path_buf(), source })?;
    let bad = |reason: String| DatasetError::Format { path: path.to_path_buf(), reason };
    let header = 4 + 4 * ndim;
    if buf.len() < header {
        return Err(bad("shorter than its header".into()));
    }
    if buf[0] != 0 || buf[1] != 0 || buf[2] != 0x08 || buf[3] as usize != ndim {
        return Err(bad(format!("expected unsigned-byte data with {ndim} dimensions")));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes([buf[4 + 4 * i], buf[5 + 4 * i], buf[6 + 4 * i], buf[7 + 4 * i]]) as usize)
        .collect();
    let len: usize = dims.iter().product();
    if buf.len() != header + len {
        return Err(bad(format!("holds {} data bytes, its header promises {len}", buf.len() - header)));
    }
    buf.drain(..header);
    Ok((dims, buf))
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
}
