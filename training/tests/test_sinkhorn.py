import math

import pytest
import torch
import torch.nn.functional as F

from swav_train.sinkhorn import sinkhorn_knopp


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The paper's Algorithm (official main_swav.py distributed_sinkhorn, one process), transcribed plainly."""
    Q = torch.exp(scores / epsilon).t()  # K x B
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def cosine_scores(b: int, k: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    w = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ w.t()


@pytest.mark.parametrize("b,k,eps,iters", [(32, 10, 0.05, 3), (64, 300, 0.05, 3), (17, 5, 0.1, 1), (40, 8, 0.03, 5)])
def test_matches_reference_transcription(b, k, eps, iters):
    scores = cosine_scores(b, k)
    got = sinkhorn_knopp(scores, eps, iters)
    want = reference_sinkhorn(scores.double(), eps, iters).float()
    assert got.shape == (b, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_marginals():
    b, k = 64, 16
    codes = sinkhorn_knopp(cosine_scores(b, k, seed=1), 0.05, 50)
    # Each sample's codes are a distribution over prototypes ...
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(b), rtol=0, atol=1e-5)
    assert bool((codes >= 0).all())
    # ... and the prototypes share the samples equally (equipartition) once converged.
    torch.testing.assert_close(codes.sum(dim=0), torch.full((k,), b / k), rtol=1e-3, atol=1e-3)


def test_rows_sum_to_one_with_default_iterations():
    codes = sinkhorn_knopp(cosine_scores(50, 30, seed=2))
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(50), rtol=0, atol=1e-5)


def test_small_epsilon_stays_finite():
    scores = cosine_scores(128, 64, seed=3)
    # A prototype far from every sample: its row underflows without the max shift.
    scores[:, 0] = -1.0
    scores[0, :] = 1.0
    codes = sinkhorn_knopp(scores, epsilon=0.01, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(128), rtol=0, atol=1e-4)
    # The unshifted official computation overflows here, which is what the shift prevents.
    assert not torch.isfinite(reference_sinkhorn(scores.float(), 0.01, 3)).all()


def test_bf16_autocast_input_gives_fp32_codes():
    scores = cosine_scores(32, 12, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = scores.bfloat16() @ torch.eye(12, dtype=torch.bfloat16)
        codes = sinkhorn_knopp(logits)
    assert logits.dtype == torch.bfloat16
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, sinkhorn_knopp(logits.float()), rtol=0, atol=0)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(32), rtol=0, atol=1e-5)


def test_input_is_not_modified_and_no_grad():
    scores = cosine_scores(8, 4).requires_grad_(True)
    before = scores.detach().clone()
    codes = sinkhorn_knopp(scores)
    assert not codes.requires_grad
    assert torch.equal(scores.detach(), before)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B x K"):
        sinkhorn_knopp(torch.zeros(3))
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(torch.zeros(3, 2), iterations=0)


def test_confident_scores_give_peaked_codes():
    # Sanity on meaning, not only on numbers: a sample aligned with one prototype gets most of its mass there.
    k = 4
    scores = torch.eye(k).repeat(3, 1) * 0.9
    codes = sinkhorn_knopp(scores, 0.05, 3)
    assert bool((codes.argmax(dim=1) == torch.arange(k).repeat(3)).all())
    assert float(codes.max(dim=1).values.min()) > 1 - math.exp(-5)
