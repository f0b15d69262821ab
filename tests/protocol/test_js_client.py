"""A second client, in JavaScript (npm ``nats``), written from docs/protocol.md alone, against a real node.

tests/protocol/js/client.mjs speaks only what the page says; it prints one JSON line per case with what
it observed and the page's expectations it found broken. Each case is asserted here on its own. Without
Node.js or its installed dependencies (``make test`` runs ``npm ci --prefix tests/protocol/js``) the
test is skipped locally and fails when ``CI=true``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.protocol.conftest import Bus

JS = Path(__file__).parent / "js"
CASES = ["request", "no_responders", "error_reply", "unknown_function", "plain_direct_message",
         "bytes_direct_message", "explicit_envelope", "invalid_envelope", "topic_publish", "discovery", "control_list",
         "control_stats", "bad_control_body", "trace_id_back"]
#: the whole client: 15 cases of a few round trips each, the slowest a durable delivery (< 1 s here)
CLIENT_TIMEOUT_S = 60


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node (Node.js) is not installed"
    if not (JS / "node_modules" / "nats").is_dir():
        return "tests/protocol/js/node_modules is missing: run `npm ci --prefix tests/protocol/js` (make test does)"
    return None


@pytest.fixture(scope="module")
def js_results(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    missing = _missing()
    if missing is not None:  # checked first: no server or node is started for nothing
        if os.environ.get("CI") == "true":
            pytest.fail(f"the JavaScript protocol client cannot run in CI: {missing}")
        pytest.skip(missing)
    node = shutil.which("node")
    assert node is not None
    protocol_bus: Bus = request.getfixturevalue("protocol_bus")
    proc = subprocess.run([node, "client.mjs", protocol_bus.url, protocol_bus.node_id], cwd=JS,
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False)
    results: dict[str, dict[str, Any]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["case"]] = result
    assert proc.returncode == 0, f"client.mjs exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return results


@pytest.mark.parametrize("case", CASES)
def test_js_client_case(js_results: dict[str, dict[str, Any]], case: str) -> None:
    assert case in js_results, f"client.mjs printed no result for {case!r} (it printed {sorted(js_results)})"
    result = js_results[case]
    observed = json.dumps(result.get("observed"))[:1500]
    assert result["ok"], f"{case}: " + "; ".join(result["problems"]) + f"\nobserved: {observed}"


def test_js_client_runs_every_case(js_results: dict[str, dict[str, Any]]) -> None:
    assert sorted(js_results) == sorted(CASES), "client.mjs and this test must list the same cases"
