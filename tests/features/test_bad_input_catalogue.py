"""Issue 9's bad-input catalogue (tests/features/bad_input_cases.py), run out of process: a call that
crashes the interpreter fails its own case, and the rest run on in a fresh process. Every case
must raise a Python exception of the expected kind whose message names the argument, and leave
every tensor it was given (caches, outputs) bitwise unchanged."""

import json
import os
import re
import subprocess
import sys

import pytest

import flash_attn_ext
from bad_input_cases import CASES, VE_TE

HERE = os.path.dirname(os.path.abspath(__file__))
# The child imports the same flash_attn_ext as this process (a source tree on PYTHONPATH or
# the installed package).
_ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(flash_attn_ext.__file__))), HERE]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ),
)


def _run_catalogue(cases=CASES, env=_ENV):
    results, start = {}, 0
    while start < len(cases):
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "bad_input_cases.py"), str(start)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=HERE,
            env=env,
        )
        last_started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                last_started = msg["start"]
            else:
                results[msg["index"]] = msg
        if proc.returncode == 0 and len(cases) - 1 in results:
            break
        crashed = last_started if last_started is not None and last_started not in results else start
        results[crashed] = {
            "index": crashed,
            "id": cases[crashed][0],
            "crashed": proc.returncode,
            "stderr": proc.stderr[-3000:],
        }
        start = crashed + 1
    return results


@pytest.fixture(scope="module")
def catalogue():
    return _run_catalogue()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input(catalogue, index):
    case_id, pattern, code = CASES[index][:3]
    allowed = CASES[index][3] if len(CASES[index]) > 3 else VE_TE
    r = catalogue[index]
    assert "crashed" not in r, f"{code!r} killed the interpreter (rc {r.get('crashed')}):\n{r.get('stderr')}"
    assert r["raised"] is not None, f"{code!r} raised nothing"
    assert set(r["raised"]) & set(allowed), f"{code!r} raised {r['raised'][0]}: {r['message']}"
    assert re.search(pattern, r["message"]), f"{code!r}: message does not name the argument ({pattern}): {r['message']}"
    assert not r["changed"], f"{code!r} modified {r['changed']}"


def test_runner_survives_a_crashing_case():
    """The runner's own check: a case that aborts the interpreter is reported as a crash of that
    case, and the cases after it still run (in a fresh process)."""
    env = dict(_ENV, FLASH_ATTN_EXT_CATALOGUE_SELFTEST="1")
    cases = [("selftest/abort", "", "os.abort()")] + CASES
    results = _run_catalogue(cases, env)
    assert results[0]["crashed"] != 0
    assert results[1]["id"] == CASES[0][0] and results[1]["raised"] is not None
    assert len(results) == len(cases)
