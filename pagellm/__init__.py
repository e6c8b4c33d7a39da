"""pagellm: a readable LLM inference and serving engine (paged KV cache, continuous batching, prefix caching)."""

from pagellm.engine_args import EngineArgs
from pagellm.outputs import CompletionOutput, Logprob, RequestOutput
from pagellm.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in the whole engine (torch, transformers): load it on first use only.
    if name == "LLM":
        from pagellm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "GuidedDecodingParams", "RequestOutput",
           "CompletionOutput", "Logprob", "EngineArgs", "__version__"]
