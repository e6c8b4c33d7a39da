"""A tensor-parallel server whose worker process dies: the stream in flight fails with an error naming the
worker, /health answers 503, new requests get 503, and SIGTERM still exits leaving no process behind."""

from __future__ import annotations

from tests.entrypoints.server_utils import RemoteServer, check_death_mid_stream, child_pids, cmdline

PROMPT = list(range(10, 30))


def test_tp2_server_worker_death_is_reported(tiny_served_model):
    args = [tiny_served_model, "--dtype", "float32", "--max-model-len", "512", "--skip-tokenizer-init",
            "--kv-cache-memory", str(8 * 2**20), "--tensor-parallel-size", "2"]
    with RemoteServer(args) as server:
        spawned = [p for p in child_pids(server.proc.pid) if "spawn_main" in cmdline(p)]
        direct = set(int(x) for x in open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split())
        cores = [p for p in spawned if p in direct]
        assert len(cores) == 1
        core = cores[0]
        workers = [p for p in child_pids(core) if "spawn_main" in cmdline(p)]
        assert len(workers) == 2, "one worker process per rank"

        check_death_mid_stream(server, PROMPT, workers[1], "worker", health_timeout=15)
