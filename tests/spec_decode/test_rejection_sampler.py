"""Rejection sampler (speculative decoding, issue 14): greedy rows equal step-by-step argmax decoding, random rows
emit tokens distributed exactly as the target's (chi-square over many identical requests in one batched call),
seeded rows are reproducible whatever shares the batch, the all-zero residual falls back to p, shapes are checked."""

from __future__ import annotations

import pytest
import torch

from pagellm.model_executor.layers.sampler import make_generator
from pagellm.spec_decode.rejection_sampler import PLACEHOLDER_TOKEN_ID, rejection_sample

# Upper 0.1% points of the chi-square distribution by degrees of freedom (scipy is not in the venv): a correct
# sampler fails 1 in 1000 seeds; the seeds below are fixed, so the tests are deterministic.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) of the tokens' counts against probs (normalized here)."""
    counts = torch.bincount(tokens, minlength=probs.shape[0]).double()
    expected = probs.double() / probs.sum() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "emitted a token of probability zero"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    stat, dof = chi_square(tokens, probs)
    assert stat < CHI2_999[dof], (stat, dof, torch.bincount(tokens, minlength=probs.shape[0]).tolist())


def greedy_reference(drafts: torch.Tensor, num_draft: list[int], probs: torch.Tensor) -> list[list[int]]:
    """Plain greedy decoding, one position at a time: emit the argmax; go on while the draft guessed it."""
    out = []
    for r, n in enumerate(num_draft):
        tokens = []
        for i in range(n + 1):
            tokens.append(int(torch.argmax(probs[r, i])))
            if i == n or int(drafts[r, i]) != tokens[-1]:
                break
        out.append(tokens)
    return out


def tied_probs(R: int, K: int, V: int, gen: torch.Generator) -> torch.Tensor:
    """[R, K + 1, V] distributions from small integer weights: many rows have tied maxima."""
    weights = torch.randint(0, 4, (R, K + 1, V), generator=gen).double()
    weights[..., 0] += 0.5 * (weights.sum(-1) == 0)  # no all-zero row
    return (weights / weights.sum(-1, keepdim=True)).float()


def drafts_near_argmax(probs: torch.Tensor, K: int, gen: torch.Generator, hit: float = 0.75) -> torch.Tensor:
    """[R, K] drafts equal to the target's argmax with probability `hit`, else random (a run of hits, then a miss)."""
    R, _, V = probs.shape
    argmax = probs[:, :K].argmax(-1)
    other = torch.randint(0, V, (R, K), generator=gen)
    return torch.where(torch.rand(R, K, generator=gen) < hit, argmax, other)


@pytest.mark.parametrize("R,K,V", [(1, 0, 5), (5, 0, 7), (3, 1, 7), (6, 4, 11), (32, 6, 50)])
def test_greedy_equals_step_by_step_argmax(R: int, K: int, V: int) -> None:
    gen = torch.Generator().manual_seed(R * 100 + K * 10 + V)
    probs = tied_probs(R, K, V, gen)
    drafts = drafts_near_argmax(probs, K, gen)
    num_draft = torch.randint(0, K + 1, (R,), generator=gen).tolist()  # mixed k, 0 included
    if R > 1:
        num_draft[0] = K
        num_draft[1] = 0
    drafts[torch.arange(K) >= torch.tensor(num_draft).unsqueeze(1)] = PLACEHOLDER_TOKEN_ID  # padding
    expected = greedy_reference(drafts, num_draft, probs)
    q = torch.softmax(torch.randn(R, K, V, generator=gen), -1)

    for draft_probs in (None, q):  # greedy rows read no draft probabilities
        out = rejection_sample(drafts, num_draft, probs, draft_probs, greedy=[True] * R)
        assert out.tolists() == expected
        assert out.token_ids.shape == (R, K + 1) and out.token_ids.dtype == torch.int64
        assert (out.token_ids[torch.arange(K + 1) >= out.num_tokens.unsqueeze(1)] == PLACEHOLDER_TOKEN_ID).all()
    # bfloat16 target probabilities: the same argmax rule on those values
    bf16 = probs.to(torch.bfloat16)
    assert rejection_sample(drafts, num_draft, bf16, greedy=[True] * R).tolists() == \
        greedy_reference(drafts, num_draft, bf16)


def test_greedy_rows_inside_a_mixed_batch() -> None:
    """Greedy rows among random and seeded random rows still give exactly the argmax tokens."""
    R, K, V = 40, 5, 13
    gen = torch.Generator().manual_seed(7)
    probs = tied_probs(R, K, V, gen)
    drafts = drafts_near_argmax(probs, K, gen)
    num_draft = torch.randint(0, K + 1, (R,), generator=gen).tolist()
    greedy = (torch.arange(R) % 3 == 0).tolist()
    generators = {r: make_generator(r, "cpu") for r in range(0, R, 4)}  # seeds on greedy rows are ignored
    expected = greedy_reference(drafts, num_draft, probs)
    torch.manual_seed(0)
    got = rejection_sample(drafts, num_draft, probs, torch.softmax(torch.randn(R, K, V), -1), greedy=greedy,
                           generators=generators).tolists()
    for r in range(R):
        if greedy[r]:
            assert got[r] == expected[r], r
        else:
            assert 1 <= len(got[r]) <= num_draft[r] + 1
            assert got[r][:-1] == drafts[r, : len(got[r]) - 1].tolist()  # accepted tokens are the drafts


N = 200_000  # identical requests in one batched call
V = 6


def _distributions(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p [3, V] (p_0 with a zeroed token, as after top-k) and q [2, V] that differ clearly but overlap enough for
    many acceptances (each test below then has thousands of samples)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(3, V, generator=gen) * 1.5, -1)
    p[0, 2] = 0.0
    p[0] /= p[0].sum()
    q = 0.5 * p[:2] + 0.5 * torch.softmax(torch.randn(2, V, generator=gen) * 1.5, -1)
    q[0, 2] = max(float(q[0, 2]), 0.2)  # the draft often proposes a token the target forbids
    q /= q.sum(-1, keepdim=True)
    return p, q


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft_probs", "point_mass"])
def test_emitted_tokens_follow_the_target(point_mass: bool) -> None:
    """First token ~ p_0; given the first draft accepted, the second ~ p_1 (verified draft when k = 2, bonus when
    k = 1); given both accepted (k = 2), the bonus ~ p_2. Draft tokens are drawn from q. Without draft_probs (an
    n-gram draft: a point mass on each draft) any drafts at all must give p; these skewed ones do, where
    uniformly drawn drafts would hide a wrong residual by symmetry."""
    p, q = _distributions(3)
    gen = torch.Generator().manual_seed(11)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=gen) for i in range(2)], 1)
    num_draft = torch.tensor([2, 1]).repeat(N // 2)  # mixed k
    drafts[num_draft == 1, 1] = PLACEHOLDER_TOKEN_ID
    target = p.expand(N, 3, V)
    draft_probs = None if point_mass else q.expand(N, 2, V)

    torch.manual_seed(12)
    out = rejection_sample(drafts, num_draft, target, draft_probs)
    tokens, count = out.token_ids, out.num_tokens
    assert bool(((count >= 1) & (count <= num_draft + 1)).all())
    accepted = torch.arange(3) < (count - 1).unsqueeze(1)
    assert torch.equal(tokens[:, :2][accepted[:, :2]], drafts[accepted[:, :2]])  # accepted tokens are the drafts
    assert bool((tokens[torch.arange(3) >= count.unsqueeze(1)] == PLACEHOLDER_TOKEN_ID).all())

    assert_follows(tokens[:, 0], p[0])
    second = count >= 2
    assert_follows(tokens[second, 1], p[1])
    assert_follows(tokens[count == 3, 2], p[2])
    assert int(second.sum()) > 20_000 and int((count == 3).sum()) > 5_000  # enough samples in each test
    # The test has power: the drafts' own distribution is far from p_0.
    assert chi_square(drafts[:, 0], p[0] + 1e-3)[0] > 100 * CHI2_999[5]


def test_seeded_requests_are_reproducible_whatever_shares_the_batch() -> None:
    """Seeded rows give the same tokens twice, under other global seeds, alone or in a batch with other rows and a
    wider K, over two steps with persistent generators (as the model runner keeps them)."""
    Vs, K = 30, 4
    gen = torch.Generator().manual_seed(21)
    steps = [(torch.softmax(torch.randn(K + 1, Vs, generator=gen), -1),
              torch.softmax(torch.randn(K, Vs, generator=gen), -1),
              torch.randint(0, Vs, (K,), generator=gen)) for _ in range(2)]
    seeds, counts = {"a": (5, 3), "b": (6, 1)}, {"a": 3, "b": 1}

    def alone(key: str) -> list[list[int]]:
        g, n = make_generator(seeds[key][0], "cpu"), counts[key]
        return [rejection_sample(d[None, :n], [n], p[None, : n + 1], q[None, :n], generators={0: g}).tolists()[0]
                for p, q, d in steps]

    expected = {key: alone(key) for key in seeds}
    assert expected == {key: alone(key) for key in seeds}
    R = 12
    for global_seed, rows in ((0, {"a": 1, "b": 7}), (1, {"a": 10, "b": 0})):
        gens = {rows[key]: make_generator(seeds[key][0], "cpu") for key in seeds}
        gens[3] = make_generator(99, "cpu")
        got = {key: [] for key in seeds}
        torch.manual_seed(global_seed)
        for p, q, d in steps:
            num_draft = [K] * R
            for key, r in rows.items():
                num_draft[r] = counts[key]
            out = rejection_sample(d.expand(R, K), num_draft, p.expand(R, K + 1, Vs), q.expand(R, K, Vs),
                                   greedy=[r == 5 for r in range(R)], generators=gens).tolists()
            for key, r in rows.items():
                got[key].append(out[r])
        assert got == expected, global_seed


def test_all_zero_residual_falls_back_to_p() -> None:
    """p_0 = q_0 / 2 (a stand-in for rounding): every draft is accepted with probability 1/2 and the residual
    max(0, p_0 - q_0) is zero everywhere, so a rejection draws from p_0 itself."""
    Nz = 50_000
    p0 = torch.tensor([0.3, 0.0, 0.25, 0.25, 0.1, 0.1])
    q0 = p0
    p = torch.stack([p0 / 2, p0])  # [k + 1 = 2, V]
    gen = torch.Generator().manual_seed(31)
    drafts = torch.multinomial(p0, Nz, replacement=True, generator=gen).unsqueeze(1)
    torch.manual_seed(32)
    out = rejection_sample(drafts, torch.ones(Nz, dtype=torch.int64), p.expand(Nz, 2, V), q0.expand(Nz, 1, V))
    rejected = out.num_tokens == 1
    assert abs(float(rejected.double().mean()) - 0.5) < 0.01
    assert_follows(out.token_ids[rejected, 0], p0)  # never a -1, never token 1

    # p = q exactly: always accepted, the residual is never read; all drafts plus a bonus token.
    out = rejection_sample(drafts, [1] * Nz, torch.stack([p0, p0]).expand(Nz, 2, V), p0.expand(Nz, 1, V))
    assert bool((out.num_tokens == 2).all()) and torch.equal(out.token_ids[:, 0], drafts[:, 0])


def test_shapes_are_checked() -> None:
    R, K, Vv = 3, 2, 5
    d = torch.zeros(R, K, dtype=torch.int64)
    p = torch.full((R, K + 1, Vv), 1 / Vv)
    q = torch.full((R, K, Vv), 1 / Vv)
    cases = [
        (dict(draft_token_ids=d[0]), "draft_token_ids"),
        (dict(draft_token_ids=d.float()), "draft_token_ids"),
        (dict(target_probs=p[:, :K]), "target_probs"),
        (dict(target_probs=p[:2]), "target_probs"),
        (dict(target_probs=p.long()), "target_probs"),
        (dict(draft_probs=q[:, :, :4]), "draft_probs"),
        (dict(draft_probs=q[:, :1]), "draft_probs"),
        (dict(num_draft=[2, 2]), "num_draft"),
        (dict(num_draft=[2, 3, 0]), "num_draft"),
        (dict(num_draft=[2, -1, 0]), "num_draft"),
        (dict(greedy=[True]), "greedy"),
        (dict(generators={3: make_generator(0, "cpu")}), "generators"),
    ]
    for change, name in cases:
        kwargs = dict(draft_token_ids=d, num_draft=[2, 1, 0], target_probs=p, draft_probs=q, greedy=None)
        kwargs.update(change)
        with pytest.raises(ValueError, match=name):
            rejection_sample(**kwargs)
    empty = rejection_sample(torch.zeros(0, K, dtype=torch.int64), [], torch.zeros(0, K + 1, Vv))
    assert empty.token_ids.shape == (0, K + 1) and empty.tolists() == []
