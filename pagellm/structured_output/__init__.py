"""Structured output: grammars (JSON schema, regex, choice, Lark/GBNF) as token bitmasks, via llguidance.

The room sits between the engine and the model runner. It knows token ids and the tokenizer's vocabulary,
never tensors or HTTP:

- `validate_structured_outputs(params)`: checks a request's grammar before it is queued (ValueError starting
  with `structured_outputs`), in bounded time; results are cached by grammar.
- `StructuredOutputManager` (owned by the EngineCore): compiles grammars on a thread pool, off the engine's
  loop, with an LRU cache of compiled grammars by key; keeps one matcher per request; fills one int32 bitmask
  row per scheduled request ([ceil(V / 32)] words, bit t of the row allows token t); advances the matcher with
  each sampled token. A grammar that has terminated (or failed) allows only EOS.

The grammar engine is llguidance (no dependencies, 3 MB; xgrammar pulls triton on the CPU). It is imported
lazily, only when a request asks for structured output, so the engine runs without it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterable, Optional

import numpy as np

from pagellm.sampling_params import StructuredOutputsParams
from pagellm.structured_output.json_closer import json_completion

logger = logging.getLogger(__name__)

FIELD = "structured_outputs"
# Seconds a grammar may take to compile (validation in the front end; compilation in the core).
COMPILE_TIMEOUT_S = 10.0
# Compiled grammars and validation results kept (LRU).
CACHE_SIZE = 256


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of the package; only a broken install lacks it
        raise ValueError(f"{FIELD}: structured output needs the llguidance package (pip install llguidance)") \
            from None
    return llguidance


def _limits() -> Any:
    """Resource limits of one grammar: bounded lexer fuel per step, bounded grammar size (hostile patterns)."""
    llg = _llguidance()
    return llg.LLParserLimits(initial_lexer_fuel=2_000_000, step_lexer_fuel=400_000, max_grammar_size=200_000,
                              max_lexer_states=100_000, verbose_errors=False)


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a request's structured_outputs (ValueError naming the field if malformed)."""
    llg = _llguidance()
    M = llg.LLMatcher
    kind, spec = params.key()
    compact = {"whitespace_flexible": False}
    flexible = {"whitespace_flexible": True}
    if kind in ("json", "json_ws"):
        try:
            return M.grammar_from_json_schema(spec, defaults=compact if kind == "json" else flexible)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{FIELD}.json: {e}") from None
    if kind in ("json_object", "json_object_ws"):
        return M.grammar_from_json_schema({"type": "object"}, defaults=compact if kind == "json_object"
                                          else flexible)
    if kind == "regex":
        return M.grammar_from_regex(spec)
    if kind == "choice":
        alternatives = " | ".join(json.dumps(c) for c in json.loads(spec) if c)
        if not alternatives:
            raise ValueError(f"{FIELD}.choice: every choice is empty")
        return M.grammar_from_lark(f"start: {alternatives}\n")
    assert kind == "grammar"
    text = spec
    if "::=" in text:  # GBNF (llama.cpp's EBNF): translate to Lark
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # noqa: BLE001 - its own parse errors
            raise ValueError(f"{FIELD}.grammar: {e}") from None
    return M.grammar_from_lark(text)


def _check(params: StructuredOutputsParams) -> Optional[str]:
    """None if the grammar compiles, else the reason."""
    llg = _llguidance()
    try:
        grammar = grammar_text(params)
    except ValueError as e:
        return str(e)
    kind = params.key()[0].replace("_ws", "")
    error = llg.LLMatcher.validate_grammar(grammar, limits=_limits())
    if error:
        return f"{FIELD}.{kind}: invalid {kind}: {error.strip()}"
    return None


class _LRU:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.cap:
                self.data.popitem(last=False)

    def __len__(self) -> int:
        return len(self.data)


_validated = _LRU(CACHE_SIZE)
_validator_pool: Optional[ThreadPoolExecutor] = None
_validator_lock = threading.Lock()


def validate_structured_outputs(params: Optional[StructuredOutputsParams],
                                timeout: float = COMPILE_TIMEOUT_S) -> None:
    """Raise ValueError (starting with `structured_outputs`) when the grammar does not compile, or takes
    longer than `timeout` seconds to check."""
    global _validator_pool
    if params is None:
        return
    key = params.key()
    cached = _validated.get(key)
    if cached is not None:
        if cached is not True:
            raise ValueError(cached)
        return
    with _validator_lock:
        if _validator_pool is None:
            _validator_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pagellm-grammar-check")
    future = _validator_pool.submit(_check, params)
    try:
        error = future.result(timeout=timeout)
    except FutureTimeout:
        raise ValueError(f"{FIELD}: the grammar took longer than {timeout:g} s to compile") from None
    _validated.put(key, error if error else True)
    if error:
        raise ValueError(error)


# JSON requests (json_object, a JSON schema, a required or named tool call) close their JSON before max_tokens
# (json_closer.py): from this many tokens before the end the manager computes what closing takes, and starts
# forcing it CLOSE_SLACK tokens early (one free token may open more than one thing to close, e.g. '[{"').
CLOSE_WINDOW = 64
CLOSE_SLACK = 4
# When the grammar refuses the syntactic completion's next token (a required key, an enum value, a minimum
# length), the closer tries this many of the tokens the grammar allows and takes the one that leaves the
# shortest completion.
CLOSE_CANDIDATES = 64
# With a schema one token may cost many to close (a "," in an array of objects opens a whole object): while what
# closing takes is within this many tokens of what is left, the tokens that open something more are tried ahead
# and refused when closing after them would no longer fit.
LOOKAHEAD_MARGIN = 32
LOOKAHEAD_CANDIDATES = 256
# A request whose JSON the engine closed finishes with reason "stop" (its JSON is whole) and this stop_reason.
JSON_CLOSED = "json_closed"
_JSON_KINDS = ("json", "json_ws", "json_object", "json_object_ws")


class _Budget:
    """A JSON request's token budget and its tokens so far."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.token_ids: list[int] = []
        self.forced = False  # the closing is forced token by token
        self.steered = False  # tokens were refused (lookahead) or forced: the engine shaped the end


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class StructuredOutputManager:
    """Grammars of the requests in one engine core: compile asynchronously, match, fill bitmasks.

    `tokenizer_factory` builds the HF tokenizer (called once, on the pool, so a slow tokenizer load never
    stalls the engine loop). `vocab_size` is the model's logits width; the bitmask covers it.
    """

    def __init__(self, tokenizer_factory: Callable[[], Any], vocab_size: int, eos_token_id: Optional[int],
                 max_workers: int = 2, cache_size: int = CACHE_SIZE,
                 compile_timeout: float = COMPILE_TIMEOUT_S) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.compile_timeout = compile_timeout
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pagellm-grammar")
        self._tokenizer_factory = tokenizer_factory
        self._ll_tokenizer: Optional[Future] = None
        self._tok_lock = threading.Lock()
        self.cache = _LRU(cache_size)  # grammar key -> a fresh (never advanced) matcher to deep-copy
        self.pending: dict[str, tuple[Future, float]] = {}  # request id -> (compile future, submit time)
        self.matchers: dict[str, Any] = {}
        self.budgets: dict[str, _Budget] = {}  # json_object requests with a max_tokens
        self._hf_tok: Any = None
        self._token_pieces: Optional[tuple[list[str], np.ndarray, np.ndarray]] = None
        self.num_words = bitmask_words(vocab_size)
        self._executor: Any = None
        self.compile_seconds = 0.0

    # ---- compiling ----

    def _tokenizer(self) -> Any:
        with self._tok_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = Future()
                try:
                    import llguidance.hf

                    hf_tok = self._tokenizer_factory()
                    if hf_tok is None:
                        raise ValueError(f"{FIELD}: the engine runs without a tokenizer")
                    self._hf_tok = hf_tok
                    n_vocab = self.vocab_size if self.vocab_size >= len(hf_tok) else None
                    tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=n_vocab)
                    self._ll_tokenizer.set_result(tok)
                except BaseException as e:  # noqa: BLE001 - every request waiting on it fails with it
                    self._ll_tokenizer.set_exception(e)
        return self._ll_tokenizer.result()

    def _compile(self, params: StructuredOutputsParams) -> Any:
        key = params.key()
        template = self.cache.get(key)
        if template is None:
            t0 = time.perf_counter()
            llg = _llguidance()
            tok = self._tokenizer()
            template = llg.LLMatcher(tok, grammar_text(params), log_level=0, limits=_limits())
            if template.is_error():
                raise ValueError(f"{FIELD}: {template.get_error()}")
            self.compile_seconds += time.perf_counter() - t0
            self.cache.put(key, template)
        return template.deep_copy()

    def submit(self, request_id: str, params: StructuredOutputsParams, max_tokens: Optional[int] = None) -> None:
        """Start compiling the request's grammar (or take it from the cache). A JSON request with a max_tokens
        will close its JSON before it runs out."""
        self.pending[request_id] = (self.pool.submit(self._compile, params), time.monotonic())
        if params.key()[0] in _JSON_KINDS and max_tokens is not None:
            self.budgets[request_id] = _Budget(max_tokens)

    def poll(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Requests whose grammar became ready, and (request, reason) of those that failed or timed out."""
        ready, failed = [], []
        now = time.monotonic()
        for req_id, (future, since) in list(self.pending.items()):
            if future.done():
                del self.pending[req_id]
                try:
                    self.matchers[req_id] = future.result()
                    ready.append(req_id)
                except Exception as e:  # noqa: BLE001 - reported to the request
                    msg = str(e) if isinstance(e, ValueError) else f"{FIELD}: {type(e).__name__}: {e}"
                    failed.append((req_id, msg))
            elif now - since > self.compile_timeout:
                del self.pending[req_id]
                future.cancel()
                failed.append((req_id, f"{FIELD}: the grammar took longer than {self.compile_timeout:g} s "
                                       "to compile"))
        return ready, failed

    def wait_any(self, timeout: float) -> None:
        """Block up to `timeout` seconds until some pending grammar is done (when nothing else can run)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        futures = [f for f, _ in self.pending.values()]
        if futures:
            wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)

    # ---- matching ----

    def has_matcher(self, request_id: str) -> bool:
        return request_id in self.matchers

    def fill_bitmask(self, request_ids: list[str]) -> np.ndarray:
        """[len(request_ids), ceil(V / 32)] int32: row i allows the next tokens of request_ids[i]'s grammar."""
        import llguidance.numpy as lnp

        bitmask = np.zeros((len(request_ids), self.num_words), dtype=np.int32)
        work = []
        for i, req_id in enumerate(request_ids):
            m = self.matchers[req_id]
            if m.is_stopped() or m.is_error():
                self._allow_only_eos(bitmask[i])
            else:
                work.append((m, i))
        if len(work) == 1:
            lnp.fill_next_token_bitmask(work[0][0], bitmask, work[0][1])
        elif work:
            if self._executor is None:
                self._executor = _llguidance().LLExecutor(num_threads=2)
            lnp.fill_next_token_bitmask_par(self._executor, work, bitmask)
        for m, i in work:
            if m.is_error() or not bitmask[i].any():  # never leave a row without a token
                self._allow_only_eos(bitmask[i])
        if self.budgets:
            for i, req_id in enumerate(request_ids):
                budget = self.budgets.get(req_id)
                if budget is not None and budget.max_tokens - len(budget.token_ids) <= CLOSE_WINDOW:
                    self._close_json(budget, self.matchers[req_id], bitmask[i])
        return bitmask

    def _close_json(self, budget: _Budget, matcher: Any, row: np.ndarray) -> None:
        """Near the end of a JSON request's budget: allow only the next token of the shortest way to close the
        JSON that its grammar accepts, from the moment that way needs nearly all the tokens left."""
        left = budget.max_tokens - len(budget.token_ids)
        if matcher.is_stopped() or matcher.is_error():
            return
        text = self._hf_tok.decode(budget.token_ids)
        plan = self._closing_plan(matcher, text, left)
        if plan is None:
            return
        if not budget.forced and len(plan) + CLOSE_SLACK < left:
            if left - len(plan) <= LOOKAHEAD_MARGIN and self._refuse_overruns(matcher, text, row, left):
                budget.steered = True
            return
        budget.forced = budget.steered = True
        t = plan[0] if plan else self.eos_token_id
        if t is not None and 0 <= t < self.num_words * 32 and (int(row[t // 32]) >> (t % 32)) & 1:
            row[:] = 0
            row[t // 32] = np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def _closing_plan(self, matcher: Any, text: str, limit: int) -> Optional[list[int]]:
        """The tokens that close the JSON `text` under the grammar (the EOS after them not counted), found
        greedily on a copy of the matcher: the syntactic completion (json_completion) where the grammar takes it,
        else the tokens the grammar forces, else the allowed token after which the completion is shortest. At
        most `limit` tokens are looked for (a longer plan is as good as too long); None: text is not JSON."""
        tok = self._hf_tok
        m = matcher.deep_copy()
        plan: list[int] = []
        while len(plan) < limit and not m.is_stopped():
            suffix = json_completion(text)
            if suffix is None:
                return None
            if not suffix:
                return plan
            step = tok.encode(suffix, add_special_tokens=False)
            step = step[:m.validate_tokens(step)]
            if not step:
                step = tok.encode(suffix[0], add_special_tokens=False)[:1]
                step = step[:m.validate_tokens(step)]
            if not step:
                step = list(m.compute_ff_tokens()) or self._shortest_closing(m, text)
            if not step:
                return None
            for t in step:
                if not m.consume_token(t):
                    return None
            plan += step
            text += tok.decode(step)
        return plan

    def _pieces(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Each token's text; whether it may open something ("," "{" "["), end a string ('"'), or starts with
        JSON's punctuation (it ends a value or moves to the next one)."""
        if self._token_pieces is None:
            pieces = [self._hf_tok.decode([t]) for t in range(len(self._hf_tok))]
            pieces += [""] * (self.num_words * 32 - len(pieces))
            opens = np.array([any(c in p for c in ",{[") for p in pieces])
            quotes = np.array(['"' in p for p in pieces])
            punctuation = np.array([p.lstrip()[:1] in (",", "}", "]", ":", '"') for p in pieces])
            self._token_pieces = (pieces, opens, quotes, punctuation)
        return self._token_pieces

    def _refuse_overruns(self, matcher: Any, text: str, row: np.ndarray, left: int) -> bool:
        """Clear the bits of the allowed tokens that open something (inside a string: only those that end it
        too) after which closing would take more than the tokens left. Whether any was cleared."""
        refused = False
        pieces, opens, quotes, _ = self._pieces()
        bits = np.unpackbits(row.view(np.uint8), bitorder="little").astype(bool)
        suffix = json_completion(text) or ""
        risky = bits & opens & (quotes if suffix.startswith('"') else True)
        for t in np.flatnonzero(risky)[:LOOKAHEAD_CANDIDATES]:
            t = int(t)
            m = matcher.deep_copy()
            plan = self._closing_plan(m, text + pieces[t], left - 1) if m.consume_token(t) else None
            if plan is None or 1 + len(plan) + CLOSE_SLACK > left:
                row.view(np.uint32)[t // 32] &= np.uint32(~(1 << (t % 32)) & 0xFFFFFFFF)
                refused = True
        return refused

    def _shortest_closing(self, m: Any, text: str) -> list[int]:
        """Of (some of) the tokens the grammar allows next, the one after which the syntactic completion is
        shortest (ties: the longer token, more progress). Punctuation goes first where the grammar allows it: a
        number or a string that may go on is ended (the syntactic completion alone would not see the required
        keys still to come, and would keep adding digits)."""
        import llguidance.numpy as lnp

        pieces, _, _, punctuation = self._pieces()
        row = np.zeros((1, self.num_words), dtype=np.int32)
        lnp.fill_next_token_bitmask(m, row, 0)
        bits = np.unpackbits(row[0].view(np.uint8), bitorder="little").astype(bool)
        if self.eos_token_id is not None and 0 <= self.eos_token_id < len(bits):
            bits[self.eos_token_id] = False
        ended = bits & punctuation
        allowed = [int(t) for t in np.flatnonzero(ended if ended.any() else bits)[:CLOSE_CANDIDATES]]
        best, best_key = None, None
        for t in allowed:
            piece = pieces[t]
            completion = json_completion(text + piece)
            if completion is None:
                continue
            key = (len(completion), -len(piece))
            if best_key is None or key < best_key:
                best, best_key = t, key
        return [] if best is None else [best]

    def closed_json(self, request_id: str) -> bool:
        """Whether the engine closed (or steered to its close) the request's JSON as its budget ran out, and the
        JSON is whole."""
        budget = self.budgets.get(request_id)
        return (budget is not None and budget.steered
                and json_completion(self._hf_tok.decode(budget.token_ids, skip_special_tokens=True)) == "")

    def _allow_only_eos(self, row: np.ndarray) -> None:
        row[:] = 0
        eos = self.eos_token_id
        if eos is not None and 0 <= eos < self.num_words * 32:
            row[eos // 32] = np.int32(np.uint32(1 << (eos % 32)).view(np.int32))

    def accept_tokens(self, request_id: str, token_ids: Iterable[int]) -> None:
        m = self.matchers.get(request_id)
        if m is None:
            return
        budget = self.budgets.get(request_id)
        if budget is not None:
            token_ids = list(token_ids)
            budget.token_ids.extend(token_ids)
        for t in token_ids:
            if m.is_stopped():
                break  # the forced EOS after the grammar's end
            if not m.consume_token(t):
                logger.warning("request %s: token %d rejected by its grammar: %s", request_id, t, m.get_error())
                break

    def remove(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        self.budgets.pop(request_id, None)
        entry = self.pending.pop(request_id, None)
        if entry is not None:
            entry[0].cancel()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
