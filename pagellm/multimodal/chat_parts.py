"""Chat messages with OpenAI content parts -> messages a chat template renders, and the images they hold.

An `image_url` part becomes the model's placeholder text (LLaVA's `<image>`) inside the message's text, in the
order of its parts, so any chat template (one that reads only string content too) puts the placeholder where
the image was; the processor later expands it into the image's tokens.
"""

from __future__ import annotations

from typing import Any, Optional


def split_image_parts(conversation: list[dict[str, Any]], placeholder: Optional[str],
                      field: str = "messages") -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
    """(messages with string content, [(image url, its field name)] in order). `placeholder` None: the model
    takes no images, and an image part is a ValueError naming it."""
    out: list[dict[str, Any]] = []
    urls: list[tuple[Any, str]] = []
    for i, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        texts: list[str] = []
        for j, part in enumerate(content):
            where = f"{field}[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if placeholder is None:
                    raise ValueError(f"{where}.image_url: this model does not take images")
                urls.append((url, f"{where}.image_url"))
                texts.append(placeholder)
            else:
                raise ValueError(f"{where}.type: content parts must be text or image_url, got {kind!r}")
        out.append({**message, "content": "\n".join(texts)})
    return out, urls
