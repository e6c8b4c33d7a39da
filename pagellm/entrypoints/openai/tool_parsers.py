"""Tool calling: the model's text -> OpenAI tool calls, and the grammars that force a call.

Parsers (`--tool-call-parser`, used when tool_choice is "auto"):
- hermes: Hermes / Qwen 2.5 / Qwen 3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of
  them, possibly after some content.
- llama3_json: Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several separated by `;`.

tool_choice "required" and a named function are enforced by a JSON-schema grammar built from the functions'
parameters, held to their schema as OpenAI's strict mode does (an object takes no keys beyond its properties
unless its schema says `additionalProperties`), so the arguments always parse and match the schema. Near
max_tokens the engine closes the JSON (structured_output's closer), so a required call is always whole.

With no --tool-call-parser, the parser comes from the chat template (infer_tool_parser).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from pagellm.sampling_params import check_json_text


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _loads(text: str) -> Any:
    """json.loads of model output, its depth checked first: a model may write brackets deeper than json.loads
    can recurse. ValueError when too deep or not JSON."""
    check_json_text("tool call", text)
    return json.loads(text)


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


def _call_from(obj: Any, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> Optional[ParsedToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = {}
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models put the JSON text in a string
        try:
            args = _loads(args)
        except ValueError:
            pass
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    name = ""
    # While streaming: once this marker shows up, the rest is tool calls (None: decided by the first character).
    start_marker: Optional[str] = None

    def extract(self, text: str) -> tuple[Optional[str], list[ParsedToolCall]]:
        """(content, tool calls) of a whole model output; no calls: (text, [])."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    start_marker = "<tool_call>"
    _pattern = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[Optional[str], list[ParsedToolCall]]:
        if self.start_marker not in text:
            return text, []
        calls = []
        for m in self._pattern.finditer(text):
            try:
                call = _call_from(_loads(m.group(1)))
            except ValueError:
                call = None
            if call is not None:
                calls.append(call)
        if not calls:
            return text, []
        content = text[: text.index(self.start_marker)].strip()
        return content or None, calls


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    python_tag = "<|python_tag|>"

    def is_tool_text(self, text: str) -> bool:
        stripped = text.lstrip()
        return stripped.startswith("{") or stripped.startswith(self.python_tag)

    def extract(self, text: str) -> tuple[Optional[str], list[ParsedToolCall]]:
        if not self.is_tool_text(text):
            return text, []
        body = text.lstrip()
        if body.startswith(self.python_tag):
            body = body[len(self.python_tag):]
        try:
            check_json_text("tool call", body)
        except ValueError:
            return text, []
        decoder = json.JSONDecoder()
        calls: list[ParsedToolCall] = []
        pos = 0
        while True:
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
            if pos >= len(body):
                break
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except ValueError:
                break
            call = _call_from(obj, ("parameters", "arguments"))
            if call is None:
                break
            calls.append(call)
        if not calls:
            return text, []
        return None, calls


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def infer_tool_parser(template: str) -> Optional[str]:
    """The parser of the tool calls a chat template teaches the model to write; None when its format is not
    one of ours. A template that does not read tools gets them in the Hermes format (chat_utils): hermes."""
    from pagellm.entrypoints.chat_utils import template_declares_tools

    if not template_declares_tools(template) or "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return "llama3_json"
    return None


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser: unknown parser {name!r} (known: {', '.join(TOOL_PARSERS)})")
    return TOOL_PARSERS[name]()


# ---- tools and tool_choice ----


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """The request's tools, checked: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list")
    if len(tools) > 128:
        raise ValueError("tools: at most 128 tools")
    names = set()
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError("tools: each tool must be {\"type\": \"function\", \"function\": {...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ValueError(f"tools: function names must be 1-64 letters, digits, _ . or -, got {name!r}")
        if name in names:
            raise ValueError(f"tools: function {name!r} is defined twice")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools: the parameters of {name!r} must be a JSON schema object")
    return tools


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The grammar's schema of a tool's arguments: its parameters, strict (see strict_schema)."""
    params = tool["function"].get("parameters")
    return strict_schema(params) if params else {"type": "object", "properties": {}, "additionalProperties": False}


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def strict_schema(schema: Any) -> Any:
    """A copy of a JSON schema in which every object schema that does not say additionalProperties has it
    false, as OpenAI's strict mode: a model held to it cannot add keys the function does not declare."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(sub) for sub in out[key]]
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    return out


def named_tool(tools: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any]:
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ValueError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                         "{\"name\": ...}}")
    for t in tools:
        if t["function"]["name"] == name:
            return t
    raise ValueError(f"tool_choice: function {name!r} is not among the tools")


def required_schema(tools: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """A JSON array of one or more calls [{"name": ..., "parameters": {...}}] of the given tools."""
    items = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                       "parameters": parameters_schema(t)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class RequiredCallStream:
    """Reads an output generated under `required_schema` as it grows: [{"name": N, "parameters": {...}}, ...].

    A call's name is known as soon as its "name" string closes, and its arguments (the raw JSON text of
    "parameters") grow fragment by fragment: streamed as OpenAI streams tool calls, a name first, then the
    arguments in pieces. The grammar fixes the key order and that parameters is an object.
    """

    _HEAD = re.compile(r'\s*[\[,]\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:')
    _CLOSE = re.compile(r"\s*\}")

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # the first character not read yet
        self.state = "head"  # head | args | close
        self.depth = 0
        self.in_str = self.escape = False
        self.calls: list[ParsedToolCall] = []
        self.num_complete = 0  # calls whose object has closed

    def feed(self, delta: str) -> list[tuple[int, Optional[str], str]]:
        """What `delta` adds: (call index, its name when the call is new else None, new arguments text)."""
        self.text += delta
        events: list[tuple[int, Optional[str], str]] = []
        text = self.text
        while True:
            if self.state == "head":
                m = self._HEAD.match(text, self.pos)
                if m is None:
                    break
                self.calls.append(ParsedToolCall(json.loads(m.group(1)), ""))
                self.pos, self.state, self.depth = m.end(), "args", 0
                events.append((len(self.calls) - 1, self.calls[-1].name, ""))
            elif self.state == "args":
                start, end = self.pos, None
                if self.depth == 0:  # blanks before the value are not part of it
                    while start < len(text) and text[start] in " \t\r\n":
                        start += 1
                for i in range(start, len(text)):
                    ch = text[i]
                    if self.in_str:
                        if self.escape:
                            self.escape = False
                        elif ch == "\\":
                            self.escape = True
                        elif ch == '"':
                            self.in_str = False
                    elif ch == '"':
                        self.in_str = True
                    elif ch in "{[":
                        self.depth += 1
                    elif ch in "}]":
                        self.depth -= 1
                        if self.depth == 0:
                            end = i + 1
                            break
                stop = len(text) if end is None else end
                if stop > start:
                    self.calls[-1].arguments += text[start:stop]
                    events.append((len(self.calls) - 1, None, text[start:stop]))
                self.pos = stop
                if end is None:
                    break
                self.state = "close"
            else:  # the call object's closing brace
                m = self._CLOSE.match(text, self.pos)
                if m is None:
                    break
                self.pos, self.state = m.end(), "head"
                self.num_complete += 1
        return events


def parse_required(text: str) -> list[ParsedToolCall]:
    """The calls of a whole output generated under `required_schema`, each call's arguments the raw JSON text
    the model wrote (as streamed). ValueError if the output is not whole (cut by max_tokens)."""
    value = _loads(text)
    reader = RequiredCallStream()
    reader.feed(text)
    if not isinstance(value, list) or reader.num_complete != len(value):
        raise ValueError("not an array of tool calls")
    return reader.calls


def hermes_tool_call_text(name: str, arguments: Any) -> str:
    """An assistant's tool call written back into a prompt whose chat template does not render tool_calls."""
    if isinstance(arguments, str):
        try:
            arguments = _loads(arguments)
        except ValueError:
            pass
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + \
        "\n</tool_call>"


class StreamingToolState:
    """Splits a streamed auto-tool-choice output into content deltas and complete tool calls.

    Content is sent as it comes, except text that may be the start of a tool call (held back until it is
    known). Each tool call is sent when it is complete: one delta with its id, type and function name (and
    empty arguments), then one with the arguments.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_content = 0  # characters of text sent as content
        self.in_tools = False
        self.calls_sent = 0

    def feed(self, delta: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        """New content to send, and new complete tool calls."""
        self.text += delta
        content = ""
        if not self.in_tools:
            marker = self.parser.start_marker
            if marker is not None:
                pos = self.text.find(marker, self.sent_content)
                if pos >= 0:
                    self.in_tools = True
                    end = pos
                else:
                    end = len(self.text)
                    if not final:  # hold back a possible marker's prefix
                        for k in range(min(len(marker) - 1, len(self.text) - self.sent_content), 0, -1):
                            if self.text.endswith(marker[:k]):
                                end -= k
                                break
            else:  # llama3_json: the first non-blank character decides
                stripped = self.text.lstrip()
                if not stripped:
                    end = self.sent_content if not final else len(self.text)
                elif self.sent_content == 0 and self.parser.is_tool_text(stripped):
                    self.in_tools = True
                    end = 0
                elif self.sent_content == 0 and not final and self.parser.python_tag.startswith(stripped):
                    end = 0  # maybe <|python_tag|>
                else:
                    end = len(self.text)
            content = self.text[self.sent_content:end]
            self.sent_content = end
        calls: list[ParsedToolCall] = []
        if self.in_tools:
            tool_text = self.text[self.sent_content:]
            if isinstance(self.parser, HermesToolParser):
                closed = tool_text.count("</tool_call>")
                _, parsed = self.parser.extract(tool_text)
                ready = len(parsed) if final else min(closed, len(parsed))
            else:
                _, parsed = self.parser.extract(tool_text)
                ready = len(parsed) if final else 0
            calls = parsed[self.calls_sent:ready]
            self.calls_sent = max(self.calls_sent, ready)
        return content, calls
