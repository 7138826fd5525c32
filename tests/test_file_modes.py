"""Every file a run writes gets the mode open() gives under the process's umask (weights, configs, cards, states,
grids, logs), so that colleagues on a shared filesystem can read a generator; mkstemp/mkdtemp (0600/0700) and
safetensors' save_file (0600) would otherwise leave some of them private."""

import os
import stat

import pytest

from sid_fast.training.config import resolve_config


def _modes(root):
    """{path relative to root: permission bits} of every file and folder below root."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("preset", ["digits", "digits-lsg"])
def test_a_run_writes_every_file_with_the_umask_mode(tmp_path, preset, umask):
    from sid_fast.training.run import run

    cfg = resolve_config(
        preset,
        dict(
            outdir=str(tmp_path / "runs"), batch=8, batch_gpu=8, duration=16e-6, tick=0.008, snap=1, metrics="none"
        ),  # fmt: skip
    )
    old = os.umask(umask)
    try:
        run_dir, status = run(cfg, log_to_stdout=False)
    finally:
        os.umask(old)
    assert status == "done"
    modes = _modes(run_dir)
    names = set(modes)
    # The run wrote what this test is about: a generator folder (safetensors weights), states, grids, options, logs.
    assert any(n.endswith(".safetensors") for n in names) and any(n.startswith("training-state-") for n in names)
    assert any(n.endswith(".png") for n in names) and "training_options.json" in names
    wrong = {n: oct(m) for n, m in modes.items() if m != (0o777 if (run_dir / n).is_dir() else 0o666) & ~umask}
    assert wrong == {}
