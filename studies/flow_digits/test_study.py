"""The study's bookkeeping: the committed lines hold every (kappa, K, sampling steps) cell and the generators' start,
and the README's table is the one the `table` command renders from them."""

import json
from pathlib import Path

from click.testing import CliRunner

from studies.flow_digits.study import KAPPAS, RESULTS, SAMPLE_STEPS, TRAIN_STEPS, main


def test_the_committed_results_fill_the_grid_and_the_readme_shows_them():
    recs = [json.loads(x) for x in (RESULTS / "flow_digits.jsonl").read_text().splitlines() if x.strip()]
    cells = sorted((r["kappa"], r["train_steps"], r["sample_steps"]) for r in recs if r["bench"] == "flow_digits")
    assert cells == sorted((k, t, s) for k in KAPPAS for t in TRAIN_STEPS for s in SAMPLE_STEPS)
    assert sorted(r["sample_steps"] for r in recs if r["bench"] == "flow_digits_start") == list(SAMPLE_STEPS)
    assert all(r["num"] == 2000 and 0 <= r["prompt_acc"] <= 1 and r["fd_digits"] > 0 for r in recs)
    result = CliRunner().invoke(main, ["table"])
    assert result.exit_code == 0, result.output
    readme = (Path(__file__).parent / "README.md").read_text()
    for line in result.output.strip().splitlines():
        assert line.replace("7.86 / 0.962", "**7.86 / 0.962**") in readme, line
