"""Declared flag domains: every numeric field of the training configuration has one, checked in one place; drawn values
(hypothesis) are either refused in one sentence naming the flag with nothing written, or accepted and one SiD
iteration runs with finite losses. The samplers', exporters' and Hub commands' flags likewise."""

import dataclasses
import math
import typing

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from sid_fast.flags import Domain
from sid_fast.training.config import DOMAINS, ConfigError, TrainConfig, flag, resolve_config
from sid_fast.training.run import build_trainer

TRAIN_OPTIONS = {p.name: p for p in train.main.params}
FIXTURE = HealthCheck.function_scoped_fixture  # the tmp_path_factory fixture is used per example on purpose
NUMERIC_FLAGS = sorted(n for n in DOMAINS if n in TRAIN_OPTIONS)


def test_every_numeric_field_declares_a_domain():
    hints = typing.get_type_hints(TrainConfig)
    numeric = {
        f.name for f in dataclasses.fields(TrainConfig) if hints[f.name] in (int, float, int | None, float | None)
    }
    assert numeric == set(DOMAINS)


def test_messages_name_the_flag_as_help_prints_it():
    for name in TrainConfig.__dataclass_fields__:
        if name in TRAIN_OPTIONS:
            assert flag(name) == TRAIN_OPTIONS[name].opts[0], name


def test_flags_are_dashed_and_the_official_spellings_are_hidden_aliases():
    from sid_fast.training.config import identity_differences

    for p in train.main.params:
        assert "_" not in p.opts[0], p.opts  # what --help prints
    help_text = CliRunner().invoke(train.main, ["--help"]).output
    assert "--init-sigma" in help_text and "--init_sigma" not in help_text and "--P_mean" not in help_text
    r = CliRunner().invoke(train.main, ["--init_sigma", "3", "--g_beta1", "0.5", "--P_mean", "-1", "--P_std", "1",
                                        "--dry-run"])  # fmt: skip
    assert r.exit_code == 0 and '"init_sigma": 3.0' in r.output and '"g_beta1": 0.5' in r.output, r.output
    # A refused resume names flags that exist (it once said --P-mean, --g-beta1 spelt from field names).
    a = resolve_config("digits", {}).to_json()
    b = resolve_config("digits", dict(init_sigma=3.0, g_beta1=0.5, P_mean=-1.0, P_std=1.0)).to_json()
    named = [d.split()[0] for d in identity_differences(a, b)]
    assert sorted(named) == ["--g-beta1", "--init-sigma", "--p-mean", "--p-std"]
    assert all(any(n in p.opts for p in train.main.params) for n in named), named


def test_domains_admit_and_refuse_exactly():
    d = Domain(float, 0, 1, lo_open=True)
    assert [d.admits(v) for v in (0.5, 1, 0, -1, math.nan, math.inf, True, "0.5")] == [1, 1, 0, 0, 0, 0, 0, 0]
    i = Domain(int, 1, 8)
    assert [i.admits(v) for v in (1, 8, 0, 9, 2.0)] == [1, 1, 0, 0, 0]
    assert i.describe() == "an integer in [1, 8]" and d.describe() == "a finite number in (0, 1]"


def _out_of_domain(d: Domain):
    """Text values outside `d`, by construction (not by asking `d`): non-finite, not a number, empty, beyond each
    bound, huge; for integers, a fraction."""
    bad = ["nan", "inf", "-inf", "", "abc", "1e400"]
    if d.kind is int:
        bad += ["1.5"]
    if d.lo is not None:
        bad += [repr(d.lo) if d.lo_open else repr(d.lo - (1 if d.kind is int else max(abs(d.lo), 1) * 1e-3))]
    if d.hi is not None:
        bad += [repr(d.hi) if d.hi_open else repr(d.hi + (1 if d.kind is int else max(abs(d.hi), 1) * 1e-3))]
        bad += ["99999999999999999999999"]
    return bad


BAD = [(n, v) for n in NUMERIC_FLAGS for v in _out_of_domain(DOMAINS[n])]


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[FIXTURE])
@given(case=st.sampled_from(BAD))
def test_train_refuses_out_of_domain_values_in_one_sentence_before_writing(tmp_path_factory, case):
    name, text = case
    out = tmp_path_factory.mktemp("out") / "runs"
    r = CliRunner().invoke(train.main, [TRAIN_OPTIONS[name].opts[0], text, "--outdir", str(out)])
    assert r.exit_code != 0 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert lines[-1].startswith("Error:") and TRAIN_OPTIONS[name].opts[0] in lines[-1], r.output
    assert "Traceback" not in r.output and not out.exists()


def _valid(name: str):
    """Values inside the domain that one CPU iteration of the digits preset can afford (sizes kept small)."""
    d = DOMAINS[name]
    if name in ("batch", "batch_gpu"):
        return st.integers(1, 16)
    if d.kind is int:
        return st.integers(int(d.lo if d.lo is not None else -(2**40)), int(d.hi if d.hi is not None else 2**40))
    lo = d.lo if d.lo is not None else -1e6
    hi = d.hi if d.hi is not None else 1e6
    return st.floats(lo, hi, exclude_min=d.lo_open, exclude_max=d.hi_open, allow_nan=False, allow_infinity=False)


@settings(max_examples=25, derandomize=True, deadline=None)
@given(data=st.data())
def test_train_accepts_in_domain_values_and_one_iteration_has_finite_losses(data):
    name = data.draw(st.sampled_from(NUMERIC_FLAGS))
    value = data.draw(_valid(name))
    flags = dict(batch=8, batch_gpu=8, metrics="none")
    flags[name] = value
    try:
        cfg = resolve_config("digits", flags)
        tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    except ConfigError as e:  # a relation between flags or with the teacher: one sentence naming a flag
        assert "\n" not in str(e) and "--" in str(e) or "preset" in str(e), str(e)
        return
    tr.step()
    sums = tr.stats.reduce()
    assert sums["rows_G"] > 0 and sums["rows_fake"] > 0, (name, value, sums)
    assert math.isfinite(sums["loss_G"]) and math.isfinite(sums["loss_fake"]), (name, value, sums)


def test_teacher_checks_run_before_anything_is_written(tmp_path):
    """A schedule of 500 timesteps with --init-timestep 625: refused after the teacher loads, before the run directory
    (it was an IndexError at the first step)."""
    import json
    import shutil

    from sid_fast.t2i import digits
    from sid_fast.training.run import run

    folder = tmp_path / "sd"
    shutil.copytree(digits.FOLDER, folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(dict(json.loads(sched.read_text()), num_train_timesteps=500)))
    cfg = resolve_config("digits-lsg", dict(teacher=str(folder), tmax=400, outdir=str(tmp_path / "runs")))
    with pytest.raises(ConfigError, match=r"--init-timestep 625: the teacher .* has 500 timesteps \(0 to 499\)"):
        run(cfg, log_to_stdout=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--guidance", "inf"], "--guidance must be a finite number"),
        (["--ema", "inf"], "--ema must be a finite number"),
        (["--preset", "digits-lsg", "--cfg_train_fake", "inf"], "--cfg-train-fake must be a finite number"),
        (["--lsg", "nan"], "--lsg must be a finite number"),
        (["--glr", "inf"], "--glr must be a finite number"),
        (["--ls", "inf"], "--ls must be a finite number"),
    ],
)
def test_the_reported_non_finite_flags_are_refused(tmp_path, argv, words):
    r = CliRunner().invoke(train.main, [*argv, "--outdir", str(tmp_path / "runs")])
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------
# The samplers', the Hub's and the state exporter's flags: every option has bad values drawn for it; each is refused
# in one sentence (click's or ours), with no traceback and nothing written; in-domain values sample.


def _command_cases(gen: str, state: str, sd: str):
    """{(command, option): [argv with a bad value for that option]} for every option of every command."""
    from sid_fast import hub, sample
    from sid_fast.t2i import sample as t2i_sample
    from sid_fast.training import state as state_cli

    base = dict(
        sample=(sample.main, ["--network", gen, "--seeds", "0-1"]),
        t2i=(t2i_sample.main, ["--network", sd, "--teacher", sd, "--prompt", "a handwritten one"]),
    )
    numbers = ["nan", "inf", "-1", "1e400", "abc", "", "99999999999999999999999"]
    bad = {
        ("sample", "network_path"): ["missing.pt", ""],
        ("sample", "outdir"): ["__FILE__"],
        ("sample", "seeds"): ["-1", "4294967296", "0-99999999", "3-1", "x", ""],
        ("sample", "sampler"): ["euler"],
        ("sample", "steps"): ["0", "10001", *numbers],
        ("sample", "churn"): ["1,2,3", "nan,0,1,1", "inf,0,1,1", "a,b,c,d", "-1,0,1,1"],
        ("sample", "class_idx"): ["7", "-1", "1.5", "abc"],
        ("sample", "init_sigma"): ["0", "81", *numbers],
        ("sample", "max_batch"): ["0", "65537", *numbers],
        ("sample", "subdirs"): ["--subdirs=maybe"],
        ("sample", "overwrite"): ["--overwrite=maybe"],
        ("sample", "grid"): ["__DIR__"],
        ("sample", "vae"): ["missing-vae"],
        ("t2i", "network"): ["missing-folder"],
        ("t2i", "teacher"): ["missing-folder"],
        ("t2i", "prompt"): [None],  # with --prompts too: one of them
        ("t2i", "prompts_file"): ["missing.txt", "__BLANK__"],
        ("t2i", "seeds"): ["-1", "4294967296", "0-99999999", "x"],
        ("t2i", "outdir"): ["__FILE__"],
        ("t2i", "batch"): ["0", "65537", *numbers],
        ("t2i", "overwrite"): ["--overwrite=maybe"],
        ("t2i", "dtype"): ["fp64"],
        ("t2i", "grid"): ["__DIR__"],
        ("t2i", "resolution"): ["7", "8193", *numbers],
        ("t2i", "init_timestep"): ["0", "1000", *numbers],
        ("t2i", "steps"): ["0", "65", *numbers],
        ("hub convert", "src"): ["missing.pt"],
        ("hub convert", "dst"): ["__FILE__"],
        ("hub convert", "overwrite"): ["--overwrite=maybe"],
        ("hub convert", "teacher"): ["missing-folder"],  # given with a .pt network: refused
        ("hub convert", "base_model"): ["someone/sd"],  # given with a .pt network: refused
        ("hub convert", "license_"): ["openrail"],  # likewise
        ("hub push", "folder"): ["missing-folder"],
        ("hub push", "repo_id"): ["__GEN_PT__"],  # a file, not a generator folder
        ("hub push", "private"): ["--private=maybe"],
        ("hub push", "token"): ["--token"],  # no value
        ("hub push", "message"): ["--message"],
        ("hub download", "repo_id"): ["not an id", "a/b/c", ""],
        ("state export", "state"): ["missing.pt", "__GEN_PT__"],
        ("state export", "out"): ["__FILE__"],
        ("state export", "overwrite"): ["--overwrite=maybe"],
    }
    cmds = dict(sample=sample.main, t2i=t2i_sample.main)
    cmds.update({f"hub {n}": c for n, c in hub.main.commands.items()})
    cmds.update({f"state {n}": c for n, c in state_cli.main.commands.items()})
    covered = {(c, p.name) for c, cmd in cmds.items() for p in cmd.params}
    assert covered == set(bad), sorted(covered ^ set(bad))
    return cmds, base, bad


def _argv(command, option, value, base, cmds, tmp, gen, state):
    param = next(p for p in cmds[command].params if p.name == option)
    special = {"__FILE__": str(tmp / "a-file"), "__DIR__": str(tmp),
               "__GEN_PT__": gen, "__BLANK__": str(tmp / "blank.txt")}  # fmt: skip
    value = special.get(value, value)
    if command in base:
        args = list(base[command][1])
        if option in ("network_path", "network", "teacher") or (option == "seeds" and "--seeds" in args):
            flag_ = param.opts[0]
            i = args.index(flag_) if flag_ in args else None
            if i is not None:
                del args[i : i + 2]
        if option == "prompt":
            return [*args, "--prompts", special["__BLANK__"], "--outdir", str(tmp / "out")]
        if option == "prompts_file":
            args = [a for a in args if a not in ("--prompt", "a handwritten one")]
        if getattr(param, "is_flag", False):
            return [*args, value, "--outdir", str(tmp / "out")]
        args += [param.opts[0], value]
        return args if option == "outdir" else [*args, "--outdir", str(tmp / "out")]
    sub = command.split()[1]
    if getattr(param, "is_flag", False) or value in ("--token", "--message"):
        pos = dict(convert=[gen, str(tmp / "dst")], push=[str(tmp), "me/x"], export=[state, str(tmp / "o.pt")])[sub]
        return [sub, *pos, value]
    pos = dict(
        convert=dict(
            src=[value, str(tmp / "dst")],
            dst=[gen, value],
            teacher=[gen, str(tmp / "dst"), "--teacher", value],
            base_model=[gen, str(tmp / "dst"), "--base-model", value],
            license_=[gen, str(tmp / "dst"), "--license", value],
        ),
        push=dict(folder=[value, "me/x"], repo_id=[value, "me/x"]),
        download=dict(repo_id=[value]),
        export=dict(state=[value, str(tmp / "o.pt")], out=[state, value]),
    )[sub][option]
    return [sub, *pos]


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    from support.helpers import NET, cfg_for, cpu_trainer

    from sid_fast.checkpoints import save_network
    from sid_fast.networks import build_network
    from sid_fast.t2i import digits

    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    gen = d / "gen.pt"
    save_network(gen, build_network("EDMPrecond", NET), NET, kind="generator", sigma_init=2.5)
    tr = cpu_trainer(cfg_for(str(gen)))
    tr.run_dir = d
    state = tr.save_state()
    return str(gen), str(state), str(digits.FOLDER)


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[FIXTURE])
@given(data=st.data())
def test_every_flag_of_the_samplers_hub_and_exporter_is_refused_in_one_sentence(tmp_path_factory, cli_inputs, data):
    from sid_fast import hub

    gen, state, sd = cli_inputs
    cmds, base, bad = _command_cases(gen, state, sd)
    command, option = data.draw(st.sampled_from(sorted(bad)))
    value = data.draw(st.sampled_from(bad[(command, option)]))
    tmp = tmp_path_factory.mktemp("case")
    (tmp / "a-file").write_text("mine")
    (tmp / "blank.txt").write_text("\n\n")
    before = sorted(p.name for p in tmp.iterdir())
    cmd = hub.main if command.startswith("hub") else cmds[command]
    if command.startswith("state"):
        from sid_fast.training import state as state_cli

        cmd = state_cli.main
    argv = _argv(command, option, value, base, cmds, tmp, gen, state)
    r = CliRunner().invoke(cmd, argv, env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code in (1, 2) and (r.exception is None or isinstance(r.exception, SystemExit)), (argv, r.output)
    assert "Traceback" not in r.output and r.output.strip().splitlines()[-1].startswith("Error"), (argv, r.output)
    assert sorted(p.name for p in tmp.iterdir()) == before, argv  # nothing written
    assert (tmp / "a-file").read_text() == "mine"


@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=[FIXTURE])
@given(
    steps=st.integers(1, 3),
    batch=st.integers(1, 70),
    class_idx=st.integers(0, 2),
    init_sigma=st.floats(0.01, 80),
    seeds=st.integers(0, 2**32 - 4),
)
def test_in_domain_sampler_flags_write_finite_images(tmp_path_factory, cli_inputs, steps, batch, class_idx,
                                                     init_sigma, seeds):  # fmt: skip
    import PIL.Image

    from sid_fast import sample

    gen, _, _ = cli_inputs
    out = tmp_path_factory.mktemp("s")
    for sampler in ("onestep", "heun"):
        args = ["--network", gen, "--seeds", f"{seeds}-{seeds + 2}", "--sampler", sampler, "--steps", str(steps)]
        args += ["--batch", str(batch), "--class", str(class_idx), "--init_sigma", repr(init_sigma)]
        r = CliRunner().invoke(sample.main, [*args, "--outdir", str(out / sampler)])
        assert r.exit_code == 0, r.output
        files = sorted((out / sampler).iterdir())
        assert len(files) == 3 and all(PIL.Image.open(f).size == (8, 8) for f in files)


# The other flags of train.py (names, paths, choices, switches): a bad value of each, drawn; refused in one sentence
# with nothing written, or (where the value only does not apply to the digits preset) a short run with finite losses.
FREE_TEXT = {"tracker_project"}  # any text is a project name
OTHER_BAD = {
    "outdir": ["__FILE__"],
    "preset": ["bogus", ""],
    "teacher": ["missing.pkl", "__FILE__", "https://127.0.0.1:9/x.pkl"],
    "cond": ["maybe", "2"],
    "desc": ["a/b", "..", "x\x00y"],
    "data": ["missing.zip", "__FILE__"],
    "data_prompt_text": ["__FILE__", "missing.txt"],
    "validation_prompts": ["missing.txt"],  # the digits preset's teacher takes no prompts
    "guidance": ["nan", "0", "-1", "inf", "x"],
    "return_logvar": ["--return-logvar=maybe"],
    "force_normalization": ["--no-force-normalization=1"],
    "method": ["gan", ""],
    "use_gan": ["maybe"],
    "xflip": ["maybe"],
    "sid_model": ["missing.pt", "__FILE__"],
    "precision": ["fp8"],
    "channels_last": ["--channels-last=1"],
    "compile": ["--compile=yes"],
    "compile_backend": ["xla"],
    "cuda_graphs": ["--cuda-graphs"],  # no CUDA here
    "checkpointing": ["all"],
    "noise_type": ["random"],
    "weighting": ["sigma"],
    "optimizer": ["sgd"],
    "fsdp": ["--fsdp=2"],
    "kernels": ["flash", "all,none", ""],
    "extra_snapshots": ["--extra-snapshots=1"],
    "tracker": ["mlflow"],
    "metrics": ["is", "fid"],  # fid needs --data-stat
    "dinov2": ["missing-dinov2.pth"],
    "data_stat": ["missing.npz", "__FILE__"],
    "vae": ["missing-vae"],
    "detector": ["missing-inception.pkl"],
    "resume": ["missing.pt", "__FILE__", "__DIR__"],
    "run_dir": ["__FILE__"],
    "dry_run": ["--dry-run=maybe"],
}
# Flags whose value only matters with other flags: given those too, so that the value is the one refused.
WITH = {"dinov2": ["--metrics", "fd-dinov2"], "data_stat": ["--metrics", "fid"], "detector": ["--metrics", "fid"]}
OTHER_CASES = [(n, v) for n, vs in sorted(OTHER_BAD.items()) for v in vs]


def test_every_other_flag_of_train_has_bad_values():
    assert set(OTHER_BAD) | FREE_TEXT | set(NUMERIC_FLAGS) == set(TRAIN_OPTIONS)


@settings(max_examples=120, derandomize=True, deadline=None, suppress_health_check=[FIXTURE])
@given(case=st.sampled_from(OTHER_CASES))
def test_train_refuses_bad_names_paths_and_choices_in_one_sentence(tmp_path_factory, case):
    import json

    name, value = case
    tmp = tmp_path_factory.mktemp("case")
    (tmp / "a-file").write_text("mine")
    out = tmp / "runs"
    value = {"__FILE__": str(tmp / "a-file"), "__DIR__": str(tmp)}.get(value, value)
    opt = TRAIN_OPTIONS[name].opts[0]
    argv = [value] if value.startswith("--") else [opt, value]
    short = ["--batch", "32", "--batch-gpu", "32", "--duration", "0.000064", "--tick", "0.032", "--metrics", "none"]
    if name == "metrics":
        short = short[:-2]
    argv += [] if name == "outdir" else ["--outdir", str(out)]
    r = CliRunner().invoke(train.main, [*short, *WITH.get(name, []), *argv])
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert (tmp / "a-file").read_text() == "mine"
    if r.exit_code == 0:  # accepted: a short run whose losses are finite
        (run_dir,) = out.iterdir()
        recs = [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines()]
        assert recs and all(math.isfinite(x["loss_G"]) and math.isfinite(x["loss_fake"]) for x in recs), (argv, recs)
        return
    assert r.exit_code in (1, 2), (argv, r.output)
    assert r.output.strip().splitlines()[-1].startswith("Error"), (argv, r.output)
    assert sorted(p.name for p in tmp.iterdir()) == ["a-file"], (argv, sorted(tmp.rglob("*")))


@pytest.mark.parametrize(
    "text, mimg", [("500", 500.0), ("0.048", 0.048), ("8k", 0.008), ("10M", 10.0), ("1.5G", 1500.0)]
)
def test_duration_takes_mimg_or_an_image_count(text, mimg):
    r = CliRunner().invoke(train.main, ["--duration", text, "--dry-run"])
    assert r.exit_code == 0, r.output
    assert math.isclose(json_value(r.output, "duration"), mimg, rel_tol=1e-12)


def json_value(dry_run_output: str, key: str):
    import json

    sections = json.loads(dry_run_output[dry_run_output.index("{") :])
    return next(s[key] for s in sections.values() if isinstance(s, dict) and key in s)
