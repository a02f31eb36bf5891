"""The one beam search: exhaustive-search equality, sorting, beam 1 == greedy, batching, n-gram blocking; top-k
candidates (a Stepper capability) give exactly the full-row results, ties included."""
import itertools

import numpy as np
import pytest

from invemb.generation import Candidates, GenerationConfig, beam_search, generate, greedy_search, log_softmax

V, EOS = 4, 3


class TableStepper:
    """Hand-built step function: each (item, prefix) has its own fixed random next-token distribution."""

    def __init__(self, batch_size=1, seed=0, bias=None):
        self.batch_size, self.seed, self.bias = batch_size, seed, bias

    def dist(self, item, prefix):
        rng = np.random.default_rng(abs(hash((self.seed, item, prefix))) % (2 ** 32))
        logits = rng.normal(size=V) * 2
        if self.bias is not None:
            logits = logits + self.bias(prefix)
        return log_softmax(logits)

    def _lp(self, cache):
        return np.stack([self.dist(item, prefix) for item, prefix in cache])

    def start(self, num_beams):
        cache = [(b, ()) for b in range(self.batch_size) for _ in range(num_beams)]
        return self._lp(cache), cache

    def step(self, tokens, cache):
        cache = [(item, prefix + (int(t),)) for (item, prefix), t in zip(cache, tokens)]
        return self._lp(cache), cache

    def reorder(self, cache, rows):
        return [cache[r] for r in rows]


def exhaustive(stepper, item, max_length, alpha):
    """Every sequence that ends with EOS within max_length tokens or runs to max_length, scored."""
    out = []
    for n in range(1, max_length + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1]:
                continue
            lp = sum(stepper.dist(item, seq[:i])[seq[i]] for i in range(n))
            tokens = list(seq[:-1]) if seq[-1] == EOS else list(seq)
            if seq[-1] != EOS and n < max_length:
                continue
            out.append((tokens, lp / n ** alpha))
    return sorted(out, key=lambda x: -x[1])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(alpha, seed):
    stepper = TableStepper(batch_size=2, seed=seed)
    cfg = GenerationConfig(beam_size=64, max_length=3, length_penalty=alpha, eos_id=EOS, num_return=64)
    result = beam_search(stepper, cfg)
    for item in range(2):
        want = exhaustive(stepper, item, 3, alpha)
        got = [(h.tokens, h.score) for h in result[item]]
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-9)


def beam_oracle(stepper, item, k, max_length, alpha):
    """Beam search of one item by its definition, every extension of every live beam scored (no top-2k shortcut,
    no batching): each step ranks all k x V extensions (ties: lower beam * V + token), takes the 2k best; an ending
    among the k best is a hypothesis, the others fill the k live beams; an item stops when it holds k hypotheses
    and its best live beam (at this length) cannot beat the worst of them, or at max_length (live beams end)."""
    def norm(raw, length):
        return raw / max(1, length) ** alpha
    live, hyps = [((), 0.0)], []  # (prefix, sum of log-probs)
    for t in range(max_length):
        cands = sorted(((s + stepper.dist(item, prefix)[tok], b * V + tok, prefix, tok)
                        for b, (prefix, s) in enumerate(live) for tok in range(V)), key=lambda c: (-c[0], c[1]))
        nxt = []
        for rank, (s, _, prefix, tok) in enumerate(cands[:2 * k]):
            if tok == EOS:
                if rank < k:
                    hyps.append((list(prefix), norm(s, t + 1)))
                continue
            nxt.append((prefix + (tok,), s))
            if len(nxt) == k:
                break
        hyps = sorted(hyps, key=lambda h: -h[1])[:k]
        if t == max_length - 1:
            hyps = sorted(hyps + [(list(p), norm(s, t + 1)) for p, s in nxt], key=lambda h: -h[1])
            break
        if not nxt or (len(hyps) >= k and norm(max(s for _, s in nxt), t + 1) <= hyps[k - 1][1]):
            break
        live = nxt
    return hyps[:k]


class RowCountingStepper(TableStepper):
    """TableStepper that records the rows of each step: fewer rows than batch x beam before max_length means an
    item finished early (its k hypotheses beat every live beam) and left the batch."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.rows = []

    def step(self, tokens, cache):
        self.rows.append(len(tokens))
        return super().step(tokens, cache)


def test_small_beam_that_prunes_equals_the_oracle():
    """Beams much narrower than the k x V extensions they rank (k=2, 3 of V=4; up to 5 tokens; EOS likelier after
    two tokens): the search keeps exactly the oracle's beams and hypotheses (full rows and top-k candidates alike),
    and the cases do prune (the beam misses the exhaustive optimum for some items) and stop early (items leave the
    batch before max_length)."""
    def eos_later(prefix):
        return np.array([0.0, 0.0, 0.0, len(prefix) - 2.0])
    missed = early = 0
    for k, alpha, seed in itertools.product((2, 3), (0.0, 1.0), range(6)):
        cfg = GenerationConfig(beam_size=k, max_length=5, length_penalty=alpha, eos_id=EOS, num_return=k)
        stepper = RowCountingStepper(batch_size=3, seed=seed, bias=eos_later)
        full = beam_search(stepper, cfg)
        top = beam_search(CandidateStepper(TableStepper(batch_size=3, seed=seed, bias=eos_later)), cfg)
        early += len(stepper.rows) < cfg.max_length - 1 or min(stepper.rows) < 3 * k
        for item in range(3):
            want = beam_oracle(stepper, item, k, cfg.max_length, alpha)
            for got in (full[item], top[item]):
                assert [h.tokens for h in got] == [w[0] for w in want], (k, alpha, seed, item)
                np.testing.assert_allclose([h.score for h in got], [w[1] for w in want], rtol=1e-12)
            missed += full[item][0].tokens != exhaustive(stepper, item, cfg.max_length, alpha)[0][0]
    assert missed > 0 and early > 0, (missed, early)


@pytest.mark.parametrize("seed", range(5))
def test_beams_sorted_and_best_is_at_least_greedy(seed):
    stepper = TableStepper(batch_size=3, seed=seed)
    cfg = GenerationConfig(beam_size=4, max_length=6, eos_id=EOS, num_return=4)
    result = beam_search(stepper, cfg)
    greedy = greedy_search(stepper, GenerationConfig(beam_size=1, max_length=6, eos_id=EOS))
    for hyps, g in zip(result, greedy):
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True) and len(hyps) == 4
        assert hyps[0].score >= g.score - 1e-12


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_one_equals_greedy(seed, alpha):
    stepper = TableStepper(batch_size=3, seed=seed)
    beam = beam_search(stepper, GenerationConfig(beam_size=1, max_length=7, length_penalty=alpha, eos_id=EOS))
    greedy = greedy_search(stepper, GenerationConfig(beam_size=1, max_length=7, length_penalty=alpha, eos_id=EOS))
    for b, g in zip(beam, greedy):
        assert b[0].tokens == g.tokens
        assert b[0].score == pytest.approx(g.score)


def test_batched_equals_one_by_one():
    stepper = TableStepper(batch_size=4, seed=7)
    cfg = GenerationConfig(beam_size=3, max_length=6, eos_id=EOS, num_return=3)
    batched = beam_search(stepper, cfg)

    class One(TableStepper):  # item `i` alone
        def __init__(self, i):
            super().__init__(1, 7)
            self.i = i

        def dist(self, item, prefix):
            return super().dist(self.i, prefix)

    for i in range(4):
        alone = beam_search(One(i), cfg)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]


def test_no_repeat_ngram_blocks_repeats():
    # strongly prefer the cycle 0 1 0 1 ... and never EOS
    def bias(prefix):
        b = np.zeros(V)
        b[EOS] = -50
        b[1 if (prefix and prefix[-1] == 0) else 0] = 20
        return b
    stepper = TableStepper(batch_size=1, bias=bias)
    free = greedy_search(stepper, GenerationConfig(beam_size=1, max_length=8, eos_id=EOS))[0].tokens
    assert free[:4] == [0, 1, 0, 1]
    for search, k in ((greedy_search, 1), (lambda s, c: [h[0] for h in beam_search(s, c)], 3)):
        toks = search(stepper, GenerationConfig(beam_size=k, max_length=8, eos_id=EOS, no_repeat_ngram_size=2))[0]
        toks = toks.tokens
        bigrams = list(zip(toks, toks[1:]))
        assert len(bigrams) == len(set(bigrams)), toks


def test_max_length_caps_output():
    stepper = TableStepper(batch_size=2, bias=lambda p: np.array([0, 0, 0, -100.0]))
    for k in (1, 3):
        cfg = GenerationConfig(beam_size=k, max_length=5, eos_id=EOS)
        out = greedy_search(stepper, cfg) if k == 1 else [h[0] for h in beam_search(stepper, cfg)]
        assert all(len(h.tokens) == 5 for h in out)


class CandidateStepper:
    """Wraps a full-row stepper and answers with Candidates (each row's n best, ties by lower id: ONNX TopK's
    order), as the exported graphs' top_log_probs/top_ids do. Counts what it was asked for."""

    def __init__(self, inner, max_candidates=10 ** 6):
        self.inner, self.batch_size, self.max_candidates = inner, inner.batch_size, max_candidates
        self.asked = None

    def start(self, num_beams, candidates=0):
        self.asked = candidates
        lp, cache = self.inner.start(num_beams)
        return (Candidates.of(lp, candidates) if candidates else lp), cache

    def step(self, tokens, cache):
        lp, cache = self.inner.step(tokens, cache)
        return (Candidates.of(lp, self.asked) if self.asked else lp), cache

    def reorder(self, cache, rows):
        return self.inner.reorder(cache, rows)


class WideStepper(TableStepper):
    """V = 40 with logits on a coarse grid: many exactly tied log-probs, inside and at the edge of every top-2k."""
    v = 40

    def dist(self, item, prefix):
        rng = np.random.default_rng(abs(hash((self.seed, item, prefix))) % (2 ** 32))
        logits = np.round(rng.normal(size=self.v) * 2) / 2  # values in steps of 0.5: ties everywhere
        logits[EOS] += 0.5 * len(prefix) - 1.0  # ends become likely after a few tokens
        return log_softmax(logits)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_candidates_wide_beam_equals_exhaustive_search(alpha, seed):
    stepper = CandidateStepper(TableStepper(batch_size=2, seed=seed))
    cfg = GenerationConfig(beam_size=64, max_length=3, length_penalty=alpha, eos_id=EOS, num_return=64)
    result = beam_search(stepper, cfg)
    assert stepper.asked == 128  # the search did take the candidate path
    for item in range(2):
        want = exhaustive(stepper.inner, item, 3, alpha)
        assert [h.tokens for h in result[item]] == [w[0] for w in want]
        np.testing.assert_allclose([h.score for h in result[item]], [w[1] for w in want], rtol=1e-9)


@pytest.mark.parametrize("beam", [1, 2, 4, 5])
@pytest.mark.parametrize("seed", range(6))
def test_candidates_give_the_full_row_results_with_ties(beam, seed):
    cfg = GenerationConfig(beam_size=beam, max_length=9, length_penalty=1.0, eos_id=EOS, num_return=beam)
    full = WideStepper(batch_size=5, seed=seed)
    top = CandidateStepper(WideStepper(batch_size=5, seed=seed))
    if beam == 1:
        want, got = greedy_search(full, cfg), greedy_search(top, cfg)
        assert top.asked == 1
        assert [(h.tokens, h.score) for h in got] == [(h.tokens, h.score) for h in want]
    else:
        want, got = beam_search(full, cfg), beam_search(top, cfg)
        assert top.asked == 2 * beam
        assert [[(h.tokens, h.score) for h in hs] for hs in got] == [[(h.tokens, h.score) for h in hs] for hs in want]


def test_candidates_not_used_when_too_few_or_ngram_blocking():
    cfg = GenerationConfig(beam_size=4, max_length=6, eos_id=EOS)
    few = CandidateStepper(WideStepper(batch_size=2), max_candidates=7)  # 2 x beam = 8 needed
    assert generate(few, cfg) and few.asked == 0
    blocking = CandidateStepper(WideStepper(batch_size=2))
    want = generate(WideStepper(batch_size=2), GenerationConfig(beam_size=4, max_length=6, eos_id=EOS,
                                                                no_repeat_ngram_size=2))
    got = generate(blocking, GenerationConfig(beam_size=4, max_length=6, eos_id=EOS, no_repeat_ngram_size=2))
    assert blocking.asked == 0 and [h.tokens for h in got] == [h.tokens for h in want]


def test_candidates_of_orders_ties_by_lower_id():
    lp = np.array([[-1.0, -0.5, -0.5, -2.0, -0.5]])
    c = Candidates.of(lp, 3)
    assert c.ids.tolist() == [[1, 2, 4]] and c.log_probs.tolist() == [[-0.5, -0.5, -0.5]]
    with pytest.raises(ValueError, match="must be"):
        Candidates(np.zeros((2, 3)), np.zeros((2, 4), dtype=np.int64), 5)


def test_split_search_keeps_row_order_and_runs_slices_at_once():
    """split_search: contiguous slices, one per worker (at most one per row), in row order, the caller's thread doing
    the first; no pool or one worker: one call; a worker's exception reaches the caller."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from invemb.generation import split_search
    calls, barrier = [], threading.Barrier(3, timeout=10)

    def search(rows):  # a search whose slices must all be running at the same time to get past the barrier
        calls.append((rows[:, 0].tolist(), threading.current_thread().name))
        barrier.wait()
        return [f"row {int(r)}" for r in rows[:, 0]]
    vectors = np.arange(7, dtype=np.float32).reshape(7, 1).repeat(3, axis=1)  # [7,3]
    with ThreadPoolExecutor(2) as pool:
        assert split_search(search, vectors, 3, pool) == [f"row {i}" for i in range(7)]
        assert sorted(c[0] for c in calls) == [[0, 1], [2, 3, 4], [5, 6]]
        assert len({c[1] for c in calls}) == 3 and (([0, 1], threading.current_thread().name) in calls)
        calls.clear()
        one = lambda rows: [int(r) for r in rows[:, 0]]  # noqa: E731
        assert split_search(one, vectors[:2], 8, pool) == [0, 1]  # 8 workers, 2 rows: 2 slices
        assert split_search(one, vectors, 1, pool) == list(range(7))
        assert split_search(one, vectors, 4, None) == list(range(7))

        def failing(rows):
            if rows[0, 0] > 0:
                raise RuntimeError("decoder failed")
            return [0] * len(rows)
        with pytest.raises(RuntimeError, match="decoder failed"):
            split_search(failing, vectors, 2, pool)
