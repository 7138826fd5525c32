"""Teacher families as plug-ins: one module per family (EDM, EDM2, Stable Diffusion, flow matching), each a
`Family` of the protocol in sid_fast.families.base, and this registry, the one place that decides which family a
configuration, a loaded network or a training state belongs to.

A new family (e.g. flow-matching DiTs) is one module with its Family subclass, its denoiser and its presets, plus its
name in FAMILIES (and NETWORK_FAMILIES if its teachers are network files) and MODULES (its presets).
"""

from __future__ import annotations

import torch

from sid_fast import checkpoints
from sid_fast.families import edm, edm2, flow, sd
from sid_fast.families.base import ASSETS, FakeOutput, Family, Networks, SiDASupport, TeacherSpec
from sid_fast.families.edm import DIGITS_TEACHER_PATH, EDMFamily
from sid_fast.families.edm2 import EDM2Family
from sid_fast.families.flow import FlowFamily
from sid_fast.families.sd import SDFamily
from sid_fast.flags import ConfigError

# Families that claim a configuration by its teacher folder or preset, then those of network files, by the network.
# FlowFamily before SDFamily: both read diffusers folders, and only the flow family's model_index.json names SD3.
FAMILIES: tuple[type[Family], ...] = (FlowFamily, SDFamily, EDM2Family, EDMFamily)
NETWORK_FAMILIES: tuple[type[Family], ...] = (EDM2Family, EDMFamily)  # the first whose `owns(network)` holds
MODULES = (edm, edm2, sd, flow)  # each holds its presets (PRESETS) and their reference statistics (FID_REFS)


def _merged(attr: str) -> dict:
    out: dict = {}
    for module in MODULES:
        clash = set(out) & set(getattr(module, attr))
        assert not clash, f"{module.__name__}.{attr} repeats {sorted(clash)}"
        out.update(getattr(module, attr))
    return out


PRESETS: dict[str, dict] = _merged("PRESETS")  # every family's presets: the values a --preset sets
FID_REFS: dict[str, str] = _merged("FID_REFS")  # the official reference statistics of presets with FID


def detect(cfg, network: torch.nn.Module | None = None) -> type[Family]:
    """The family of the configuration's teacher, decided here only: a family that claims it by its folder (Stable
    Diffusion: a diffusers folder, or one of its presets); for a network file, the loaded network's family when it is
    given (EDM2's Precond, else EDM), before that the family whose presets name the configuration (EDM2's), else
    EDM's (they share the loader and the checks before the network is read)."""
    for family in FAMILIES:
        if network is not None and family in NETWORK_FAMILIES:
            return next(f for f in NETWORK_FAMILIES if f.owns(network))
        if family.claims(cfg):
            return family
    return EDMFamily


def load(cfg, device: torch.device, network=None, spec: TeacherSpec | None = None, fid=None) -> Family:
    """detect -> validate -> load: the family's flags checked, then its teacher (from cfg.teacher unless `network`
    and its `spec` are given: tests and benchmarks bring networks that are not files) and its inputs. Every refusal is
    one ConfigError or CheckpointError sentence naming the flag or the file."""
    family = detect(cfg, network)
    family.check_config(cfg)  # before any file is read
    if family not in NETWORK_FAMILIES:  # a folder family (Stable Diffusion) loads its own teacher
        return family.load(cfg, device)
    if network is None:
        network, info = checkpoints.load_network_file(cfg.teacher)
        spec = TeacherSpec(info["class_name"], info["init_kwargs"], network.state_dict(), info.get("meta", {}))
    elif spec is None:
        raise ValueError("families.load: a teacher network given without its TeacherSpec (class, kwargs, weights).")
    owner = detect(cfg, network)  # the network decides between the network families
    if owner is not family:
        owner.check_config(cfg)
    return owner.load(cfg, device, network, spec, fid=fid)


def by_name(name: str) -> type[Family]:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ConfigError(f"unknown teacher family {name!r}; sid_fast has {', '.join(f.name for f in FAMILIES)}.")


def of_state(state: dict, path) -> type[Family]:
    """The family of a training state: recorded by name, or (states written before the name was recorded) found by
    G's class name."""
    if isinstance(state.get("family"), str):
        return by_name(state["family"])
    for family in FAMILIES:
        if state.get("class_name") in family.generator_classes:
            return family
    raise checkpoints.CheckpointError(
        f"{path}: no teacher family builds its network class {state.get('class_name')!r}."
    )


__all__ = [
    "ASSETS",
    "DIGITS_TEACHER_PATH",
    "FAMILIES",
    "FID_REFS",
    "PRESETS",
    "Family",
    "FakeOutput",
    "Networks",
    "SiDASupport",
    "TeacherSpec",
    "by_name",
    "detect",
    "load",
    "of_state",
]
