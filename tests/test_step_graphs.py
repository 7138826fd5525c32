"""Whole-step CUDA graphs (`--cuda-graphs step`, sid_fast.training.graphs). Without a GPU the runner goes through the
capture's code path (generators seeded before the step and not re-seeded inside it, beta as a device tensor, counters
in place): that path must equal the eager step bit for bit, must fail when a piece is left out (planted), and must
have no capture-guard finding. On CUDA, the capture and replay against eager steps."""

from __future__ import annotations

import inspect

import pytest
import torch
from support.helpers import cfg_for, cpu_trainer, trainer_params

from sid_fast.flags import ConfigError
from sid_fast.guard import CaptureGuard
from sid_fast.training import graphs
from sid_fast.training.sid import SiDTrainer


def _state(tr):
    out = trainer_params(tr)
    for name, opt in (("opt_g", tr.opt_g), ("opt_fake", tr.opt_fake)):
        for i, st in enumerate(opt.state.values()):
            for k, v in st.items():
                out[f"{name}.{i}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
    out["stats"] = tr.stats.values.clone()
    out["consec"] = torch.stack([tr.consec_bad, tr.max_consec_bad]).clone()
    return out


def _run(teacher_file, graph_path: bool, steps=3, plant=None, **kw):
    tr = cpu_trainer(cfg_for(teacher_file, **kw))
    if graph_path:
        tr.step_graph = graphs.StepGraph(tr, capture=False)
        if plant == "no reseed":  # the generators seeded once, never again: later steps repeat nothing fresh
            seeded = []
            real = tr.seed_micro_batches
            tr.seed_micro_batches = lambda: seeded or seeded.extend(real()) or seeded
        if plant == "no beta":  # beta never filled: G_ema would not follow G's ramp-up
            tr.step_graph.beta.fill = lambda beta: None
    for _ in range(steps):
        tr.step()
    return _state(tr)


CASES = {
    "reference": dict(),
    "bf16-foreach-augment": dict(precision="bf16", optimizer="foreach", augment=0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_capture_path_equals_the_eager_step(teacher_file, case):
    eager = _run(teacher_file, False, **CASES[case])
    graph = _run(teacher_file, True, **CASES[case])
    assert eager.keys() == graph.keys()
    for k in eager:
        assert torch.equal(eager[k], graph[k]), k


@pytest.mark.parametrize("plant", ["no reseed", "no beta"])
def test_a_capture_path_missing_a_piece_differs(teacher_file, plant):
    eager = _run(teacher_file, False)
    planted = _run(teacher_file, True, plant=plant)
    assert any(not torch.equal(eager[k], planted[k]) for k in eager)


def test_the_captured_region_has_no_capture_guard_finding(teacher_file):
    tr = cpu_trainer(cfg_for(teacher_file, precision="bf16", optimizer="foreach"))
    tr.step_graph = graphs.StepGraph(tr, capture=False)
    tr.step()  # warm: the generators and optimizer states exist, as after the warm-up iterations on a GPU
    tr.seed_micro_batches()
    tr.step_graph.beta.fill(tr.ema_beta())
    with CaptureGuard() as guard:
        tr.step_graph._run_seeded()
    # The one exception is Adam's step on the CPU, which torch builds only non-capturable (its step count read on the
    # host); on CUDA the optimizers are built capturable (parallel.py), which moves that count to the device.
    src = inspect.getsource(SiDTrainer)
    line = inspect.getsourcelines(SiDTrainer)[1] + src.splitlines().index("            opt.step()")
    where = f"sid_fast/training/sid.py:{line}"
    assert any(f.where == where for f in guard.findings)  # the guard does see the CPU optimizer
    assert [f for f in guard.findings if f.where != where] == []


def test_step_graphs_are_refused_where_they_cannot_replay(teacher_file, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA device"):
        cfg_for(teacher_file, cuda_graphs="step")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks after the device's
    with pytest.raises(ConfigError, match="--cuda-graphs step with --fsdp: FSDP2's all-gathers"):
        cfg_for(teacher_file, cuda_graphs="step", fsdp=True)
    with pytest.raises(ConfigError, match="--cuda-graphs step with --method sida"):
        cfg_for(teacher_file, cuda_graphs="step", method="sida")
    with pytest.raises(ConfigError, match="--cuda-graphs 'always': choose one of none, sites, step"):
        cfg_for(teacher_file, cuda_graphs="always")
    from sid_fast.training.config import resolve_config

    with pytest.raises(ConfigError, match="--cuda-graphs step: Stable Diffusion prompts are tokenised on the host"):
        resolve_config("digits-lsg", dict(cuda_graphs="step"))
    assert cfg_for(teacher_file, cuda_graphs=True).cuda_graphs == "sites"  # a configuration of the old switch


@pytest.mark.gpu  # bench/acceptance.sh runs these
def test_captured_steps_replay_the_eager_steps(teacher_file):
    """Five steps, the last two replayed from the graph, against five eager steps with capturable Adam (whose bias
    corrections on the device round as the non-capturable ones may not: the same optimizer on both sides)."""
    from support.helpers import cfg_for as cfg

    def run(mode):
        c = cfg(teacher_file, cuda_graphs=mode)
        tr = __import__("sid_fast.training.run", fromlist=["build_trainer"]).build_trainer(
            c, torch.device("cuda"), log=lambda *a: None
        )
        if mode == "none":  # the same capturable Adam as the graph's
            for opt in (tr.opt_g, tr.opt_fake):
                for group in opt.param_groups:
                    group["capturable"] = True
        for _ in range(5):
            tr.step()
        torch.cuda.synchronize()
        return _state(tr), tr

    eager, _ = run("none")
    graph, tr = run("step")
    assert tr.step_graph.graph is not None
    for k in eager:
        assert torch.equal(eager[k].cpu(), graph[k].cpu()), k
