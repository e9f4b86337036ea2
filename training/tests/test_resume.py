import json

import pytest
import torch

from conftest import tiny_config
from swav_train import checkpoint
from swav_train.config import ConfigError
from swav_train.train import train


@pytest.mark.parametrize("workers", [0, 1])
def test_stopped_and_resumed_follows_the_uninterrupted_loss_curve(tmp_path, image_folder, workers):
    # Queue created at epoch 1 and full from its third step, so the checkpoint after epoch 2 carries it.
    cfg = tiny_config(data_dir=str(image_folder), epochs=3, warmup_epochs=1, queue_length=16, epoch_queue_starts=1,
                      freeze_prototypes_niters=2, num_workers=workers)
    full = train(cfg, tmp_path / "full", resume=False, finish=False)
    assert len(full.losses) == 12  # 32 images / batch 8 = 4 steps per epoch

    first = train(cfg, tmp_path / "split", finish=False, stop_after_epoch=2)
    assert first.epochs_done == 2
    saved = checkpoint.load(tmp_path / "split" / "rank0.pt")
    assert saved["queue"] is not None and saved["queue"]["in_use"]
    second = train(cfg, tmp_path / "split", finish=False)  # auto-resume from the run directory
    assert second.epochs_done == 3 and len(second.losses) == 4

    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(full.losses),
                               rtol=1e-5, atol=1e-6)
    a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")["model"]
    b = checkpoint.load(tmp_path / "split" / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1, 2]


def test_resume_refuses_a_different_config(tmp_path, image_folder):
    cfg = tiny_config(data_dir=str(image_folder), epochs=2)
    train(cfg, tmp_path / "run", finish=False, stop_after_epoch=1)
    with pytest.raises(ConfigError, match="nmb_prototypes"):
        train(cfg.replace(nmb_prototypes=7), tmp_path / "run", finish=False)


def test_a_checkpoint_from_before_a_config_field_existed_resumes(tmp_path, image_folder):
    # init_from came after runs that are still on disk: a config without it means its default.
    cfg = tiny_config(data_dir=str(image_folder), epochs=2)
    train(cfg, tmp_path / "run", finish=False, stop_after_epoch=1)
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    del state["config"]["init_from"]
    checkpoint.atomic_save(state, path)
    assert train(cfg, tmp_path / "run", finish=False).epochs_done == 2
    # ... but not when the run sets the field now
    train(cfg, tmp_path / "again", finish=False, stop_after_epoch=1)
    with pytest.raises(ConfigError, match="init_from"):
        train(cfg.replace(init_from=str(path)), tmp_path / "again", finish=False)


def test_a_run_resumes_with_another_embedding_layer_and_exports_it(tmp_path, image_folder):
    # A run started before the preset chose stage 3 (its checkpoint says 4, or nothing) must resume under it.
    cfg = tiny_config(data_dir=str(image_folder), epochs=2)
    train(cfg, tmp_path / "run", finish=False, stop_after_epoch=1)
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    del state["config"]["embedding_layer"]
    checkpoint.atomic_save(state, path)
    assert train(cfg.replace(embedding_layer=3), tmp_path / "run").epochs_done == 2
    manifest = json.loads((tmp_path / "run" / "bundle" / "manifest.json").read_text())
    assert manifest["training"]["embedding_layer"] == 3
    assert manifest["outputs"]["embedding"]["dim"] == 4 * cfg.width


def test_checkpoint_write_is_atomic(tmp_path):
    target = tmp_path / "c.pt"
    checkpoint.atomic_save({"a": 1}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.atomic_save({"a": Boom()}, target)
    assert checkpoint.load(target) == {"a": 1}  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # and no temporary is left behind
