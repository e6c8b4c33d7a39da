"""Quantized linear layers on the CPU, each against a float reference, plus the `quantization` option's checks.

The packed formats are checked against the published layouts written out by hand (GPTQ: input channels 8 to
an int32, zeros stored minus one; AWQ: output channels in the order 0 2 4 6 1 3 5 7), so a packing bug cannot
hide behind a matching unpacking bug. GPU kernels: tests/layers/test_quantization_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from pagellm.model_executor.layers.linear import Linear, MergedLinear, QKVLinear, RowParallelLinear
from pagellm.model_executor.layers.quantization import get_quant_config, resolve_quantization
from pagellm.model_executor.layers.quantization.awq import AWQConfig, awq_unpack
from pagellm.model_executor.layers.quantization.compressed_tensors import CompressedTensorsConfig, OnlineW8A8Config
from pagellm.model_executor.layers.quantization.gptq import GPTQConfig
from pagellm.model_executor.layers.quantization.rtn import (
    awq_quantize,
    gptq_quantize,
    quantization_config,
    w8a8_quantize,
)
from pagellm.model_executor.layers.quantization.w4a16 import pack_rows, unpack_cols, unpack_rows
from pagellm.model_executor.layers.quantization.w8a8 import FP8, quantize_per_row

torch.manual_seed(0)


def _load(layer, tensors: dict[str, torch.Tensor], shard_id=None) -> None:
    """What a model's load_weights does: every tensor through its parameter's weight_loader."""
    params = dict(layer.named_parameters())
    for name, value in tensors.items():
        if shard_id is None:
            params[name].weight_loader(params[name], value)
        else:
            params[name].weight_loader(params[name], value, shard_id)


def _process(layer) -> None:
    layer.quant_method.process_weights_after_loading(layer)


# ---- the published packings, by hand ---------------------------------------------------------------------
def test_gptq_packing_is_the_published_layout():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))  # N=16 outputs, K=32 inputs, one group
    tensors, deq = gptq_quantize(w, group_size=-1)
    q = torch.round(w.t() / tensors["scales"].float()[0]) + 8  # symmetric: zero point 8
    q = q.clamp(0, 15).long()
    for row in range(4):
        for n in range(16):
            word = sum(int(q[8 * row + j, n]) << (4 * j) for j in range(8))
            assert tensors["qweight"][row, n].item() & 0xFFFFFFFF == word
    assert (tensors["qzeros"] & 0xFFFFFFFF == 0x77777777).all()  # 8 stored as 7
    assert torch.equal(tensors["g_idx"], torch.zeros(32, dtype=torch.int32))
    assert torch.allclose(deq, w, atol=tensors["scales"].float().max().item() / 2 + 1e-6)


def test_awq_packing_is_the_published_layout():
    w = torch.randn(16, 32)
    tensors, _ = awq_quantize(w, group_size=32)
    fields = unpack_cols(tensors["qweight"])  # field order as stored
    s, z = tensors["scales"].float()[0], awq_unpack(tensors["qzeros"])[0].float()
    q = torch.clamp(torch.round(w.t() / s) + z, 0, 15)
    for c in range(2):
        for i, col in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            assert torch.equal(fields[:, 8 * c + i].float(), q[:, 8 * c + col])
    assert torch.equal(awq_unpack(tensors["qweight"]).float(), q)


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(q)), q)


# ---- W8A8 -----------------------------------------------------------------------------------------------
def _w8a8_reference(x, w_q, w_s, qdtype, bias=None):
    """Hand-written: x quantized per token like the weight, integer/fp8 products summed in float64."""
    qmax = 127.0 if qdtype == torch.int8 else 448.0
    xs = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-10)
    xq = x / xs
    xq = xq.round().clamp(-127, 127) if qdtype == torch.int8 else xq.clamp(-448, 448).to(FP8).float()
    y = (xq.double() @ w_q.double().t()) * xs.double() * w_s.double().reshape(1, -1)
    return y.float() if bias is None else y.float() + bias


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_online_w8a8_linear(name):
    qdtype = FP8 if name == "fp8" else torch.int8
    layer = Linear(96, 48, bias=True, dtype=torch.float32, quant_config=OnlineW8A8Config(name))
    w, b = torch.randn(48, 96) * 0.05, torch.randn(48) * 0.1
    _load(layer, {"weight": w, "bias": b})
    _process(layer)
    assert layer.weight.dtype == qdtype and layer.weight_scale.shape == (1, 48)
    x = torch.randn(7, 96)
    y = layer(x)
    wq, ws = quantize_per_row(w, qdtype)
    assert torch.allclose(y, _w8a8_reference(x, wq.float(), ws, qdtype, b), atol=1e-5, rtol=1e-5)
    rel = (y - torch.nn.functional.linear(x, w, b)).norm() / y.norm()
    assert rel < (0.05 if name == "fp8" else 0.01)  # close to the float layer, not equal


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_norm_and_activation_hand_w8a8_layers_quantized_inputs(name, monkeypatch):
    """Before a W8A8 linear, RMSNorm and SiLU-and-mul return their output quantized per token (fused into their
    own pass on CUDA), and the linear uses it as it is: the same result as quantizing inside the linear. A float
    linear gets no such hint."""
    from pagellm.model_executor.layers.norm import RMSNorm
    from pagellm.model_executor.layers.quantization.w8a8 import QuantizedActivations, W8A8LinearMethod
    from pagellm.model_executor.models.llama import LlamaMLP

    qdtype = FP8 if name == "fp8" else torch.int8
    mlp = LlamaMLP(32, 48, "silu", dtype=torch.float32, quant_config=OnlineW8A8Config(name))
    _load(mlp.gate_up_proj, {"weight": torch.randn(48, 32) * 0.1}, 0)
    _load(mlp.gate_up_proj, {"weight": torch.randn(48, 32) * 0.1}, 1)
    _load(mlp.down_proj, {"weight": torch.randn(32, 48) * 0.1})
    _process(mlp.gate_up_proj)
    _process(mlp.down_proj)
    assert mlp.input_quant_dtype == qdtype and mlp.down_proj.input_quant_dtype == qdtype
    assert Linear(4, 4, dtype=torch.float32).input_quant_dtype is None
    seen = []
    apply = W8A8LinearMethod.apply
    monkeypatch.setattr(W8A8LinearMethod, "apply", lambda self, layer, x, bias: seen.append(type(x)) or
                        apply(self, layer, x, bias))
    norm = RMSNorm(32, dtype=torch.float32)
    norm.weight.data.normal_(1.0, 0.2)
    x, res = torch.randn(5, 32), torch.randn(5, 32)
    normed, new_res = norm(x, res.clone(), mlp.input_quant_dtype)
    assert isinstance(normed, QuantizedActivations) and normed.q.dtype == qdtype and normed.lead == (5,)
    plain, plain_res = norm(x, res.clone())
    assert torch.equal(new_res, plain_res)
    assert torch.equal(normed.q.float(), quantize_per_row(plain, qdtype)[0].float())
    y = mlp(normed)  # gate_up gets the norm's quantized rows, down_proj the activation's
    assert seen == [QuantizedActivations, QuantizedActivations]
    act = torch.nn.functional.silu(mlp.gate_up_proj(plain)[:, :48]) * mlp.gate_up_proj(plain)[:, 48:]
    assert torch.equal(y, mlp.down_proj(act))  # a float input, quantized inside the linear: the same bits


def test_compressed_tensors_input_rotation():
    """pagellm's `pagellm_input_rotation` entry: the named layers rotate their input by their `input_rotation`
    block before quantizing it (the weight holds W R); a malformed entry is a ValueError naming quantization."""
    from pagellm.model_executor.layers.quantization.w8a8 import rotate_blocks

    qc = quantization_config("compressed-tensors", qdtype=torch.int8, ignore=["lm_head"])
    cfg = CompressedTensorsConfig.from_dict({**qc, "pagellm_input_rotation": {"block_size": 8,
                                                                              "targets": [r"re:.*\.down_proj"]}})
    assert cfg.linear_method("model.layers.0.self_attn.qkv_proj").input_quant_dtype == torch.int8
    layer = RowParallelLinear(32, 16, dtype=torch.float32, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    assert layer.input_quant_dtype is None
    w = torch.randn(16, 32) * 0.1
    block = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].float()
    tensors, _ = w8a8_quantize(w @ torch.block_diag(*[block] * 4), torch.int8)
    _load(layer, {**tensors, "input_rotation": block})
    _process(layer)
    x = torch.randn(5, 32)
    wq, ws = layer.weight.float(), layer.weight_scale.reshape(-1)
    ref = _w8a8_reference(rotate_blocks(x, block), wq, ws, torch.int8)
    assert torch.allclose(layer(x), ref, atol=1e-5, rtol=1e-5)
    assert (layer(x) - x @ w.t()).norm() / (x @ w.t()).norm() < 0.02
    for bad in ({"block_size": 1, "targets": ["x"]}, {"block_size": 8}, "yes"):
        with pytest.raises(ValueError, match="quantization"):
            CompressedTensorsConfig.from_dict({**qc, "pagellm_input_rotation": bad})
    with pytest.raises(ValueError, match="quantization"):  # 12 input values in blocks of 8
        RowParallelLinear(12, 4, dtype=torch.float32, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("qdtype", [FP8, torch.int8])
@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_merged_linear(qdtype, strategy):
    """gate/up shards with their own scales (one per tensor, or per row) load into one merged layer."""
    config = CompressedTensorsConfig.from_dict(quantization_config("compressed-tensors", qdtype=qdtype,
                                                                   strategy=strategy))
    layer = MergedLinear(64, [32, 48], dtype=torch.float32, quant_config=config, prefix="model.layers.0.mlp.x")
    ws = [torch.randn(32, 64) * 0.05, torch.randn(48, 64) * 0.3]
    deqs = []
    for i, w in enumerate(ws):
        tensors, deq = w8a8_quantize(w, qdtype, strategy)
        _load(layer, tensors, shard_id=i)
        deqs.append((tensors["weight"].float(), tensors["weight_scale"].expand(w.shape[0], 1)))
    _process(layer)
    x = torch.randn(5, 64)
    ref = torch.cat([_w8a8_reference(x, q, s, qdtype) for q, s in deqs], dim=1)
    assert torch.allclose(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_compressed_tensors_ignore_keeps_float():
    qc = quantization_config("compressed-tensors", qdtype=torch.int8)
    qc["ignore"] = ["lm_head", "re:.*layers\\.1\\..*"]
    config = CompressedTensorsConfig.from_dict(qc)
    assert type(config.linear_method("model.layers.1.mlp.down_proj")).__name__ == "UnquantizedLinearMethod"
    assert type(config.linear_method("model.layers.0.mlp.down_proj")).__name__ == "W8A8LinearMethod"


@pytest.mark.parametrize("change,match", [
    (lambda g: g["input_activations"].update(dynamic=False, strategy="tensor"), "input_activations"),
    (lambda g: g["weights"].update(num_bits=4), "weights"),
    (lambda g: g.update(input_activations=None), "weight-only"),
])
def test_compressed_tensors_refuses_other_schemes(change, match):
    qc = quantization_config("compressed-tensors", qdtype=FP8)
    change(qc["config_groups"]["group_0"])
    with pytest.raises(ValueError, match=f"quantization: .*{match}"):
        CompressedTensorsConfig.from_dict(qc)


# ---- 4-bit ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size,act_order,sym", [(32, False, True), (16, True, True), (-1, False, False),
                                                      (32, True, False)])
def test_gptq_qkv_linear(group_size, act_order, sym):
    config = GPTQConfig(4, group_size, act_order, sym)
    layer = QKVLinear(64, 16, 4, 2, dtype=torch.float32, quant_config=config, prefix="model.layers.0.self_attn.qkv")
    perm = torch.randperm(64) if act_order else None  # q, k, v share their input, so their channel order
    deqs = []
    for shard, rows in (("q", 64), ("k", 32), ("v", 32)):
        tensors, deq = gptq_quantize(torch.randn(rows, 64) * 0.1, group_size, sym, perm)
        _load(layer, tensors, shard_id=shard)
        deqs.append(deq)
    _process(layer)
    assert (layer.perm is not None) == act_order
    x = torch.randn(3, 64)
    ref = x @ torch.cat(deqs).t()
    assert torch.allclose(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_gptq_row_parallel_and_missing_g_idx():
    """No act-order: a checkpoint without g_idx loads (g_idx is k // G)."""
    config = GPTQConfig(4, 32, False, True)
    layer = RowParallelLinear(128, 40, bias=True, dtype=torch.float32, quant_config=config, prefix="p")
    assert layer.g_idx.has_default
    tensors, deq = gptq_quantize(torch.randn(40, 128) * 0.1, 32)
    del tensors["g_idx"]
    b = torch.randn(40)
    _load(layer, {**tensors, "bias": b})
    _process(layer)
    x = torch.randn(4, 128)
    assert torch.allclose(layer(x), x @ deq.t() + b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_merged_linear(group_size):
    layer = MergedLinear(128, [64, 64], dtype=torch.float32, quant_config=AWQConfig(4, group_size), prefix="m")
    deqs = []
    for i in range(2):
        tensors, deq = awq_quantize(torch.randn(64, 128) * 0.1, group_size)
        _load(layer, tensors, shard_id=i)
        deqs.append(deq)
    _process(layer)
    x = torch.randn(2, 128)
    assert torch.allclose(layer(x), x @ torch.cat(deqs).t(), atol=1e-5, rtol=1e-5)


def test_w4a16_bfloat16_rounds_weights_like_the_kernel():
    """bf16 activations on the CPU: the weight is rounded to bf16, the sums are float32 (the kernel's math)."""
    layer = Linear(64, 32, dtype=torch.bfloat16, quant_config=GPTQConfig(4, 32, False, True), prefix="p")
    tensors, deq = gptq_quantize(torch.randn(32, 64) * 0.1, 32)
    _load(layer, tensors)
    _process(layer)
    x = torch.randn(3, 64).bfloat16()
    ref = (x.float() @ deq.bfloat16().float().t()).bfloat16()
    assert torch.equal(layer(x), ref)


# ---- the option ---------------------------------------------------------------------------------------------
class _Cfg:
    def __init__(self, qc=None):
        if qc is not None:
            self.quantization_config = qc


def test_quantization_option_is_checked():
    assert resolve_quantization(None, _Cfg()) is None
    assert resolve_quantization("fp8", _Cfg()) == "fp8"
    assert resolve_quantization(None, _Cfg({"quant_method": "gptq"})) == "gptq"
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("fp4", _Cfg())
    with pytest.raises(ValueError, match="quantization='fp8' was asked for, but the checkpoint is quantized "
                                         "with 'awq'"):
        resolve_quantization("fp8", _Cfg({"quant_method": "awq"}))
    with pytest.raises(ValueError, match="quantization: the checkpoint's quantization_config names 'bitsandbytes'"):
        resolve_quantization(None, _Cfg({"quant_method": "bitsandbytes"}))
    with pytest.raises(ValueError, match="quantization='gptq' needs a checkpoint quantized in that format"):
        get_quant_config("gptq", _Cfg())
    assert isinstance(get_quant_config("gptq", _Cfg(), load_format="dummy"), GPTQConfig)
    with pytest.raises(ValueError, match="GPTQ with 8 bits"):
        get_quant_config(None, _Cfg({"quant_method": "gptq", "bits": 8}))


def test_engine_option_and_cli_flag(tiny_model_dir):
    import argparse

    from pagellm.engine_args import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--model", tiny_model_dir("llama"), "--quantization", "int8",
                                                       "--device", "cpu"]))
    assert args.create_engine_config().model_config.quantization == "int8"
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineArgs(model=tiny_model_dir("llama"), quantization="nf4").create_engine_config()
    with pytest.raises(ValueError, match="quantization='awq' needs a checkpoint"):
        EngineArgs(model=tiny_model_dir("llama"), quantization="awq", device="cpu").create_engine_config()
