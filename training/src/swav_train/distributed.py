"""Process-group set-up: the only reader of torchrun's environment.

Without RANK/WORLD_SIZE in the environment everything degrades to rank 0 of
a world of 1, so a plain ``python -m swav_train train`` needs no launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class DistributedSetupError(RuntimeError):
    """The device or the process group cannot be set up; the message is one line that says why."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def setup(device_pref: str = "auto") -> DistContext:
    """Read torchrun's environment, pick the device and start the process group if needed."""
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} and WORLD_SIZE={world} do not fit (need 0 <= RANK < WORLD_SIZE)")
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise DistributedSetupError("device=cuda was requested but CUDA is not available")
    if use_cuda:
        try:
            torch.cuda.set_device(local_rank)
        except (RuntimeError, ValueError) as e:
            raise DistributedSetupError(f"cannot use CUDA device {local_rank} (LOCAL_RANK): {_one_line(e)}") from None
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        try:
            dist.init_process_group(backend=backend, init_method="env://")
        except (RuntimeError, ValueError, OSError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
            raise DistributedSetupError(f"cannot join the process group as rank {rank} of {world} ({backend}, "
                                        f"MASTER_ADDR={os.environ.get('MASTER_ADDR', '')!r}, "
                                        f"MASTER_PORT={os.environ.get('MASTER_PORT', '')!r}): {_one_line(e)}") from None
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def current() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy); the identity in a single process."""
    out = value.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest `value` over ranks; `value` itself in a single process."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
