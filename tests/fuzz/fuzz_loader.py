"""Coverage-guided fuzzing of sid_fast's file readers with atheris (libFuzzer).

    python tests/fuzz/fuzz_loader.py tests/fuzz/corpus -max_total_time=600 -timeout=5 -rss_limit_mb=4096

The corpus folder is seeded with valid files (an EDM pickle, a sid_fast network file, a training state) when it is
empty; libFuzzer adds every input that reaches new code. A contract violation (loader_target.check_input) makes
libFuzzer write the input to crash-<sha1> and exit non-zero. -timeout is libFuzzer's own kill switch for inputs
that hang; the target itself fails any input slower than loader_target.TIME_LIMIT_S.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["sid_fast"]):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import loader_target


def main() -> None:
    dirs = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
    seeds = loader_target.seed_files(Path(tempfile.gettempdir()) / "sid_fast_fuzz_seeds")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        if not any(d.iterdir()):
            for s in seeds:
                (d / s.name).write_bytes(s.read_bytes())
    loader_target.warm_up(seeds)
    atheris.Setup(sys.argv, loader_target.check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
