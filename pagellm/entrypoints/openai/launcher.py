"""`pagellm serve --api-server-count N` (N > 1): the launcher process, which serves nothing itself.

It binds the listening sockets, starts the engine core process(es) (each loads the model once), then spawns N
API processes (api_server.run_api_server_process) that accept connections on the server's port, each with its
own AsyncLLM connected to every core (engine/core_client.py: SharedCores). The API processes start while the
cores load the model. The launcher waits for each core's Ready on its control connection to that core (which
later carries Shutdown), then for each API process to say it has reached every core: a core that fails to
start, or an API process that exits before then, fails the launch (exit status 1).

- SIGTERM or Ctrl-C: each API process gets SIGTERM and drains (new requests 503, requests in flight finish, up
  to --shutdown-timeout); once all have exited the cores are stopped, and the launcher exits 0. A second signal
  is passed on too: the API processes then exit at once.
- An API process that exits by itself stops the server (the others drain); the launcher exits 1.
- A core that dies: every API process fails its requests and answers 503 (/health too) until stopped, as a
  single server does.
- /metrics: prometheus_client's multiprocess mode, in a private temporary folder (see pagellm/metrics.py).
- API keys: one KeyRing, made before the processes start and handed to each, so that every API process gives a
  key the same cache salt and counts it against the same limits (tenants.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any, Optional

import pagellm
from pagellm.engine.core_client import CoreProcClient, InheritedFd, SharedCores, wait_ready
from pagellm.engine_args import EngineArgs
from pagellm.entrypoints.openai.api_server import load_chat_template, run_api_server_process
from pagellm.entrypoints.openai.tenants import KeyRing

logger = logging.getLogger("pagellm.launcher")

_STARTUP_TIMEOUT = 900.0
_EXIT_GRACE = 30.0  # beyond --shutdown-timeout, for a draining API process to exit before it is killed


def run_launcher(args: argparse.Namespace, keyring: Optional[KeyRing] = None) -> int:
    """`keyring`: the server's API keys, handed to every API process (their limits in shared memory)."""
    return asyncio.run(_Launcher(args, keyring).run())


def _listen(host: str, port: int, count: int) -> list[socket.socket]:
    """The listening sockets of the API processes, bound here (so the port is taken before they start): one per
    process, all on the port with SO_REUSEPORT, so that the kernel spreads new connections over them. One socket
    that every process accepts on would not: under load, the process that wakes first accepts whatever is queued,
    and one process can take every connection. Where SO_REUSEPORT is missing, that one shared socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reuse_port = getattr(socket, "SO_REUSEPORT", None)
    socks: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port is not None else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port is not None:
                sock.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
            sock.bind((host, socks[0].getsockname()[1] if len(socks) > 1 else port))
            sock.listen(2048)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _pidfd(pid: int) -> Optional[int]:
    """A pidfd of a core (readable once it exits), for the API processes; None where Linux has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class _Launcher:
    def __init__(self, args: argparse.Namespace, keyring: Optional[KeyRing] = None) -> None:
        self.args = args
        self.keyring = keyring
        self.count: int = args.api_server_count
        self.cores: list[CoreProcClient] = []
        self.servers: list[Any] = []  # multiprocessing.Process, one per API process
        self.started = False  # every core and every API process is ready
        self.stopping = False
        self.deadline = 0.0
        self._exited: asyncio.Queue = asyncio.Queue()

    async def run(self) -> int:
        args = self.args
        log_level = getattr(args, "log_level", "warning")
        engine_args = EngineArgs.from_cli_args(args)
        config = engine_args.create_engine_config()  # bad flags fail here, before any process starts
        dp = config.parallel_config.data_parallel_size
        tmpdir = tempfile.mkdtemp(prefix="pagellm-serve-")
        os.chmod(tmpdir, 0o700)
        metrics_dir = os.path.join(tmpdir, "metrics")
        os.mkdir(metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client in the API processes
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, main)
        listeners: list[socket.socket] = []
        pidfds: list[Optional[int]] = []
        ready_pipes: list[Any] = []
        try:
            load_chat_template(args.chat_template)  # as a single server does, before any process starts
            listeners = _listen(args.host, args.port, self.count)
            # Per core, per API process: the (input, output) socket addresses that API process binds.
            addrs = [[(f"ipc://{tmpdir}/core{r}-api{i}-in", f"ipc://{tmpdir}/core{r}-api{i}-out")
                      for i in range(self.count)] for r in range(dp)]
            for r in range(dp):
                core_args = engine_args if dp == 1 else dataclasses.replace(engine_args, data_parallel_rank=r)
                self.cores.append(CoreProcClient(core_args, log_level.upper(), clients=addrs[r]))
            # Opened before anything waits for the cores, so none can have been reaped (and its pid reused).
            pids = [core.proc.pid for core in self.cores]
            pidfds = [_pidfd(pid) for pid in pids]
            mp = multiprocessing.get_context("spawn")
            for i in range(self.count):
                shared = SharedCores(i, [addrs[r][i] for r in range(dp)], pids,
                                     [InheritedFd(fd) if fd is not None else None for fd in pidfds])
                ready, ready_child = mp.Pipe(duplex=False)
                proc = mp.Process(target=run_api_server_process, name=f"pagellm-api-server-{i}",
                                  args=(args, shared, listeners[i % len(listeners)], ready_child, self.keyring))
                proc.start()
                ready_child.close()  # the child's end: closed there too, the pipe reads EOF if it dies
                self.servers.append(proc)
                ready_pipes.append(ready)
            readies = [await wait_ready(core, "the engine core" if dp == 1 else f"engine core {r}",
                                        _STARTUP_TIMEOUT) for r, core in enumerate(self.cores)]
            for i, ready in enumerate(ready_pipes):
                await self._api_ready(i, ready)
            for i, proc in enumerate(self.servers):
                loop.add_reader(proc.sentinel, self._on_server_exit, i)
            self.started = True
            mc = config.model_config
            print(f"pagellm {pagellm.__version__}: serving {mc.served_model_name or mc.model} on "
                  f"http://{args.host}:{args.port} (engine core pid {', '.join(map(str, pids))}; "
                  f"{self.count} API server processes, pid {', '.join(str(p.pid) for p in self.servers)}; "
                  f"{sum(r.num_blocks for r in readies)} KV blocks)", file=sys.stderr, flush=True)
            return await self._supervise()
        except asyncio.CancelledError:
            logger.warning("stopped during startup")
            return 1
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            for proc in self.servers:  # only after a failure are any left
                try:
                    loop.remove_reader(proc.sentinel)
                except Exception:
                    pass
                if proc.is_alive():
                    proc.kill()
                proc.join(10)
            # After a failed start, a core still loading reads no Shutdown: it is killed sooner.
            timeout = 10.0 if self.started else 5.0
            await asyncio.gather(*(asyncio.to_thread(core.close, timeout) for core in self.cores))
            for ready in ready_pipes:
                ready.close()
            for listener in listeners:
                listener.close()
            for fd in pidfds:
                if fd is not None:
                    os.close(fd)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(tmpdir, ignore_errors=True)

    async def _api_ready(self, index: int, ready: Any) -> None:
        """Wait until API process `index` has reached every core (RuntimeError if it exits first)."""
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        loop.add_reader(ready.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            await readable
            ready.recv_bytes()
        except EOFError:
            proc = self.servers[index]
            proc.join(5)
            raise RuntimeError(f"API server {index} exited during startup (exit code {proc.exitcode})") from None
        finally:
            loop.remove_reader(ready.fileno())
            ready.close()

    def _on_signal(self, main: Optional[asyncio.Task]) -> None:
        if not self.started and main is not None:  # still starting: nothing to drain
            main.cancel()
            return
        self._stop()

    def _stop(self) -> None:
        """Send SIGTERM to every API process still running (they drain; a second one makes them exit now)."""
        if not self.stopping:
            self.stopping = True
            self.deadline = asyncio.get_running_loop().time() + self.args.shutdown_timeout + _EXIT_GRACE
        for proc in self.servers:
            if proc.exitcode is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _on_server_exit(self, index: int) -> None:
        asyncio.get_running_loop().remove_reader(self.servers[index].sentinel)
        self._exited.put_nowait(index)

    async def _supervise(self) -> int:
        """Wait until every API process has exited; the launcher's exit code."""
        loop = asyncio.get_running_loop()
        running = set(range(len(self.servers)))
        code = 0
        while running:
            timeout = max(0.0, self.deadline - loop.time()) if self.stopping else None
            try:
                index = await asyncio.wait_for(self._exited.get(), timeout)
            except asyncio.TimeoutError:
                logger.warning("API processes %s did not exit in time: killing them", sorted(running))
                return 1
            running.discard(index)
            proc = self.servers[index]
            proc.join()
            if not self.stopping:
                logger.error("API server %d exited (exit code %s): stopping the server", index, proc.exitcode)
                code = 1
                self._stop()
            elif proc.exitcode != 0:
                code = 1
        return code
