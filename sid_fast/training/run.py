"""A distillation run: checks before any work, one `build_trainer`, the run directory, resume, and `run()`.

Everything that can be refused (configuration, teacher, data, FID inputs, the state to resume) is checked before a
run directory is made, and with several processes every rank stops with the same sentence. `build_trainer` is the
one way to construct a SiDTrainer from a configuration; train.py, bench/ and profile/ use it. `choose_run` decides
which run directory a command continues (--resume auto: the same configuration's) or starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sid_fast import checkpoints, dist, families
from sid_fast.families import Family, TeacherSpec
from sid_fast.training.config import ConfigError, TrainConfig, check_world, identity_differences
from sid_fast.training.rundir import RunLock, RunLocked, outdir_lock, remove_stale_temporaries, rewind_records
from sid_fast.training.sid import SiDTrainer, TrainingAborted
from sid_fast.training.sida import FlowSiDATrainer, SiDATrainer
from sid_fast.training.state import list_states
from sid_fast.training.tickstats import Logger
from sid_fast.training.trackers import make_tracker


def build_trainer(
    cfg: TrainConfig,
    device: torch.device | None = None,
    *,
    teacher=None,
    teacher_spec: TeacherSpec | None = None,
    family: Family | None = None,
    run_dir: Path | None = None,
    log=print,
    fid=None,
) -> SiDTrainer:
    """detect -> validate -> load -> build -> method: the teacher's family (sid_fast.families) checks the flags, loads
    and checks its teacher (from cfg.teacher unless `teacher` and `teacher_spec` are given, or a loaded `family`:
    tests and benchmarks bring networks that are not files) and its inputs, once; then the method's trainer (SiD, or
    SiDA with --method sida) builds the networks through the family.

    With several processes every rank loads its inputs, then all agree before the first collective: when any rank
    failed (an unreachable URL, a missing file on one node), every rank raises the same ConfigError, and none waits
    for the others in DDP's or FSDP's set-up."""
    device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_world(cfg, dist.world_size())
        if family is None:
            family = families.load(cfg, device, teacher, teacher_spec, fid=fid)
        failure = None
    except (ConfigError, checkpoints.CheckpointError) as e:
        failure = (type(e).__name__, str(e))
    except Exception as e:  # anything else: its own traceback alone, but never one rank gone while others wait
        if dist.world_size() == 1:
            raise
        failure = ("ConfigError", f"loading the run's inputs failed: {type(e).__name__}: {e}")
    agree_or_raise(failure)
    method = SiDTrainer
    if cfg.method == "sida":
        method = FlowSiDATrainer if family.sida is not None and family.sida.latent_pairs else SiDATrainer
    return method(cfg, device, family, run_dir=run_dir, log=log)


def agree_or_raise(failure: tuple[str, str] | None) -> None:
    """Every rank raises the same error when any rank's `failure` ((ConfigError or CheckpointError, its sentence)) is
    not None: the first failing rank's, naming it (a collective when distributed: every rank calls it)."""
    failures = dist.all_gather_object(failure)
    bad = [(r, f) for r, f in enumerate(failures) if f is not None]
    if not bad:
        return
    rank, (kind, msg) = bad[0]
    where = f" (on rank {rank}{f' and {len(bad) - 1} other(s)' if len(bad) > 1 else ''})" if len(failures) > 1 else ""
    raise (checkpoints.CheckpointError if kind == "CheckpointError" else ConfigError)(msg + where)


RUN_DIR_RE = re.compile(r"^(\d+)-(.+)$")


def run_desc(cfg: TrainConfig, world: int) -> str:
    return cfg.desc or f"{cfg.preset}-alpha{cfg.alpha:g}-batch{cfg.batch}-gpus{world}-{cfg.precision}"


def next_run_dir(outdir: str, desc: str) -> Path:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in out.iterdir() if (m := RUN_DIR_RE.match(p.name))]
    run_dir = out / f"{max(ids, default=-1) + 1:05d}-{desc}"
    run_dir.mkdir()
    return run_dir


def latest_state(run_dir: Path) -> Path | None:
    """The newest complete training state of a run directory (names sort by images seen), or None."""
    states = list_states(run_dir)
    return states[-1] if states else None


def find_resume_state(path: str) -> Path:
    p = Path(path)
    if p.is_dir() and not (p / "meta.pt").is_file():  # a run directory, not a sharded state
        state = latest_state(p)
        if state is None:
            raise ConfigError(f"--resume {p}: the directory holds no training state (training-state-*.pt or .dcp).")
        return state
    if not p.exists():
        raise ConfigError(f"--resume {p}: no such file.")
    return p


def load_state_file(path) -> dict:
    """checkpoints.read_training_state (memory-mapped) with the --resume flag named in its error."""
    try:
        return checkpoints.read_training_state(path, mmap=True)
    except checkpoints.CheckpointError as e:
        raise ConfigError(f"--resume {e}") from None


def check_same_run(cfg: TrainConfig, state: dict, path: Path) -> None:
    """Refuse a state whose configuration differs from these flags in what the run computes."""
    diff = identity_differences(state.get("config", {}), cfg.to_json())
    if diff:
        raise ConfigError(
            f"{path}: written by another configuration ({'; '.join(diff)}: the state's value first); "
            "give the same flags, or --resume new (or another --outdir/--run-dir) for a new run."
        )


def _matching_run(cfg: TrainConfig, desc: str) -> Path | None:
    """--resume auto: the newest run directory in --outdir of this configuration (same --desc, same identity) that
    holds a training state. A directory of this configuration that a live process holds (the same command started
    twice) is refused, naming the holder."""
    out = Path(cfg.outdir)
    if not out.is_dir():
        return None
    for d in sorted((p for p in out.iterdir() if (m := RUN_DIR_RE.match(p.name)) and m.group(2) == desc), reverse=True):
        try:
            options = json.loads((d / "training_options.json").read_text())
        except (OSError, ValueError):
            continue
        if identity_differences(options, cfg.to_json()):
            continue
        holder = RunLock(d).held_by_another()
        if holder is not None:
            raise ConfigError(
                f"{d}: a run of this configuration is already training there ({holder}); wait for it or stop it, "
                "or give --resume new (or another --desc) for a separate run."
            )
        if latest_state(d) is not None:
            return d
    return None


def choose_run(cfg: TrainConfig, world: int, check=None) -> tuple[Path, Path | None]:
    """(run directory, training state to resume or None), decided on rank 0:
    - --resume auto (default): --run-dir if given (created if new), else the newest run directory of this
      configuration in --outdir that holds a state, else a new numbered one; continue from its newest state;
    - --resume new: a new numbered run directory (or --run-dir), from the start;
    - --resume PATH: a new numbered run directory, from PATH (a state, or a run directory's newest state).
    `check(state)` runs before any directory is made (a refusal leaves nothing behind)."""
    desc = run_desc(cfg, world)
    if cfg.resume not in ("auto", "new"):
        state = find_resume_state(cfg.resume)
    elif cfg.run_dir is not None:
        state = latest_state(Path(cfg.run_dir)) if cfg.resume == "auto" else None
    else:
        found = _matching_run(cfg, desc) if cfg.resume == "auto" else None
        state = latest_state(found) if found is not None else None
    if state is not None and check is not None:
        check(state)
    if cfg.run_dir is not None and cfg.resume in ("auto", "new"):
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, state
    if cfg.resume == "auto" and state is not None:
        return state.parent, state
    return next_run_dir(cfg.outdir, desc), state


def _on_rank0(fn):
    """fn() on rank 0, its result (or its error as one ConfigError sentence, raised on every rank) shared with all
    ranks."""
    result, failure = None, None
    if dist.rank() == 0:
        try:
            result = fn()
        except (ConfigError, checkpoints.CheckpointError) as e:
            failure = str(e)
        except OSError as e:  # e.g. an --outdir that cannot be created
            failure = f"{e.filename or 'the run directory'}: {e.strerror or e}."
    result, failure = dist.broadcast_object((result, failure))
    if failure is not None:
        raise ConfigError(failure)
    return result


def run(cfg: TrainConfig, log_to_stdout=True) -> tuple[Path | None, str]:
    """Run, continue or resume a distillation; returns (the run directory, "done" or "stopped")."""
    device = dist.init()
    world = dist.world_size()
    # Everything that can be refused is checked before the run directory is made: the trainer is built first,
    # with a logger that buffers until the directory exists.
    pending: list[str] = []
    trainer = build_trainer(cfg, device, log=pending.append)
    lock = None  # rank 0's lock on the run directory, held until the run ends (or the process dies)

    def decide():
        nonlocal lock
        with outdir_lock(Path(cfg.run_dir).parent if cfg.run_dir is not None else cfg.outdir):
            run_dir, state_path = choose_run(cfg, world, check=lambda p: check_same_run(cfg, load_state_file(p), p))
            try:
                lock = RunLock(run_dir).acquire()
            except RunLocked as e:
                raise ConfigError(str(e)) from None
        if lock.unsupported:
            pending.append(f"Warning: {run_dir} is not locked ({lock.unsupported}): start one command per directory.")
        removed = remove_stale_temporaries(run_dir)
        if removed:
            pending.append(f"Removed what killed writes left in {run_dir}: {', '.join(removed)}.")
        checkpoints.atomic_write_text(
            run_dir / "training_options.json",
            json.dumps(dict(cfg.to_json(), world_size=world, class_labels=trainer.conditioning()), indent=2),
        )
        return run_dir, state_path

    try:
        run_dir, state_path = _on_rank0(decide)
        log = Logger(run_dir if dist.rank() == 0 else None) if log_to_stdout else (lambda *_: None)
        log(f"Run directory: {run_dir}")
        for line in pending:
            log(line)
        trainer.run_dir, trainer.log = run_dir, log  # every rank: a sharded state is written by all
        if state_path is not None:
            trainer.load_state_dict(load_state_file(state_path), state_path)
            log(f"Resumed from {state_path} at {trainer.cur_nimg / 1e3:.1f} kimg.")
            if dist.rank() == 0:
                dropped = rewind_records(run_dir, trainer.cur_nimg / 1e3)
                if dropped:
                    what = ", ".join(f"{n} record(s) of {name}" for name, n in dropped.items())
                    log(f"Dropped {what} written after that state (logged again as the run continues).")
        if dist.rank() == 0:
            trainer.tracker = make_tracker(cfg.tracker, run_dir, cfg.to_json(), cfg.tracker_project, log)
        try:
            status = trainer.train()
        except OSError as e:  # the run directory made read-only, removed, or its disk full
            last = latest_state(run_dir) if run_dir.is_dir() else None
            raise ConfigError(
                f"{e.filename or run_dir}: writing failed ({e.strerror or e}); the last complete training state is "
                f"{last or 'none'}{'' if last is None else ' (run the same command again to continue from it)'}."
            ) from None
        finally:
            trainer.tracker.close()
        log(f"Run directory: {run_dir} (states, snapshots, stats.jsonl, log.txt)")
        if isinstance(log, Logger):
            log.close()
    finally:
        if lock is not None:
            lock.release()
    dist.finish()
    return run_dir, status


__all__ = [
    "agree_or_raise",
    "build_trainer",
    "choose_run",
    "find_resume_state",
    "load_state_file",
    "next_run_dir",
    "run",
    "TrainingAborted",
]
