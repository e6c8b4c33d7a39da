"""OutputProcessor: the core's token-id news -> RequestOutputs with text, logprobs and stop strings.

Runs beside the user (in the LLM's process, or the API server's), so detokenization never slows the core.
A request with n sequences is n core requests; they are gathered back into one RequestOutput here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from pagellm.core.sched_output import EngineCoreOutput
from pagellm.engine.detokenizer import IncrementalDetokenizer, LogprobsProcessor
from pagellm.engine.processor import ProcessedPrompt, child_request_id
from pagellm.outputs import CompletionOutput, RequestOutput
from pagellm.sampling_params import SamplingParams


class OutputKind(Enum):
    CUMULATIVE = "cumulative"  # every output holds everything so far
    DELTA = "delta"  # every output holds only what is new (streaming)
    FINAL_ONLY = "final_only"  # one output, when the request finishes


@dataclass
class SequenceState:
    index: int
    params: SamplingParams
    detokenizer: Optional[IncrementalDetokenizer]
    logprobs: LogprobsProcessor
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    sent_tokens: int = 0  # for DELTA: tokens already handed out
    sent_logprobs: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: ProcessedPrompt
    sequences: dict[str, SequenceState]
    output_kind: OutputKind
    prompt_logprobs: LogprobsProcessor
    sent_prompt_logprobs: bool = False
    num_cached_tokens: int = 0
    arrival_time: float = field(default_factory=time.time)
    first_token_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences.values())


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_text: dict[int, str] = {}  # token id -> its text alone, for every request's logprobs
        self.requests: dict[str, RequestState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                    output_kind: OutputKind = OutputKind.FINAL_ONLY) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        num_seqs = params.num_sequences
        if num_seqs > params.n and output_kind is not OutputKind.FINAL_ONLY:
            raise ValueError(f"best_of: best_of ({num_seqs}) > n ({params.n}) needs whole outputs, not streaming "
                             "(the best sequences are known only when all have finished)")
        num_logprobs = 0 if num_seqs > params.n and params.logprobs is None else params.logprobs
        sequences = {}
        for i in range(num_seqs):
            child_id = child_request_id(request_id, i, num_seqs)
            detok = None
            if params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt.prompt_token_ids, params)
            logprobs = LogprobsProcessor(self.tokenizer, num_logprobs, token_text=self.token_text)
            sequences[child_id] = SequenceState(index=i, params=params, detokenizer=detok, logprobs=logprobs)
            self.child_to_parent[child_id] = request_id
        prompt_logprobs = LogprobsProcessor(self.tokenizer, None, params.prompt_logprobs, self.token_text)
        self.requests[request_id] = RequestState(request_id, prompt, sequences, output_kind, prompt_logprobs)

    def child_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return list(state.sequences) if state else []

    def abort_request(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state:
            for child_id in state.sequences:
                self.child_to_parent.pop(child_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs to hand out, and the core ids that a stop string finished."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        now = time.time()
        for out in outputs:
            parent_id = self.child_to_parent.get(out.req_id)
            if parent_id is None:
                continue  # aborted meanwhile
            state = self.requests[parent_id]
            seq = state.sequences[out.req_id]
            if seq.finish_reason is not None:
                continue
            touched[parent_id] = state
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if out.new_prompt_logprobs is not None:
                state.prompt_logprobs.update_prompt(out.new_prompt_logprobs)
            if out.new_token_ids and state.first_token_time is None:
                state.first_token_time = now
            seq.token_ids.extend(out.new_token_ids)
            for entry in out.new_logprobs or ():
                seq.logprobs.update(entry)
            stop_str = None
            if seq.detokenizer is not None and out.new_token_ids:
                # The core finishes with "stop" only on a stop token, whose text is then left out.
                stop_str = seq.detokenizer.update(out.new_token_ids, stop_terminated=out.finish_reason == "stop")
                if stop_str is not None:  # tokens after the one that completed it (several came in one step)
                    del seq.token_ids[seq.detokenizer.num_output_tokens:]
            if stop_str is not None and not out.finished:
                seq.finish_reason, seq.stop_reason = "stop", stop_str
                stopped.append(out.req_id)
            elif stop_str is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop_str
            elif out.finished:
                seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        results = []
        for parent_id, state in touched.items():
            result = self._make_output(state)
            if result is not None:
                results.append(result)
            if state.finished:
                self.abort_request(parent_id)
        return results, stopped

    def _make_output(self, state: RequestState) -> Optional[RequestOutput]:
        finished = state.finished
        kind = state.output_kind
        if kind is OutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is OutputKind.DELTA
        completions = []
        for seq in sorted(state.sequences.values(), key=lambda s: s.index):
            seq_done = seq.finish_reason is not None
            if seq.detokenizer is not None:
                text = seq.detokenizer.get_next_output_text(seq_done, delta)
            else:
                text = ""
            token_ids = seq.token_ids[seq.sent_tokens:] if delta else list(seq.token_ids)
            logprobs = seq.logprobs.logprobs
            if logprobs is not None:
                logprobs = logprobs[seq.sent_logprobs:] if delta else list(logprobs)
            if delta:
                seq.sent_tokens = len(seq.token_ids)
                seq.sent_logprobs += len(logprobs) if logprobs is not None else 0
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=token_ids, cumulative_logprob=seq.logprobs.cumulative_logprob,
                logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            ))
        params = next(iter(state.sequences.values())).params
        if finished and len(completions) > params.n:
            completions = self._best(completions, params)
        prompt_logprobs = state.prompt_logprobs.prompt_logprobs
        if delta and state.sent_prompt_logprobs:
            prompt_logprobs = None
        elif prompt_logprobs is not None and len(prompt_logprobs) == len(state.prompt.prompt_token_ids):
            state.sent_prompt_logprobs = True
        metrics = {"arrival_time": state.arrival_time, "first_token_time": state.first_token_time}
        if finished:
            metrics["finished_time"] = time.time()
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt.prompt, prompt_token_ids=state.prompt.prompt_token_ids,
            outputs=completions, finished=finished, prompt_logprobs=prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens, metrics=metrics,
        )

    @staticmethod
    def _best(completions: list[CompletionOutput], params: SamplingParams) -> list[CompletionOutput]:
        """best_of: the n sequences of the highest cumulative logprob, best first, indexed 0..n-1 (their token
        logprobs kept only when the user asked for them)."""
        ranked = sorted(completions, key=lambda c: -(c.cumulative_logprob or 0.0))[:params.n]
        for i, c in enumerate(ranked):
            c.index = i
            if params.logprobs is None:
                c.logprobs = None
        return ranked
