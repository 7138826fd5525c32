"""What the trainer's collaborators (sid_fast.training.loop, .state, .snapshots) read and write, typed, instead of
the trainer's attributes:

- `RunContext`: fixed when the trainer is built (the configuration, the teacher family, the device and the process's
  place among the others, the kernel selection), except where the run writes (its directory, log and tracker: set
  once the run directory is decided);
- `Progress`: what moves as the run trains (images and ticks seen, the device-side tick statistics, the bad-step
  counters, the metric history, a stop request): with the networks and optimizers, what a training state holds;
- `Trained`: the networks (sid_fast.families.Networks) and how the processes train them (sid_fast.training.parallel's
  wrappers and optimizers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sid_fast.families import Family, Networks
from sid_fast.training.config import TrainConfig
from sid_fast.training.parallel import Parallel
from sid_fast.training.tickstats import TickStats
from sid_fast.training.trackers import Tracker


@dataclass
class RunContext:
    cfg: TrainConfig
    family: Family
    device: torch.device
    rank: int
    world: int
    rounds: int  # micro-batches per process and phase
    kernels: object  # sid_fast.ops' selection, entered around every step and snapshot
    run_dir: Path | None = None
    log: Callable[[str], None] = print
    tracker: Tracker = field(default_factory=Tracker)  # run() sets the --tracker one on rank 0


@dataclass
class Progress:
    stats: TickStats
    consec_bad: torch.Tensor  # consecutive iterations with non-finite gradients (on the device)
    max_consec_bad: torch.Tensor
    cur_nimg: int = 0
    cur_tick: int = 0
    tick_start_nimg: int = 0
    metrics_history: list[dict] = field(default_factory=list)
    stop_requested: bool = False

    @classmethod
    def start(cls, device: torch.device) -> Progress:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return cls(TickStats(device), zero, zero.clone())


@dataclass
class Trained:
    nets: Networks
    par: Parallel

    def nets_and_opts(self):
        """(network, its optimizer, its key in a training state, its optimizer's key) of G and the fake score."""
        return (
            (self.nets.G, self.par.opt_g, "G", "opt_g"),
            (self.nets.fake, self.par.opt_fake, "fake_score", "opt_fake"),
        )


class Forward:
    """A trainer attribute that is its RunContext's or its Progress's (trainer.cur_nimg is trainer.progress.cur_nimg):
    one place holds each value, and the trainer's own code and its users read it as before."""

    def __init__(self, holder: str):
        self.holder = holder

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(getattr(obj, self.holder), self.name)

    def __set__(self, obj, value):
        setattr(getattr(obj, self.holder), self.name, value)
