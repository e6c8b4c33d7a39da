"""Images in chat through the server with the openai SDK: a tiny LLaVA-1.5 answers an image_url part (data: URL
or an allowed local file) with transformers' greedy tokens, streamed and not; bad image parts are 400s naming
the part, and a good request running beside them is answered."""

from __future__ import annotations

import asyncio
import base64

import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer
from tests.multimodal.helpers import IMAGE_TOKEN_ID, data_url, image, load_reference, make_tiny_llava, \
    png_bytes, reference_greedy

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    folder = make_tiny_llava(str(tmp_path_factory.mktemp("server-llava")))
    media = tmp_path_factory.mktemp("media")
    image(21).save(media / "cat.png")
    args = [folder, "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", str(16 * 2**20),
            "--served-model-name", "llava", "--limit-mm-per-prompt", '{"image": 2}',
            "--allowed-local-media-path", str(media)]
    with RemoteServer(args) as server:
        yield folder, media, server


def _messages(url: str, text: str = "w40 w41") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def _expected_text(folder: str, text: str, img) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode(f"USER: {text}\n<image> ASSISTANT:")
    slot = ids.index(IMAGE_TOKEN_ID)
    ids = ids[:slot] + [IMAGE_TOKEN_ID] * 16 + ids[slot + 1:]
    return tok.decode(reference_greedy(load_reference(folder), folder, ids, [img], MAX_TOKENS),
                      skip_special_tokens=True)


def test_chat_with_an_image_streamed_and_not(vision_server):
    folder, media, server = vision_server
    client = server.client()
    expected = _expected_text(folder, "w40 w41", image(20))
    answer = client.chat.completions.create(model="llava", messages=_messages(data_url(image(20))),
                                            max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.content.strip() == expected  # (a word-level tokenizer: a leading space)
    assert answer.usage.prompt_tokens == 3 + 16 + 1  # USER: w40 w41, the image's 16 tokens, ASSISTANT:
    chunks = client.chat.completions.create(model="llava", messages=_messages(data_url(image(20))),
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    local = client.chat.completions.create(model="llava", messages=_messages(f"file://{media}/cat.png"),
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert local.choices[0].message.content.strip() == _expected_text(folder, "w40 w41", image(21))


def test_bad_image_parts_are_400s_naming_the_part(vision_server):
    from PIL import Image

    folder, media, server = vision_server
    field = "messages[0].content[1].image_url"
    huge = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (4200, 4200)))).decode()
    cases = {
        "data:image/png;base64,%%%": (field, "not valid base64"),
        "data:image/png;base64," + base64.b64encode(b"GIF89a but not really").decode(): (field, "not a readable"),
        huge: (field, "4200x4200 pixels"),
        "file:///etc/hostname": (field, "outside the allowed local media path"),
        "https://example.com/cat.png": (field, "--allowed-media-domains"),
    }
    client = server.client()

    async def run_all():
        aclient = server.async_client()
        good = aclient.chat.completions.create(model="llava", messages=_messages(data_url(image(22))),
                                               max_tokens=MAX_TOKENS, temperature=0)
        bad = [aclient.chat.completions.create(model="llava", messages=_messages(url), max_tokens=2)
               for url in cases]
        return await asyncio.gather(good, *bad, return_exceptions=True)

    good, *errors = asyncio.run(run_all())
    assert good.choices[0].message.content.strip() == _expected_text(folder, "w40 w41", image(22))
    for (param, message), err in zip(cases.values(), errors):
        assert isinstance(err, openai.BadRequestError), err
        assert err.body["param"] == "messages" and err.body["message"].startswith(param + ": "), err.body
        assert message in err.body["message"], err.body
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image(i))}}
                                          for i in range(3)]}]
    with pytest.raises(openai.BadRequestError, match="3 images in one prompt"):
        client.chat.completions.create(model="llava", messages=three, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llava", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}])
    assert e.value.body["param"] == "messages"
    assert server.proc.poll() is None  # nothing crashed


def test_a_model_without_images_refuses_image_parts():
    """The chat handler of a text-only model: an image part is a 400 naming it (no server needed)."""
    from types import SimpleNamespace

    from pagellm.entrypoints.openai.protocol import ChatMessage
    from pagellm.entrypoints.openai.serving_engine import APIError, OpenAIServing

    serving = OpenAIServing.__new__(OpenAIServing)
    serving.engine = SimpleNamespace(processor=SimpleNamespace(mm=None))
    message = ChatMessage.model_validate(_messages(data_url(image(1)))[0])
    with pytest.raises(APIError) as e:
        serving.chat_messages([message])
    assert e.value.param == "messages"
    assert str(e.value).startswith("messages[0].content[1].image_url: this model does not take images")
