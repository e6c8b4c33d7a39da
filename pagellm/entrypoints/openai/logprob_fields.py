"""Logprobs as the OpenAI-compatible responses carry them: finite floats, and vLLM's prompt_logprobs field."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import PlainSerializer, WithJsonSchema

from pagellm.outputs import PositionLogprobs

# A logit_bias or prompt_logprobs key: a token id in decimal digits (int() would also take " 1", "1_0" and
# "\uff11").
TOKEN_ID_KEY = r"^[0-9]{1,10}$"

# JSON has no infinities: a token the sampler ruled out (logprob -inf) is reported at this floor, as vLLM does.
LOGPROB_FLOOR = -9999.0


def _finite_logprob(value: float) -> float:
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN and -inf fail the comparison


Logprob = Annotated[float, PlainSerializer(_finite_logprob, return_type=float)]

# vLLM's `prompt_logprobs` in a response: one entry per prompt position, null for the first (nothing predicts
# it), else token id (a decimal string key) -> {logprob, rank, decoded_token}: the prompt token and the top
# prompt_logprobs. Plain dicts (prompt_logprobs_field), not models: a long prompt has hundreds of thousands of
# entries, which pydantic models took seconds to build; the schema is published as written here.
_PROMPT_LOGPROB_SCHEMA = {"type": "array", "items": {"anyOf": [{"type": "null"}, {
    "type": "object", "propertyNames": {"pattern": TOKEN_ID_KEY}, "additionalProperties": {
        "type": "object", "required": ["logprob"], "properties": {
            "logprob": {"type": "number"}, "rank": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "decoded_token": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}}]}}
PromptLogprobs = Annotated[Optional[Any], WithJsonSchema({"anyOf": [_PROMPT_LOGPROB_SCHEMA, {"type": "null"}]})]


def prompt_logprobs_field(positions: list[Optional[PositionLogprobs]], k: int) -> list[Optional[dict[str, dict]]]:
    """A response's prompt_logprobs from the engine's: at each position the prompt token and the top k (the
    engine may have computed more, for echo's logprobs)."""
    result: list[Optional[dict[str, dict]]] = []
    for position in positions:
        if position is None:
            result.append(None)
            continue
        entries = {}
        for i, (tok, lp) in enumerate(position.items()):  # the prompt token first, then by rank
            if i == 0 or (lp.rank is not None and lp.rank <= k):
                entries[str(tok)] = {"logprob": _finite_logprob(lp.logprob), "rank": lp.rank,
                                     "decoded_token": lp.decoded_token}
        result.append(entries)
    return result
