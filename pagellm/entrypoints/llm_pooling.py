"""LLM's pooling calls (runner='pooling'): embed, encode and score, in vLLM's signatures and output shapes."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from pagellm.inputs import as_prompt_list
from pagellm.pooling.engine import PoolingEngine, PoolingPrompt
from pagellm.pooling.outputs import (EmbeddingRequestOutput, PoolingRequestOutput, ScoringOutput,
                                     ScoringRequestOutput)


def score_pairs(n1: int, n2: int) -> list[tuple[int, int]]:
    """vLLM's pairing: 1 x N, or N x N taken pairwise."""
    if n1 == 1:
        return [(0, j) for j in range(n2)]
    if n1 != n2:
        raise ValueError(f"data_2: score takes one text against N or N against N; got {n1} and {n2}")
    return [(i, i) for i in range(n1)]


class PoolingCalls:
    """Mixed into LLM; `self.llm_engine` is a PoolingEngine when the model runs as a pooling model."""

    llm_engine: Any

    def _pooling_engine(self) -> PoolingEngine:
        if not isinstance(self.llm_engine, PoolingEngine):
            raise ValueError("runner: this model runs for text generation; embed/encode/score need "
                             "LLM(model, runner='pooling')")
        return self.llm_engine

    def encode(self, prompts: Union[PoolingPrompt, Sequence[PoolingPrompt]], use_tqdm: bool = True,
               dimensions: Optional[int] = None, pooling_task: str = "embed",
               lora_request: Any = None) -> list[PoolingRequestOutput]:
        """One pooled vector (out.outputs.data, a float32 tensor) per prompt, in the order of the prompts. All
        prompts are validated before any is queued."""
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported for pooling models")
        if pooling_task != "embed":
            raise ValueError(f"pooling_task: only 'embed' is supported, got {pooling_task!r}")
        engine = self._pooling_engine()
        engine.pooler_config.check_dimensions(dimensions)
        prompt_list = as_prompt_list(prompts)
        tokens = [engine.tokenize(p, f"prompts[{i}]") for i, p in enumerate(prompt_list)]
        ids = [engine.next_request_id() for _ in tokens]
        for request_id, t in zip(ids, tokens):
            engine.add_request(request_id, t, dimensions)
        results: dict[str, PoolingRequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="Pooled prompts", disable=not use_tqdm) as bar:
                while len(results) < len(ids):
                    outs = engine.step()
                    if not outs:
                        raise RuntimeError("the pooling engine stopped with requests unfinished")
                    for out in outs:
                        results[out.request_id] = out
                    bar.update(len(outs))
        except BaseException:
            engine.abort_request([i for i in ids if i not in results])
            raise
        return [results[i] for i in ids]

    def embed(self, prompts: Union[PoolingPrompt, Sequence[PoolingPrompt]], use_tqdm: bool = True,
              dimensions: Optional[int] = None, lora_request: Any = None) -> list[EmbeddingRequestOutput]:
        """out.outputs.embedding: a list of floats per prompt."""
        return [EmbeddingRequestOutput.from_base(o)
                for o in self.encode(prompts, use_tqdm, dimensions, lora_request=lora_request)]

    def score(self, data_1: Union[PoolingPrompt, Sequence[PoolingPrompt]],
              data_2: Union[PoolingPrompt, Sequence[PoolingPrompt]], use_tqdm: bool = True,
              lora_request: Any = None) -> list[ScoringRequestOutput]:
        """Cosine similarity of the embeddings: one text against N (1 x N) or N pairs (N x N)."""
        first, second = as_prompt_list(data_1), as_prompt_list(data_2)
        pairs = score_pairs(len(first), len(second))
        outs = self.encode(first + second, use_tqdm, lora_request=lora_request)
        a, b = outs[:len(first)], outs[len(first):]
        return [ScoringRequestOutput(f"score-{k}", ScoringOutput(cosine(a[i].outputs.data, b[j].outputs.data)),
                                     a[i].prompt_token_ids + b[j].prompt_token_ids)
                for k, (i, j) in enumerate(pairs)]


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=0))
