"""PoolingEngine: the engine of runner='pooling'. Prompts are validated and tokenized on the way in, wait in
arrival order, and each step takes whole prompts from the front while they fit the scheduler's budgets
(max_num_batched_tokens tokens, max_num_seqs requests), runs the model once over them and pools one vector each.

A prompt is never chunked: an encoder attends over the whole prompt at once. So a prompt longer than the token
budget (or than the model's limit) is refused on arrival, with an error naming the field."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from pagellm.config import EngineConfig
from pagellm.model_executor.loader.source import load_tokenizer
from pagellm.pooling.outputs import PoolingOutput, PoolingRequestOutput
from pagellm.pooling.pooler import pool, shorten
from pagellm.pooling.st_config import PoolerConfig, is_encoder, read_pooler_config

logger = logging.getLogger(__name__)

PoolingPrompt = Union[str, list[int], dict[str, Any]]


@dataclass
class PoolingRequest:
    request_id: str
    prompt_token_ids: list[int]
    dimensions: Optional[int] = None


def load_pooling_model(config: EngineConfig, device: torch.device) -> nn.Module:
    """BertModel for encoder checkpoints; any decoder pagellm runs, wrapped as a DecoderEmbedder."""
    mc = config.model_config
    if not is_encoder(mc.hf_config):
        from pagellm.model_executor.loader import load_model
        from pagellm.pooling.decoder import DecoderEmbedder

        return DecoderEmbedder(load_model(mc, device))
    from pagellm.pooling.bert import BertModel

    with torch.device(device):
        model = BertModel(mc.hf_config, mc.dtype, device)
    if mc.load_format == "dummy":
        from pagellm.model_executor.loader.dummy_loader import load_dummy_weights

        load_dummy_weights(model, mc.hf_config, mc.seed)
    else:
        from pagellm.model_executor.loader.safetensors_loader import iterate_safetensors_weights

        loaded = model.load_weights(iterate_safetensors_weights(mc.source.path))
        missing = sorted(set(dict(model.named_parameters())) - loaded)
        if missing:
            raise ValueError(f"weights missing from the checkpoint {mc.source.path}: {', '.join(missing[:10])}")
    return model.eval()


class PoolingEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc, sc = config.model_config, config.scheduler_config
        if config.parallel_config.world_size > 1 or config.speculative_config is not None:
            raise ValueError("runner: pooling models run on one device, without speculative decoding")
        self.device = torch.device(config.device_config.device)
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(mc.source, mc.tokenizer)
        folder = mc.source.path if mc.source is not None and mc.source.kind == "hf" else None
        self.pooler_config: PoolerConfig = read_pooler_config(folder, mc.hf_config)
        self.max_num_batched_tokens = sc.max_num_batched_tokens
        self.max_num_seqs = sc.max_num_seqs
        self.max_model_len = min(mc.max_model_len, self.pooler_config.max_seq_length or mc.max_model_len)
        self.model = load_pooling_model(config, self.device)
        self.waiting: deque[PoolingRequest] = deque()
        self._ids = itertools.count()
        logger.info("pooling engine: %s pooling, normalize=%s, max %d tokens a prompt",
                    self.pooler_config.pooling, self.pooler_config.normalize, self.max_model_len)

    # ---- requests in -----------------------------------------------------------------------------------
    def next_request_id(self) -> str:
        return f"pool-{next(self._ids)}"

    def tokenize(self, prompt: PoolingPrompt, field: str = "input") -> list[int]:
        """Token ids of a prompt (text gets the tokenizer's special tokens, e.g. BERT's [CLS] ... [SEP]), checked:
        not empty, ids in the vocabulary, not longer than the model's limit or the step's token budget."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"{field}: a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{field}: the input is empty")
            if self.tokenizer is None:
                raise ValueError(f"{field}: text needs a tokenizer (the engine runs with skip_tokenizer_init)")
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            ids = list(prompt)
            vocab = self.config.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        else:
            raise ValueError(f"{field}: a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{field}: the input is empty")
        if len(ids) > self.max_model_len:
            raise ValueError(f"{field}: the input has {len(ids)} tokens, more than the model's limit of "
                             f"{self.max_model_len}")
        if len(ids) > self.max_num_batched_tokens:
            raise ValueError(f"{field}: the input has {len(ids)} tokens, more than max_num_batched_tokens "
                             f"({self.max_num_batched_tokens}), the token budget of one step (pooling prompts "
                             "are not chunked)")
        return ids

    def add_request(self, request_id: str, prompt: PoolingPrompt, dimensions: Optional[int] = None,
                    field: str = "input") -> None:
        self.pooler_config.check_dimensions(dimensions)
        self.waiting.append(PoolingRequest(request_id, self.tokenize(prompt, field), dimensions))

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting)

    # ---- one step --------------------------------------------------------------------------------------
    def schedule(self) -> list[PoolingRequest]:
        """Whole prompts from the front, in arrival order, while both budgets hold."""
        batch: list[PoolingRequest] = []
        tokens = 0
        while self.waiting and len(batch) < self.max_num_seqs:
            n = len(self.waiting[0].prompt_token_ids)
            if tokens + n > self.max_num_batched_tokens:
                break
            batch.append(self.waiting.popleft())
            tokens += n
        return batch

    def step(self) -> list[PoolingRequestOutput]:
        return self.run(self.schedule())

    @torch.inference_mode()
    def run(self, batch: list[PoolingRequest]) -> list[PoolingRequestOutput]:
        """The model over a scheduled batch, pooled. Touches no queue, so a server may run it in a thread."""
        if not batch:
            return []
        seq_lens = [len(r.prompt_token_ids) for r in batch]
        input_ids = torch.tensor([t for r in batch for t in r.prompt_token_ids], device=self.device)
        hidden = self.model(input_ids, seq_lens)
        pc = self.pooler_config
        vectors = pool(hidden, seq_lens, pc.pooling, pc.normalize).cpu()
        return [PoolingRequestOutput(r.request_id, PoolingOutput(shorten(v, r.dimensions, pc.normalize)),
                                     r.prompt_token_ids) for r, v in zip(batch, vectors)]

    def shutdown(self) -> None:
        """Nothing runs outside this process."""
