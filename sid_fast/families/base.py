"""The teacher-family protocol: everything the SiD loop needs from a kind of teacher, and nothing of the loop itself.

A family is one module (sid_fast.families.edm, .edm2, .sd) holding a `Family` subclass, its denoiser and its presets.
The trainer is built as detect -> validate -> load -> build -> method (sid_fast.training.run.build_trainer):

1. **detect** (`claims`, class level): is the configuration's teacher (or, without one, its preset) of this family?
   sid_fast.families.detect asks each family in turn; this is the only place the question is decided.
2. **validate** (`check_config`, class level): the flags this family takes, refuses or needs, from the configuration
   alone (no file read), in one sentence naming the flag.
3. **load** (`load`, class level -> an instance): the teacher file or folder read through the safe loaders and
   checked against the flags, and the family's other inputs (class labels, prompts, real data, a VAE, FID inputs).
4. **build** (`build_networks`): the teacher (frozen), G, the fake score and G_ema, on the device, as plain modules;
   the fast path's options are then applied to them in one place by the trainer (`sid_fast.perf.prepare_networks`).
   `make_denoiser`: the family's noise levels, network calls, conversions and losses (the seam the phases call).
5. **method**: SiD runs with every family; SiDA needs `sida` (the fake score's discriminator head and its rules) and
   real data (`real_data`).

Conditioning (`draw`: z and the condition of a micro-batch, from the micro-batch's generator), the snapshot's
picture and generator folder (`grid`, `write_generator`, `update_generator`), its metrics (`evaluate`), and the
export of a training state's G_ema (`export`) complete the protocol. The phases speak of a noise level and a
condition: EDM's levels are sigma and its conditions one-hot class labels; Stable Diffusion's levels are integer
timesteps and its conditions text embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from sid_fast.flags import ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"  # the bundled teachers, prompts and their records


@dataclass
class FakeOutput:
    """One call of the fake score: its denoised estimate D (an x0-prediction), SiDA's discriminator logits (return_flag
    "encoder_decoder") and EDM2's log-variance u ([N, 1, 1, 1]) where the call returns them, and the raw network output
    where the family's fake-score loss reads it directly (Stable Diffusion: epsilon or v)."""

    D: torch.Tensor | None
    logits: torch.Tensor | None = None
    u: torch.Tensor | None = None
    raw: torch.Tensor | None = None


@dataclass
class TeacherSpec:
    """A network teacher's class, init kwargs and weights, from which G and the fake score start (SiD copies the
    teacher's EMA weights), and its metadata (e.g. its own FD-digits, drawn in the metric plot)."""

    class_name: str
    init_kwargs: dict
    state_dict: dict
    teacher_meta: dict = field(default_factory=dict)


@dataclass
class Networks:
    """The four networks of a run as the family builds them (plain modules on the device), and how G and the fake
    score are rebuilt from a training state (class name and init kwargs)."""

    teacher: torch.nn.Module
    G: torch.nn.Module
    fake: torch.nn.Module
    G_ema: torch.nn.Module
    class_name: str
    init_kwargs: dict
    g_init_kwargs: dict
    fake_init_kwargs: dict


@dataclass(frozen=True)
class SiDASupport:
    """What SiDA needs of a family beyond SiD: the fake score's discriminator head (return_flag "encoder" and
    "encoder_decoder"), the elementwise clipping of its gradients, and which official version's NaN rules apply."""

    fake_grad_clip: float | None
    edm2_rules: bool
    latent_pairs: bool = False  # real data are latent/caption pairs (sid_fast.training.sida.FlowSiDATrainer)


def fitted_generator(cfg, teacher_state: dict, generator_state: dict, what: str, skip=None) -> dict:
    """--sid-model's weights as float32 copies, which must fit the teacher's network exactly (every key and shape but
    those `skip` leaves out); one ConfigError naming the flag otherwise."""
    keep = (lambda k: True) if skip is None else (lambda k: not skip(k))
    want = {k: tuple(v.shape) for k, v in teacher_state.items() if keep(k)}
    got = {k: tuple(v.shape) for k, v in generator_state.items() if keep(k)}
    if got != want:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise ConfigError(
            f"--sid-model {cfg.sid_model}: not a generator of {what} ({len(diff)} tensors differ in name or shape, "
            f"e.g. {diff[0]})."
        )
    return {k: v.float() for k, v in generator_state.items()}


class Family:
    """One teacher family (see the module docstring). Subclasses fill the class attributes and the methods; the
    defaults below are what a family without the feature does."""

    name: ClassVar[str] = ""
    # The class names that a training state of this family records for G (state export finds the family by them).
    generator_classes: ClassVar[tuple[str, ...]] = ()
    # The fields of the configuration's family section that this family reads (--dry-run shows these).
    fields: ClassVar[tuple[str, ...]] = ()
    sida: ClassVar[SiDASupport | None] = None  # None: SiDA is not built for this family
    folder_files: ClassVar[tuple[str, ...]] = ()  # the files of its generator folder (an export's own files)

    # 1. detect, 2. validate (class level: nothing is loaded yet).
    @classmethod
    def claims(cls, cfg) -> bool:
        raise NotImplementedError

    @classmethod
    def missing_teacher(cls, cfg) -> str:
        """The sentence refusing a run without --teacher: what this family's teacher is and where to get it."""
        return f"--teacher is required for preset {cfg.preset!r}."

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse, in one sentence naming the flag, what this family cannot run (configuration only, no file)."""

    # 3. load.
    @classmethod
    def load(cls, cfg, device: torch.device) -> Family:
        raise NotImplementedError

    # 4. build.
    def build_networks(self, cfg, device: torch.device, log) -> Networks:
        raise NotImplementedError

    def make_denoiser(self, cfg, device: torch.device):
        raise NotImplementedError

    # Conditioning.
    def draw(self, g, n: int, device: torch.device, fake_phase: bool):
        """(z, condition) of a micro-batch of n, drawn from its generator `g` in the family's fixed order."""
        raise NotImplementedError

    def conditioning(self) -> str:
        """What the generator is conditioned on (the log and training_options.json)."""
        return "none (unconditional)"

    def describe(self, cfg) -> str:
        """The algorithm's settings for the log."""
        return f"alpha {cfg.alpha}"

    # 5. method inputs.
    real_data = None  # SiDA's real images (a dataset), loaded by `load` when --method sida

    # Outputs.
    def grid(self, G_ema, cfg, device: torch.device):
        """uint8 images [N, C, H, W] of G_ema for the snapshot's picture, or None when there is nothing to draw."""
        return None

    def write_generator(self, folder: Path, nets: Networks, cfg, kimg: float) -> Path:
        """G_ema as the family's generator folder (the run's own: other files in it are kept)."""
        raise NotImplementedError

    def update_generator(self, folder: Path, **meta) -> None:
        """Add metadata (a snapshot's metrics) to a folder written by `write_generator`."""
        raise NotImplementedError

    def evaluate(self, G_ema, cfg, device: torch.device, rank: int, world: int) -> dict[str, float] | None:
        """{metric key: value} of G_ema for --metrics, on rank 0 (None elsewhere and without metrics). Every rank
        calls it (FID generates its share of the images on each)."""
        return None

    def teacher_metric(self, key: str, cfg) -> tuple[float | None, str]:
        """(the teacher's value of a metric, its label) for the metric's plot; None when unknown."""
        return None, ""

    @classmethod
    def export(cls, state: dict, state_path, out, overwrite: bool) -> Path:
        """G_ema of a training state of this family written to `out` (`python -m sid_fast.training.state export`)."""
        raise NotImplementedError
