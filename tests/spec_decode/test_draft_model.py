"""Draft-model speculation (issue 14): a tiny random model with the target's vocabulary drafts, the target
verifies. Greedy tokens are those of decoding without speculation, whatever the draft (the target itself, which
accepts nearly everything, or another random model, which accepts little), scheduled one step at a time or
ahead, chunked, preempted, in the padded verify layout; aborts leave no block behind; a draft that cannot draft
for the target is refused naming the field."""

from __future__ import annotations

import pytest

from pagellm import SamplingParams
from pagellm.engine_args import EngineArgs
from tests.reference import tiny_llm
from tests.spec_decode.test_spec_engine import BLOCK_BYTES, GREEDY, _prompts, _spec_counts, _tokens


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(model_path):
    return _tokens(tiny_llm(model_path).generate(_prompts(), GREEDY, use_tqdm=False))


def _draft(path: str, k: int = 3) -> dict:
    return {"model": path, "num_speculative_tokens": k}


def test_the_target_as_its_own_draft_accepts_nearly_everything(model_path, reference):
    llm = tiny_llm(model_path, speculative_config=_draft(model_path))
    assert llm.llm_engine.config.speculative_config.method == "draft_model"
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    drafts, draft_tokens, accepted = _spec_counts(llm)
    assert drafts > 0 and accepted >= 0.9 * draft_tokens
    assert llm.llm_engine.core.scheduler.kv_cache_manager.usage == 0.0


@pytest.mark.parametrize("options", [
    dict(async_scheduling=True),
    dict(max_num_batched_tokens=3, max_num_seqs=3),  # chunked prompts, verify steps cut to the budget
    # 12 blocks: requests preempt each other (the qwen3 draft's KV takes twice the target's per block).
    dict(max_model_len=96, kv_cache_memory=BLOCK_BYTES * 12 * 3),
    dict(enable_prefix_caching=False),
])
def test_other_draft_same_tokens(model_path, reference, tiny_model_dir, options):
    draft = tiny_model_dir("qwen3")  # another random model: it guesses badly, and the target corrects it
    llm = tiny_llm(model_path, speculative_config=_draft(draft, 4), **options)
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    drafts, draft_tokens, accepted = _spec_counts(llm)
    assert drafts > 0 and accepted < draft_tokens
    sched = llm.llm_engine.core.scheduler
    assert sched.kv_cache_manager.usage == 0.0
    if "kv_cache_memory" in options:
        assert sched.kv_cache_manager.num_blocks == 12 and sched.num_preemptions_total > 0


def test_padded_verify_layout_and_seeded_sampling(model_path, reference):
    llm = tiny_llm(model_path, speculative_config=_draft(model_path, 4))
    llm.llm_engine.core.executor.worker.runner.pad_verify_steps = True
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference
    seeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=7, ignore_eos=True)
    first = _tokens(llm.generate(_prompts()[:3], seeded, use_tqdm=False))
    assert _tokens(llm.generate(_prompts()[:3], seeded, use_tqdm=False)) == first


def test_abort_mid_run_frees_every_block(model_path):
    llm = tiny_llm(model_path, speculative_config=_draft(model_path))
    engine = llm.llm_engine
    sched = engine.core.scheduler
    for i, p in enumerate(_prompts()[:6]):
        engine.add_request(f"ab{i}", p, GREEDY)
    for _ in range(40):  # until some requests hold drafts for the next step
        engine.step()
        if any(r.spec_token_ids for r in sched.requests.values()):
            break
    engine.abort_request(sorted(sched.requests)[::2])
    while engine.has_unfinished_requests():
        engine.step()
    assert sched.kv_cache_manager.usage == 0.0


def test_bad_draft_names_the_field(model_path, tmp_path, tiny_model_dir):
    import json
    import shutil

    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(tiny_model_dir("qwen3"), other_vocab)
    config = json.loads((other_vocab / "config.json").read_text())
    (other_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": 1024}))
    for draft, why in [(str(other_vocab), "vocabulary"), (str(tmp_path / "missing"), "cannot load")]:
        with pytest.raises(ValueError, match=f"speculative_config.model.*{why}"):
            EngineArgs(model=model_path, device="cpu", speculative_config=_draft(draft)).create_engine_config()
    with pytest.raises(ValueError, match="prompt_lookup"):
        EngineArgs(model=model_path, device="cpu", speculative_config={
            **_draft(model_path), "prompt_lookup_min": 2}).create_engine_config()
