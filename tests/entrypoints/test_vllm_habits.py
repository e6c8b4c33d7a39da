"""The vLLM calls people already write, through `LLM` and the command line (issue 17): Hub ids, engine options
with vLLM's names, generation_config.json's defaults, TokensPrompt/TextPrompt, best_of, guided_decoding, chat's
tools/chat_template_kwargs/continue_final_message, lora_request, pagellm --version."""

from __future__ import annotations

import json
import shutil

import pytest

from pagellm import GuidedDecodingParams, SamplingParams
from pagellm.engine_args import EngineArgs
from pagellm.inputs import TextPrompt, TokensPrompt
from pagellm.lora.request import LoRARequest

GENERATION_CONFIG = {"temperature": 0.0, "top_p": 0.9, "top_k": 7, "repetition_penalty": 1.1,
                     "max_new_tokens": 5, "do_sample": True, "eos_token_id": 2}


@pytest.fixture(scope="module")
def model_with_defaults(tiny_so_model, tmp_path_factory) -> str:
    """The tiny random model (SmolLM2's tokenizer) with a generation_config.json of sampling defaults."""
    folder = tmp_path_factory.mktemp("tiny-gen-config") / "model"
    shutil.copytree(tiny_so_model, folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return str(folder)


@pytest.fixture(scope="module")
def llm(model_with_defaults):
    from pagellm import LLM

    return LLM(model_with_defaults, dtype="float32", max_model_len=512, kv_cache_memory=32 * 2**20,
               trust_remote_code=True, enable_chunked_prefill=True, runner="generate")


# ---- Hub ids ----


def _fake_hub(monkeypatch, download):
    """snapshot_download: never cached locally; `download` stands for the network's answer."""
    import huggingface_hub

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not in the cache")
        return download(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # tests/conftest.py sets it


def test_hub_id_downloads_config_tokenizer_and_safetensors(monkeypatch, tiny_so_model):
    from pagellm.model_executor.loader.source import resolve_model_source

    asked = {}

    def download(repo_id, allow_patterns=None, **kwargs):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return tiny_so_model

    _fake_hub(monkeypatch, download)
    source = resolve_model_source("SomeOrg/some-model")
    assert source.kind == "hf" and source.path == tiny_so_model and source.display_name == "SomeOrg/some-model"
    assert asked["repo_id"] == "SomeOrg/some-model"
    for needed in ("*.json", "*.safetensors"):
        assert needed in asked["allow_patterns"]
    assert not any(p.endswith((".bin", ".gguf", ".pt")) for p in asked["allow_patterns"])


def test_hub_errors_say_which(monkeypatch):
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    from pagellm.model_executor.loader.source import resolve_model_source

    def unknown(repo_id, **kwargs):
        raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "http://h")))

    _fake_hub(monkeypatch, unknown)
    with pytest.raises(ValueError, match="Hub does not know it"):
        resolve_model_source("SomeOrg/no-such-model")

    def unreachable(repo_id, **kwargs):
        try:
            raise httpx.ConnectError("Name or service not known")
        except httpx.ConnectError as e:
            raise LocalEntryNotFoundError("cannot find the snapshot") from e

    _fake_hub(monkeypatch, unreachable)
    with pytest.raises(ValueError, match="Hub is unreachable .*ConnectError"):
        resolve_model_source("SomeOrg/some-model")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        resolve_model_source("SomeOrg/some-model")


# ---- engine options and the command line ----


def test_engine_options_with_vllms_names():
    with pytest.raises(ValueError, match="enable_chunked_prefill: pagellm always chunks"):
        EngineArgs(enable_chunked_prefill=False)._validate()
    with pytest.raises(ValueError, match="runner must be one of auto, generate, pooling"):
        EngineArgs(runner="classify")._validate()
    EngineArgs(runner="pooling")._validate()
    EngineArgs(enable_chunked_prefill=True, runner="auto", trust_remote_code=True)._validate()


def test_model_flag_and_version(capsys):
    from pagellm.entrypoints.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--model", "some/model", "--generation-config", "vllm"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.model == "some/model" and engine_args.generation_config == "vllm"
    assert EngineArgs.from_cli_args(build_parser().parse_args(["serve", "positional"])).model == "positional"
    with pytest.raises(ValueError, match="model: given twice"):
        EngineArgs.from_cli_args(build_parser().parse_args(["serve", "a", "--model", "b"]))
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    import pagellm

    assert capsys.readouterr().out.strip() == f"pagellm {pagellm.__version__}"


# ---- generation defaults ----


def test_generation_config_defaults(llm, model_with_defaults):
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty,
            defaults.max_tokens) == (0.0, 0.9, 7, 1.1, 5)
    out = llm.generate(["hello there", "x y z"], use_tqdm=False)  # no sampling_params: the model's defaults
    explicit = llm.generate(["hello there", "x y z"], defaults, use_tqdm=False)
    for a, b in zip(out, explicit):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.outputs[0].token_ids) <= 5
    assert any(len(a.outputs[0].token_ids) == 5 for a in out)


def test_generation_config_vllm_turns_them_off(model_with_defaults):
    args = EngineArgs(model=model_with_defaults, generation_config="vllm", load_format="dummy")
    assert args.create_engine_config().model_config.sampling_defaults == {}
    auto = EngineArgs(model=model_with_defaults, load_format="dummy").create_engine_config()
    assert auto.model_config.sampling_defaults == {"temperature": 0.0, "top_p": 0.9, "top_k": 7,
                                                   "repetition_penalty": 1.1, "max_tokens": 5}
    with pytest.raises(ValueError, match="generation_config must be auto, vllm or a folder"):
        EngineArgs(model=model_with_defaults, generation_config="nowhere").create_engine_config()


# ---- prompts, best_of, guided decoding, LoRA ----


def test_tokens_and_text_prompts(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=4)
    ids = tok.encode("hello there")
    a, b, c = llm.generate([TokensPrompt(prompt_token_ids=ids), TextPrompt(prompt="hello there"), ids], params,
                           use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    assert b.prompt == "hello there"


def test_best_of_returns_the_n_most_likely(llm):
    """best_of=4, n=2 samples the same 4 sequences as n=4 with the same seed, and returns the 2 of the highest
    cumulative logprob, best first."""
    common = dict(temperature=1.0, seed=11, max_tokens=6)
    best = llm.generate(["hello"], SamplingParams(n=2, best_of=4, **common), use_tqdm=False)[0].outputs
    all4 = llm.generate(["hello"], SamplingParams(n=4, logprobs=0, **common), use_tqdm=False)[0].outputs
    ranked = sorted(all4, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    assert [c.index for c in best] == [0, 1] and best[0].logprobs is None
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    with pytest.raises(ValueError, match=r"best_of \(1\) must be at least n \(2\)"):
        SamplingParams(n=2, best_of=1)


def test_guided_decoding_and_lora_request(llm):
    choices = ["alpha", "beta", "gamma"]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=10,
                            guided_decoding=GuidedDecodingParams(choice=choices, backend="xgrammar"))
    assert params.structured_outputs.choice == choices and params.guided_decoding is None
    outs = llm.generate(["pick one"] * 4, params, use_tqdm=False, lora_request=None)
    assert all(o.outputs[0].text in choices for o in outs)
    with pytest.raises(ValueError, match="guided_decoding: set structured_outputs or guided_decoding"):
        SamplingParams(guided_decoding={"regex": "a"}, structured_outputs={"regex": "b"})
    with pytest.raises(ValueError, match="lora_request must be a LoRARequest"):
        llm.generate(["hello"], lora_request=object())
    with pytest.raises(ValueError, match="lora_request: LoRA is not enabled"):
        llm.generate(["hello"], lora_request=LoRARequest("a", 1, "/nowhere"))


# ---- chat ----

THINKING_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if not (loop.last and continue_final_message) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_chat_tools_template_kwargs_and_continue_final_message(llm):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=2)
    user = [{"role": "user", "content": "What is 2+2?"}]

    def prompt_of(*args, **kwargs) -> str:
        return tok.decode(llm.chat(*args, use_tqdm=False, **kwargs)[0].prompt_token_ids)

    off = prompt_of(user, params, chat_template=THINKING_TEMPLATE, chat_template_kwargs={"enable_thinking": False})
    on = prompt_of(user, params, chat_template=THINKING_TEMPLATE, chat_template_kwargs={"enable_thinking": True})
    assert off.endswith("<think>\n\n</think>\n\n") and on.endswith("<|im_start|>assistant\n")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert prompt_of(user, params, chat_template=THINKING_TEMPLATE, tools=tools).startswith(
        "<tools>get_weather;</tools>")
    # SmolLM2's own template ignores tools: they are written into the system message in the Hermes format.
    smol = prompt_of(user, params, tools=tools)
    assert "<tools>" in smol and '"get_weather"' in smol and "<tool_call>" in smol
    cont = prompt_of(user + [{"role": "assistant", "content": "The answer is"}], params,
                     chat_template=THINKING_TEMPLATE, add_generation_prompt=False, continue_final_message=True)
    assert cont.endswith("<|im_start|>assistant\nThe answer is")
    with pytest.raises(ValueError, match="lora_request"):
        llm.chat(user, params, lora_request=object())
