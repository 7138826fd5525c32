"""Coverage-guided fuzzing of the parsers of what users type (prompt files, seed lists, flag values) with atheris.

    python tests/fuzz/fuzz_parsers.py tests/fuzz/parsers_corpus -max_total_time=600 -timeout=5

An empty corpus folder is seeded with parsers_target.SEEDS; a contract violation (parsers_target.check_input) makes
libFuzzer write the input to crash-<sha1> and exit non-zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["sid_fast"]):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import parsers_target


def main() -> None:
    for d in (Path(a) for a in sys.argv[1:] if not a.startswith("-")):
        d.mkdir(parents=True, exist_ok=True)
        if not any(d.iterdir()):
            for name, data in parsers_target.SEEDS.items():
                (d / name).write_bytes(data)
    atheris.Setup(sys.argv, parsers_target.check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
