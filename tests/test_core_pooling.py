"""Poolers against hand-computed values; padding must not leak into the vector."""
import math

import torch

from invemb.encoder import AttentionPooling, ClsPooling, MeanPooling


def _identity_projection(pool):
    """Make Linear(H,S) the identity, LayerNorm the identity map up to normalisation."""
    with torch.no_grad():
        lin, ln = pool.proj[0], pool.proj[2]
        lin.weight.copy_(torch.eye(2))
        lin.bias.zero_()
        ln.weight.fill_(1.0)
        ln.bias.zero_()


def _proj(x):  # GELU -> LayerNorm over 2 features, by hand
    g = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]
    mu = sum(g) / 2
    var = sum((v - mu) ** 2 for v in g) / 2
    return [(v - mu) / math.sqrt(var + 1e-5) for v in g]


H = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])  # [1,3,2]; token 2 is padding
MASK = torch.tensor([[1, 1, 0]])


def test_attention_pooling_hand_computed():
    pool = AttentionPooling(2, 2)
    _identity_projection(pool)
    with torch.no_grad():
        pool.score.weight.copy_(torch.tensor([[1.0, 0.5]]))  # scores: 1.0, 1.0, 4.5 (masked)
        pool.score.bias.fill_(0.25)
    out = pool(H, MASK)[0].tolist()
    w = [0.5, 0.5]  # softmax(1.25, 1.25); the padded token's 4.75 is masked out
    p0, p1 = _proj([1.0, 0.0]), _proj([0.0, 2.0])
    expected = [w[0] * p0[i] + w[1] * p1[i] for i in range(2)]
    assert out == pytest_approx(expected)


def test_attention_pooling_unequal_weights_and_mask_respected():
    pool = AttentionPooling(2, 2)
    _identity_projection(pool)
    with torch.no_grad():
        pool.score.weight.copy_(torch.tensor([[2.0, 0.0]]))  # scores 2, 0
        pool.score.bias.zero_()
    out = pool(H, MASK)[0].tolist()
    e2 = math.exp(2.0)
    w0, w1 = e2 / (e2 + 1), 1 / (e2 + 1)
    p0, p1 = _proj([1.0, 0.0]), _proj([0.0, 2.0])
    assert out == pytest_approx([w0 * p0[i] + w1 * p1[i] for i in range(2)])
    # changing the padded token changes nothing
    h2 = H.clone()
    h2[0, 2] = torch.tensor([-50.0, 80.0])
    assert torch.allclose(pool(h2, MASK), pool(H, MASK))


def test_cls_and_mean_pooling_hand_computed():
    cls, mean = ClsPooling(2, 2), MeanPooling(2, 2)
    _identity_projection(cls)
    _identity_projection(mean)
    assert cls(H, MASK)[0].tolist() == pytest_approx(_proj([1.0, 0.0]))
    p0, p1 = _proj([1.0, 0.0]), _proj([0.0, 2.0])
    assert mean(H, MASK)[0].tolist() == pytest_approx([(p0[i] + p1[i]) / 2 for i in range(2)])


def pytest_approx(values):
    import pytest
    return pytest.approx(values, abs=1e-5)
