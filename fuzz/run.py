"""Run one fuzz target for a bounded time: python -m fuzz.run TARGET SECONDS [CORPUS_DIR].

The committed seed corpus (fuzz/corpus/TARGET) is copied into a scratch directory first, so a run
never writes into the repository. Exit 0 when nothing crashed; libFuzzer's non-zero exit and the
crashing input (written to the scratch directory, path printed) otherwise."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

from fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"


def main(argv: list[str]) -> None:
    name, seconds = argv[0], int(argv[1])
    scratch = Path(argv[2]) if len(argv) > 2 else Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    corpus = scratch / "corpus"
    shutil.copytree(CORPUS / name, corpus, dirs_exist_ok=True)
    args = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048",
            f"-artifact_prefix={scratch}/", "-print_final_stats=1"]
    atheris.Setup(args, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
