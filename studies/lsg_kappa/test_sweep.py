"""The kappa sweep's bookkeeping: its summary is the runs' last evaluations, and the committed results agree with
themselves (the summary with the per-run lines, the teacher's values with the bundled teacher's file)."""

import json

import pytest

from studies.lsg_kappa.sweep import RESULTS, plot, summary


def _run(kappa, seed, fd, acc):
    return dict(kappa=kappa, seed=seed, kimg=[2.0, 4.0], fd_digits=[99.0, fd], prompt_acc=[0.1, acc])


def test_summary_is_the_last_evaluation_of_each_run_with_the_teacher_beside_it(tmp_path):
    runs = [_run(2.0, 1, 6.0, 0.9), _run(2.0, 0, 4.0, 0.8), _run(4.5, 0, 10.0, 0.95)]
    teacher = {2.0: dict(fd_digits=3.0, prompt_acc=0.85, sampler="ddim25")}
    s = summary(runs, teacher)
    assert list(s) == ["2", "4.5"]
    assert s["2"]["seeds"] == [0, 1] and s["2"]["fd_digits"] == [4.0, 6.0] and s["2"]["fd_mean"] == 5.0
    assert s["2"]["acc_mean"] == pytest.approx(0.85) and s["2"]["acc_sd"] == pytest.approx(0.0707, abs=1e-4)
    assert s["2"]["teacher_fd_digits"] == 3.0 and s["4.5"]["teacher_fd_digits"] is None and s["4.5"]["fd_sd"] == 0
    plot(s, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_the_committed_sweep_agrees_with_itself_and_with_the_bundled_teacher():
    from sid_fast.t2i.digits import FOLDER, TEACHER_METRICS

    recs = [json.loads(x) for x in (RESULTS / "lsg_kappa.jsonl").read_text().splitlines() if x.strip()]
    runs = [r for r in recs if r["bench"] == "lsg_kappa"]
    (s,) = [r["summary"] for r in recs if r["bench"] == "lsg_kappa_summary"]
    committed_teacher = {r["kappa"]: r for r in json.loads((FOLDER / TEACHER_METRICS).read_text())["teacher"]}
    assert summary(runs, committed_teacher) == s
    assert sorted(x["kappa"] for x in s.values()) == [1.0, 1.5, 2.0, 3.0, 4.5]
    assert all(len(x["seeds"]) >= 2 for x in s.values())
    assert all(r["preset"] == "digits-lsg" and r["guidance"] == [r["kappa"]] * 3 for r in runs)
