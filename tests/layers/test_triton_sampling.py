"""The one-kernel sampler (triton_sampling) against inverse-CDF sampling computed in float64 torch: the first token
whose cumulative probability exceeds u * total. Under Triton's CPU interpreter where there is no GPU, compiled on
CUDA where there is one; skipped without triton (CI). The uniforms are put in the middle of a token's interval,
far from its ends, so float32 and float64 cannot disagree and the indices must be equal."""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch

from pagellm.model_executor.layers.sampler import (
    Sampler,
    SamplingMetadata,
    draw_uniforms,
    fused_sampler,
    make_generator,
)
from pagellm.sampling_params import SamplingParams
from tests.triton_interpreter import interpreted as interpreted_module

NEG_INF = float("-inf")
U_MAX = 0.99999994  # the largest float32 below 1
# Upper 0.1% point of the chi-square distribution with 4 degrees of freedom (the seeds are fixed: deterministic).
CHI2_999_DF4 = 18.47


@pytest.fixture(scope="module")
def draw():
    """(logits, temperature, u) on the CPU -> the kernel's tokens on the CPU, run on CUDA when it is here."""
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        from pagellm.model_executor.layers.triton_sampling import sample_from_logits

        yield _on_device(sample_from_logits, torch.device("cuda"))
        return
    with interpreted_module("pagellm.model_executor.layers.triton_sampling") as module:
        yield _on_device(module.sample_from_logits, torch.device("cpu"))


def _on_device(kernel: Callable, device: torch.device) -> Callable:
    def run(logits: torch.Tensor, temp: Optional[torch.Tensor], u: torch.Tensor, **kw) -> torch.Tensor:
        t = None if temp is None else temp.to(device)
        return kernel(logits.to(device), t, u.to(device), **kw).cpu()

    run.device = device
    return run


def ref_probs(logits: torch.Tensor, temp: Optional[torch.Tensor]) -> torch.Tensor:
    z = logits.to(torch.float64)
    if temp is not None:
        z = z / temp.to(torch.float64).unsqueeze(1)
    return torch.softmax(z, dim=1)


def reference(logits: torch.Tensor, temp: Optional[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """The first index i with cumsum(p)[i] > u * sum(p), in float64."""
    cdf = ref_probs(logits, temp).cumsum(dim=1)
    return (cdf > u.to(torch.float64).unsqueeze(1) * cdf[:, -1:]).int().argmax(dim=1)


def midpoint_u(logits: torch.Tensor, temp: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """float32 u in the middle of each row's token's interval of the CDF."""
    p = ref_probs(logits, temp)
    cdf = p.cumsum(dim=1)
    hi = cdf.gather(1, tokens.unsqueeze(1))
    lo = hi - p.gather(1, tokens.unsqueeze(1))
    return ((lo + hi) / 2 / cdf[:, -1:]).squeeze(1).to(torch.float32)


def wide_tokens(logits: torch.Tensor, temp: Optional[torch.Tensor], seed: int, min_p: float = 1e-3) -> torch.Tensor:
    """One token per row, drawn among those of probability >= min_p (intervals wide enough for float32)."""
    p = ref_probs(logits, temp)
    return torch.multinomial(p * (p >= min_p), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


def check_against_reference(draw, logits: torch.Tensor, temp: Optional[torch.Tensor], seed: int, **kw) -> None:
    tokens = wide_tokens(logits, temp, seed)
    u = midpoint_u(logits, temp, tokens)
    assert torch.equal(reference(logits, temp, u), tokens)  # the test's own u is right
    assert torch.equal(draw(logits, temp, u, **kw), tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,block", [(7, 8192), (1000, 8192), (9000, 8192), (3000, 1024)])  # 1, 1, 2, 3 tiles
@pytest.mark.parametrize("with_temp", [False, True])
def test_matches_the_float64_reference(draw, dtype, vocab, block, with_temp):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=g) * 3).to(dtype)
    temp = torch.tensor([0.7, 1.3, 1.0, 2.0, 0.5, 1.0]) if with_temp else None
    check_against_reference(draw, logits, temp, seed=vocab + with_temp, block=block)


@pytest.mark.parametrize("vocab,dtype", [(128256, torch.bfloat16), (151936, torch.float16)])
def test_model_vocabularies(draw, vocab, dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, vocab, generator=g) * 3
    logits[0, vocab - 5] = 20.0  # a likely token in the last block
    logits = logits.to(dtype)
    temp = torch.tensor([1.0, 0.8])
    tokens = torch.tensor([vocab - 5, int(wide_tokens(logits[1:], temp[1:], seed=4))])
    u = midpoint_u(logits, temp, tokens)
    assert torch.equal(draw(logits, temp, u), tokens)


def test_masked_tokens_are_never_drawn(draw):
    # Three tiles of 1024, the first one all -inf (the running max starts at -inf), the row's first and last
    # valid tokens next to masked ones.
    vocab = 3000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(5))
    masked = torch.zeros(vocab, dtype=torch.bool)
    masked[:1024] = True
    masked[1500:1600] = True
    masked[2900:] = True
    logits = logits.masked_fill(masked, NEG_INF)
    first, last, best = 1024, 2899, int(logits.argmax())
    u = torch.tensor([0.0, 1e-9, 1e-4, 0.25, 0.5, 0.9, 1 - 1e-4, 1 - 1e-6, U_MAX])
    for dtype in (torch.float32, torch.bfloat16):
        rows = logits.to(dtype).expand(len(u), vocab)
        got = draw(rows, None, u, block=1024)
        assert not masked[got].any()
        assert got[0] == first
        assert got[-1] in (last, best)  # the last interval, or the argmax where rounding leaves no crossing
    # float64 uniforms within 2**-25 of 1 round to 1.0 in float32: still never a masked token
    got = draw(logits.expand(2, vocab), None, torch.tensor([1 - 1e-12, 1 - 1e-17], dtype=torch.float64), block=1024)
    assert not masked[got].any()


def test_an_interval_end_belongs_to_the_next_valid_token(draw):
    # target = u * total lands exactly on the end of token 0's interval: the next token of probability > 0
    logits = torch.tensor([[0.0, NEG_INF, NEG_INF, 0.0, NEG_INF]]).expand(2, 5)
    assert draw(logits, None, torch.tensor([0.5, 0.0])).tolist() == [3, 0]


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 100.0])
def test_a_row_with_one_valid_token_draws_it(draw, temperature):
    vocab = 3000
    positions = [0, 1023, 1024, 2999]  # in tiles of 1024: the first and later ones
    logits = torch.full((len(positions) * 3, vocab), NEG_INF)
    u = torch.tensor([0.0, 0.5, U_MAX] * len(positions))
    expected = torch.tensor(positions).repeat_interleave(3)
    logits[torch.arange(len(expected)), expected] = 2.5
    temp = torch.full((len(expected),), temperature)
    assert torch.equal(draw(logits.to(torch.bfloat16), temp, u, block=1024), expected)


@pytest.mark.parametrize("temperature", [1e-3, 100.0])
def test_extreme_temperatures(draw, temperature):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 1000, generator=g) * 3
    check_against_reference(draw, logits, torch.full((4,), temperature), seed=7)


def test_a_tiny_temperature_splits_a_tie_in_half(draw):
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(8)).expand(3, 1000).clone()
    logits[:, 10] = logits[:, 700] = 10.0
    got = draw(logits, torch.full((3,), 1e-3), torch.tensor([0.25, 0.75, U_MAX]))
    assert got.tolist()[:2] == [10, 700]
    assert got[2] in (700, 10)  # the last interval, or the first index of the max when rounding leaves none


def test_row_strides(draw):
    g = torch.Generator().manual_seed(9)
    wide = torch.randn(4, 1300, generator=g) * 3
    sliced = wide[:, 100:1100]  # rows 1300 apart
    assert sliced.stride() == (1300, 1)
    check_against_reference(draw, sliced, None, seed=10)
    transposed = (torch.randn(1000, 4, generator=g) * 3).t()  # columns not contiguous: copied first
    check_against_reference(draw, transposed, torch.tensor([0.9, 1.1, 1.0, 3.0]), seed=11)
    same_row = wide[:1, :1000].expand(4, 1000)  # row stride 0
    check_against_reference(draw, same_row, None, seed=12)


def test_no_temperature_is_temperature_one(draw):
    g = torch.Generator().manual_seed(13)
    logits = (torch.randn(8, 500, generator=g) * 2).to(torch.bfloat16)
    u = torch.rand(8, generator=g)
    assert torch.equal(draw(logits, None, u), draw(logits, torch.ones(8), u))


def test_frequencies_match_the_probabilities(draw):
    # A few hundred rows under the interpreter (each row is a program run in Python), thousands on a GPU.
    n = 4000 if draw.device.type == "cuda" else 256
    logits = torch.tensor([[1.0, 0.2, NEG_INF, -0.5, 0.8, 0.0]])
    g = torch.Generator().manual_seed(14)
    got = draw(logits.expand(n, 6), torch.full((n,), 1.5), torch.rand(n, generator=g))
    counts = torch.bincount(got, minlength=6).to(torch.float64)
    assert counts[2] == 0
    expected = ref_probs(logits, torch.tensor([1.5]))[0] * n
    keep = expected > 0
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < CHI2_999_DF4


def test_an_empty_batch(draw):
    assert draw(torch.zeros(0, 10), None, torch.zeros(0)).shape == (0,)


def test_the_cpu_takes_the_torch_path():
    md = SamplingMetadata.build([SamplingParams(temperature=0.8)], [[]], [[]], {}, 10, "cpu")
    assert fused_sampler(torch.zeros(1, 10), md) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_sampler_draws_with_the_kernel():
    pytest.importorskip("triton")
    from pagellm.model_executor.layers.triton_sampling import sample_from_logits

    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=2), SamplingParams(temperature=1.3, seed=3)]
    logits = (torch.randn(4, 128256, device="cuda") * 3).to(torch.bfloat16)
    before = logits.clone()

    def metadata(p: list[SamplingParams]) -> SamplingMetadata:
        gens = {i: make_generator(x.seed, "cuda") for i, x in enumerate(p) if x.seed is not None}
        return SamplingMetadata.build(p, [[]] * len(p), [[]] * len(p), gens, logits.shape[1], "cuda")

    md = metadata(params)
    assert fused_sampler(logits, md) is not None
    got = Sampler()(logits, md).sampled_token_ids
    twin = metadata(params)  # the same seeds: the same uniforms
    expected = sample_from_logits(logits, twin.temperature, draw_uniforms(twin, logits.device))
    expected[1] = logits[1].float().argmax()
    assert torch.equal(got, expected)
    assert torch.equal(logits, before)
    assert fused_sampler(logits, metadata([SamplingParams(top_k=5)])) is None
    assert fused_sampler(logits, metadata([SamplingParams(top_p=0.9)])) is None
    assert fused_sampler(logits, metadata([SamplingParams(min_p=0.1)])) is None


# ---- the greedy argmax (argmax_rows) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def argmax():
    """logits on the CPU -> argmax_rows' indices on the CPU, run on CUDA when it is here."""
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        from pagellm.model_executor.layers.triton_sampling import argmax_rows

        yield lambda logits, **kw: argmax_rows(logits.to("cuda"), **kw).cpu()
        return
    with interpreted_module("pagellm.model_executor.layers.triton_sampling") as module:
        yield module.argmax_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,vocab,block", [(1, 7, 4096), (3, 1000, 256), (2, 9000, 4096), (5, 4096, 1024)])
def test_argmax_rows_is_torch_argmax(argmax, dtype, rows, vocab, block):
    """Rows spread over several chunks: the index torch.argmax gives, in the logits' own dtype."""
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 4).to(dtype)
    got = argmax(logits, block=block)
    assert got.dtype == torch.int64 and torch.equal(got, logits.float().argmax(dim=1))


def test_argmax_rows_takes_the_first_of_tied_maxima_across_chunks(argmax):
    logits = torch.zeros(4, 1000)
    logits[0, [700, 300, 999]] = 5.0  # ties in different chunks: the first
    logits[1, [257, 256]] = 2.0  # ties in one chunk
    logits[2] = float("-inf")  # nothing allowed: index 0, as torch.argmax
    logits[3, :] = float("-inf")
    logits[3, 999] = -1e30  # the only finite logit, in the last (partial) chunk
    got = argmax(logits, block=256)
    assert got.tolist() == [300, 256, 0, 999]


def test_argmax_rows_strided_rows_and_empty_batch(argmax):
    wide = torch.randn(3, 2048, generator=torch.Generator().manual_seed(1))
    view = wide[:, :1500]  # rows 2048 apart
    assert torch.equal(argmax(view, block=512), view.argmax(dim=1))
    assert argmax(torch.zeros(0, 10)).shape == (0,)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_greedy_sampler_takes_the_argmax_kernel_and_keeps_torch_choices():
    pytest.importorskip("triton")
    from pagellm.model_executor.layers.sampler import fused_argmax

    logits = (torch.randn(5, 128256, device="cuda") * 3).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0)] * 5
    md = SamplingMetadata.build(params, [[]] * 5, [[]] * 5, {}, logits.shape[1], "cuda")
    assert fused_argmax(logits) is not None and fused_argmax(logits.cpu()) is None
    assert torch.equal(Sampler()(logits, md).sampled_token_ids, logits.float().argmax(dim=1))
