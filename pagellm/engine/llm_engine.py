"""LLMEngine: the synchronous engine behind `LLM`: processor -> EngineCore (in process) -> output processor."""

from __future__ import annotations

import itertools
import logging
from typing import Iterable, Optional, Union

from pagellm.config import EngineConfig
from pagellm.engine.core import EngineCore
from pagellm.engine.output_processor import OutputKind, OutputProcessor
from pagellm.engine.processor import Processor, PromptType
from pagellm.lora.request import LoRARequest
from pagellm.model_executor.loader.source import load_generation_eos_ids, load_tokenizer
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(mc.source, mc.tokenizer)
        self.processor = Processor(mc, self.tokenizer, load_generation_eos_ids(mc.source),
                                   lora_config=config.lora_config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.core = EngineCore(config, self.tokenizer)
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, engine_args) -> "LLMEngine":
        return cls(engine_args.create_engine_config())

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.FINAL_ONLY,
        lora_request: Optional[LoRARequest] = None,
    ) -> None:
        """Validates first (ValueError naming the field), so a bad request never reaches the core."""
        if self.config.scheduler_config.policy != "priority" and priority != 0:
            raise ValueError("priority: set scheduling_policy='priority' to use request priorities")
        processed = self.processor.tokenize_prompt(prompt)
        requests = self.processor.make_requests(request_id, processed, params, priority=priority,
                                                lora_request=lora_request)
        self.output_processor.add_request(request_id, processed, params, output_kind)
        try:
            for request in requests:
                self.core.add_request(request)
        except BaseException:
            self.abort_request(request_id)
            raise

    def abort_request(self, request_ids: Union[str, Iterable[str]]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            children = self.output_processor.child_ids(request_id)
            self.core.abort_requests(children)
            self.output_processor.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.core.scheduler.get_num_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        outputs, stopped = self.output_processor.process_outputs(core_outputs)
        if stopped:
            self.core.stop_requests(stopped)
        return outputs

    def shutdown(self) -> None:
        """Stop the workers (multi-device engines); the engine cannot step afterwards."""
        self.core.shutdown()

    @property
    def prefix_cache_stats(self):
        return self.core.scheduler.kv_cache_manager.prefix_cache_stats
