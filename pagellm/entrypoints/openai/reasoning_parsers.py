"""Reasoning models: the thinking (`<think>...</think>`) apart from the answer (`--reasoning-parser`).

- qwen3: Qwen3 (and QwQ-style) models write `<think>` first when they think; an output that does not start with
  it is all answer (e.g. with `chat_template_kwargs: {"enable_thinking": false}`, whose template closes the
  thinking in the prompt).
- deepseek_r1: DeepSeek-R1's template opens the thinking in the prompt, so the output starts inside it (a
  leading `<think>` is dropped if the model writes one anyway); everything up to `</think>` is thinking, and an
  output cut before `</think>` is all thinking.

The answer starts after `</think>` and its leading blank lines. One function (`split`) decides for a whole
output and for a stream alike, so the streamed deltas add up to the whole response.
"""

from __future__ import annotations

from typing import Optional

START, END = "<think>", "</think>"


def _held(text: str, marker: str) -> int:
    """How many characters at the end of text may be the start of marker (held back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningParser:
    name = ""
    starts_in_reasoning = False  # deepseek_r1: the prompt opened the thinking

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(thinking, answer) of the output so far: the parts safe to send now (a marker's possible beginning,
        or leading blanks that may precede one, are held back until final)."""
        stripped = text.lstrip()
        if not final and START.startswith(stripped) and stripped != START:
            return "", ""  # nothing yet, or maybe "<think>" still coming
        if stripped.startswith(START):
            body = stripped[len(START):]
        elif self.starts_in_reasoning:
            body = text
        else:
            return "", text
        end = body.find(END)
        if end < 0:
            return (body if final else body[:len(body) - _held(body, END)]), ""
        answer = body[end + len(END):].lstrip()
        return body[:end], answer

    def extract(self, text: str) -> tuple[Optional[str], Optional[str]]:
        """(reasoning_content, content) of a whole output; None where a part is empty."""
        thinking, answer = self.split(text, final=True)
        return thinking or None, answer or None


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {"qwen3": Qwen3ReasoningParser,
                                                       "deepseek_r1": DeepSeekR1ReasoningParser}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser: unknown parser {name!r} (known: {', '.join(REASONING_PARSERS)})")
    return REASONING_PARSERS[name]()


class ReasoningStream:
    """One streamed sequence: each feed gives the new thinking and the new answer text to send."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_thinking = 0
        self.sent_answer = 0

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        self.text += delta
        thinking, answer = self.parser.split(self.text, final)
        new_thinking, new_answer = thinking[self.sent_thinking:], answer[self.sent_answer:]
        self.sent_thinking, self.sent_answer = max(self.sent_thinking, len(thinking)), \
            max(self.sent_answer, len(answer))
        return new_thinking, new_answer
