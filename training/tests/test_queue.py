import torch

import swav_train.loss as loss_mod
from swav_train.loss import SwAVLoss
from swav_train.queue import EmbeddingQueue


def _batch(bs, crops, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(bs * crops, d, generator=g), dim=1)
    w = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return emb, emb @ w.t(), w


def test_queue_is_used_only_when_full_and_read_before_update(monkeypatch):
    bs, crops, k, d = 4, 3, 5, 6
    seen = []
    real = loss_mod.sinkhorn_knopp
    monkeypatch.setattr(loss_mod, "sinkhorn_knopp", lambda s, e, i: (seen.append(s.clone()), real(s, e, i))[1])
    queue = EmbeddingQueue(num_assign=2, length_per_rank=2 * bs, dim=d)
    loss_fn = SwAVLoss(crops, (0, 1))
    history = []
    for step in range(4):
        emb, scores, w = _batch(bs, crops, k, d, seed=step)
        before = queue.buffer.clone()
        seen.clear()
        loss, stats = loss_fn(scores, emb, bs, queue, w)
        assert torch.isfinite(loss)
        if step < 2:
            # Not full yet (the last row is still zero): Sinkhorn sees only the batch.
            assert [s.shape[0] for s in seen] == [bs, bs] and not stats.queue_used
        else:
            assert stats.queue_used
            for slot in range(2):
                assert seen[slot].shape[0] == 3 * bs
                # The prepended rows are the queue as it was BEFORE this batch was pushed.
                torch.testing.assert_close(seen[slot][:2 * bs], before[slot] @ w.t())
        # After the step the newest embeddings are at the front, the older ones shifted back.
        for slot, crop_id in enumerate((0, 1)):
            torch.testing.assert_close(queue.buffer[slot, :bs], emb[crop_id * bs:(crop_id + 1) * bs])
            torch.testing.assert_close(queue.buffer[slot, bs:], before[slot, :bs])
        history.append(stats.queue_used)
    assert history == [False, False, True, True]


def test_queue_state_round_trips():
    q = EmbeddingQueue(2, 8, 4)
    q.push(0, torch.ones(8, 4))
    q.scores_with_queue(0, torch.zeros(3, 2), torch.ones(2, 4))
    r = EmbeddingQueue(2, 8, 4)
    r.load_state_dict(q.state_dict())
    assert r.in_use and torch.equal(r.buffer, q.buffer)


def test_loss_averages_as_the_paper():
    # Hand computation of the swapped prediction for 3 crops, assignment crops (0, 1).
    bs, crops, k, d = 4, 3, 5, 6
    emb, scores, _ = _batch(bs, crops, k, d, seed=9)
    loss, _ = SwAVLoss(crops, (0, 1), temperature=0.1)(scores, emb, bs)
    want = 0.0
    for c in (0, 1):
        q = loss_mod.sinkhorn_knopp(scores[c * bs:(c + 1) * bs], 0.05, 3)
        sub = 0.0
        for v in (v for v in range(crops) if v != c):
            p = torch.log_softmax(scores[v * bs:(v + 1) * bs] / 0.1, dim=1)
            sub += -(q * p).sum(dim=1).mean()
        want += sub / (crops - 1)
    torch.testing.assert_close(loss, want / 2)
