"""The model runner's CUDA-graph code path, on the CPU: persistent input buffers, decode batches padded to a
captured size (padding rows with slot -1 and an empty context), logits read from the graph's static output.

A real CUDA graph needs a GPU (tests/engine/test_cuda_engine.py); here each "graph" replays as an eager forward
of the padded batch, which runs every line of the runner's graph path except the capture itself. Greedy tokens
must equal those of the plain eager CPU path.
"""

from __future__ import annotations

import random

import torch

from pagellm import LLM, SamplingParams
from pagellm.worker.model_runner import StepBuffers, graph_batch_sizes


class EagerReplay:
    """Stands in for torch.cuda.CUDAGraph: replay() recomputes the padded batch into the static logits."""

    def __init__(self, runner, bs: int, logits: torch.Tensor) -> None:
        self.runner, self.bs, self.logits = runner, bs, logits
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.logits.copy_(self.runner._graph_forward(self.bs))


def test_graph_path_gives_the_eager_tokens(tiny_model_dir):
    path = tiny_model_dir("llama")
    opts = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=256, kv_cache_memory=16 * 2**20,
                max_num_seqs=12)
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(rng.randint(3, 40))]} for _ in range(20)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, **opts).generate(prompts, params, use_tqdm=False)]

    llm = LLM(path, **opts)
    runner = llm.llm_engine.core.executor.worker.runner
    sc = llm.llm_engine.config.scheduler_config
    runner.buffers = StepBuffers(max(sc.max_num_batched_tokens, sc.max_num_seqs), sc.max_num_seqs,
                                 runner.max_blocks_per_seq, runner.device)
    runner.graph_sizes = graph_batch_sizes(sc.max_num_seqs)
    assert runner.graph_sizes == [1, 2, 4, 8, 12]
    vocab = llm.llm_engine.config.model_config.vocab_size
    runner.graphs = {bs: (EagerReplay(runner, bs, torch.zeros(bs, vocab)), None) for bs in runner.graph_sizes}
    runner.graphs = {bs: (g, g.logits) for bs, (g, _) in runner.graphs.items()}
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    replays = {bs: g.replays for bs, (g, _) in runner.graphs.items()}
    assert replays[12] > 0 and sum(replays.values()) > 20  # decode steps went through the graph path, padded
    # Padding rows wrote nothing: a second run over the same cache gives the same tokens again.
    again = [o.outputs[0].token_ids for o in llm.generate(prompts[:5], params, use_tqdm=False)]
    assert again == expected[:5]
