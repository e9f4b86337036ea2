import math

import numpy as np
import torch

from swav_train.optim import LARS, learning_rate


def official_schedule(ipe, epochs, warmup, base, final, start):
    """The paper's main_swav.py schedule, transcribed with numpy."""
    warm = np.linspace(start, base, ipe * warmup)
    iters = np.arange(ipe * (epochs - warmup))
    cos = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / len(iters))) for t in iters])
    return np.concatenate((warm, cos))


def test_schedule_matches_official_arrays():
    for ipe, epochs, warmup, base, final, start in [(7, 10, 2, 4.8, 0.0048, 0.3), (5, 3, 0, 0.6, 0.0006, 0.0),
                                                     (1, 4, 1, 1.0, 0.1, 0.5)]:
        want = official_schedule(ipe, epochs, warmup, base, final, start)
        got = [learning_rate(s, ipe, epochs, warmup, base, final, start) for s in range(ipe * epochs)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_lars_matches_larc_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    zero = torch.nn.Parameter(torch.zeros(4))  # zero norm: plain SGD step, no weight decay
    lr, wd, trust, mom = 0.5, 1e-2, 0.001, 0.9
    opt = LARS([w, zero], lr=lr, momentum=mom, weight_decay=wd, trust_coefficient=trust)
    w0 = w.detach().clone()
    bufs = None
    for step in range(3):
        g = torch.randn(5, 3)
        gz = torch.randn(4)
        w.grad, zero.grad = g.clone(), gz.clone()
        wn, gn = w0.norm(), g.norm()
        scaled = (g + wd * w0) * (trust * wn / (gn + wn * wd + 1e-8))
        bufs = scaled if bufs is None else mom * bufs + scaled
        expect = w0 - lr * bufs
        zero_before = zero.detach().clone()
        opt.step()
        torch.testing.assert_close(w.detach(), expect, rtol=1e-6, atol=1e-7)
        if step == 0:
            torch.testing.assert_close(zero.detach(), zero_before - lr * gz)
        w0 = w.detach().clone()


def test_lars_skips_parameters_without_grad():
    p = torch.nn.Parameter(torch.ones(3))
    opt = LARS([p], lr=1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state
