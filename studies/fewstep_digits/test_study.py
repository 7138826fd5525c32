"""The study's bookkeeping: the committed lines hold every (preset, K, seed, sampling steps) cell, and the README's
table is the one the `table` command renders from them."""

import json
from pathlib import Path

from click.testing import CliRunner

from studies.fewstep_digits.study import PRESETS, RESULTS, SAMPLE_STEPS, TRAIN_STEPS, main


def test_the_committed_results_fill_the_grid_and_the_readme_shows_them():
    recs = [json.loads(x) for x in (RESULTS / "fewstep_digits.jsonl").read_text().splitlines() if x.strip()]
    cells = sorted((r["preset"], r["train_steps"], r["seed"], r["sample_steps"]) for r in recs)
    assert cells == sorted((p, k, s, n) for p in PRESETS for k in TRAIN_STEPS for s in (0, 1) for n in SAMPLE_STEPS)
    assert all(r["num"] == 2000 and r["fd_digits"] > 0 for r in recs)
    assert all(0 <= r["prompt_acc"] <= 1 for r in recs if r["preset"] == "digits-lsg")
    result = CliRunner().invoke(main, ["table"])
    assert result.exit_code == 0, result.output
    readme = (Path(__file__).parent / "README.md").read_text()
    for line in result.output.strip().splitlines():
        assert line in readme, line
