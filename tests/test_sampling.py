"""The batched sampler (backend/sampling.py): draws follow the distribution the request asks for
(temperature, top-p), forbidden tokens are never drawn, greedy rows stay argmax, and a draw depends
on (seed, position) only - not on the batch it was made in."""

import math

import torch

from backend import sampling


def _uniform(seeds, positions) -> torch.Tensor:
    return torch.from_numpy(sampling.row_uniform(seeds, positions))


def _draws(logits_row: list[float], temperature: float, top_p: float, n: int) -> torch.Tensor:
    """n draws for one distribution: n rows of the same logits, seeds 0..n-1."""
    logits = torch.tensor([logits_row] * n)
    return sampling.sample(logits, torch.full((n,), temperature), torch.full((n,), top_p),
                           _uniform(torch.arange(n) * 7919 + 11, torch.full((n,), 3)), True, top_p < 1)


def _assert_frequencies(draws: torch.Tensor, expected: torch.Tensor) -> None:
    """Each token's share of the draws within 5 standard deviations of its probability."""
    n = len(draws)
    counts = torch.bincount(draws, minlength=len(expected)).double() / n
    for token, (got, p) in enumerate(zip(counts.tolist(), expected.tolist())):
        bound = 5 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9
        assert abs(got - p) <= bound, (token, got, p)


def test_draws_follow_the_tempered_distribution():
    row = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]
    for temperature in (0.5, 1.0, 1.7):
        expected = torch.softmax(torch.tensor(row, dtype=torch.float64) / temperature, dim=-1)
        _assert_frequencies(_draws(row, temperature, 1.0, 40_000), expected)


def test_top_p_keeps_the_smallest_set_reaching_it_and_renormalises():
    row = [0.0, 2.0, 1.0, 0.5, -1.0, -3.0]
    probs = torch.softmax(torch.tensor(row, dtype=torch.float64), dim=-1)  # 0.08 0.56 0.21 0.13 0.03 0.004
    draws = _draws(row, 1.0, 0.75, 40_000)
    kept = [1, 2]  # 0.56 < 0.75 <= 0.56 + 0.21
    assert set(draws.tolist()) <= set(kept)
    expected = torch.zeros(6, dtype=torch.float64)
    expected[kept] = probs[kept] / probs[kept].sum()
    _assert_frequencies(draws, expected)


def test_forbidden_tokens_are_never_drawn():
    """A grammar masks tokens to -inf: however many draws, none of them comes out - also where the
    allowed tokens are nearly impossible next to each other."""
    n = 20_000
    logits = torch.randn((n, 300), generator=torch.Generator().manual_seed(1))
    allowed = torch.zeros(300, dtype=torch.bool)
    allowed[[0, 17, 299]] = True
    logits[:, ~allowed] = float("-inf")
    logits[:, 17] = -60.0  # allowed, but ~1e-26 of the mass
    for top_p in (1.0, 0.5):
        got = sampling.sample(logits, torch.full((n,), 1.3), torch.full((n,), top_p),
                              _uniform(torch.arange(n), torch.arange(n) % 5), True, top_p < 1)
        assert allowed[got].all()


def test_greedy_rows_take_the_argmax_beside_sampled_ones():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((8, 1000), generator=gen)
    temperature = torch.tensor([0.0, 0.7, 1.3, 0.0, 1.0, 0.0, 2.0, 0.9])
    uniform = _uniform(torch.arange(8), torch.zeros(8, dtype=torch.long))
    got = sampling.sample(logits, temperature, torch.ones(8), uniform, True, False)
    greedy = temperature == 0
    assert torch.equal(got[greedy], logits.argmax(-1)[greedy])
    assert torch.equal(sampling.sample(logits, torch.zeros(8), torch.ones(8), uniform, False, False),
                       logits.argmax(-1))


def test_a_draw_depends_on_seed_and_position_only():
    """The same row drawn alone and inside a batch of others gives the same token (a generation
    resumed on another worker, in another batch, continues exactly); other seeds or positions give
    other draws."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn((16, 500), generator=gen)
    temperature, top_p = torch.full((16,), 1.0), torch.tensor([1.0, 0.9] * 8)
    seeds, positions = torch.randint(0, 2**62, (16,), generator=gen), torch.arange(16) * 3
    u = _uniform(seeds, positions)
    batch = sampling.sample(logits, temperature, top_p, u, True, True)
    for i in range(16):
        alone = sampling.sample(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], u[i:i + 1], True,
                                bool(top_p[i] < 1))
        assert alone.item() == batch[i].item()
    assert ((u > 0) & (u < 1)).all()
    assert len(set(u.tolist())) == 16
    assert not torch.equal(_uniform(seeds, positions + 1), u)


def _splitmix_reference(seed: int, position: int) -> float:
    """row_uniform written out with Python integers, masked to 64 bits by hand."""
    mask = 2**64 - 1

    def mix(x):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)
    bits = mix((mix((seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & mask) + 0x94D049BB133111EB) & mask)
    return ((bits >> 11) + 0.5) / float(1 << 53)


def test_the_uniform_numbers_are_splitmix64_bit_for_bit():
    """The rows' numbers (hashed with numpy's wrapping uint64 arithmetic) equal the same hash in
    Python's integers, for any seed (negative, near the int64 limits) and position."""
    gen = torch.Generator().manual_seed(3)
    seeds = torch.cat([torch.randint(-2**63, 2**63 - 1, (200,), generator=gen),
                       torch.tensor([0, 1, -1, 2**63 - 1, -2**63])]).tolist()
    positions = torch.randint(0, 1 << 20, (205,), generator=gen).tolist()
    got = sampling.row_uniform(seeds, positions).tolist()
    assert got == [_splitmix_reference(s % 2**64, p) for s, p in zip(seeds, positions)]
