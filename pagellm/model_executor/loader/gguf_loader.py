"""GGUF files: metadata, and weights dequantized lazily to float32 under HF names.

The header is parsed here directly (the format is a short list of typed key/values and tensor records):
`gguf.GGUFReader` builds a numpy view per field and takes seconds on a tokenizer's 100k strings, while this
takes milliseconds. Tensor bytes are read from a memory map and dequantized one tensor at a time with
`gguf.quants.dequantize`, so at most one dequantized tensor is alive besides the model.

llama.cpp's converter permutes the rows of q_proj/k_proj of llama-arch models (it interleaves the two rotary
halves of each head for its own rope kernel); the loader undoes that, since our RoPE is HF's rotate-half.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_NUMPY_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9

@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch/HF shape (GGUF lists dims in reverse)."""
        return tuple(reversed(self.dims))


class GGUFFile:
    """A GGUF file: `.metadata` (key -> value; numeric arrays as numpy arrays, string arrays as lists),
    `.tensors` (name -> GGUFTensorInfo, in file order), and `dequantize(name)`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "rb")
        try:
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except Exception:
            self._file.close()
            raise
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._parse()

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # a dequantized F32 view still references the map; leave it to the GC
            pass
        self._file.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- header -----------------------------------------------------------------------------------------
    def _read(self, fmt: str):
        value = struct.unpack_from(fmt, self._mm, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _read_string(self) -> str:
        n = self._read("<Q")
        raw = self._mm[self._pos: self._pos + n]
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _read_value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._read_string()
        if vtype == _ARRAY:
            item_type = self._read("<I")
            count = self._read("<Q")
            if item_type in _NUMPY_TYPES:
                dt = np.dtype(_NUMPY_TYPES[item_type]).newbyteorder("<")
                arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self._pos).copy()
                self._pos += count * dt.itemsize
                return arr
            return [self._read_value(item_type) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype} at byte {self._pos}")
        return self._read(fmt)

    def _parse(self) -> None:
        if self._mm[:4] != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic {self._mm[:4]!r})")
        self._pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: unsupported GGUF version {version} (big-endian files are not supported)")
        num_tensors = self._read("<Q")
        num_kv = self._read("<Q")
        for _ in range(num_kv):
            key = self._read_string()
            vtype = self._read("<I")
            self.metadata[key] = self._read_value(vtype)
        infos = []
        for _ in range(num_tensors):
            name = self._read_string()
            n_dims = self._read("<I")
            dims = tuple(self._read("<Q") for _ in range(n_dims))
            qtype = self._read("<I")
            offset = self._read("<Q")
            infos.append((name, dims, qtype, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (self._pos + alignment - 1) // alignment * alignment
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        for name, dims, qtype, offset in infos:
            try:
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            except (KeyError, ValueError):
                raise ValueError(f"{self.path}: tensor {name} has unknown ggml type {qtype}") from None
            n = int(np.prod(dims)) if dims else 1
            self.tensors[name] = GGUFTensorInfo(name, dims, qtype, data_start + offset, n // block_size * type_size)

    # ---- metadata helpers -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    # ---- tensors ----------------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as uint8 [rows..., bytes per row] (the layout gguf.quants.dequantize takes)."""
        info = self.tensors[name]
        data = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = info.shape[:-1] if info.shape else ()
        return data.reshape(*rows, -1) if rows else data

    def dequantize(self, name: str) -> torch.Tensor:
        """A float32 torch tensor of the HF shape (own memory, not a view of the file)."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        qtype = GGMLQuantizationType(info.qtype)
        if info.qtype in _TORCH_DEQUANT:
            return dequantize_torch(self.raw(name), info.qtype).reshape(info.shape)
        values = dequantize(self.raw(name), qtype)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not values.flags.writeable:  # F32 data: still a view of the read-only file map
            values = values.copy()
        return torch.from_numpy(values).reshape(info.shape)


# ---- fast dequantization ------------------------------------------------------------------------------
# The simple block formats in torch (multithreaded, ~10x gguf's numpy), with the same float32 operations in
# the same order as gguf.quants, so the values are bit-identical (tests/models/test_gguf.py checks). Other
# types (K-quants, ...) go through gguf.quants.dequantize.
_Q4_0, _Q4_1, _Q8_0 = 2, 3, 8
_TORCH_DEQUANT = {_Q4_0: 18, _Q4_1: 20, _Q8_0: 34}  # ggml type -> bytes per block of 32


def _f16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()  # [n, 1]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def dequantize_torch(raw: np.ndarray, qtype: int) -> torch.Tensor:
    """raw: uint8 [..., bytes per row] of a Q4_0/Q4_1/Q8_0 tensor -> flat float32 tensor."""
    import warnings

    with warnings.catch_warnings():  # a read-only view of the file map: only read here
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1))
    blocks = data.view(-1, _TORCH_DEQUANT[qtype])
    if qtype == _Q8_0:
        d = _f16_column(blocks, 0)
        x = blocks[:, 2:].contiguous().view(torch.int8).float()
        return (x * d).reshape(-1)
    if qtype == _Q4_0:
        d = _f16_column(blocks, 0)
        q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
        return (d * q.float()).reshape(-1)
    d, m = _f16_column(blocks, 0), _f16_column(blocks, 2)
    q = _nibbles(blocks[:, 4:]).float()
    return ((d * q) + m).reshape(-1)


_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")

# GGUF tensor name (without `blk.N.` and `.weight/.bias`) -> HF module path within a decoder layer.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "rope_freqs": "rope_freqs",  # llama.cpp's per-frequency rope factors (Llama 3.1); the model handles it
}


def gguf_to_hf_name(name: str, layer_names: Optional[dict[str, str]] = None) -> Optional[str]:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for a name we do not know.
    `layer_names`: an architecture's own per-layer names (its ArchSpec.gguf_layer_names), tried first."""
    base, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    m = _LAYER.match(base)
    if m:
        mapped = (layer_names or {}).get(m.group(2)) or _LAYER_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{mapped}.{suffix}" if mapped else None
    mapped = _GLOBAL_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. It took each head's rows [first half | second half] of the rotary dim
    and interleaved them (row 2i from the first half, row 2i+1 from the second); this puts them back."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def iterate_gguf_weights(path: str, config: Any = None,
                         gguf_file: Optional[GGUFFile] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, float32 tensor) for every tensor of a GGUF file, dequantized one at a time.

    `config` gives the head counts needed to undo the q/k permutation of llama-arch files (read from the
    file's metadata when not given). Unknown tensor names are passed through under their GGUF name, so the
    model reports them as unexpected.
    """
    from pagellm.model_executor.models.registry import spec_for_gguf

    f = gguf_file or GGUFFile(path)
    try:
        spec = spec_for_gguf(f.architecture)
        if config is not None:
            from pagellm.arch_config import ArchConfig

            arch = ArchConfig.from_hf(config)
            n_heads, n_kv = arch.num_heads, arch.num_kv_heads
        else:
            n_heads = int(f.arch_get("attention.head_count"))
            n_kv = int(f.arch_get("attention.head_count_kv", n_heads))
        for name in f.tensors:
            hf_name = gguf_to_hf_name(name, spec.gguf_layer_names) or name
            tensor = f.dequantize(name)
            if spec.gguf_permute_qk and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
                tensor = unpermute_qk(tensor, n_heads if ".q_proj." in hf_name else n_kv)
            if spec.gguf_norm_offset and hf_name.endswith("norm.weight"):
                tensor = tensor + spec.gguf_norm_offset
            yield hf_name, tensor
    finally:
        if gguf_file is None:
            f.close()


def gguf_path(folder: str, gguf_file: Optional[str]) -> str:
    return os.path.join(folder, gguf_file) if gguf_file else folder
