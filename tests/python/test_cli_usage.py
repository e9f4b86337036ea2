"""Every swav command that the scripts, the GPU check and the README run must exist with the flags
they give it: checked against the built binary's --help (and the trainer's, for `swav train -- …`)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from repo_tools import REPO, swav_bin  # noqa: F401 (swav_bin is a fixture)

WORD = re.compile(r"[a-z][a-z0-9-]*")


def invocation(tokens: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(subcommand words, swav's own --flags, arguments after a lone `--`) of one command line."""
    words: list[str] = []
    while tokens and WORD.fullmatch(tokens[0]) and not tokens[0].startswith("-"):
        words.append(tokens.pop(0))
    if "--" in tokens:
        split = tokens.index("--")
        tokens, rest = tokens[:split], tokens[split + 1 :]
    else:
        rest = []
    flags = [t.split("=")[0] for t in tokens if t.startswith("--")]
    return words, flags, rest


def readme_commands() -> list[list[str]]:
    """Command lines in README.md's shell blocks that run swav (comments and continuations handled)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            match = re.match(r"^(?:target/release/)?swav (.*)$", line)
            if match:
                commands.append(shlex.split(match.group(1)))
    return commands


def script_commands() -> list[list[str]]:
    text = (REPO / "scripts" / "serve").read_text()
    return [shlex.split(m) for m in re.findall(r'"\$swav" (.*)', text)]


def gpu_check_command() -> list[str]:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.serve_command(Path("swav"), Path("m"), Path("lib"), "cuda")[1:]


def help_text(binary: Path, words: list[str]) -> str:
    result = subprocess.run([str(binary), *words, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"`swav {' '.join(words)} --help` failed:\n{result.stderr}"
    return result.stdout


def check(binary: Path, tokens: list[str]) -> list[str]:
    words, flags, _ = invocation(list(tokens))
    text = help_text(binary, words)
    return [f"swav {' '.join(words)} {flag}" for flag in flags if not re.search(rf"(^|\s){flag}\b", text, re.M)]


def test_scripts_serve_uses_real_commands_and_flags(swav_bin):
    commands = script_commands()
    assert {tuple(invocation(list(c))[0]) for c in commands} >= {("dataset", "fashion-mnist"), ("index", "build"), ("serve",)}
    missing = [m for c in commands for m in check(swav_bin, c)]
    assert not missing, f"scripts/serve uses flags that swav does not have: {missing}"


def test_gpu_check_uses_real_serve_flags(swav_bin):
    missing = check(swav_bin, gpu_check_command())
    assert not missing, f"scripts/gpu_check.py uses flags that swav does not have: {missing}"


def test_readme_commands_exist(swav_bin):
    commands = readme_commands()
    assert len(commands) >= 6, "expected the README's swav examples"
    missing = [m for c in commands for m in check(swav_bin, c)]
    assert not missing, f"README.md shows flags that swav does not have: {missing}"


@pytest.mark.parametrize("command", ["train", "import"])
def test_readme_trainer_arguments_exist(command):
    """What README.md passes after `swav train --` or `swav import --` exists in the Python command's --help."""
    flags = {f for c in readme_commands() if invocation(list(c))[0] == [command]
             for f in invocation(list(c))[2] if f.startswith("--")}
    assert {"--out"} <= flags and (command != "train" or {"--preset", "--data-dir"} <= flags)
    result = subprocess.run([sys.executable, "-m", "swav_train", command, "--help"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, f"python -m swav_train {command} --help failed:\n{result.stderr}"
    missing = sorted(f for f in flags if not re.search(rf"(^|\s){f}\b", result.stdout, re.M))
    assert not missing, f"README.md passes `swav {command} --` flags it does not have: {missing}"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("train --nproc-per-node 8 -- --preset x --out y", (["train"], ["--nproc-per-node"], ["--preset", "x", "--out", "y"])),
        ("index search var/index --model m FILE", (["index", "search"], ["--model"], [])),
        ("serve --listen=0.0.0.0:1", (["serve"], ["--listen"], [])),
    ],
)
def test_invocation_splits_words_flags_and_trainer_arguments(line, expected):
    assert invocation(shlex.split(line)) == expected
