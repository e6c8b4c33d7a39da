"""schemathesis against a live server: every operation of /openapi.json, all of its checks (`--checks all`).

The server is a random 2-layer Llama with the SmolLM2 tokenizer (text prompts reach the tokenizer) and
--max-model-len 64, so a generated request that asks for many tokens is a quick 400 and one that fits ends
in a fraction of a second; more sequences (prompts x n) than 4 running and 4 waiting are a quick 429. The
run is bounded by examples per operation (the coverage phase's boundary values, then fuzzing and stateful
sequences); its NDJSON report holds every request and response, and the test asserts: no 5xx, every check
passed, and every 400 is OpenAI's envelope naming its field without Python's exception text.

Schema-valid requests may still get a 400 for the rules no OpenAPI schema can state: a prompt longer than
max_model_len, token ids beyond the model's vocabulary, min_tokens above max_tokens, a grammar that does not
compile, tool_choice "auto" on a server without a tool parser. So positive_data_acceptance also expects 400,
404 (a model name that is not served) and 429 (more sequences than the small queue of this server takes);
the 400s are then held to the envelope checks below.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from tests.entrypoints.server_utils import RemoteServer

# CI: a few examples per operation, a fixed seed, and the coverage phase's boundary values only where they break
# the schema (the valid ones each generate text, at a second apiece on a busy machine). A long local run, to
# find bugs (minutes): PAGELLM_SCHEMATHESIS_LONG=1 python -m pytest -q tests/entrypoints/test_schemathesis.py
# (many examples, a random seed, every boundary value, fuzzing repeated for 10 minutes).
LONG = os.environ.get("PAGELLM_SCHEMATHESIS_LONG") == "1"
MAX_EXAMPLES = 200 if LONG else 5
SEED = None if LONG else "1"
CONFIG = f"""\
[checks]
max_response_time = 30

[checks.positive_data_acceptance]
expected-statuses = ["2XX", "400", "404", "429"]

[phases.coverage.generation]
mode = "{'all' if LONG else 'negative'}"
"""
# What must never reach a client: Python's own words for its exceptions.
LEAKS = re.compile(r"Traceback|Error\b|Exception\b|<class|__init__|validation errors? for")
OPERATIONS = 15  # the LoRA routes (load, unload) included


@pytest.fixture(scope="module")
def server(tiny_so_model):
    args = [tiny_so_model, "--dtype", "float32", "--max-model-len", "64", "--kv-cache-memory", str(16 * 2**20),
            "--max-num-seqs", "4", "--max-queued-requests", "4"]
    with RemoteServer(args) as srv:
        yield srv


def run_schemathesis(server: RemoteServer, folder) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`st run --checks all` in its own folder (it keeps caches in the working directory); its output and the
    scenarios of its NDJSON report."""
    config = folder / "schemathesis.toml"
    config.write_text(CONFIG)
    report = folder / "report.ndjson"
    # The `st` script, not `python -m schemathesis.cli`: started that way (or with -c) its fuzzing of the chat
    # operation took a minute instead of seconds here (schemathesis 4.32; cause not found).
    cmd = [os.path.join(os.path.dirname(sys.executable), "st"), "--config-file", str(config), "--no-color", "run",
           server.url("/openapi.json"), "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
           "--suppress-health-check", "all", "--request-timeout", "60", "--generation-database", "none",
           "--report", "ndjson", "--report-ndjson-path", str(report)]
    cmd += ["--max-time", "600"] if LONG else ["--seed", SEED]
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=3600 if LONG else 600)
    scenarios = []
    if report.exists():
        for line in report.read_text().splitlines():
            event = json.loads(line)
            if "ScenarioFinished" in event:
                scenarios.append(event["ScenarioFinished"]["recorder"])
    return done, scenarios


def _body(response: dict) -> str:
    content = response.get("content") or {}
    return base64.b64decode(content.get("$base64", "")).decode("utf-8", "replace")


def test_schemathesis_all_checks(server, tmp_path):
    done, scenarios = run_schemathesis(server, tmp_path)
    output = done.stdout[-6000:] + done.stderr[-2000:]
    assert scenarios, output
    statuses: Counter = Counter()
    failed_checks = []
    bad_errors = []
    for scenario in scenarios:
        label = scenario["label"]
        for case_id, checks in scenario.get("checks", {}).items():
            failed_checks += [(label, c["name"]) for c in checks if c["status"] != "success"]
        for interaction in scenario.get("interactions", {}).values():
            response = interaction.get("response")
            if response is None:
                continue
            status = response["status_code"]
            statuses[(label.split(" ")[0], status // 100)] += 1
            if status == 400:
                error = json.loads(_body(response))["error"]
                named = error["param"] is None and error["message"].startswith("body") or \
                    error["param"] is not None and error["message"].startswith(error["param"])
                if not named or LEAKS.search(error["message"]) or error["type"] != "invalid_request_error":
                    bad_errors.append((label, error))
    server_errors = {k: v for k, v in statuses.items() if k[1] == 5}
    assert not server_errors, (server_errors, output)
    assert not failed_checks, (Counter(failed_checks), output)
    assert not bad_errors, bad_errors[:10]
    assert done.returncode == 0, output
    tested = {s["label"] for s in scenarios if s.get("interactions")} - {"Stateful tests"}
    assert len(tested) == OPERATIONS, tested
    assert statuses[("POST", 2)] > 0, statuses  # some generated requests were served, not only refused
