"""The training state: everything exact resume needs.

Contents: the configuration, G_ema, G and the fake score with their Adam states, every rank's RNG states (dropout),
the counters (images, ticks), the tick statistics, the bad-step counters and the metric history.

Two formats, named by images seen so that names never collide and sort in order up to 10^12 images:
- one file, `training-state-<images>.pt` (one process or DDP): written by rank 0 (sid_fast.checkpoints.atomic_save),
  read back with torch.load(weights_only=True, mmap=True);
- a directory, `training-state-<images>.dcp` (--fsdp): G, the fake score and their Adam states written shard by shard
  with torch.distributed.checkpoint, so that no rank holds more than its own shards plus the library's write and
  read buffers, and `meta.pt` with the rest (G_ema is whole on every rank and written once). The directory is written
  under a temporary name and renamed when every rank has finished, so a listed state is always complete. On resume
  each rank reads only its shards. The Adam states are restored with Adam's own layout: an optimizer that has not
  stepped (SiDA's G during its warm-up) has no state in the file and gets none (PyTorch's get_optimizer_state_dict
  would give it a zero step, which shifts Adam's bias correction).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import click
import torch

from sid_fast import checkpoints, dist, families
from sid_fast.files import DestinationError, check_file_destination, check_folder_destination, fsync_dir
from sid_fast.training.config import ConfigError
from sid_fast.training.context import Progress, RunContext, Trained

STATE_RE = re.compile(r"^training-state-(\d{12})\.(pt|dcp)$")


def state_name(nimg: int, sharded: bool = False) -> str:
    """training-state-<images seen, 12 digits>.pt (or .dcp for a sharded state)."""
    return f"training-state-{nimg:012d}.{'dcp' if sharded else 'pt'}"


def list_states(run_dir: Path) -> list[Path]:
    """The complete training states of a run directory, oldest first (a sharded one is listed once renamed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if STATE_RE.match(p.name) and (p.is_file() or (p / "meta.pt").is_file())]
    return sorted(found, key=lambda p: p.name)


# ----------------------------------------------------------------------------------------------------------------
# The parts every format shares.


def training_state(ctx: RunContext, progress: Progress, trained: Trained, whole: bool = True) -> dict:
    """The state as one dict (a collective: it gathers the RNG states of every rank). Without `trained`, G, the fake
    score and the Adam states are left out (the sharded format writes them apart) and the optimizers' hyperparameters
    are kept."""
    device = ctx.device
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if whole:
        parts = {key: net.state_dict() for net, _, key, _ in trained.nets_and_opts()}
        parts.update({key: opt.state_dict() for _, opt, _, key in trained.nets_and_opts()})
    else:
        parts = dict(sharded=True, param_groups={key: opt.state_dict()["param_groups"] for _, opt, _, key in
                                                 trained.nets_and_opts()})  # fmt: skip
    return dict(
        format=checkpoints.TRAINING_STATE_FORMAT,
        version=1,
        config=ctx.cfg.to_json(),
        world_size=ctx.world,
        family=ctx.family.name,
        class_name=trained.nets.class_name,
        init_kwargs=trained.nets.init_kwargs,
        g_init_kwargs=trained.nets.g_init_kwargs,
        fsdp=trained.par.fsdp,
        G_ema=trained.nets.G_ema.state_dict(),
        **parts,
        rng=dist.all_gather_object(rng),
        cur_nimg=progress.cur_nimg,
        cur_tick=progress.cur_tick,
        tick_start_nimg=progress.tick_start_nimg,
        stats=progress.stats.values.cpu(),
        consec_bad=progress.consec_bad.cpu(),
        max_consec_bad=progress.max_consec_bad.cpu(),
        metrics_history=json.dumps(progress.metrics_history),
    )


def load_training_state(ctx: RunContext, progress: Progress, trained: Trained, s: dict, path) -> None:
    """Restore `s` (read by checkpoints.read_training_state; for a sharded state its meta.pt) into the trainer; one
    ConfigError when it does not fit."""
    if s.get("world_size") != ctx.world:
        raise ConfigError(
            f"--resume {path}: written by {s.get('world_size')} processes, this run has {ctx.world}; "
            "resume with the same number of processes."
        )
    if bool(s.get("sharded")) != trained.par.fsdp:
        raise ConfigError(
            f"--resume {path}: a {'sharded' if s.get('sharded') else 'whole'} state; this run "
            f"{'shards' if trained.par.fsdp else 'does not shard'} its networks (--fsdp): resume it as it was written."
        )
    try:
        trained.nets.G_ema.load_state_dict(s["G_ema"])
        if s.get("sharded"):
            _load_sharded(trained, s, Path(path))
        else:
            for net, opt, key, opt_key in trained.nets_and_opts():
                net.load_state_dict(s[key])
                opt.load_state_dict(s[opt_key])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"--resume {path}: the state does not match this teacher/configuration: {e}") from None
    progress.cur_nimg, progress.cur_tick = s["cur_nimg"], s["cur_tick"]
    progress.tick_start_nimg = s["tick_start_nimg"]
    stats = s["stats"].to(ctx.device)
    if stats.shape != progress.stats.values.shape:
        raise ConfigError(
            f"--resume {path}: {len(stats)} tick statistics in the state, this trainer keeps "
            f"{len(progress.stats.values)}."
        )
    progress.stats.values.copy_(stats)  # in place, as the counters: a captured step graph holds these tensors
    progress.consec_bad.copy_(s["consec_bad"])
    progress.max_consec_bad.copy_(s["max_consec_bad"])
    progress.metrics_history = json.loads(s.get("metrics_history", "[]"))
    rng = s["rng"][ctx.rank]
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)


def save_training_state(ctx: RunContext, progress: Progress, trained: Trained) -> Path | None:
    """Write the state into the run directory, then keep the newest --keep-states of them; every rank calls it (a
    collective) and gets the state's path (None without a run directory)."""
    if ctx.run_dir is None:
        training_state(ctx, progress, trained)  # the collective part, as the other ranks run it
        return None
    path = Path(ctx.run_dir) / state_name(progress.cur_nimg, sharded=trained.par.fsdp)
    if trained.par.fsdp:
        _save_sharded(ctx, progress, trained, path)
    else:
        s = training_state(ctx, progress, trained)
        if ctx.rank == 0:
            checkpoints.atomic_save(s, path)
    if ctx.rank == 0 and ctx.cfg.keep_states:
        for old in list_states(ctx.run_dir)[: -ctx.cfg.keep_states]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The sharded format (--fsdp): torch.distributed.checkpoint.


def _sharded_tensors(trained: Trained) -> dict:
    """G's and the fake score's state dicts (DTensor shards) and their Adam states keyed by parameter index."""
    out = {}
    for net, opt, key, opt_key in trained.nets_and_opts():
        out[key] = net.state_dict()
        out[opt_key] = {str(i): dict(st) for i, st in opt.state_dict()["state"].items()}
    return out


def _save_sharded(ctx: RunContext, progress: Progress, trained: Trained, path: Path) -> None:
    import torch.distributed.checkpoint as dcp  # start-up: ~0.5 s (sympy), sharded runs only

    tmp = path.with_name(path.name + ".tmp")
    meta = training_state(ctx, progress, trained, whole=False)  # collective
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a write killed earlier
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(_sharded_tensors(trained), checkpoint_id=str(tmp))  # collective: every rank writes its shards
        if ctx.rank == 0:
            checkpoints.atomic_save(meta, tmp / "meta.pt")
    except OSError as e:
        raise checkpoints.CheckpointError(f"{path}: writing failed ({e.strerror or e}); the previous state is intact.")
    dist.barrier()
    if ctx.rank == 0:
        shutil.rmtree(path, ignore_errors=True)  # the same images seen again: an earlier attempt's state
        os.replace(tmp, path)
        fsync_dir(path.parent)
    dist.barrier()


def _load_sharded(trained: Trained, meta: dict, path: Path) -> None:
    """Read this rank's shards of G, the fake score and their Adam states from a sharded state."""
    import torch.distributed.checkpoint as dcp  # start-up: ~0.5 s (sympy), sharded runs only

    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    target = {}
    for net, _, key, opt_key in trained.nets_and_opts():
        target[key] = net.state_dict()
        params = list(net.parameters())
        target[opt_key] = {}
        for name, md in stored.items():  # "opt_g.<index>.<exp_avg|exp_avg_sq|step>": Adam's layout, shaped as stored
            prefix, _, rest = name.partition(".")
            if prefix != opt_key:
                continue
            index, _, field = rest.partition(".")
            p = params[int(index)]
            like_p = tuple(md.size) == tuple(p.shape) and len(md.size) > 0
            dtype = md.properties.dtype
            value = torch.zeros_like(p, dtype=dtype) if like_p else torch.zeros(md.size, dtype=dtype)
            target[opt_key].setdefault(index, {})[field] = value
    dcp.load(target, checkpoint_id=str(path))  # collective: every rank reads its shards
    for net, opt, key, opt_key in trained.nets_and_opts():
        net.load_state_dict(target[key])
        state = {int(i): st for i, st in target[opt_key].items()}
        opt.load_state_dict(dict(state=state, param_groups=meta["param_groups"][opt_key]))


def gathered_trained_states(trained: Trained) -> dict:
    """G, the fake score and their Adam moments as whole tensors on every rank (a collective under --fsdp): for tests
    and for consolidating a sharded run's networks; the training state does not use it."""

    def whole(t):
        return t.full_tensor().cpu() if hasattr(t, "full_tensor") else t

    out = {}
    for net, opt, key, opt_key in trained.nets_and_opts():
        out[key] = {k: whole(v) for k, v in net.state_dict().items()}
        sd = opt.state_dict()
        out[opt_key] = dict(sd, state={i: {k: whole(v) for k, v in st.items()} for i, st in sd["state"].items()})
    return out


def export_generator(state_path, out, overwrite: bool = False) -> Path:
    """G_ema of a training state (a whole file or a sharded directory: G_ema is whole in both) written by its teacher
    family (sid_fast.families): a sid_fast generator folder or .pt file (EDM, EDM2), a diffusers UNet folder (Stable
    Diffusion). `python -m sid_fast.training.state export STATE OUT`. An existing file, or a folder holding other
    files, is refused unless `overwrite` (a folder's other files are then kept)."""
    s = checkpoints.read_training_state(state_path, mmap=True)
    family = families.of_state(s, state_path)
    try:
        if str(out).endswith(".pt"):
            check_file_destination(out, "state export", overwrite)
        else:
            check_folder_destination(out, lambda name: name in family.folder_files, "state export", overwrite)
    except DestinationError as e:
        raise checkpoints.CheckpointError(str(e)) from None
    return family.export(s, state_path, out, overwrite)


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def main():
    """Training states."""


@main.command("export")
@click.argument("state", metavar="STATE")
@click.argument("out", metavar="OUT")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing OUT file, or write into a folder with other files."
)
def export_cmd(state, out, overwrite):
    """G_ema of STATE (training-state-*.pt, or a sharded training-state-*.dcp directory) written to OUT: a generator
    folder (EDM, EDM2: model.safetensors + config.json + model card, or a sid_fast .pt file when OUT ends in .pt;
    Stable Diffusion: a diffusers UNet folder with sid_fast.json and a model card)."""
    try:
        path = export_generator(state, out, overwrite=overwrite)
    except checkpoints.CheckpointError as e:
        raise click.ClickException(str(e)) from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
