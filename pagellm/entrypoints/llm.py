"""LLM: the offline entry point. `LLM(model).generate(prompts, params)` runs all prompts to completion.

Its calls follow vLLM's LLM (generate, chat, get_default_sampling_params, get_tokenizer), so that vLLM code runs
unchanged where pagellm has the feature, and fails with a clear error where it has not."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from tqdm.auto import tqdm

from pagellm.engine.llm_engine import LLMEngine
from pagellm.engine.processor import PromptType
from pagellm.entrypoints.chat_utils import render_chat
from pagellm.entrypoints.llm_pooling import PoolingCalls
from pagellm.inputs import as_prompt_list
from pagellm.engine_args import EngineArgs
from pagellm.lora.request import LoRARequest
from pagellm.multimodal.chat_parts import split_image_parts
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams

ChatMessages = list[dict[str, Any]]


class LLM(PoolingCalls):
    """An engine in this process. Keyword arguments are EngineArgs' fields (the CLI flags' names). A pooling
    model (runner='pooling', or detected) answers embed/encode/score (llm_pooling.py) instead of generate."""

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - EngineArgs.field_names()
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown engine option (known: {sorted(EngineArgs.field_names())})")
        self.engine_args = EngineArgs(model=model, **kwargs)
        if self.engine_args.data_parallel_size != 1:
            raise ValueError("data_parallel_size: data parallelism is for the server (pagellm serve "
                             "--data-parallel-size N); the offline LLM runs one engine")
        config = self.engine_args.create_engine_config()
        if config.model_config.runner == "pooling":
            from pagellm.pooling.engine import PoolingEngine

            self.llm_engine: Any = PoolingEngine(config)
        else:
            self.llm_engine = LLMEngine(config)

    def shutdown(self) -> None:
        """Stop the engine's worker processes or actors (tensor/pipeline parallelism); idempotent."""
        self.llm_engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without sampling_params uses: SamplingParams' defaults overridden by the model's
        generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens as
        max_tokens), unless the engine was made with generation_config="vllm"."""
        return SamplingParams(**self.llm_engine.config.model_config.sampling_defaults)

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        priority: Optional[Sequence[int]] = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in the order of the prompts.

        `lora_request`: one adapter for every prompt, or one per prompt (None: the base model); the engine needs
        enable_lora. A prompt that fails validation raises before any prompt is queued, so nothing is left
        half-submitted.
        """
        self._generating_engine()
        prompt_list = as_prompt_list(prompts)
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompt_list)
        elif isinstance(lora_request, (list, tuple)):
            loras = list(lora_request)
            if len(loras) != len(prompt_list):
                raise ValueError(f"lora_request: {len(loras)} given for {len(prompt_list)} prompts")
        else:
            raise ValueError(f"lora_request must be a LoRARequest or a list of them (None: the base model), got "
                             f"{type(lora_request).__name__}")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"sampling_params: {len(params_list)} given for {len(prompt_list)} prompts")
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"priority: {len(priority)} given for {len(prompt_list)} prompts")

        engine = self.llm_engine
        ids: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
                request_id = engine.next_request_id()
                engine.add_request(request_id, prompt, params, priority=priority[i] if priority else 0,
                                   lora_request=loras[i])
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)
            raise
        return self._run_engine(ids, use_tqdm)

    def _generating_engine(self) -> LLMEngine:
        if not isinstance(self.llm_engine, LLMEngine):
            raise ValueError("runner: this is a pooling model (embeddings); use embed/encode/score, or "
                             "runner='generate' for a model that generates text")
        return self.llm_engine

    def _run_engine(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        out_tokens = 0
        try:
            while len(results) < len(ids):
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        out_tokens += sum(len(c.token_ids) for c in output.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"{out_tokens / elapsed:.1f} output tok/s", refresh=False)
                if not engine.has_unfinished_requests() and len(results) < len(ids):
                    raise RuntimeError("the engine stopped with requests unfinished")
        except BaseException:
            engine.abort_request([i for i in ids if i not in results])
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def chat(
        self,
        messages: Union[ChatMessages, Sequence[ChatMessages]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Optional[list[dict[str, Any]]] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        """Formats each conversation with the model's chat template (or `chat_template`), then generates.
        Content parts may be text or (a vision model) image_url, as OpenAI's: {"type": "image_url",
        "image_url": {"url": "data:image/png;base64,..."}}.

        `tools` reach the template (written into the system message in the Hermes format when the template does
        not read them); `chat_template_kwargs` are more template variables (e.g. enable_thinking);
        `continue_final_message` continues the last (assistant) message instead of starting a new one."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("messages: chat needs a tokenizer (the engine runs with skip_tokenizer_init)")
        mm = self._generating_engine().processor.mm  # a vision model's image processor, else None
        prompts: list[PromptType] = []
        for conversation in conversations:
            # image_url parts -> the model's placeholder in the text, and the images they name
            conversation, urls = split_image_parts(conversation, mm.placeholder if mm is not None else None)
            if mm is not None:
                mm.check_count(len(urls), "messages")
            ids = render_chat(tokenizer, conversation, chat_template, add_generation_prompt, continue_final_message,
                              tools, chat_template_kwargs)
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            if urls:
                prompt["multi_modal_data"] = {"image": [mm.load_image(url, field) for url, field in urls]}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

