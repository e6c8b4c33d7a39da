"""Incremental detokenization, stop strings and logprob formatting, one request (sequence) at a time.

Text is produced token by token without re-decoding the whole output: two offsets into the token list mark
a small window. `prefix_offset..read_offset` is text already emitted (decoded again only as context, so that
tokenizers whose decoding depends on neighbours, such as SentencePiece's leading-space rule, stay right), and
`read_offset..end` is new. The new text is the window's decode minus the prefix's. A window whose decode ends
in U+FFFD ends inside a UTF-8 character (byte-level BPE or byte-fallback tokens split characters), so nothing
is emitted until the next token completes it.

Stop strings are searched only where a new match can be: the new text plus the max_stop_len - 1 characters
before it. While a request runs, the streamed text holds back its last max_stop_len - 1 characters, so text
that a later stop string would cut is never sent.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from pagellm.core.sched_output import PromptLogprobs, TokenLogprobs
from pagellm.outputs import Logprob, PositionLogprobs
from pagellm.sampling_params import SamplingParams

# Prompt tokens decoded with the first output tokens as context (SentencePiece drops a leading space otherwise).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


def _special_ids(tokenizer: Any) -> frozenset[int]:
    try:
        return frozenset(int(t) for t in (getattr(tokenizer, "all_special_ids", None) or ()))
    except (TypeError, ValueError):
        return frozenset()


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.spaces_between_special_tokens = params.spaces_between_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        # Characters held back from streaming while running: a later stop string may still cut them.
        self.stop_buffer_length = 0 if (self.include_stop_str_in_output or not self.stop) else self.max_stop_len - 1
        self.min_tokens = params.min_tokens
        # Stop token ids known here (EOS is in all_stop_token_ids only on the engine's per-sequence copy).
        self._stop_token_ids = set(params.stop_token_ids or ()) | set(params.all_stop_token_ids or ())
        self._special = _special_ids(tokenizer)

        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        for i in range(len(context) - 1, -1, -1):  # context starts after the prompt's last special token
            if context[i] in self._special:
                context = context[i + 1 :]
                break
        self._tokens: list[int] = context  # decoding context + every output token decoded so far
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: Optional[str] = None  # decode of tokens[prefix_offset:read_offset], cached
        self._output_token_ids: list[int] = []
        self._text = ""
        self._sent = 0  # characters handed out by get_next_output_text(delta=True)
        self.stopped = False  # a stop string matched: no more text
        self.stop_reason: Optional[str] = None

    # ---- public ---------------------------------------------------------------------------------------
    @property
    def output_text(self) -> str:
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self._output_token_ids

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_token_ids)

    def update(self, new_token_ids: Iterable[int], stop_terminated: Optional[bool] = None) -> Optional[str]:
        """Append tokens, extend the text, and return the stop string if one matched (the text is then cut).

        stop_terminated: the last token is a stop token that finishes the request; its text is left out unless
        include_stop_str_in_output. None: decide from the request's stop token ids and min_tokens.
        """
        new_ids = [int(t) for t in new_token_ids]
        if self.stopped or not new_ids:
            return None
        if stop_terminated is None:
            stop_terminated = (new_ids[-1] in self._stop_token_ids
                               and len(self._output_token_ids) + len(new_ids) >= self.min_tokens)
        last = len(new_ids) - 1
        # One token at a time: when several come in one step (speculative decoding), the token that completes a
        # stop string is the last one kept, as if they had come one by one.
        for i, tok in enumerate(new_ids):
            self._output_token_ids.append(tok)
            if i == last and stop_terminated and not self.include_stop_str_in_output:
                break
            before = len(self._text)
            self._tokens.append(tok)
            self._text += self._decode_next(final=False)
            stop = self._check_stop(len(self._text) - before)
            if stop is not None:
                return stop
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The whole text (delta=False) or the text since the last delta call, minus the held-back tail while
        the request runs. Once finished, any held-back partial character is flushed (as U+FFFD, like a plain
        decode of all ids would give)."""
        if finished:
            self.flush()
        length = len(self._text) if finished else max(0, len(self._text) - self.stop_buffer_length)
        if not delta:
            return self._text[:length]
        start = self._sent
        if length <= start:
            return ""
        self._sent = length
        return self._text[start:length]

    def flush(self) -> Optional[str]:
        """Emit text still waiting for the rest of a UTF-8 character (the request ended). Returns a stop
        string if the flushed text completed one (also kept in `stop_reason`)."""
        if self.stopped or self._read_offset >= len(self._tokens):
            return None
        before = len(self._text)
        self._text += self._decode_next(final=True)
        return self._check_stop(len(self._text) - before)

    # ---- internals ------------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        tok = self.tokenizer
        if (self.skip_special_tokens or not self.spaces_between_special_tokens
                or not self._special.intersection(ids)):
            return tok.decode(ids, skip_special_tokens=self.skip_special_tokens)
        # Special tokens kept and spaced: decode the runs between them and join everything with spaces.
        pieces: list[str] = []
        run: list[int] = []
        for t in ids:
            if t in self._special:
                if run:
                    pieces.append(tok.decode(run, skip_special_tokens=False))
                    run = []
                pieces.append(tok.decode([t], skip_special_tokens=False))
            else:
                run.append(t)
        if run:
            pieces.append(tok.decode(run, skip_special_tokens=False))
        return " ".join(pieces)

    def _decode_next(self, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        prefix_text = self._prefix_text
        new_text = self._decode(self._tokens[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(_REPLACEMENT)):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            self._prefix_text = None
            return new_text[len(prefix_text) :]
        return ""

    def _check_stop(self, new_chars: int) -> Optional[str]:
        if not self.stop or new_chars <= 0 or len(self._output_token_ids) < self.min_tokens:
            return None
        text = self._text
        new_start = len(text) - new_chars
        best: Optional[tuple[int, int, str]] = None  # (end, start, stop string)
        for s in self.stop:
            # A new match ends inside the new text: start no earlier than len(s) - 1 characters before it.
            idx = text.find(s, max(0, new_start - len(s) + 1))
            if idx < 0:
                continue
            cand = (idx + len(s), idx, s)
            # The stop string completed first wins (the longest when two end together).
            if best is None or cand[0] < best[0] or (cand[0] == best[0] and cand[1] < best[1]):
                best = cand
        if best is None:
            return None
        end, start, s = best
        self._text = text[:end] if self.include_stop_str_in_output else text[:start]
        self.stopped = True
        self.stop_reason = s
        return s


# ---- logprobs ---------------------------------------------------------------------------------------------

def make_position_logprobs(token_ids: list[int], logprobs: list[float], ranks: list[int], tokenizer: Any,
                           num_logprobs: Optional[int] = None,
                           cache: Optional[dict[int, str]] = None) -> PositionLogprobs:
    """token id -> Logprob at one position: the sampled (or prompt) token first, then the top num_logprobs.
    Runs once per position of a prompt's logprobs (thousands per request): the cache lookup is inlined."""
    width = len(token_ids) if num_logprobs is None else min(len(token_ids), 1 + num_logprobs)
    result: PositionLogprobs = {}
    if cache is None:
        cache = {}
    for tok, lp, rank in zip(token_ids[:width], logprobs[:width], ranks[:width]):
        if tok not in result:
            text = cache.get(tok)
            if text is None and tokenizer is not None:
                text = cache[tok] = tokenizer.decode([tok])
            result[tok] = Logprob(lp, rank, text)
    return result


class LogprobsProcessor:
    """Collects one sequence's sample logprobs (and a request's prompt logprobs) as vLLM-style dicts.

    `token_text`: token id -> its text alone, shared by every request of one tokenizer (the output processor
    keeps one), so that the ~21 tokens of each prompt position are decoded once per server, not per request."""

    def __init__(self, tokenizer: Any, num_logprobs: Optional[int], num_prompt_logprobs: Optional[int] = None,
                 token_text: Optional[dict[int, str]] = None):
        self.tokenizer = tokenizer
        self.num_logprobs = num_logprobs
        self.num_prompt_logprobs = num_prompt_logprobs
        self.logprobs: Optional[list[PositionLogprobs]] = [] if num_logprobs is not None else None
        self.cumulative_logprob: Optional[float] = 0.0 if num_logprobs is not None else None
        # Prompt position 0 has no logprob: it is predicted by nothing.
        self.prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = (
            [None] if num_prompt_logprobs is not None else None)
        self._cache: dict[int, str] = {} if token_text is None else token_text

    def update(self, entry: TokenLogprobs) -> Optional[PositionLogprobs]:
        if self.logprobs is None:
            return None
        position = make_position_logprobs(entry.token_ids, entry.logprobs, entry.ranks, self.tokenizer,
                                          self.num_logprobs, self._cache)
        self.logprobs.append(position)
        self.cumulative_logprob += entry.logprobs[0]
        return position

    def update_prompt(self, plp: PromptLogprobs) -> None:
        """Add prompt logprobs of positions plp.first_position...; positions already known (a preempted request
        recomputing its prompt) are skipped."""
        if self.prompt_logprobs is None:
            return
        first = plp.first_position
        for offset, (ids, lps, ranks) in enumerate(zip(plp.token_ids, plp.logprobs, plp.ranks)):
            if first + offset == len(self.prompt_logprobs):
                self.prompt_logprobs.append(
                    make_position_logprobs(ids, lps, ranks, self.tokenizer, self.num_prompt_logprobs, self._cache))
