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


# ------------------------------------------------------------------------------------------------ fact slots
def _slots_pool(token_identity=False):
    """Multi-query pooling, 1 query + 3 number slots of 2 dims, over a 6-piece vocabulary where pieces 2 and 4 hold
    a digit."""
    from invemb.encoder import MultiQueryPooling
    torch.manual_seed(0)
    table = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    return MultiQueryPooling(2, 8, 1, number_slots=3, token_identity=token_identity, number_table=table)


def test_number_slots_hold_the_kth_digit_piece_and_none_elsewhere():
    pool = _slots_pool()
    with torch.no_grad():
        pool.num_none.copy_(torch.tensor([0.7, -0.3]))
    ids = torch.tensor([[1, 4, 3, 2, 4]])  # digit pieces at positions 1, 3 and 4 (4 is padding)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    h = torch.randn(1, 5, 2)
    emb = torch.randn(1, 5, 2)
    out = pool(h, mask, ids, emb).view(1, 4, 2)  # [B, Q+K, c]

    def slot(pos):  # the k-th slot by hand: Linear([h; emb]) -> GELU -> LayerNorm
        x = pool.num_proj(torch.cat([h[0, pos], emb[0, pos]]))
        return pool.num_norm(torch.nn.functional.gelu(x))
    none = pool.num_norm(torch.nn.functional.gelu(pool.num_proj.bias + pool.num_none))
    assert torch.allclose(out[0, 1], slot(1), atol=1e-6)  # first digit piece
    assert torch.allclose(out[0, 2], slot(3), atol=1e-6)  # second
    assert torch.allclose(out[0, 3], none, atol=1e-6)  # the padded digit piece is not a third
    # a piece that holds no digit changes only the query's chunk (through its state), not the number slots
    h2, ids2 = h.clone(), ids.clone()
    h2[0, 2] += 5.0
    ids2[0, 2] = 5
    out2 = pool(h2, mask, ids2, emb).view(1, 4, 2)
    assert torch.allclose(out2[0, 1:], out[0, 1:], atol=1e-6) and not torch.allclose(out2[0, 0], out[0, 0])
    # another digit piece at the first slot's position moves that slot
    emb3 = emb.clone()
    emb3[0, 1] += 1.0
    assert not torch.allclose(pool(h, mask, ids, emb3).view(1, 4, 2)[0, 1], out[0, 1])


def test_token_identity_starts_as_the_plain_pooling_then_reads_the_pieces():
    plain, ident = _slots_pool(False), _slots_pool(True)  # same seed: same weights, identity weights zero
    ids, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]])
    h, emb = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    assert torch.equal(plain(h, mask, ids, emb), ident(h, mask, ids, emb))
    with torch.no_grad():
        ident.id_weight.fill_(0.5)
    moved = ident(h, mask, ids, emb + 1.0)[0, :2]
    assert not torch.allclose(moved, ident(h, mask, ids, emb)[0, :2])  # the query's chunk reads the pieces
