"""SamplingParams: how one request turns logits into tokens, validated on construction.

Every invalid field raises a ValueError whose message starts with the field's name, so the HTTP layer can
turn it into a 400 that names the parameter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

# Caps that keep one request from costing the engine unbounded work.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
# Token ids travel in int32 tensors (the processor then checks them against the vocabulary); counts of tokens
# (max_tokens, min_tokens, top_k) are capped by max_model_len anyway: both stay inside 31 bits.
MAX_TOKEN_ID = 2**31 - 1
MAX_TOKENS = 2**31 - 1
# The n sequences of a request take seeds seed, seed + 1, ...: all of them inside int64.
MAX_SEED = 2**63 - 1 - MAX_N
MAX_PRIORITY = 2**31 - 1
# Nesting of a JSON value (a schema, a tool, any free-form field), checked before anything walks it recursively.
MAX_JSON_DEPTH = 64


class Range(NamedTuple):
    """The values one numeric field takes: low..high (None: unbounded), low itself excluded when low_open."""

    low: Optional[float]
    high: Optional[float] = None
    low_open: bool = False

    def __contains__(self, value: object) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low_ok and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.low_open:
            return f"in ({self.low}, {self.high}]"
        if self.high is None:
            return f"at least {self.low}"
        return f"between {self.low} and {self.high}"


# The range of every numeric field, said once: SamplingParams checks it, the HTTP schema publishes it.
RANGES: dict[str, Range] = {
    "n": Range(1, MAX_N),
    "temperature": Range(0.0),
    "top_p": Range(0.0, 1.0, low_open=True),
    "top_k": Range(-1, MAX_TOKENS),  # -1 and 0: no top-k
    "min_p": Range(0.0, 1.0),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "repetition_penalty": Range(0.0, 2.0, low_open=True),
    "logit_bias": Range(-100.0, 100.0),
    "token_id": Range(0, MAX_TOKEN_ID),
    "seed": Range(-MAX_SEED, MAX_SEED),
    "max_tokens": Range(1, MAX_TOKENS),
    "min_tokens": Range(0, MAX_TOKENS),
    "logprobs": Range(0, MAX_LOGPROBS),
    "prompt_logprobs": Range(0, MAX_LOGPROBS),
    "priority": Range(-MAX_PRIORITY, MAX_PRIORITY),
}


def _shown(value: object) -> str:
    """A value for an error message: huge integers by size (their digits would swamp the message)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_range(name: str, value: Any, key: Optional[str] = None) -> None:
    """ValueError naming `name` when value is outside RANGES[key or name]."""
    allowed = RANGES[key or name]
    if value not in allowed:
        raise ValueError(f"{name} must be {allowed}, got {_shown(value)}")


def _check_number(name: str, value: object, key: Optional[str] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    check_range(name, value, key)


def _check_int(name: str, value: object, allow_none: bool = False, key: Optional[str] = None) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_shown(value)}")
    check_range(name, value, key)


def check_text(name: str, text: str) -> None:
    """ValueError naming the field when text holds a lone surrogate (JSON's "\\ud800"): no tokenizer, encoder
    or grammar compiler takes one, and an error that echoed it could not be sent either."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} must be valid Unicode text; it holds a lone surrogate at character "
                         f"{e.start}") from None


_WALKED = (str, dict, list, tuple)
_WALKED_TYPES = frozenset(_WALKED)


def _path_key(key: object) -> str:
    """A dict key as a step of an error's path (a key too long or too odd to echo is elided)."""
    text = str(key)
    return text if len(text) <= 64 and text.isascii() and text.isprintable() else "<key>"


def check_json_value(name: str, value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """ValueError naming the place when a JSON value nests deeper than max_depth or holds text (a key or a
    string) that is not valid Unicode. Iterative, so a hostile depth cannot exhaust the stack: run it before
    anything walks the value recursively (json.dumps, a schema compiler, a chat template)."""
    if not isinstance(value, _WALKED):
        return
    stack: list[tuple[str, Any, int]] = [(name, value, 0)]
    while stack:
        path, item, depth = stack.pop()
        if isinstance(item, str):
            check_text(path, item)
            continue
        if depth >= max_depth:
            raise ValueError(f"{name} is nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str):
                    check_text(f"{path} (a key)", key)
                if isinstance(child, _WALKED):
                    stack.append((f"{path}.{_path_key(key)}", child, depth + 1))
        elif not _WALKED_TYPES.isdisjoint(map(type, item)):  # a list of numbers (a token-id prompt) is skipped fast
            stack.extend((f"{path}.{i}", child, depth + 1) for i, child in enumerate(item)
                         if isinstance(child, _WALKED))


def check_json_text(name: str, text: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """check_json_value for JSON text, before json.loads (which recurses): brackets outside strings are
    counted, not parsed, in a few vectorized passes (a body of megabytes takes milliseconds)."""
    check_text(name, text)
    if text.count("[") + text.count("{") <= max_depth:
        return
    import numpy as np

    # Escaped backslashes, then escaped quotes, go first (a backslash outside a string ends json.loads' parse
    # anyway): every quote left opens or closes a string.
    raw = np.frombuffer(text.replace("\\\\", "").replace('\\"', "").encode(), dtype=np.uint8)
    quote = raw == ord('"')
    in_string = np.bitwise_xor.accumulate(quote.view(np.uint8)).view(bool) | quote
    step = ((raw == ord("[")) | (raw == ord("{"))).astype(np.int32) - ((raw == ord("]")) | (raw == ord("}")))
    step[in_string] = 0
    if int(np.cumsum(step).max()) > max_depth:
        raise ValueError(f"{name} is nested deeper than {max_depth} levels")


MAX_CHOICES = 1024
MAX_STRUCTURED_SPEC_CHARS = 256 * 1024  # a schema, regex or grammar (as text) of at most this many characters

STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output to a grammar (vLLM's name). Exactly one of the fields is set.

    json: a JSON schema (dict or its JSON text); regex: a regular expression the whole output matches;
    choice: the output is one of these strings; grammar: a Lark grammar (or GBNF, recognised by `::=`);
    json_object: any JSON object. The grammar itself is checked by the engine (pagellm.structured_output),
    which raises a ValueError starting with `structured_outputs` when it does not compile.
    """

    json: Optional[Union[str, dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    # Compact JSON (no whitespace between tokens): small models otherwise may emit whitespace forever.
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        name = "structured_outputs"
        if self.json_object is False:
            self.json_object = None
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, (list, tuple)):
                raise ValueError(f"{name}.choice must be a list of strings, got {_shown(self.choice)}")
            self.choice = list(self.choice)
            if not self.choice:
                raise ValueError(f"{name}.choice must not be empty")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"{name}.choice may hold at most {MAX_CHOICES} strings")
            for c in self.choice:
                if not isinstance(c, str):
                    raise ValueError(f"{name}.choice must be a list of strings, got {_shown(c)}")
        set_fields = [k for k in STRUCTURED_KINDS if getattr(self, k) is not None]
        if len(set_fields) != 1:
            raise ValueError(f"{name}: set exactly one of {', '.join(STRUCTURED_KINDS)}, got "
                             f"{', '.join(set_fields) or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"{name}.json must be a JSON schema (an object or its JSON text), got "
                             f"{type(self.json).__name__}")
        for k in ("regex", "grammar"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name}.{k} must be a non-empty string, got {_shown(v)}")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"{name}.json_object must be a boolean, got {_shown(self.json_object)}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"{name}.disable_any_whitespace must be a boolean")
        self._check_text_and_depth()
        kind, spec = self.key()
        if len(spec) > MAX_STRUCTURED_SPEC_CHARS:
            raise ValueError(f"{name}.{kind} is too large ({len(spec)} characters; at most "
                             f"{MAX_STRUCTURED_SPEC_CHARS})")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "StructuredOutputsParams":
        """From a dict of fields; an unknown field is a ValueError naming it, not a TypeError."""
        known = cls.__dataclass_fields__
        unknown = [k for k in spec if k not in known]
        if unknown:
            raise ValueError(f"structured_outputs: unknown field {_path_key(unknown[0])}; the fields are "
                             f"{', '.join(known)}")
        return cls(**spec)

    def _check_text_and_depth(self) -> None:
        """Before key() parses or dumps the spec: valid Unicode, bounded size and nesting."""
        name = "structured_outputs"
        for kind in ("json", "regex", "grammar"):
            value = getattr(self, kind)
            if isinstance(value, str) and len(value) > MAX_STRUCTURED_SPEC_CHARS:
                raise ValueError(f"{name}.{kind} is too large ({len(value)} characters; at most "
                                 f"{MAX_STRUCTURED_SPEC_CHARS})")
        if isinstance(self.json, str):
            check_json_text(f"{name}.json", self.json)
        elif self.json is not None:
            check_json_value(f"{name}.json", self.json)
        for kind in ("regex", "grammar"):
            if getattr(self, kind) is not None:
                check_text(f"{name}.{kind}", getattr(self, kind))
        for c in self.choice or ():
            check_text(f"{name}.choice", c)

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): the grammar cache's key."""
        import json as _json

        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = _json.loads(self.json)
                except _json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e.msg} at line {e.lineno}, "
                                     f"column {e.colno}") from None
                if not isinstance(schema, (dict, bool)):
                    raise ValueError("structured_outputs.json must be a JSON object (a schema)")
            else:
                schema = self.json
            try:
                text = _json.dumps(schema, sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError) as e:
                raise ValueError(f"structured_outputs.json is not JSON-serializable: {e}") from None
            return ("json" if self.disable_any_whitespace else "json_ws", text)
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", _json.dumps(self.choice))
        if self.grammar is not None:
            return ("grammar", self.grammar)
        return ("json_object" if self.disable_any_whitespace else "json_object_ws", "")


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name of StructuredOutputsParams (`SamplingParams(guided_decoding=...)`). Its backend and
    tuning fields are accepted and ignored: the grammars run on llguidance, compact JSON unless
    disable_any_whitespace is False."""

    backend: Optional[str] = None
    whitespace_pattern: Optional[str] = None
    disable_fallback: bool = False
    disable_additional_properties: bool = False

    def as_structured_outputs(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json, regex=self.regex, choice=self.choice, grammar=self.grammar,
                                       json_object=self.json_object,
                                       disable_any_whitespace=self.disable_any_whitespace)


@dataclass
class SamplingParams:
    """Sampling options of one request, with vLLM's names and defaults."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: Optional[StructuredOutputsParams] = None
    # vLLM's older name of structured_outputs: moved there on construction (never travels to the core).
    guided_decoding: Optional[StructuredOutputsParams] = None
    # Sample best_of sequences and return the n of the highest cumulative logprob (None: n). Whole outputs only
    # (not with streaming); the engine computes the sampled tokens' logprobs for it.
    best_of: Optional[int] = None
    # Filled by the engine: EOS and the generation config's extra stop tokens, never by the user.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"logit_bias must map token ids to numbers, got {_shown(self.logit_bias)}") \
                    from None
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("guided_decoding: set structured_outputs or guided_decoding (its older name), "
                                 "not both")
            guided, self.guided_decoding = self.guided_decoding, None
            if isinstance(guided, dict):
                guided = GuidedDecodingParams.from_dict(guided)
            if isinstance(guided, GuidedDecodingParams):
                guided = guided.as_structured_outputs()
            self.structured_outputs = guided
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                    StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        _check_int("n", self.n)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, key="n")
            if self.best_of < self.n:
                raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _check_number(name, getattr(self, name))
        _check_int("top_k", self.top_k)
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
            for tok, bias in self.logit_bias.items():
                _check_int("logit_bias token ids", tok, key="token_id")
                _check_number("logit_bias values", bias, key="logit_bias")
        _check_int("seed", self.seed, allow_none=True)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be strings, got {_shown(s)}")
            if not s:
                raise ValueError("stop must not contain empty strings")
            if len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(f"stop strings may be at most {MAX_STOP_STRING_LEN} characters long")
            check_text("stop", s)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, key="token_id")
        _check_int("max_tokens", self.max_tokens, allow_none=True)
        _check_int("min_tokens", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            _check_int(name, getattr(self, name), allow_none=True)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {_shown(getattr(self, name))}")

    @property
    def num_sequences(self) -> int:
        """Sequences the engine samples for this request: best_of (then the n best are returned), else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below float noise) means argmax."""
        return self.temperature < 1e-5

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
