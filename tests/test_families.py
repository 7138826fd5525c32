"""Teacher families as plug-ins (sid_fast.families): one detection, each family's checks in its own place, the
protocol every family fills, and the family of a training state."""

from __future__ import annotations

import inspect

import pytest
import torch

from sid_fast import families
from sid_fast.checkpoints import CheckpointError, load_network_file
from sid_fast.families import DIGITS_TEACHER_PATH, FAMILIES, Family
from sid_fast.families.edm import EDMFamily
from sid_fast.families.edm2 import EDM2Family
from sid_fast.families.sd import SDFamily
from sid_fast.training.config import ConfigError, resolve_config
from sid_fast.training.run import build_trainer

EDM2_TEACHER = DIGITS_TEACHER_PATH.parent / "digits_edm2_teacher.pt"


def test_one_detection_by_folder_preset_and_network():
    assert families.detect(resolve_config("digits", {})) is EDMFamily
    assert families.detect(resolve_config("digits-edm2", {})) is EDM2Family
    assert families.detect(resolve_config("digits-lsg", {})) is SDFamily
    # A network file's family is the loaded network's, whatever the preset says.
    cfg = resolve_config("digits", {})
    edm2_net, _ = load_network_file(EDM2_TEACHER)
    edm_net, _ = load_network_file(DIGITS_TEACHER_PATH)
    assert families.detect(cfg, edm2_net) is EDM2Family and families.detect(cfg, edm_net) is EDMFamily
    # A diffusers folder is Stable Diffusion's whatever the preset.
    assets = DIGITS_TEACHER_PATH.parent
    sd_cfg = resolve_config(
        "digits", dict(teacher=str(assets / "digits-sd"), data_prompt_text=str(assets / "digits-prompts.txt"))
    )
    assert families.detect(sd_cfg) is SDFamily


def test_every_family_fills_the_protocol():
    required = ["claims", "check_config", "load", "build_networks", "make_denoiser", "draw", "write_generator",
                "update_generator", "export"]  # fmt: skip
    for family in FAMILIES:
        for name in required:
            assert getattr(family, name) is not getattr(Family, name), (family.name, name)
        assert family.name and family.generator_classes and family.folder_files
    # The denoiser seam: the same methods, neutral names (a level, a condition), in every family.
    seam = ["image_shape", "fake_level", "generator_level", "noise", "noisy", "generate", "teacher", "fake",
            "fake_loss_sum", "generator_loss_sum", "begin_phase", "aug_zeros"]  # fmt: skip
    from sid_fast.families.edm import EDMDenoiser
    from sid_fast.families.sd import SDDenoiser

    for den in (EDMDenoiser, SDDenoiser):
        for name in seam:
            assert callable(getattr(den, name)), (den, name)
        params = inspect.signature(den.fake).parameters
        assert "sigma" not in params and "labels" not in params


def test_each_check_refuses_in_its_place_in_one_sentence(tmp_path):
    # Configuration only (resolve_config): the family's own flags.
    with pytest.raises(ConfigError, match=r"^--augment 0.1: EDM's augmentation is not built for Stable Diffusion"):
        resolve_config("digits-lsg", dict(augment=0.1))
    with pytest.raises(ConfigError, match=r"^--cfg-eval-fake 2: guidance applies to Stable Diffusion teachers"):
        resolve_config("digits", dict(cfg_eval_fake=2.0))
    # What needs the file: the family's loader (the bundled digits teacher has no augment labels).
    cfg = resolve_config("digits", dict(augment=0.1))
    with pytest.raises(ConfigError, match=r"^--augment 0.1: the networks have no augment labels"):
        build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    with pytest.raises(ConfigError, match="SiDA with a Stable Diffusion teacher is not built"):
        resolve_config("digits-lsg", dict(method="sida", data="digits"))


def test_the_family_of_a_training_state():
    assert families.of_state(dict(family="sd"), "s.pt") is SDFamily
    # States written before the family was recorded: by G's class name.
    assert families.of_state(dict(class_name="EDMPrecond"), "s.pt") is EDMFamily
    assert families.of_state(dict(class_name="Precond"), "s.pt") is EDM2Family
    assert families.of_state(dict(class_name="diffusers.UNet2DConditionModel"), "s.pt") is SDFamily
    with pytest.raises(CheckpointError, match=r"^s.pt: no teacher family builds its network class 'Foo'"):
        families.of_state(dict(class_name="Foo"), "s.pt")
    with pytest.raises(ConfigError, match="unknown teacher family 'dit'"):
        families.of_state(dict(family="dit"), "s.pt")
