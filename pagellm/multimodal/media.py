"""An image_url -> a decoded PIL image, under the engine's media rules (MediaRules).

data: URLs (base64) are always read; `file://` paths only inside `allowed_local_media_path`; http(s) only from
hosts listed in `allowed_media_domains` (none by default: the server never fetches on a client's say-so).
Every failure is a ValueError whose message starts with the field's name, so the server answers 400 with it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional

# Caps on one image: its encoded bytes and its decoded pixels (a small PNG can decode to gigabytes).
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MediaRules:
    """Where images may come from (EngineArgs' allowed_local_media_path / allowed_media_domains)."""

    allowed_local_media_path: Optional[str] = None
    allowed_media_domains: tuple[str, ...] = ()
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS


def load_image(url: Any, rules: MediaRules, field: str = "image_url") -> Any:
    """The RGB PIL image an image_url names (ValueError starting with `field`)."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"{field}: must be a data:, file:// or http(s):// URL string")
    if url.startswith("data:"):
        raw = _data_url_bytes(url, rules, field)
    elif url.startswith("file:"):
        raw = _local_file_bytes(url, rules, field)
    elif url.startswith(("http://", "https://")):
        raw = _fetch_bytes(url, rules, field)
    else:
        raise ValueError(f"{field}: unsupported URL scheme (data:, file:// or http(s):// only)")
    return decode_image(raw, rules, field)


def decode_image(raw: bytes, rules: MediaRules, field: str) -> Any:
    """Encoded image bytes -> an RGB PIL image, refusing more than max_image_pixels before decoding them."""
    from PIL import Image, UnidentifiedImageError

    if len(raw) > rules.max_image_bytes:
        raise ValueError(f"{field}: the image has {len(raw):,} bytes, more than {rules.max_image_bytes:,}")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size  # read from the header: nothing decoded yet
            if width * height > rules.max_image_pixels:
                raise ValueError(f"{field}: the image is {width}x{height} pixels, more than "
                                 f"{rules.max_image_pixels:,} in all")
            return img.convert("RGB")
    except ValueError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        raise ValueError(f"{field}: not a readable image (PNG, JPEG, WebP, GIF, ...)") from None


def _data_url_bytes(url: str, rules: MediaRules, field: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"{field}: a data: URL must be base64 (data:image/png;base64,...)")
    if not header[5:].startswith("image/"):
        raise ValueError(f"{field}: a data: URL must hold an image (data:image/...;base64,...)")
    if len(payload) > rules.max_image_bytes * 4 // 3 + 4:
        raise ValueError(f"{field}: the image is more than {rules.max_image_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: the data: URL is not valid base64") from None


def _local_file_bytes(url: str, rules: MediaRules, field: str) -> bytes:
    if rules.allowed_local_media_path is None:
        raise ValueError(f"{field}: file:// URLs are refused (the server was started without "
                         "--allowed-local-media-path)")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{field}: a file:// URL must name a local path")
    path = os.path.realpath(urllib.parse.unquote(parsed.path))
    root = os.path.realpath(rules.allowed_local_media_path)
    if os.path.commonpath([path, root]) != root:
        raise ValueError(f"{field}: the file is outside the allowed local media path")
    try:
        if os.path.getsize(path) > rules.max_image_bytes:
            raise ValueError(f"{field}: the file is more than {rules.max_image_bytes:,} bytes")
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        raise ValueError(f"{field}: cannot read the file") from None


def _fetch_bytes(url: str, rules: MediaRules, field: str) -> bytes:
    host = (urllib.parse.urlparse(url).hostname or "").lower()
    if host not in rules.allowed_media_domains:
        raise ValueError(f"{field}: fetching images from {host or 'that URL'} is refused (the server's "
                         "--allowed-media-domains does not list it)")
    opener = urllib.request.build_opener(_ListedHostsOnly(rules.allowed_media_domains, field))
    try:
        with opener.open(url, timeout=FETCH_TIMEOUT_S) as resp:  # host checked above, redirects by the handler
            raw = resp.read(rules.max_image_bytes + 1)
    except OSError as e:  # (a refused redirect is the handler's ValueError, which passes through)
        raise ValueError(f"{field}: cannot fetch the image ({type(e).__name__})") from None
    if len(raw) > rules.max_image_bytes:
        raise ValueError(f"{field}: the image is more than {rules.max_image_bytes:,} bytes")
    return raw


class _ListedHostsOnly(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a listed host (a listed host must not lead the server anywhere else)."""

    def __init__(self, hosts: tuple[str, ...], field: str) -> None:
        super().__init__()
        self.hosts, self.field = hosts, field

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        host = (urllib.parse.urlparse(newurl).hostname or "").lower()
        if host not in self.hosts or not newurl.startswith(("http://", "https://")):
            raise ValueError(f"{self.field}: the image URL redirects to {host or 'another scheme'}, which "
                             "--allowed-media-domains does not list")
        return super().redirect_request(req, fp, code, msg, headers, newurl)
