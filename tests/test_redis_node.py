"""A Node client on O7s's Redis port (issue 12): node-redis (tests/clients/node, from its lockfile, installed
by scripts/install with `npm ci`) through a real `o7s serve --redis-listen` in front of a real redis-server:
plain commands, a pipeline, MULTI/EXEC, errors that keep the connection, and Pub/Sub."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

NODE_DIR = Path(__file__).parent / "clients" / "node"
NODE = shutil.which("node")


def test_node_redis_through_o7s(rp, ra, direct) -> None:
    if NODE is None:
        pytest.fail("node is not installed (scripts/install installs Debian's nodejs)")
    if not (NODE_DIR / "node_modules" / "redis").is_dir():
        pytest.fail(f"npm package redis missing in {NODE_DIR} (scripts/install runs npm ci there)")
    url = f"redis://{quote(ra.name)}:{quote(ra.password, safe='')}@127.0.0.1:{rp.port}"
    r = subprocess.run([NODE, str(NODE_DIR / "node_redis.js"), url], cwd=NODE_DIR, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    tag = out["tag"]
    assert "client_error" not in out and "sub_error" not in out, out
    assert out["set"] == "OK" and out["get"] == "v1"
    assert out["hgetall"] == {"a": "1", "b": "2"}
    assert out["keys"] == [f"{tag}:h", f"{tag}:k"]  # the org's names, without the prefix
    assert out["pipeline_len"] == 101 and out["pipeline_last"] == "99"
    assert out["multi"] == [1, 2, "2"]
    assert "not an integer" in out["incr_error"]
    assert "O7s refuses 'FLUSHALL'" in out["flushall"]
    assert out["published"] == 1 and out["message"] == [f"{tag}:ch", "hello"]
    assert out["deleted"] == 103  # k, h, p0..p99, n: the keys the workload made, all in the org's namespace
    assert direct.keys(f"*{tag}*") == []  # the backend saw them under the prefix, now gone
