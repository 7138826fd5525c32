"""The configuration's sections: every field declared in one, a run's identity taken from the declared identity
sections (not a hand-kept list), the family section exactly the families' own settings, presets from the families,
--dry-run by section with the detected family's settings only."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

import train
from sid_fast import families
from sid_fast.training.config import (
    IDENTITY_FIELDS,
    PRESETS,
    SECTION_OF,
    SECTIONS,
    TrainConfig,
    _in,
    identity_differences,
    identity_fields,
    resolve_config,
)


def test_every_field_is_in_one_declared_section():
    assert set(SECTION_OF) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(SECTION_OF.values()) <= set(SECTIONS)
    # Planted: a field added without a section is refused where the identity is computed.
    Bad = dataclasses.make_dataclass(
        "Bad", [("new_flag", bool, dataclasses.field(default=False))], bases=(TrainConfig,)
    )
    with pytest.raises(TypeError, match="new_flag"):
        identity_fields(Bad)


def test_identity_is_the_identity_sections():
    assert IDENTITY_FIELDS == {n for n, s in SECTION_OF.items() if s in ("inputs", "algorithm", "family")}
    # What changes the computation is in it; how fast, how spread, how long and what is measured is not.
    assert {"alpha", "precision", "batch_gpu", "seed", "teacher", "cfg_eval_real", "P_mean"} <= IDENTITY_FIELDS
    assert not {"compile", "kernels", "fsdp", "checkpointing", "duration", "metrics", "outdir"} & IDENTITY_FIELDS
    # Planted: a new speed option declared in its section stays out of the identity without any list to update, and a
    # new algorithm setting enters it.
    Planted = dataclasses.make_dataclass(
        "Planted",
        [("fused_new_thing", bool, _in("speed", False)), ("new_weighting", str, _in("algorithm", "sid"))],
        bases=(TrainConfig,),
    )
    planted = identity_fields(Planted)
    assert "fused_new_thing" not in planted and "new_weighting" in planted


def test_a_state_continues_under_other_speed_flags_and_not_under_another_algorithm():
    base = resolve_config("digits", {}).to_json()
    fast = resolve_config("digits", dict(precision="fp32", compile=True, compile_backend="eager", kernels="all",
                                         checkpointing="selective", optimizer="fused")).to_json()  # fmt: skip
    assert identity_differences(base, fast) == []
    other = resolve_config("digits", dict(g_beta1=0.5, cfg_eval_real=1.0)).to_json()
    assert identity_differences(base, other) == ["--g-beta1 0.0 vs 0.5"]


def test_the_family_section_is_the_families_own_settings():
    family_section = {n for n, s in SECTION_OF.items() if s == "family"}
    assert set().union(*(f.fields for f in families.FAMILIES)) == family_section
    for f in families.FAMILIES:
        assert set(f.fields) <= family_section, f.name


def test_presets_come_from_the_families_and_are_a_base_plus_changes():
    assert PRESETS is families.PRESETS
    owner = {name: m.__name__ for m in families.MODULES for name in m.PRESETS}
    assert owner["cifar10-uncond"].endswith(".edm") and owner["edm2-img512-xs"].endswith(".edm2")
    assert owner["sd15-lsg2"].endswith(".sd") and owner["digits-lsg"].endswith(".sd")
    assert owner["sd35-large-sid"].endswith(".flow") and owner["flux-dev-sid"].endswith(".flow")
    assert owner["sana-600m-512-sid"].endswith(".flow") and owner["digits-flow"].endswith(".flow")
    assert owner["sdxl-lsg2"].endswith(".sd")
    for name in PRESETS:  # each resolves (a teacher given where the preset has none)
        over = {} if PRESETS[name].get("teacher") else dict(teacher="t", data_prompt_text="p.txt")
        if PRESETS[name].get("method") == "sida" and not PRESETS[name].get("data"):
            over["data"] = "d.zip"
        if PRESETS[name].get("needs_sid_model"):
            over["sid_model"] = "g.pkl"
        if PRESETS[name].get("metrics") not in ("none", "fd-digits"):
            over["data_stat"] = "ref.npz"
        if PRESETS[name].get("method") == "sida" and owner[name].endswith(".flow"):  # pairs: captions, no prompts
            over.pop("data_prompt_text", None)
        elif name.startswith(("sd", "flux", "sana")) or name in ("digits-lsg", "digits-flow"):  # prompts, no --data
            over.pop("data", None)
        else:
            over.pop("data_prompt_text", None)
        cfg = resolve_config(name, over)
        assert families.detect(cfg).name == owner[name].rpartition(".")[2], name


def test_dry_run_prints_the_sections_and_the_detected_familys_settings():
    r = CliRunner().invoke(train.main, ["--preset", "digits-edm2", "--dry-run"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["teacher_family"] == "edm2" and set(out) == {"teacher_family", *SECTIONS}
    assert "cfg_eval_real" not in out["family"] and {"P_mean", "return_logvar"} <= set(out["family"])
    assert out["algorithm"]["alpha"] == 1.2 and out["speed"]["kernels"] == "none"
