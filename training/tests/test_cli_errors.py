"""Checkpoint files and distributed set-up that cannot be used end the command with exit status 2
and one line on stderr that says why, never a traceback; a checkpoint never runs code."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from conftest import tiny_config
from swav_train import checkpoint, cli
from swav_train.model import SwAVModel


def _fails_with(argv, capsys, *needles) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class _RunsCode:
    """Unpickling this runs `touch MARKER`, unless the loader refuses it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(cfg, **changes) -> dict:
    state = {"epoch": 1, "model": SwAVModel.from_config(cfg).state_dict(), "optimizer": {}, "config": cfg.to_dict()}
    state.update(changes)
    return state


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys, command):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save(_checkpoint(tiny_config(), epoch=_RunsCode(marker)), path)
    argv = [command, str(path)] + (["--out", str(tmp_path / "b")] if command == "export" else [])
    _fails_with(argv, capsys, str(path), "weights_only=True", "GLOBAL")
    assert not marker.exists()


def test_unreadable_and_foreign_checkpoints_are_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    _fails_with(["eval", str(garbage)], capsys, str(garbage), "cannot be read")

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    _fails_with(["export", str(foreign), "--out", str(tmp_path / "b")], capsys,
                "not a swav_train checkpoint", "model, config")

    cfg = tiny_config()
    misfit = tmp_path / "misfit.pt"
    torch.save(_checkpoint(cfg, config=cfg.replace(width=4).to_dict()), misfit)
    _fails_with(["eval", str(misfit)], capsys, str(misfit), "do not fit the model")

    bad_config = tmp_path / "bad_config.pt"
    torch.save(_checkpoint(cfg, config={**cfg.to_dict(), "epochs": "3"}), bad_config)
    _fails_with(["eval", str(bad_config)], capsys, "epochs=", "must be an integer")

    _fails_with(["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--resume", str(garbage)],
                capsys, str(garbage), "cannot be read")


def test_a_broken_torchrun_environment_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    argv = ["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--device", "cpu"]
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    _fails_with(argv, capsys, "cannot join the process group as rank 0 of 2", "gloo", "MASTER_ADDR")
    monkeypatch.setenv("RANK", "first")
    _fails_with(argv, capsys, "RANK='first' is not an integer")
    monkeypatch.setenv("RANK", "2")
    _fails_with(argv, capsys, "RANK=2 and WORLD_SIZE=2 do not fit")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_rng_state_loads_weights_only_and_older_checkpoints_still_resume(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    checkpoint.atomic_save({"rng": checkpoint.rng_state()}, tmp_path / "new.pt")
    want = (random.random(), np.random.rand(), torch.rand(()).item())
    # Nothing in it needs more than torch's weights-only loader.
    checkpoint.set_rng_state(torch.load(tmp_path / "new.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == want

    # Written before the numpy state became a tensor: numpy's array in the pickle.
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"epoch": 1, "rng": old}, tmp_path / "old.pt")
    np.random.seed(99)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "old.pt", required=("epoch", "rng"))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == want
