"""Draft-model proposer: a smaller model with the target's vocabulary guesses the next k tokens greedily.

`speculative_config={"model": PATH, "num_speculative_tokens": k}` (vLLM's spelling). The draft runs in the
runner's process on the same device, with a paged KV cache of its own indexed by the target's block ids: the
scheduler's blocks hold a request's positions for both models, so the draft needs no allocator. Positions past
a request's allocated blocks (its drafts, and the newest token when it starts a block) go to scratch blocks
that each row owns at the end of the draft cache; they are never counted as computed, so they are written again
in real blocks once the target accepts those tokens.

Per request the proposer remembers how many leading positions its cache holds (`num_computed`). Each call runs
one forward pass over every request's missing positions (the tokens accepted since the last call, or a whole
prompt), takes the argmax at the last one as draft 1, then k - 1 one-token passes for drafts 2..k. The drafts
are deterministic (probabilities None): the rejection sampler treats them as proposed with probability 1,
which keeps sampling exact.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from pagellm.attention.metadata import AttentionMetadata
from pagellm.spec_decode.proposer import Drafts, ProposeBatch


def draft_model_config(path: str, target: Any) -> Any:
    """The draft's ModelConfig (the target's dtype and max_model_len), or a ValueError naming
    speculative_config.model when it cannot draft for the target."""
    from pagellm.config import ModelConfig
    from pagellm.model_executor.loader.source import load_hf_config, resolve_model_source

    try:
        source = resolve_model_source(path)
        hf_config = load_hf_config(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"speculative_config.model: cannot load {path!r}: {e}") from None
    if hf_config.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config.model: the draft's vocabulary ({hf_config.vocab_size} tokens) is not "
                         f"the target's ({target.vocab_size})")
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos is not None and max_pos < target.max_model_len:
        raise ValueError(f"speculative_config.model: the draft's max_position_embeddings ({max_pos}) is below "
                         f"max_model_len ({target.max_model_len})")
    return ModelConfig(model=path, source=source, hf_config=hf_config, dtype=target.dtype,
                       max_model_len=target.max_model_len, load_format="auto", seed=target.seed,
                       skip_tokenizer_init=True, enforce_eager=True)


class DraftModelProposer:
    def __init__(self, model_config: Any, max_rows: int, max_k: int, block_size: int,
                 device: torch.device) -> None:
        self.model_config = model_config
        self.block_size = block_size
        self.device = device
        self.max_k = max_k
        self.num_computed = np.zeros(max_rows, dtype=np.int64)
        # Scratch blocks per row: the k - 1 drafts fed back and the newest token, from any offset in a block.
        self.scratch_per_row = -(-(max_k + 1) // block_size) + 1
        self.max_rows = max_rows
        self.model: Optional[torch.nn.Module] = None
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0

    # ---- set-up -----------------------------------------------------------------------------------------
    def load(self) -> None:
        from pagellm.model_executor.loader import load_model

        self.model = load_model(self.model_config, self.device)

    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=mc.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * elem

    def allocate(self, num_blocks: int) -> None:
        """A cache of the target's num_blocks, then each row's scratch blocks."""
        mc = self.model_config
        self.num_blocks = num_blocks
        total = num_blocks + self.max_rows * self.scratch_per_row
        shape = (2, total, self.block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=mc.dtype, device=self.device) for _ in range(mc.num_layers)]

    def reset(self, row: int) -> None:
        """A new request in the row: nothing of it is cached."""
        self.num_computed[row] = 0

    def release(self) -> None:
        self.model, self.kv_caches = None, []

    # ---- proposing --------------------------------------------------------------------------------------
    def _table(self, row: int, blocks: np.ndarray, num_positions: int) -> np.ndarray:
        """The row's block ids covering num_positions: its real blocks, then its scratch blocks."""
        need = -(-num_positions // self.block_size)
        scratch = self.num_blocks + row * self.scratch_per_row + np.arange(max(0, need - len(blocks)))
        return np.concatenate([blocks, scratch]).astype(np.int64)

    @torch.inference_mode()
    def propose(self, batch: ProposeBatch) -> Drafts:
        assert batch.rows is not None and batch.block_tables is not None, "the draft model needs rows and blocks"
        n_req = len(batch.token_ids)
        drafts: list[list[int]] = [[] for _ in range(n_req)]
        ks = np.asarray(batch.num_speculative_tokens, dtype=np.int64)
        lens = np.array([len(t) for t in batch.token_ids], dtype=np.int64)
        rows = np.asarray(batch.rows, dtype=np.int64)
        tables = [self._table(int(r), np.asarray(b), int(n) + int(k))
                  for r, b, n, k in zip(rows, batch.block_tables, lens, ks)]
        starts = np.minimum(self.num_computed[rows], lens - 1)
        # Pass 1: every request's missing positions; draft 1 from the last.
        ids = [np.asarray(t[s:], dtype=np.int64) for t, s in zip(batch.token_ids, starts)]
        last = self._forward(list(range(n_req)), starts, ids, tables)
        for i, token in enumerate(last):
            if ks[i] > 0:
                drafts[i].append(token)
        # Only positions inside real blocks count as computed; scratch ones are written again later.
        real = np.array([len(b) for b in batch.block_tables], dtype=np.int64) * self.block_size
        self.num_computed[rows] = np.minimum(lens, real)
        # Passes 2..k: one token each, for the requests that want more.
        for step in range(1, int(ks.max(initial=0))):
            active = [i for i in range(n_req) if ks[i] > step]
            if not active:
                break
            pos = np.array([lens[i] + step - 1 for i in active], dtype=np.int64)
            tokens = [np.array([drafts[i][-1]], dtype=np.int64) for i in active]
            for i, token in zip(active, self._forward(active, pos, tokens, tables)):
                drafts[i].append(token)
        return Drafts(token_ids=drafts, probs=None)

    def _forward(self, reqs: list[int], starts: np.ndarray, ids: list[np.ndarray],
                 tables: list[np.ndarray]) -> list[int]:
        """One draft forward pass: request reqs[j] computes tokens ids[j] from position starts[j]; returns the
        argmax after each one's last token. One-token requests go first (the backends' decode batch)."""
        order = sorted(range(len(reqs)), key=lambda j: len(ids[j]) != 1)
        q_lens = np.array([len(ids[j]) for j in order], dtype=np.int64)
        st = np.array([starts[j] for j in order], dtype=np.int64)
        qsl = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        positions = np.concatenate([s + np.arange(q) for s, q in zip(st, q_lens)])
        slots = np.concatenate([
            tables[reqs[j]][p // self.block_size] * self.block_size + p % self.block_size
            for j, p in zip(order, np.split(positions, qsl[1:-1]))])
        seq_lens = st + q_lens
        width = max(len(tables[reqs[j]]) for j in order)
        bt = np.zeros((len(order), width), dtype=np.int32)
        for r, j in enumerate(order):
            bt[r, : len(tables[reqs[j]])] = tables[reqs[j]]
        dev = self.device
        meta = AttentionMetadata(
            num_actual_tokens=int(qsl[-1]), query_start_loc=torch.from_numpy(qsl).to(dev, torch.int32),
            seq_lens=torch.from_numpy(seq_lens).to(dev, torch.int32), block_tables=torch.from_numpy(bt).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev), max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()), num_decodes=int(np.count_nonzero(q_lens == 1)),
            block_size=self.block_size, query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist())
        input_ids = torch.from_numpy(np.concatenate([ids[j] for j in order])).to(dev)
        hidden = self.model(input_ids, torch.from_numpy(positions).to(dev), self.kv_caches, meta)
        last = torch.from_numpy(qsl[1:] - 1).to(dev)
        tokens = self.model.compute_logits(hidden[last]).argmax(dim=-1).tolist()
        out = [0] * len(reqs)
        for r, j in enumerate(order):
            out[j] = tokens[r]
        return out
