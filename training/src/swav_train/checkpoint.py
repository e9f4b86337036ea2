"""Atomic checkpoint files and the random-number-generator state they carry."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace,
    so a crash leaves either the old or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file (and the keys at fault)."""


# Checkpoints written before the numpy RNG state was stored as a tensor hold one numpy array:
# allowing numpy's array reconstruction (numbers only; any other class is still refused) reads them.
_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                        (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct]


def read(path: str | Path, *, numpy_arrays: bool = False) -> dict:
    """A dict from a checkpoint file, read with `torch.load(weights_only=True)`: tensors, numbers,
    strings and containers, so a checkpoint cannot run code on this machine. This holds for every
    checkpoint path a user gives (training checkpoints to resume, export or evaluate, and released
    checkpoints to import). `numpy_arrays` also admits numpy's plain arrays, for older training
    checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    allowed = _NUMPY_ARRAY_GLOBALS if numpy_arrays else []
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True (swav never "
                              f"executes code from a checkpoint): {type(e).__name__}: {_reason(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict")
    return obj


def _reason(e: Exception) -> str:
    """The line of torch's several-line message that says what was refused."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line or "GLOBAL" in line:
            return line
    return lines[0] if lines else ""


def load(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint written by this trainer; CheckpointError when it cannot be read or lacks a
    `required` key."""
    state = read(path, numpy_arrays=True)
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a swav_train checkpoint: no {', '.join(missing)} inside")
    return state


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    # The numpy state's key array as a tensor, so that weights_only loading needs no numpy class.
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((kind, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_from_checkpoint(path: str | Path):
    """(SwAVModel in eval mode on CPU, TrainConfig, the checkpoint) from a training checkpoint."""
    from swav_train.config import ConfigError, from_dict
    from swav_train.model import SwAVModel

    state = load(path, required=("model", "config"))
    try:
        cfg = from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config is not valid here: {e}") from None
    model = SwAVModel.from_config(cfg)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: its weights do not fit the model of its config: {_reason(e)}") from None
    return model.eval(), cfg, state
