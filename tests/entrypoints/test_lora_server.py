"""LoRA through the server with the openai SDK: adapters named at start and loaded at run time are listed in
/v1/models and chosen by the request's `model`; concurrent requests for different adapters and the base give
transformers' greedy tokens with each adapter merged; unloading removes one; bad adapters get HTTP 400 naming
the field; with runtime updating off the load route says how to turn it on."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer, tiny_args
from tests.lora.helpers import make_adapter, merged_reference
from tests.reference import hf_greedy, random_prompt

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def lora_setup(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("server-adapters")
    paths = {
        "all": make_adapter(str(root / "all"), base, rank=8, seed=11),
        "qv": make_adapter(str(root / "qv"), base, rank=4, seed=12, targets=["q_proj", "v_proj"]),
        "late": make_adapter(str(root / "late"), base, rank=8, seed=13, targets=["o_proj", "down_proj"]),
        "wide": make_adapter(str(root / "wide"), base, rank=16, seed=14),
    }
    args = tiny_args(base, "--served-model-name", "tiny", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                     "--lora-modules", f"all={paths['all']}", "--lora-modules", f"qv={paths['qv']}")
    with RemoteServer(args, env={"PAGELLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as server:
        yield base, paths, server


def _tokens(choice) -> list[int]:
    return [int(t.split(":", 1)[1]) for t in choice.logprobs.tokens]


def test_models_listed_and_chosen_by_model_field(lora_setup):
    base, paths, server = lora_setup
    client = server.client()
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "all", "qv"}
    assert models["all"].model_extra["parent"] == "tiny" and models["all"].model_extra["root"] == paths["all"]

    # load at run time, then several adapters and the base at once
    r = httpx.post(server.url("/v1/load_lora_adapter"), json={"lora_name": "late", "lora_path": paths["late"]})
    assert r.status_code == 200, r.text
    assert "late" in {m.id for m in client.models.list().data}
    names = ["tiny", "all", "qv", "late", "all", "tiny", "late", "qv"]
    prompts = [random_prompt(40 + i, 6 + 5 * i)["prompt_token_ids"] for i in range(len(names))]

    async def run_all():
        aclient = server.async_client()
        return await asyncio.gather(*(aclient.completions.create(
            model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
            for name, prompt in zip(names, prompts)))

    answers = asyncio.run(run_all())
    refs = {name: merged_reference(base, None if name == "tiny" else paths[name]) for name in set(names)}
    for name, prompt, answer in zip(names, prompts, answers):
        assert _tokens(answer.choices[0]) == hf_greedy(refs[name], prompt, MAX_TOKENS)[0], name
        assert answer.model == name  # the adapter's name, as vLLM answers

    # chat and completions share the lookup: an unknown model is a 404 naming the field
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=[5, 6], max_tokens=2)
    assert e.value.body["param"] == "model"

    r = httpx.post(server.url("/v1/unload_lora_adapter"), json={"lora_name": "late"})
    assert r.status_code == 200, r.text
    assert "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=[5, 6], max_tokens=2)
    r = httpx.post(server.url("/v1/unload_lora_adapter"), json={"lora_name": "late"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"


def test_bad_adapters_are_400_naming_the_field(lora_setup, tmp_path):
    _, paths, server = lora_setup
    load = server.url("/v1/load_lora_adapter")
    r = httpx.post(load, json={"lora_name": "gone", "lora_path": str(tmp_path / "missing")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    r = httpx.post(load, json={"lora_name": "wide", "lora_path": paths["wide"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "r", r.text
    assert "max_lora_rank 8" in r.json()["error"]["message"]
    r = httpx.post(load, json={"lora_name": "all", "lora_path": paths["all"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    r = httpx.post(load, json={"lora_name": "x"})
    assert r.status_code == 400 and "lora_path" in r.text


def test_runtime_updating_off_by_default(monkeypatch):
    """Without the env switch the load and unload routes refuse, saying how to turn them on (no server needed:
    the routes call ServingModels)."""
    from types import SimpleNamespace

    from pagellm.entrypoints.openai.serving_engine import APIError
    from pagellm.entrypoints.openai.serving_models import (LoadLoRAAdapterRequest, ServingModels,
                                                           UnloadLoRAAdapterRequest)
    from pagellm.lora.config import LoRAConfig

    for name in ("PAGELLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        monkeypatch.delenv(name, raising=False)
    models = ServingModels("tiny", SimpleNamespace(config=SimpleNamespace(lora_config=LoRAConfig())))
    for call in (lambda: models.load(LoadLoRAAdapterRequest(lora_name="a", lora_path="/nowhere")),
                 lambda: models.unload(UnloadLoRAAdapterRequest(lora_name="a"))):
        with pytest.raises(APIError) as e:
            call()
        assert e.value.status == 404 and "PAGELLM_ALLOW_RUNTIME_LORA_UPDATING=1" in e.value.message
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")  # vLLM's name works too
    with pytest.raises(APIError) as e:
        models.load(LoadLoRAAdapterRequest(lora_name="a", lora_path="/nowhere"))
    assert e.value.status == 400 and e.value.param == "lora_path"
    off = ServingModels("tiny", SimpleNamespace(config=SimpleNamespace(lora_config=None)))
    with pytest.raises(APIError, match="--enable-lora"):
        off.load(LoadLoRAAdapterRequest(lora_name="a", lora_path="/nowhere"))
