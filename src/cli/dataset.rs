//! `swav dataset fashion-mnist`: write the IDX files as PNG folders for indexing and benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::dataset::{Split, export_fashion_mnist};

#[derive(Debug, Args)]
pub struct DatasetArgs {
    #[command(subcommand)]
    pub command: DatasetCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Write Fashion-MNIST as OUT/<class-name>/<index>.png (idempotent: existing files are kept).
    FashionMnist(FashionMnistArgs),
}

#[derive(Debug, Args)]
pub struct FashionMnistArgs {
    /// Which split: train (60,000 images) or test (10,000).
    #[arg(long, env = "SWAV_DATASET_SPLIT", value_enum)]
    pub split: Split,
    /// Output folder.
    #[arg(long, env = "SWAV_DATASET_OUT", value_name = "DIR")]
    pub out: PathBuf,
    /// Folder with the {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz files.
    #[arg(long, env = "SWAV_FASHION_MNIST_DIR", value_name = "DIR", default_value = "/usr/share/datasets/fashion-mnist")]
    pub data_dir: PathBuf,
}

pub fn run(args: DatasetArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DatasetCommand::FashionMnist(a) => {
            let report = export_fashion_mnist(&a.data_dir, a.split, &a.out)
                .with_context(|| format!("cannot export Fashion-MNIST to {}", a.out.display()))?;
            println!("{}", serde_json::to_string(&report).context("cannot serialise the report")?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
