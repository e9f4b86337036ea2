import torch
import torchvision

from conftest import tiny_config
from swav_train.loss import SwAVLoss
from swav_train.model import InferenceModel, ResNetTrunk, SwAVModel
from swav_train.optim import LARS
from swav_train.train import NonFiniteLossError, collapse_warning, train_step


def _crops(cfg, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, cfg.channels, s, s, generator=g) for n, s in zip(cfg.nmb_crops, cfg.size_crops)
            for _ in range(n)]


def _setup(cfg):
    torch.manual_seed(0)
    model = SwAVModel.from_config(cfg).train()
    loss_fn = SwAVLoss(cfg.total_crops, cfg.crops_for_assign, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations)
    opt = LARS(model.parameters(), lr=0.1)
    return model, loss_fn, opt


def test_width_64_trunk_has_torchvision_shapes():
    for arch, ctor in (("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)):
        ours = {k: v.shape for k, v in ResNetTrunk(arch, 64, 3, small_stem=False).state_dict().items()}
        theirs = {k: v.shape for k, v in ctor(weights=None).state_dict().items() if not k.startswith("fc.")}
        assert ours == theirs, arch


def test_small_stem_keeps_resolution_and_channels_follow_config():
    trunk = ResNetTrunk("resnet18", 4, in_channels=1, small_stem=True)
    assert trunk.conv1.kernel_size == (3, 3) and trunk.conv1.stride == (1, 1) and trunk.conv1.in_channels == 1
    assert isinstance(trunk.maxpool, torch.nn.Identity)
    assert trunk(torch.randn(2, 1, 28, 28)).shape == (2, 32)
    assert tiny_config(image_size=64, resize_size=64, stem="auto").small_stem
    assert not tiny_config(image_size=96, resize_size=96, stem="auto").small_stem


def test_forward_groups_consecutive_crops_of_equal_resolution():
    cfg = tiny_config(nmb_crops=(2, 3), size_crops=(16, 8), min_scale_crops=(0.3, 0.1), max_scale_crops=(1, 0.3))
    model, _, _ = _setup(cfg)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    emb, scores = model(_crops(cfg, bs=4))
    assert calls == [(8, 3, 16, 16), (12, 3, 8, 8)]
    assert emb.shape == (20, cfg.feat_dim) and scores.shape == (20, cfg.nmb_prototypes)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(20))


def test_every_parameter_gets_a_finite_gradient_and_prototypes_only_after_freeze():
    cfg = tiny_config(freeze_prototypes_niters=2)
    model, loss_fn, opt = _setup(cfg)
    crops = _crops(cfg)
    frozen_before = model.prototypes.weight.detach().clone()
    for it in range(2):
        loss, _ = train_step(model, loss_fn, opt, crops, it, cfg.freeze_prototypes_niters)
        assert torch.isfinite(loss)
        assert model.prototypes.weight.grad is None
        for name, p in model.named_parameters():
            if not name.startswith("prototypes"):
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Only normalised, never moved by the optimiser while frozen.
    torch.testing.assert_close(model.prototypes.weight, torch.nn.functional.normalize(frozen_before, dim=1))
    train_step(model, loss_fn, opt, crops, 2, cfg.freeze_prototypes_niters)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().sum()) > 0, name
    assert not torch.allclose(model.prototypes.weight, torch.nn.functional.normalize(frozen_before, dim=1))


def test_prototypes_are_normalised_before_each_step_not_in_forward():
    cfg = tiny_config()
    model, loss_fn, opt = _setup(cfg)
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    before = model.prototypes.weight.detach().clone()
    model(_crops(cfg))
    assert torch.equal(model.prototypes.weight.detach(), before)  # forward leaves them alone
    assert float(before.norm(dim=1).max()) > 1.5
    seen = []
    model.prototypes.register_forward_pre_hook(lambda m, i: seen.append(m.weight.norm(dim=1).clone()))
    train_step(model, loss_fn, opt, _crops(cfg), 5, 0)
    torch.testing.assert_close(seen[0], torch.ones(cfg.nmb_prototypes))


def test_non_finite_loss_stops_with_a_clear_message():
    cfg = tiny_config()
    model, loss_fn, opt = _setup(cfg)
    crops = _crops(cfg)
    crops[0][0, 0, 0, 0] = float("nan")
    try:
        train_step(model, loss_fn, opt, crops, 7, 0)
    except NonFiniteLossError as e:
        assert "iteration 7" in str(e) and "nan" in str(e).lower()
    else:
        raise AssertionError("NaN input did not stop training")


def test_bf16_autocast_step_runs_with_fp32_codes():
    cfg = tiny_config()
    model, loss_fn, opt = _setup(cfg)
    loss, _ = train_step(model, loss_fn, opt, _crops(cfg), 5, 0, autocast_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_collapse_warning_names_remedies():
    cfg = tiny_config(nmb_prototypes=30)
    msg = collapse_warning(cfg, mean_loss=3.40, mean_used=12.0, batch_size=64)
    assert msg is not None and "ln K" in msg
    for remedy in ("--queue-length", "--freeze-prototypes-niters", "--epsilon"):
        assert remedy in msg
    few = collapse_warning(cfg, mean_loss=1.0, mean_used=1.0, batch_size=64)
    assert few is not None and "prototypes win" in few
    assert collapse_warning(cfg, mean_loss=1.0, mean_used=20.0, batch_size=64) is None


def test_inference_model_outputs_are_normalised_cosines():
    cfg = tiny_config()
    model, _, _ = _setup(cfg)
    with torch.no_grad():
        model.prototypes.weight.mul_(5)
    with torch.no_grad():
        emb, proj, scores = InferenceModel(model.eval(), cfg.mean, cfg.std)(torch.rand(3, 3, 16, 16))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(proj.norm(dim=1), torch.ones(3))
    assert float(scores.abs().max()) <= 1 + 1e-5


def test_the_embedding_is_the_pooled_output_of_the_chosen_stage():
    cfg = tiny_config()
    stage4, _, _ = _setup(cfg)
    stage3 = SwAVModel.from_config(cfg.replace(embedding_layer=3))
    stage3.load_state_dict(stage4.state_dict())  # the same weights: the choice adds none
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        emb4, proj4, scores4 = InferenceModel(stage4.eval(), cfg.mean, cfg.std)(x)
        emb3, proj3, scores3 = InferenceModel(stage3.eval(), cfg.mean, cfg.std)(x)
        # by hand, stage by stage
        bb = stage4.backbone
        h = bb.relu(bb.bn1(bb.conv1((x - torch.tensor(cfg.mean).view(1, -1, 1, 1)) / torch.tensor(cfg.std).view(1, -1, 1, 1))))
        h3 = bb.layer3(bb.layer2(bb.layer1(h)))
        h4 = bb.layer4(h3)
    assert stage3.embedding_dim == 4 * cfg.width == emb3.shape[1] and stage4.embedding_dim == 8 * cfg.width
    torch.testing.assert_close(emb3, torch.nn.functional.normalize(h3.mean((2, 3)), dim=1))
    torch.testing.assert_close(emb4, torch.nn.functional.normalize(h4.mean((2, 3)), dim=1))
    # projection and prototypes always take stage 4
    torch.testing.assert_close(proj3, proj4)
    torch.testing.assert_close(scores3, scores4)
