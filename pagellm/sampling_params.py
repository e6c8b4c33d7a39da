"""SamplingParams: how one request turns logits into tokens, validated on construction.

Every invalid field raises a ValueError whose message starts with the field's name, so the HTTP layer can
turn it into a 400 that names the parameter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Union

# Caps that keep one request from costing the engine unbounded work.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_SEED = 2**63 - 1


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


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
                raise ValueError(f"{name}.choice must be a list of strings, got {self.choice!r}")
            self.choice = list(self.choice)
            if not self.choice:
                raise ValueError(f"{name}.choice must not be empty")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"{name}.choice may hold at most {MAX_CHOICES} strings")
            for c in self.choice:
                if not isinstance(c, str):
                    raise ValueError(f"{name}.choice must be a list of strings, got {c!r}")
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
                raise ValueError(f"{name}.{k} must be a non-empty string, got {v!r}")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError(f"{name}.json_object must be a boolean, got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"{name}.disable_any_whitespace must be a boolean")
        kind, spec = self.key()
        if len(spec) > MAX_STRUCTURED_SPEC_CHARS:
            raise ValueError(f"{name}.{kind} is too large ({len(spec)} characters; at most "
                             f"{MAX_STRUCTURED_SPEC_CHARS})")

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): the grammar cache's key."""
        import json as _json

        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = _json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
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
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                    StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        _check_int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {self.n}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _check_number(name, getattr(self, name))
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
            for tok, bias in self.logit_bias.items():
                _check_number("logit_bias", bias)
                if tok < 0:
                    raise ValueError(f"logit_bias token ids must be non-negative, got {tok}")
                if not -100.0 <= bias <= 100.0:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        _check_int("seed", self.seed, allow_none=True)
        if self.seed is not None and not -MAX_SEED <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be strings, got {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings")
            if len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(f"stop strings may be at most {MAX_STOP_STRING_LEN} characters long")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t)
            if t < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {t}")
        _check_int("max_tokens", self.max_tokens, allow_none=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check_int(name, value, allow_none=True)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below float noise) means argmax."""
        return self.temperature < 1e-5

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
