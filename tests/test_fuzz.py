"""The fuzz targets (fuzz/targets.py) run coverage-guided for a bounded time from the committed
seed corpus: about a minute each in CI (CI=true), a few seconds elsewhere; FULLPOWER_FUZZ_SECONDS
overrides both. A crash fails the test with the crashing input's path and libFuzzer's report."""

import os
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT

SECONDS = int(os.environ.get("FULLPOWER_FUZZ_SECONDS") or (60 if os.environ.get("CI") else 5))


@pytest.mark.parametrize("target", ["request", "frames", "config"])
@pytest.mark.timeout(SECONDS + 120)
def test_fuzz_target_finds_no_crash(target, tmp_path):
    result = subprocess.run([PYTHON, "-m", "fuzz.run", target, str(SECONDS), str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=SECONDS + 90)
    report = result.stdout[-3000:] + result.stderr[-6000:]
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert result.returncode == 0 and not crashes, f"{crashes}\n{report}"
    assert "Done" in report or "DONE" in report, report
