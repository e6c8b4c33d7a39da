"""Sampler: greedy, temperature, top-k/top-p/min-p, penalties, logit_bias, min_tokens, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pagellm.model_executor.layers import prompt_logprobs as prompt_logprobs_mod
from pagellm.model_executor.layers.prompt_logprobs import compute_prompt_logprobs
from pagellm.model_executor.layers.sampler import (
    Sampler,
    SamplingMetadata,
    make_generator,
    to_token_logprobs,
)
from pagellm.sampling_params import SamplingParams

SAMPLER = Sampler()


def sample(logits: torch.Tensor, params: list[SamplingParams], prompts=None, outputs=None, generators=None):
    n = len(params)
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    md = SamplingMetadata.build(params, prompts, outputs, generators or {}, logits.shape[1], "cpu")
    return SAMPLER(logits, md)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability zero"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# Upper 0.1% points of the chi-square distribution by degrees of freedom: a correct sampler fails 1 in 1000
# seeds; the seeds below are fixed, so the tests are deterministic.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 1000)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 16)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=1))
    assert out.logprobs is None


def test_greedy_does_not_touch_input_and_accepts_bf16() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 300).to(torch.bfloat16)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5), SamplingParams(top_k=3, seed=1),
              SamplingParams(temperature=0.0, logprobs=2), SamplingParams(top_p=0.9, logit_bias={3: 2.0})]
    out = sample(logits, params, outputs=[[1, 2], [3], [], [4]], generators={1: make_generator(1, "cpu")})
    assert torch.equal(logits, before)
    assert out.sampled_token_ids.dtype == torch.int64 and out.sampled_token_ids.shape == (4,)
    assert out.sampled_token_ids[2] == logits[2].float().argmax()


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0),
                                    dict(top_k=1, temperature=5.0), dict(top_p=1e-6, top_k=50, temperature=3.0)])
def test_restrictive_filters_equal_greedy(kwargs: dict) -> None:
    torch.manual_seed(2)
    logits = torch.randn(64, 500) * 3
    out = sample(logits, [SamplingParams(**kwargs) for _ in range(64)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=1))


def _draw_counts(logits_row: torch.Tensor, params: SamplingParams, num: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    out = sample(logits_row.expand(num, -1).clone(), [params] * num)
    return torch.bincount(out.sampled_token_ids, minlength=logits_row.shape[0]).double()


LOGITS6 = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def test_temperature_distribution_matches_softmax() -> None:
    for temp, seed in ((1.0, 10), (0.7, 11), (2.0, 12)):
        counts = _draw_counts(LOGITS6, SamplingParams(temperature=temp), 20000, seed)
        probs = torch.softmax(LOGITS6.double() / temp, dim=0)
        assert chi_square(counts, probs) < CHI2_999[5], temp


def test_top_k_distribution() -> None:
    counts = _draw_counts(LOGITS6, SamplingParams(temperature=0.8, top_k=3), 20000, 20)
    probs = torch.softmax(LOGITS6.double() / 0.8, dim=0)
    probs[3:] = 0
    probs /= probs.sum()
    assert chi_square(counts, probs) < CHI2_999[2]


def test_top_p_distribution() -> None:
    probs = torch.softmax(LOGITS6.double(), dim=0)  # ~ [.55, .20, .12, .07, .03, .003]
    # p = 0.8: the best three reach 0.8766 >= 0.8 (the best two, 0.75, do not) -> keep three.
    counts = _draw_counts(LOGITS6, SamplingParams(top_p=0.8), 20000, 21)
    kept = probs.clone()
    kept[3:] = 0
    kept /= kept.sum()
    assert chi_square(counts, kept) < CHI2_999[2]


def test_min_p_distribution() -> None:
    probs = torch.softmax(LOGITS6.double(), dim=0)
    min_p = 0.2  # keeps p >= 0.2 * p_max = 0.11: the best three
    counts = _draw_counts(LOGITS6, SamplingParams(min_p=min_p), 20000, 22)
    kept = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    assert int((kept > 0).sum()) == 3
    kept /= kept.sum()
    assert chi_square(counts, kept) < CHI2_999[2]


def test_seeded_generator_distribution_over_steps() -> None:
    """One seeded request, many steps with its persistent generator: the draws follow the softmax."""
    gen = make_generator(1234, "cpu")
    params = [SamplingParams(temperature=0.9, seed=1234)]
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(3000):
        out = sample(LOGITS6.unsqueeze(0), params, generators={0: gen})
        counts[out.sampled_token_ids[0]] += 1
    assert chi_square(counts, torch.softmax(LOGITS6.double() / 0.9, dim=0)) < CHI2_999[5]


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    """The same seeds give the same tokens alone and in batches with other random, greedy and seeded rows, in
    any row order, across steps with persistent generators (as the model runner keeps them)."""
    V, steps = 2000, 6
    torch.manual_seed(5)
    logits_a = torch.randn(steps, V)
    logits_b = torch.randn(steps, V) * 0.5
    pa = SamplingParams(temperature=0.8, top_p=0.95, seed=77)
    pb = SamplingParams(temperature=1.3, top_k=500, seed=78, presence_penalty=0.5)

    def run_alone(logits, p, seed):
        gen = make_generator(seed, "cpu")
        toks, out_ids = [], []
        for s in range(steps):
            t = sample(logits[s : s + 1], [p], outputs=[list(out_ids)], generators={0: gen})
            toks.append(int(t.sampled_token_ids[0]))
            out_ids.append(toks[-1])
        return toks

    alone_a = run_alone(logits_a, pa, 77)
    alone_b = run_alone(logits_b, pb, 78)
    assert alone_a != alone_b

    # In a batch: [random unseeded, a, greedy, other seeded, b, random with top-k and penalties]
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.5, seed=999), SamplingParams(top_k=5, repetition_penalty=1.2)]
    for order in ([0, "a", 1, 2, "b", 3], ["b", 3, 2, "a", 0, 1]):
        gens = {"a": make_generator(77, "cpu"), "b": make_generator(78, "cpu"), 2: make_generator(999, "cpu")}
        outs: dict = {key: [] for key in order}
        torch.manual_seed(123)
        for s in range(steps):
            rows, params, generators, outputs = [], [], {}, []
            for row, key in enumerate(order):
                if key == "a":
                    rows.append(logits_a[s])
                    params.append(pa)
                elif key == "b":
                    rows.append(logits_b[s])
                    params.append(pb)
                else:
                    rows.append(torch.randn(V))
                    params.append(others[key])
                if key in gens:
                    generators[row] = gens[key]
                outputs.append(list(outs[key]))
            out = sample(torch.stack(rows), params, prompts=[[1, 2, 3]] * len(order), outputs=outputs,
                         generators=generators)
            for row, key in enumerate(order):
                outs[key].append(int(out.sampled_token_ids[row]))
        assert outs["a"] == alone_a
        assert outs["b"] == alone_b


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    logits = torch.zeros(1, 5000)  # uniform: different seeds collide with probability 1/5000 per step
    p = SamplingParams(seed=1)
    first = [int(sample(logits, [p], generators={0: make_generator(s, "cpu")}).sampled_token_ids[0])
             for s in (1, 1, 2)]
    assert first[0] == first[1] != first[2]
    # A greedy row with a seed draws nothing: its generator is left untouched.
    gen = make_generator(3, "cpu")
    state = gen.get_state()
    sample(logits, [SamplingParams(temperature=0.0, seed=3)], generators={0: gen})
    assert torch.equal(gen.get_state(), state)


def reference_penalties(logits: torch.Tensor, params, prompts, outputs) -> torch.Tensor:
    """Per row, per token, in plain Python: vLLM's repetition / frequency / presence penalties."""
    rows = logits.tolist()
    for i, p in enumerate(params):
        seen = set(prompts[i]) | set(outputs[i])
        for tok in range(logits.shape[1]):
            x = rows[i][tok]
            if tok in seen and p.repetition_penalty != 1.0:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            count = outputs[i].count(tok)
            x -= p.frequency_penalty * count
            x -= p.presence_penalty * (1.0 if count else 0.0)
            rows[i][tok] = x
    return torch.tensor(rows, dtype=logits.dtype)


def test_penalties_match_reference() -> None:
    torch.manual_seed(7)
    V = 40
    logits = torch.randn(5, V) * 2
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.7),
        SamplingParams(temperature=0.0, frequency_penalty=0.9, presence_penalty=-0.4),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=0.6, frequency_penalty=-1.5, presence_penalty=2.0),
        SamplingParams(temperature=0.0, presence_penalty=1.1),
    ]
    prompts = [[1, 2, 3, 3], [5, 6], [7, 8, 9], [10, 11, 1], []]
    outputs = [[4, 4, 12], [5, 13, 13, 13, 14], [15], [10, 16, 16], [17, 17, 18, 0]]
    md = SamplingMetadata.build(params, prompts, outputs, {}, V, "cpu")
    got = Sampler.process_logits(logits.clone(), md)
    want = reference_penalties(logits, params, prompts, outputs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    out = SAMPLER(logits, md)
    assert torch.equal(out.sampled_token_ids, want.argmax(dim=1))


def test_penalties_flags_skip_unused_work() -> None:
    md = SamplingMetadata.build([SamplingParams(temperature=0.0)] * 2, [[1], [2]], [[3], [4]], {}, 10, "cpu")
    assert md.all_greedy and md.no_penalties and md.no_top_k and md.no_top_p and md.no_min_p
    assert md.prompt_token_ids is None and md.output_token_ids is None and md.max_num_logprobs is None
    md = SamplingMetadata.build([SamplingParams(), SamplingParams(top_k=3, temperature=0.0)], [[], []], [[], []],
                                {}, 10, "cpu")
    assert not md.all_random and not md.all_greedy and md.greedy_mask.tolist() == [False, True]
    assert md.no_top_k  # top_k of a greedy row costs nothing


def test_logit_bias_forces_and_forbids_tokens() -> None:
    torch.manual_seed(8)
    logits = torch.randn(4, 100)
    top = logits.argmax(dim=1)
    params = [SamplingParams(temperature=0.0, logit_bias={42: 100.0}),
              SamplingParams(temperature=1.0, logit_bias={17: 100.0, 3: -5.0}),
              SamplingParams(temperature=0.0, logit_bias={int(top[2]): -100.0}),
              SamplingParams(temperature=0.0)]
    out = sample(logits, params)
    assert out.sampled_token_ids[0] == 42
    assert out.sampled_token_ids[1] == 17
    assert out.sampled_token_ids[2] != top[2]
    assert out.sampled_token_ids[3] == top[3]


def test_min_tokens_masks_stop_ids() -> None:
    V = 20
    logits = torch.zeros(3, V)
    logits[:, 2] = 50.0  # EOS
    logits[:, 7] = 40.0  # a user stop token
    logits[:, 5] = 1.0
    def params(min_tokens: int, ignore_eos: bool = False) -> SamplingParams:
        p = SamplingParams(temperature=0.0, min_tokens=min_tokens, stop_token_ids=[7])
        p.all_stop_token_ids = {7} if ignore_eos else {2, 7}  # what the engine's processor sets
        return p
    ps = [params(3), params(3), params(3, ignore_eos=True)]
    out = sample(logits, ps, outputs=[[1], [1, 1, 1], [1]])
    assert out.sampled_token_ids.tolist() == [5, 2, 2]
    # random rows too, with a bias that cannot bring a stop token back
    p = SamplingParams(temperature=1.0, min_tokens=2, logit_bias={2: 100.0})
    p.all_stop_token_ids = {2}
    out = sample(logits[:1], [p], outputs=[[]])
    assert int(out.sampled_token_ids[0]) not in (2,)


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    torch.manual_seed(9)
    V = 300
    logits = torch.randn(4, V) * 2
    params = [SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=2.0),
              SamplingParams(temperature=1.5, logprobs=0, top_k=20, seed=4),
              SamplingParams(temperature=0.7, logprobs=3, logit_bias={11: 100.0}),
              SamplingParams(temperature=0.0)]  # no logprobs on this row
    out = sample(logits, params, prompts=[[int(logits[0].argmax())], [], [], []], outputs=[[], [], [], []],
                 generators={1: make_generator(4, "cpu")})
    ref = torch.log_softmax(logits, dim=1)
    assert out.logprobs is not None and out.logprobs.token_ids.shape == (4, 6)
    for row, k in ((0, 5), (1, 0), (2, 3)):
        entry = to_token_logprobs(out, row, k)
        assert len(entry.token_ids) == 1 + k
        tok = int(out.sampled_token_ids[row])
        assert entry.token_ids[0] == tok
        assert math.isclose(entry.logprobs[0], float(ref[row, tok]), abs_tol=1e-5)
        assert entry.ranks[0] == 1 + int((ref[row] > ref[row, tok]).sum())
        order = torch.argsort(ref[row], descending=True)
        assert entry.token_ids[1:] == order[:k].tolist()
        assert entry.ranks[1:] == list(range(1, k + 1))
        for t, lp in zip(entry.token_ids, entry.logprobs):
            assert math.isclose(lp, float(ref[row, t]), abs_tol=1e-5)
    # the penalty moved row 0 off its raw argmax: its rank is > 1, from the raw logits
    assert to_token_logprobs(out, 0, 5).ranks[0] > 1
    # row 2 was forced to 11 by the bias; its logprob is the raw one
    assert out.sampled_token_ids[2] == 11
    # without num_logprobs: everything computed
    assert len(to_token_logprobs(out, 0).token_ids) == 6


def test_prompt_logprobs(monkeypatch) -> None:
    monkeypatch.setattr(prompt_logprobs_mod, "PROMPT_LOGPROBS_ROWS_CPU", 3)  # several blocks of rows
    torch.manual_seed(10)
    P, V = 8, 50
    logits = torch.randn(P, V)
    logits[4, :] = 0.0
    logits[4, 9] = 1.0  # ties: every other token shares rank 2
    targets = torch.randint(0, V, (P,))
    targets[4] = 3
    plp = compute_prompt_logprobs(logits, targets, 2, first_position=5)
    ref = torch.log_softmax(logits, dim=1)
    assert len(plp) == P and plp.first_position == 5
    for i in range(P):
        t = int(targets[i])
        ids, lps, ranks = plp.token_ids[i], plp.logprobs[i], plp.ranks[i]
        assert ids[0] == t and len(ids) == 3
        assert math.isclose(lps[0], float(ref[i, t]), abs_tol=1e-5)
        assert ranks[0] == 1 + int((ref[i] > ref[i, t]).sum())
        assert ids[1] == int(ref[i].argmax()) and ranks[1:] == [1, 2]
    assert plp.ranks[4][0] == 2
    assert len(compute_prompt_logprobs(logits, targets, 0).token_ids[0]) == 1


def test_candidate_top_k_top_p_equals_the_full_sort() -> None:
    """apply_top_k_top_p (topk candidates) keeps exactly the tokens one full sort keeps, for peaked rows (the
    candidates cover p) and flat rows (they do not: the fallback), with and without top-k, mixed in a batch."""
    from pagellm.model_executor.layers import sampler as smp

    gen = torch.Generator().manual_seed(5)
    V = 5000
    for trial in range(20):
        n = 9
        logits = torch.randn(n, V, generator=gen) * (8.0 if trial % 2 else 0.5)  # peaked / flat
        ks = torch.tensor([V, 1, 7, V, 2000, V, 40, V, 3])[:n]
        ps = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.95, 0.999, 0.2, 1e-6, 1.0])[:n]
        for top_k, top_p in ((ks, ps), (None, ps), (ks, None)):
            ref = smp._apply_top_k_top_p_sorted(logits.clone(), top_k, top_p)
            got = smp.apply_top_k_top_p(logits.clone(), top_k, top_p)
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), (trial, top_k is None, top_p is None)
            assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])
