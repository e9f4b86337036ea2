//! `swav train`: runs the Python trainer (`python -m swav_train train …`), through
//! `torch.distributed.run` when several processes or nodes are asked for.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::Args;

const SETUP_HINT: &str = "set up the training environment with `scripts/setup-train` \
     (or `python3 -m venv .venv && .venv/bin/pip install -e training`), or point --python / SWAV_PYTHON at a Python that has it";

#[derive(Debug, Args)]
#[command(after_help = "Everything after the launcher's own flags goes to `python -m swav_train train`; \
    `swav train -- --help` shows the trainer's options.")]
pub struct TrainArgs {
    /// Python interpreter with swav_train installed. Default: .venv/bin/python of the repository, else python3.
    #[arg(long, env = "SWAV_PYTHON", value_name = "FILE")]
    pub python: Option<PathBuf>,
    /// Processes per node; given (or with --nnodes), the run goes through torch.distributed.run.
    #[arg(long, env = "SWAV_NPROC_PER_NODE")]
    pub nproc_per_node: Option<u32>,
    /// Number of nodes (torch.distributed.run).
    #[arg(long, env = "SWAV_NNODES")]
    pub nnodes: Option<u32>,
    /// This node's rank (torch.distributed.run).
    #[arg(long, env = "SWAV_NODE_RANK")]
    pub node_rank: Option<u32>,
    /// Address of the rank-0 node (torch.distributed.run).
    #[arg(long, env = "SWAV_MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// Port of the rank-0 node (torch.distributed.run).
    #[arg(long, env = "SWAV_MASTER_PORT")]
    pub master_port: Option<u16>,
    /// Arguments for the trainer.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "TRAINER_ARGS")]
    pub args: Vec<OsString>,
}

impl TrainArgs {
    fn distributed(&self) -> bool {
        self.nproc_per_node.is_some() || self.nnodes.is_some()
    }

    /// The interpreter's arguments: the module to run and everything for it.
    pub fn python_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        if self.distributed() {
            out.extend(["-m", "torch.distributed.run"].map(OsString::from));
            let flags = [
                ("--nproc-per-node", self.nproc_per_node.map(|v| v.to_string())),
                ("--nnodes", self.nnodes.map(|v| v.to_string())),
                ("--node-rank", self.node_rank.map(|v| v.to_string())),
                ("--master-addr", self.master_addr.clone()),
                ("--master-port", self.master_port.map(|v| v.to_string())),
            ];
            for (flag, value) in flags {
                if let Some(v) = value {
                    out.push(flag.into());
                    out.push(v.into());
                }
            }
        }
        out.extend(["-m", "swav_train", "train"].map(OsString::from));
        out.extend(self.args.iter().cloned());
        out
    }
}

pub(super) fn find_python(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
        PathBuf::from(".venv/bin/python"),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

pub(super) fn check_trainer(python: &Path) -> anyhow::Result<()> {
    let status = Command::new(python)
        .args(["-c", "import swav_train"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}; {SETUP_HINT}", python.display()))?;
    if !status.success() {
        anyhow::bail!("{} cannot import swav_train; {SETUP_HINT}", python.display());
    }
    Ok(())
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let python = find_python(args.python.as_deref());
    check_trainer(&python)?;
    let python_args = args.python_args();
    tracing::debug!(python = %python.display(), args = ?python_args, "starting trainer");
    let status = Command::new(&python)
        .args(&python_args)
        .status()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if let Some(message) = signal_message(status, &python) {
        eprintln!("error: {message}");
    }
    Ok(exit_code(status))
}

/// The child's exit code; 128 + signal when it was killed, as shells report it.
pub(super) fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// What to tell the user when the trainer died by a signal: Python prints nothing then (at most
/// a faulthandler trace), so the launcher names the signal and the likely way out.
fn signal_message(status: std::process::ExitStatus, python: &Path) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let signal = status.signal()?;
    let name = signal_name(signal);
    let what = format!("the trainer ({} -m swav_train) died by signal {signal} ({name})", python.display());
    let hint = match signal {
        libc::SIGSEGV | libc::SIGABRT | libc::SIGBUS | libc::SIGILL | libc::SIGFPE => {
            "a native crash inside PyTorch or a library below it, not a Python error. With channels_last \
             (the default) retry with `--no-channels-last` after `--`; keep the trainer's crash guard on \
             (it runs one step in a child process first and switches or stops before a crash). Report the \
             command and the output of `lscpu` if it happens again"
        }
        libc::SIGKILL => "often the kernel's out-of-memory killer (see `dmesg`): lower --batch-size or --num-workers",
        libc::SIGINT | libc::SIGTERM | libc::SIGHUP => {
            "it was stopped; the same command resumes from the run's last checkpoint"
        }
        _ => "the same command resumes from the run's last checkpoint",
    };
    Some(format!("{what}: {hint}"))
}

fn signal_name(signal: i32) -> String {
    let known = [
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ];
    known
        .iter()
        .find(|(number, _)| *number == signal)
        .map_or_else(|| format!("signal {signal}"), |(_, name)| (*name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn parse(args: &[&str]) -> TrainArgs {
        let mut full = vec!["swav-train"];
        full.extend_from_slice(args);
        Wrapper::try_parse_from(full).expect("parses").train
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn single_process_passes_arguments_through() {
        let args = parse(&["--epochs", "3", "--data", "x y", "-v"]);
        assert_eq!(
            strings(args.python_args()),
            ["-m", "swav_train", "train", "--epochs", "3", "--data", "x y", "-v"]
        );
    }

    #[test]
    fn a_signal_gets_its_name_and_a_way_out() {
        use std::os::unix::process::ExitStatusExt;
        let python = Path::new("/venv/bin/python");
        let crashed = signal_message(std::process::ExitStatus::from_raw(libc::SIGSEGV), python).expect("message");
        assert!(crashed.contains("died by signal 11 (SIGSEGV)"), "{crashed}");
        assert!(crashed.contains("/venv/bin/python") && crashed.contains("--no-channels-last"), "{crashed}");
        let killed = signal_message(std::process::ExitStatus::from_raw(libc::SIGKILL), python).expect("message");
        assert!(killed.contains("signal 9 (SIGKILL)") && killed.contains("out-of-memory"), "{killed}");
        assert_eq!(signal_name(64), "signal 64");
        // exit status 3 (raw wait status 3 << 8): no signal, no message
        assert!(signal_message(std::process::ExitStatus::from_raw(3 << 8), python).is_none());
    }

    #[test]
    fn nproc_uses_torch_distributed_run() {
        let args = parse(&["--nproc-per-node", "4", "--master-port", "29501", "--epochs", "1"]);
        assert_eq!(
            strings(args.python_args()),
            [
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "4",
                "--master-port",
                "29501",
                "-m",
                "swav_train",
                "train",
                "--epochs",
                "1"
            ]
        );
    }
}
