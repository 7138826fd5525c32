"""The training state: everything exact resume needs, written as one file by rank 0 (sid_fast.checkpoints).

Contents: the configuration, G_ema, G and the fake score with their Adam states, every rank's RNG states (dropout),
the counters (images, ticks), the tick statistics, the bad-step counters and the metric history. With --fsdp every
sharded tensor (parameters and Adam moments) is gathered whole (a collective), so the file has the format of an
unsharded run's, and on resume each rank keeps its own shard of it. (PyTorch's get_optimizer_state_dict is not used:
it initialises the state of an optimizer that has not stepped yet, e.g. SiDA's G before its warm-up ends, with a zero
step that shifts Adam's bias correction afterwards.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sid_fast import checkpoints, dist
from sid_fast.training.config import ConfigError


def _whole(t):
    return t.full_tensor().cpu() if hasattr(t, "full_tensor") else t


def trained_states(tr) -> dict:
    """G, fake score and their Adam states (gathered whole under FSDP2: every rank calls it)."""
    par = tr.par
    nets = dict(G=tr.G.state_dict(), fake_score=tr.fake.state_dict())
    opts = dict(opt_g=par.opt_g.state_dict(), opt_fake=par.opt_fake.state_dict())
    if not par.fsdp:
        return dict(nets, **opts)

    def opt_state(sd):
        return dict(sd, state={i: {k: _whole(v) for k, v in st.items()} for i, st in sd["state"].items()})

    return dict(
        {key: {k: _whole(v) for k, v in sd.items()} for key, sd in nets.items()},
        **{key: opt_state(sd) for key, sd in opts.items()},
    )


def _shard_like(t, like):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(like.device, like.dtype), like.device_mesh, like.placements)


def load_trained_states(tr, s: dict) -> None:
    par = tr.par
    pairs = ((tr.G, par.opt_g, "G", "opt_g"), (tr.fake, par.opt_fake, "fake_score", "opt_fake"))
    if not par.fsdp:
        for net, opt, key, opt_key in pairs:
            net.load_state_dict(s[key])
            opt.load_state_dict(s[opt_key])
        return
    for net, opt, key, opt_key in pairs:
        own = net.state_dict()
        with torch.no_grad():
            for k, v in s[key].items():
                if k not in own:
                    raise KeyError(k)
                target = own[k]
                if hasattr(target, "full_tensor"):  # every rank read the whole file and keeps its own shard
                    target.to_local().copy_(_shard_like(v, target).to_local())
                else:
                    target.copy_(v)
    for net, opt, _, opt_key in pairs:
        params = list(net.parameters())
        sd = s[opt_key]
        state = {}
        for i, st in sd["state"].items():
            p = params[int(i)]
            sharded = hasattr(p, "full_tensor")
            state[i] = {k: _shard_like(v, p) if sharded and v.ndim and v.shape == p.shape else v for k, v in st.items()}
        opt.load_state_dict(dict(sd, state=state))


def training_state(tr) -> dict:
    """The whole state as one dict (a collective: it gathers the RNG states of every rank)."""
    device = tr.device
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    return dict(
        format=checkpoints.TRAINING_STATE_FORMAT,
        version=1,
        config=tr.cfg.to_json(),
        world_size=tr.world,
        class_name=tr.teacher_spec.class_name,
        init_kwargs=tr.init_kwargs,
        fsdp=tr.par.fsdp,
        G_ema=tr.G_ema.state_dict(),
        **trained_states(tr),
        rng=dist.all_gather_object(rng),
        cur_nimg=tr.cur_nimg,
        cur_tick=tr.cur_tick,
        tick_start_nimg=tr.tick_start_nimg,
        stats=tr.stats.values.cpu(),
        consec_bad=tr.consec_bad.cpu(),
        max_consec_bad=tr.max_consec_bad.cpu(),
        metrics_history=json.dumps(tr.metrics_history),
    )


def load_training_state(tr, s: dict, path) -> None:
    """Restore `s` (read by checkpoints.read_training_state) into the trainer; one ConfigError when it does not fit."""
    if s.get("world_size") != tr.world:
        raise ConfigError(
            f"--resume {path}: written by {s.get('world_size')} processes, this run has {tr.world}; "
            "resume with the same number of processes."
        )
    try:
        tr.G_ema.load_state_dict(s["G_ema"])
        load_trained_states(tr, s)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"--resume {path}: the state does not match this teacher/configuration: {e}") from None
    tr.cur_nimg, tr.cur_tick, tr.tick_start_nimg = s["cur_nimg"], s["cur_tick"], s["tick_start_nimg"]
    stats = s["stats"].to(tr.device)
    if stats.shape != tr.stats.values.shape:
        raise ConfigError(
            f"--resume {path}: {len(stats)} tick statistics in the state, this trainer keeps {len(tr.stats.values)}."
        )
    tr.stats.values = stats
    tr.consec_bad = s["consec_bad"].to(tr.device)
    tr.max_consec_bad = s["max_consec_bad"].to(tr.device)
    tr.metrics_history = json.loads(s.get("metrics_history", "[]"))
    rng = s["rng"][tr.rank]
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and tr.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], tr.device)


def save_training_state(tr) -> Path | None:
    """Write the state into the run directory (rank 0); every rank calls it (the state is a collective)."""
    s = training_state(tr)
    if tr.rank != 0 or tr.run_dir is None:
        return None
    path = tr.run_dir / f"training-state-{tr.cur_nimg // 1000:06d}.pt"
    checkpoints.atomic_save(s, path)
    return path
