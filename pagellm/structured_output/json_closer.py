"""The shortest text that completes a prefix of a JSON value: how a JSON request closes its JSON before
max_tokens cuts it.

`response_format: json_object` has no bounds, and a schema's strings, numbers and arrays may run on: a model
that keeps opening keys, strings or arrays would be cut by max_tokens with unparseable text. When a JSON
request's (json_object, json_schema, a required or named tool call) remaining tokens come close to what closing
takes, the structured-output manager forces, token by token, the completion computed here (ending the open
string, giving a pending key the value 0, closing every open container), or where the request's grammar wants
something else (a required key, an enum value) the allowed token that leaves the shortest completion. The
request then finishes with reason "stop" and stop_reason "json_closed", its JSON whole.
"""

from __future__ import annotations

from typing import Optional

_LITERALS = ("true", "false", "null")


def json_completion(text: str) -> Optional[str]:
    """The shortest suffix s such that text + s is one whole JSON value ("{}" for empty text); "" when text
    already is one; None when text is not a prefix of a JSON value (trailing text, a broken token)."""
    stack: list[str] = []  # open containers, "{" or "["
    # What the next significant character may be: value | value_or_close (after "[") | key | key_or_close
    # (after "{") | colon (after a key) | after_value
    state = "value"
    in_str = is_key = escape = False
    unicode_left = 0  # hex digits still owed by a \u escape
    number_tail: Optional[str] = None  # last character of a number in progress
    literal_left = ""  # letters still owed by true / false / null
    for ch in text:
        if in_str:
            if unicode_left:
                unicode_left -= 1
            elif escape:
                escape = False
                if ch == "u":
                    unicode_left = 4
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
                state = "colon" if is_key else "after_value"
            continue
        if literal_left:
            if ch != literal_left[0]:
                return None
            literal_left = literal_left[1:]
            if not literal_left:
                state = "after_value"
            continue
        if number_tail is not None:
            if ch in "0123456789+-.eE":
                number_tail = ch
                continue
            number_tail = None
            state = "after_value"  # and ch is read below
        if ch in " \t\n\r":
            continue
        if state in ("value", "value_or_close"):
            if ch == "]" and state == "value_or_close":
                stack.pop()
                state = "after_value"
            elif ch == "{":
                stack.append("{")
                state = "key_or_close"
            elif ch == "[":
                stack.append("[")
                state = "value_or_close"
            elif ch == '"':
                in_str, is_key = True, False
            elif ch in "-0123456789":
                number_tail = ch
            else:
                word = next((w for w in _LITERALS if w[0] == ch), None)
                if word is None:
                    return None
                literal_left = word[1:]
        elif state in ("key", "key_or_close"):
            if ch == "}" and state == "key_or_close":
                stack.pop()
                state = "after_value"
            elif ch == '"':
                in_str, is_key = True, True
            else:
                return None
        elif state == "colon":
            if ch != ":":
                return None
            state = "value"
        else:  # after_value
            if not stack:
                return None  # text after the whole value
            if ch == ",":
                state = "key" if stack[-1] == "{" else "value"
            elif (ch == "}" and stack[-1] == "{") or (ch == "]" and stack[-1] == "["):
                stack.pop()
            else:
                return None

    out = []
    if in_str:
        if unicode_left:
            out.append("0" * unicode_left)
        elif escape:
            out.append("n")
        out.append('"')
        state = "colon" if is_key else "after_value"
    elif literal_left:
        out.append(literal_left)
        state = "after_value"
    elif number_tail is not None:
        if number_tail in "+-.eE":  # "-", "1.", "1e", "1e+" still need a digit
            out.append("0")
        state = "after_value"
    if state == "colon":
        out.append(":0")
    elif state == "key":
        out.append('"":0')
    elif state == "value":
        out.append("{}" if not stack and not text.strip() else "0")
    elif state == "key_or_close":
        out.append("}")
        stack.pop()
    elif state == "value_or_close":
        out.append("]")
        stack.pop()
    out.extend("}" if c == "{" else "]" for c in reversed(stack))
    return "".join(out)
