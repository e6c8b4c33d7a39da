"""Calibration: run the float model over a text and keep, for every linear layer, the largest absolute value
each of its input channels took (what SmoothQuant's scales are made from).

The float model is transformers' (float32, on the CPU) built from the checkpoint's config and the state dict
the quantizer writes from, so the hooks see the HF module names the checkpoint's tensors carry. The built-in
text is a mix of registers (explanation, dialogue, a list, Python) and shares nothing with the evaluation
text of benchmarks/quant_quality.py.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

BUILTIN_CALIBRATION_TEXT = (
    "Bread rises because yeast, a single-celled fungus, eats the sugars in flour and releases carbon dioxide. "
    "The gas is trapped by gluten, a network of proteins that forms when wheat flour is mixed with water and "
    "kneaded. A warm kitchen speeds the process up; a cold one slows it down, which is why many bakers leave "
    "their dough in the refrigerator overnight to develop a deeper flavour. Salt controls the yeast and "
    "tightens the gluten, so a loaf made without it spreads flat and tastes of very little.\n\n"
    "Q: How long should I bake a sourdough loaf?\n"
    "A: About forty-five minutes at 230 degrees Celsius: twenty with the lid on the pot, then the rest with it "
    "off, until the crust is dark brown and the loaf sounds hollow when you tap the bottom.\n"
    "Q: Why did my bread come out dense?\n"
    "A: Usually the dough was under-proofed, the starter was weak, or the flour had too little protein.\n\n"
    "Shopping list for the week: 2 kg of strong white flour, 500 g of rye flour, a jar of honey, 12 eggs, "
    "butter, sea salt, olive oil, 3 lemons, fresh rosemary, and coffee beans (medium roast).\n\n"
    "The committee met on Tuesday to discuss the budget for the new library. Several members argued that the "
    "money would be better spent on repairing the roads, while others pointed out that the old building had "
    "no heating and leaked whenever it rained. After two hours the chair proposed a compromise: the roof "
    "would be fixed this year, and the rest of the project would be reviewed in the spring.\n\n"
    "def moving_average(values, window):\n"
    "    \"\"\"Return the mean of each run of `window` consecutive values.\"\"\"\n"
    "    if window <= 0:\n"
    "        raise ValueError(\"window must be positive\")\n"
    "    total = sum(values[:window])\n"
    "    result = [total / window]\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        result.append(total / window)\n"
    "    return result\n\n"
    "Mars is the fourth planet from the Sun. Its red colour comes from iron oxide in the dust that covers its "
    "surface, and its thin atmosphere is mostly carbon dioxide. It has two small moons, Phobos and Deimos, "
    "which may be captured asteroids. Rovers have found evidence that liquid water once flowed there, in "
    "rivers and lakes that dried up billions of years ago.\n\n"
    "Dear Ms. Patel, thank you for your letter of 3 March. I am pleased to confirm that your application has "
    "been accepted and that your first day will be Monday, 14 April. Please bring a form of identification "
    "and arrive at the front desk by nine o'clock. Kind regards, J. Moreno, Human Resources."
)


def calibration_chunks(tokenizer: Any, text: str, max_tokens: int = 2048, seq_len: int = 512) -> list[list[int]]:
    """The text's token ids (at most `max_tokens`) cut into sequences of at most `seq_len`."""
    if not text or not text.strip():
        raise ValueError("calibration_text: the calibration text is empty")
    if max_tokens <= 0 or seq_len <= 0:
        raise ValueError(f"max_calibration_tokens must be positive; got {max_tokens}")
    ids = list(tokenizer.encode(text))[:max_tokens]
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


def hf_float_model(config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """transformers' model of `config` in float32 holding `state` (HF names; a tied lm_head may be absent)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"model: transformers' {type(model).__name__} needs weights the checkpoint lacks: "
                         f"{', '.join(missing[:5])}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules of the decoder layers (the LM head is never quantized)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


@torch.no_grad()
def _observe_inputs(model: nn.Module, chunks: list[list[int]], observe: Callable[[str, torch.Tensor], None]) -> None:
    """Run the chunks through the model, calling observe(module name, input [tokens, in_features]) for each
    decoder linear layer."""
    hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: observe(
        name, args[0].detach().reshape(-1, args[0].shape[-1]).float())) for name, module in _decoder_linears(model)]
    try:
        for ids in chunks:
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()


def collect_input_absmax(model: nn.Module, chunks: list[list[int]]) -> dict[str, torch.Tensor]:
    """module name -> max over all calibration tokens of |input| per input channel ([in_features], float32)."""
    found: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.abs().amax(dim=0)
        found[name] = m if name not in found else torch.maximum(found[name], m)

    _observe_inputs(model, chunks, observe)
    return found


def collect_input_hessians(model: nn.Module, chunks: list[list[int]]) -> dict[str, torch.Tensor]:
    """module name -> X^T X / tokens over the calibration tokens ([in, in], float32): the Hessian of a linear
    layer's squared output error, which GPTQ rounds against. Sibling layers reading the very same input tensor
    (q/k/v, gate/up) share one accumulator."""
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    owner: dict[str, str] = {}  # module -> the sibling whose accumulator it shares
    last_input: dict[str, tuple[int, tuple[int, ...], str]] = {}  # parent module -> (data_ptr, shape, reader)

    def observe(name: str, x: torch.Tensor) -> None:
        parent = name.rpartition(".")[0]
        prev = last_input.get(parent)
        if prev is not None and prev[:2] == (x.data_ptr(), tuple(x.shape)) and owner.get(name, prev[2]) == prev[2]:
            owner[name] = prev[2]  # the same tensor its sibling just read (alive for both calls)
            return
        last_input[parent] = (x.data_ptr(), tuple(x.shape), name)
        owner[name] = name
        if name in sums:
            sums[name].addmm_(x.t(), x)
        else:
            sums[name] = x.t() @ x
        tokens[name] = tokens.get(name, 0) + x.shape[0]

    _observe_inputs(model, chunks, observe)
    means = {o: sums[o] / tokens[o] for o in sums}
    return {name: means[o] for name, o in owner.items()}
