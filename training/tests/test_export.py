import numpy as np
import onnx
import pytest
import torch

from conftest import tiny_config
from swav_train import export
from swav_train.model import InferenceModel, SwAVModel


def test_parity_failure_is_loud_and_graph_has_dynamic_batch(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = SwAVModel.from_config(cfg).eval()
    out = export.export_bundle(model, cfg, tmp_path / "b")
    graph = onnx.load(out / "model.onnx")
    assert graph.opset_import[0].version >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in graph.graph.output] == ["embedding", "projection", "prototype_scores"]

    wrapper = InferenceModel(model, cfg.mean, cfg.std).eval()
    batch = np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32)
    assert export.parity_check(wrapper, out / "model.onnx", batch) <= 1e-4
    with torch.no_grad():
        model.prototypes.weight.add_(0.5)  # PyTorch now disagrees with the exported graph
    with pytest.raises(export.ExportError, match="max abs diff"):
        export.parity_check(wrapper, out / "model.onnx", batch)
