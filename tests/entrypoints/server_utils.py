"""A live `pagellm serve` in a subprocess on a free loopback port, for the server tests.

Everything waits with a timeout, so a broken server fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The embedded SmolLM2 as the tests serve it: float32 (the reference dtype), a small KV cache.
SMOLLM_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory", str(64 * 2**20)]


def tiny_args(model_dir: str, *extra: str) -> list[str]:
    """The tiny random model of tiny_served_model as the tests serve it: token-id prompts, a small KV cache."""
    return [model_dir, "--dtype", "float32", "--max-model-len", "512", "--skip-tokenizer-init",
            "--kv-cache-memory", str(16 * 2**20), *extra]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_children(pid: int) -> list[int]:
    """The children of pid (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def child_pids(pid: int) -> list[int]:
    """All descendants of pid (Linux /proc)."""
    result = []
    for kid in direct_children(pid):
        result.append(kid)
        result.extend(child_pids(kid))
    return result


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 60.0) -> list[int]:
    """Wait until none of pids is alive (the resource tracker exits only after its parent); the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Call condition() until it returns something truthy (returned), or fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as name{labels} -> value of every sample (labels without model_name)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def read_metrics(server: "RemoteServer") -> dict[str, float]:
    """/metrics of a live server, parsed (see parse_metrics)."""
    return parse_metrics(httpx.get(server.url("/metrics"), timeout=30).text)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RemoteServer:
    def __init__(self, args: list[str], api_key: Optional[str] = None, startup_timeout: float = 300.0,
                 env: Optional[dict] = None, entry: Optional[list[str]] = None) -> None:
        """`entry`: how the server is started (default `-m pagellm.entrypoints.cli serve`)."""
        self.port = free_port()
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{self.port}"
        entry = entry or ["-m", "pagellm.entrypoints.cli", "serve"]
        cmd = [sys.executable, *entry, *args, "--port", str(self.port)]
        if api_key is not None:
            cmd += ["--api-key", api_key]
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.pop("PAGELLM_API_KEY", None)
        # One intra-op thread: the server's processes share the machine's 2 cores with the test process (and, on a
        # busy machine, with other jobs), and OpenMP threads that outnumber the free cores spin on each other's
        # barriers: SmolLM2 decoded 8x slower with 2 threads than with 1 on a busy 2-core machine.
        full_env["OMP_NUM_THREADS"] = "1"
        full_env.update(env or {})
        self.log = tempfile.NamedTemporaryFile(prefix="pagellm-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=full_env)
        self._children: set[int] = set()
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            self._children.update(child_pids(self.proc.pid))
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    self._children.update(child_pids(self.proc.pid))
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server did not become healthy in {timeout:.0f} s:\n{self.log_tail()}")

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log.name, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def engine_core_pid(self) -> int:
        """The engine core: the server's one direct child started by multiprocessing (workers are its own)."""
        kids = [p for p in direct_children(self.proc.pid) if "spawn_main" in cmdline(p)]
        assert len(kids) == 1, f"expected one engine core process, found {kids}"
        return kids[0]

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 600.0)  # headroom for a busy machine
        return openai.OpenAI(base_url=self.url("/v1"), api_key=self.api_key or "unused", **kwargs)

    def async_client(self, **kwargs):
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 600.0)  # headroom for a busy machine
        return openai.AsyncOpenAI(base_url=self.url("/v1"), api_key=self.api_key or "unused", **kwargs)

    def all_pids(self) -> list[int]:
        self._children.update(child_pids(self.proc.pid))
        return [self.proc.pid, *sorted(self._children)]

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for exit; returns the exit code."""
        self._children.update(child_pids(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """Kill the server and the processes it started (by pid), whatever state they are in."""
        pids = self.all_pids() if self.proc.poll() is None else sorted(self._children)
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            if pid != self.proc.pid and pid_alive(pid) and "python" in cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.terminate(timeout=30)
                except Exception:
                    pass
        finally:
            self.kill()
            self.log.close()
            try:
                os.unlink(self.log.name)
            except OSError:
                pass

    def __enter__(self) -> "RemoteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_death_mid_stream(server: "RemoteServer", prompt: list[int], kill_pid: int, word: str,
                           health_timeout: float) -> None:
    """Kill `kill_pid` (a process of the serving engine) while a stream runs: the stream fails with an error
    whose message names `word`, /health turns 503, a new request gets 503, and SIGTERM still exits 0 leaving
    no process behind."""
    import openai
    import pytest

    client = server.client()
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=480, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    os.kill(kill_pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as info:
        for _ in it:
            pass
    assert word in str(info.value.message)
    deadline = time.monotonic() + health_timeout
    while httpx.get(server.url("/health"), timeout=30).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=model, prompt=prompt, max_tokens=2)
    assert info.value.status_code == 503
    pids = server.all_pids()
    assert server.terminate(timeout=30) == 0
    assert not wait_gone(pids), "a child process outlived the server"
