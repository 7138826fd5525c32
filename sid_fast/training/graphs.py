"""Whole-step CUDA graphs (`--cuda-graphs step`): one SiD iteration (both phases over every micro-batch, the two
optimizer steps, the EMA, the statistics) captured once into a `torch.cuda.CUDAGraph` after warm-up iterations and
replayed every iteration after, so the host launches one graph instead of thousands of kernels.

What a replay cannot do is run Python, so everything the iteration reads from the host lives on the device, at
addresses fixed at capture:
- the random draws come from one generator per (phase, micro-batch) (SiDTrainer.micro_batch_rng), registered with the
  graph (`CUDAGraph.register_generator_state`) and re-seeded on the host before every replay with the iteration's
  hashed seeds: a replay draws what a fresh generator with that seed draws, as the eager step does;
- the EMA's beta (which ramps up with the images seen) is a 0-d device tensor filled before every replay (with 1 - beta
  beside it for the foreach EMA: sid_fast.ema.DeviceBeta);
- Adam is built capturable (its step count and bias corrections on the device: parallel.py);
- the tick statistics and the counters of steps with non-finite gradients are updated in place (TickStats,
  SiDTrainer.step_body), and a resumed state is copied into them, never rebinding them.

The warm-up iterations run eagerly on a side stream (cuDNN's and cuBLAS's workspaces, the optimizer's states and the
autograd graph's buffers exist before capture, as torch.cuda.graphs asks); DDP needs 11 of them before its
all-reduces can be captured (PyTorch's CUDA graphs notes: NCCL >= 2.9.6). Refused with FSDP2 and SiDA (config.py),
and with Stable Diffusion teachers, whose prompts are tokenised on the host inside each micro-batch
(families/sd.py).

On a machine without CUDA the same runner does everything but the capture: the seeded generators, the beta tensor
and the in-place counters, then `step_body`, so a CPU test checks that this path equals the eager step exactly
(tests/test_step_graphs.py). The capture itself has not run on a GPU yet: bench/acceptance.sh measures it.
"""

from __future__ import annotations

import torch

from sid_fast.ema import DeviceBeta

WARMUP = 3  # eager iterations before capture (one process)
WARMUP_DDP = 11  # PyTorch's CUDA graph notes for DDP


class StepGraph:
    """Runs `trainer.step_body` through a captured CUDA graph (or, without CUDA, through the capture's code path)."""

    def __init__(self, trainer, capture: bool | None = None):
        self.tr = trainer
        self.capture = trainer.device.type == "cuda" if capture is None else capture
        self.warmup = WARMUP_DDP if trainer.world > 1 else WARMUP
        self.beta = DeviceBeta(trainer.device)  # the EMA's beta, filled per step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def step(self) -> None:
        """One iteration: the generators seeded and beta filled for it (host work, no sync), then the replay."""
        tr = self.tr
        tr.seed_micro_batches()
        self.beta.fill(tr.ema_beta())
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.capture:
            self._run_seeded()
            return
        if self.eager_steps < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                tr.step_body(self.beta)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
            return
        graph = torch.cuda.CUDAGraph()
        gens = tr.seed_micro_batches()  # every generator exists after the warm-up iterations
        for g in gens:
            graph.register_generator_state(g)
        torch.cuda.synchronize()
        tr._rngs_seeded = True
        try:
            with torch.cuda.graph(graph):
                tr.step_body(self.beta)
        finally:
            tr._rngs_seeded = False
        self.graph = graph
        tr.seed_micro_batches()  # capture ran nothing: this iteration's work is the first replay
        graph.replay()

    def _run_seeded(self) -> None:
        """The capture's code path without a capture: draws from the generators seeded above, beta as a tensor."""
        tr = self.tr
        tr._rngs_seeded = True
        try:
            tr.step_body(self.beta)
        finally:
            tr._rngs_seeded = False
