//! `swav import`: runs the Python importer (`python -m swav_train import …`), which turns a released
//! SwAV checkpoint into a bundle.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::Args;

use super::train::{check_trainer, exit_code, find_python};

#[derive(Debug, Args)]
#[command(after_help = "Everything after the launcher's own flags goes to `python -m swav_train import`; \
    `swav import -- --help` shows the importer's options. Example: \
    `swav import swav_800ep_pretrain.pth.tar --out models/swav-rn50`.")]
pub struct ImportArgs {
    /// Python interpreter with swav_train installed. Default: .venv/bin/python of the repository, else python3.
    #[arg(long, env = "SWAV_PYTHON", value_name = "FILE")]
    pub python: Option<PathBuf>,
    /// The checkpoint file and the importer's flags (--out BUNDLE_DIR, --fp16, --cluster-images DIR, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "IMPORTER_ARGS")]
    pub args: Vec<OsString>,
}

impl ImportArgs {
    pub fn python_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = ["-m", "swav_train", "import"].map(OsString::from).into();
        out.extend(self.args.iter().cloned());
        out
    }
}

pub fn run(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let python = find_python(args.python.as_deref());
    check_trainer(&python)?;
    let status = Command::new(&python)
        .args(args.python_args())
        .status()
        .with_context(|| format!("cannot run {}", python.display()))?;
    Ok(exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        import: ImportArgs,
    }

    #[test]
    fn passes_the_checkpoint_and_flags_through() {
        let parsed = Wrapper::try_parse_from(["swav-import", "a b.pth.tar", "--out", "m", "--fp16"]).expect("parses");
        let args: Vec<String> =
            parsed.import.python_args().into_iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(args, ["-m", "swav_train", "import", "a b.pth.tar", "--out", "m", "--fp16"]);
        assert!(Wrapper::try_parse_from(["swav-import"]).is_err(), "the checkpoint is required");
    }
}
