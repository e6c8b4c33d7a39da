"""The media rules: data: URLs always, file:// only under the allowed folder, http(s) only for listed hosts, and
caps on bytes and pixels; every refusal a ValueError naming the field."""

from __future__ import annotations

import base64

import pytest

from pagellm.multimodal.media import MediaRules, load_image
from pagellm.multimodal.processing import parse_limit_mm_per_prompt
from tests.multimodal.helpers import data_url, image

FIELD = "messages[0].content[1].image_url"


def test_data_url_decodes_to_the_same_pixels():
    img = image(0, (9, 5))
    got = load_image(data_url(img), MediaRules(), FIELD)
    assert got.size == (9, 5) and got.tobytes() == img.tobytes()


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,not base64!", "not valid base64"),
    ("data:image/png," + "abc", "must be base64"),
    ("data:text/plain;base64," + base64.b64encode(b"hi").decode(), "must hold an image"),
    ("data:image/png;base64," + base64.b64encode(b"definitely not a png").decode(), "not a readable image"),
    ("ftp://example.com/cat.png", "unsupported URL scheme"),
    ("https://example.com/cat.png", "example.com is refused"),
    ("file:///etc/passwd", "file:// URLs are refused"),
    (42, "must be a data:"),
])
def test_bad_urls_name_the_field(url, message):
    with pytest.raises(ValueError, match=rf"^{FIELD.replace('[', '.').replace(']', '.')}: .*{message}"):
        load_image(url, MediaRules(), FIELD)


def test_caps_on_pixels_and_bytes():
    url = data_url(image(0, (64, 64)))
    with pytest.raises(ValueError, match=r"64x64 pixels, more than 1,000"):
        load_image(url, MediaRules(max_image_pixels=1000), FIELD)
    with pytest.raises(ValueError, match=r"more than 100 bytes"):
        load_image(url, MediaRules(max_image_bytes=100), FIELD)


def test_local_files_only_under_the_allowed_folder(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    image(1).save(allowed / "cat.png")
    image(1).save(tmp_path / "outside.png")
    rules = MediaRules(allowed_local_media_path=str(allowed))
    assert load_image(f"file://{allowed}/cat.png", rules, FIELD).size == (40, 52)
    for url in (f"file://{tmp_path}/outside.png", f"file://{allowed}/../outside.png"):
        with pytest.raises(ValueError, match="outside the allowed local media path"):
            load_image(url, rules, FIELD)
    (allowed / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ValueError, match="outside the allowed local media path"):
        load_image(f"file://{allowed}/link.png", rules, FIELD)


def test_limit_mm_per_prompt_option():
    assert parse_limit_mm_per_prompt('{"image": 2}') == {"image": 2}
    assert parse_limit_mm_per_prompt(None) == {"image": 4}
    for bad in ('{"video": 1}', "[1]", '{"image": -1}', "{"):
        with pytest.raises(ValueError, match="^limit_mm_per_prompt"):
            parse_limit_mm_per_prompt(bad)


def test_http_only_from_listed_hosts_and_never_redirected_elsewhere():
    """A local HTTP server: 127.0.0.1 listed, its redirect to localhost (not listed) refused."""
    import http.server
    import threading

    from tests.multimodal.helpers import png_bytes

    body = png_bytes(image(2))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_port}/cat.png")
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        rules = MediaRules(allowed_media_domains=("127.0.0.1",))
        assert load_image(f"{base}/cat.png", rules, FIELD).tobytes() == image(2).tobytes()
        with pytest.raises(ValueError, match=r"redirects to localhost, which --allowed-media-domains"):
            load_image(f"{base}/elsewhere", rules, FIELD)
        with pytest.raises(ValueError, match=r"127.0.0.1 is refused"):
            load_image(f"{base}/cat.png", MediaRules(), FIELD)
    finally:
        server.shutdown()
