"""vLLM's prompt types: `llm.generate(TokensPrompt(prompt_token_ids=[...]))`. Plain dicts, as the engine's
processor reads them (a str or a list of token ids works as well)."""

from __future__ import annotations

from typing import Sequence, TypedDict, Union


class TextPrompt(TypedDict):
    """A text prompt, tokenized by the engine."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    """A prompt already tokenized; `prompt` (its text, optional) is only handed back in the output."""

    prompt: str


PromptType = Union[str, list[int], TextPrompt, TokensPrompt]


def as_prompt_list(prompts: Union[PromptType, Sequence[PromptType]]) -> list[PromptType]:
    """One prompt or many: a str, a token-id list, or a dict is one prompt."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]
    return prompts


__all__ = ["TextPrompt", "TokensPrompt", "PromptType", "as_prompt_list"]
