"""train.py with one fault injected on the first attempt of a torchrun job, for the elastic-restart tests.

    torchrun --standalone --nproc_per_node=2 --max-restarts=1 tests/support/faulty_train.py TRAIN.PY-FLAGS

SID_FAST_TEST_FAULT says what happens while TORCHELASTIC_RESTART_COUNT is 0 (later attempts run clean):
- iteration:RANK:NIMG  rank RANK kills itself with SIGKILL at the start of the generator phase of the iteration that
  begins with NIMG images seen (in the middle of an iteration, after its fake-score step);
- state-write:NIMG     rank 0 kills itself with SIGKILL in the middle of writing the training state at NIMG images
  (after some bytes of the temporary file are written).
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    kind, *args = fault.split(":")
    rank = int(os.environ.get("RANK", "0"))
    if kind == "iteration":
        from sid_fast.training.sid import SiDTrainer

        target_rank, nimg = int(args[0]), int(args[1])
        phase = SiDTrainer.generator_phase

        def generator_phase(self):
            if rank == target_rank and self.cur_nimg == nimg:
                _die()
            return phase(self)

        SiDTrainer.generator_phase = generator_phase
    elif kind == "state-write":
        from sid_fast import checkpoints

        nimg = int(args[0])
        save = torch.save

        def torch_save(obj, f, *a, **kw):
            if rank == 0 and isinstance(obj, dict) and obj.get("cur_nimg") == nimg:
                f.write(b"PK\x03\x04" + b"\0" * 4096)  # the first bytes of a zip, then the process dies
                f.flush()
                _die()
            return save(obj, f, *a, **kw)

        checkpoints.torch.save = torch_save
    else:
        raise SystemExit(f"SID_FAST_TEST_FAULT={fault!r}: expected iteration:RANK:NIMG or state-write:NIMG.")


if __name__ == "__main__":
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("SID_FAST_TEST_FAULT"):
        install(os.environ["SID_FAST_TEST_FAULT"])
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
