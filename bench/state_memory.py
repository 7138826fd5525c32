"""Peak host memory per rank for writing and reading a --fsdp training state, sharded (torch.distributed.checkpoint,
the trainer's format) against whole (every sharded tensor gathered, one file written by rank 0 and read whole by every
rank: the format a sharded run would otherwise have).

    python -m bench.state_memory --config edm2-s --formats sharded
    python -m bench.state_memory --config edm2-xs --formats whole,sharded

Two gloo processes on the CPU build the trainer of an EDM2 ImageNet-512 network with random weights and --fsdp, give
both optimizers their Adam state (zero moments after one step), then write the state of one format; two fresh
processes then build the same trainer and read it back (G compared with what was written). A thread samples each
process's resident set every 2 ms; the figures are the peaks above the resident set before the operation (the
trainer's own), each operation in fresh processes. One JSON line per rank and format goes to
bench/results/state_memory.jsonl, with the bytes of the rank's shards and of the whole trained state for scale.
"""

from __future__ import annotations

import json
import os
import threading
import time
import types
from pathlib import Path

import click
import torch
import torch.multiprocessing as mp

from bench.common import command, environment, write_jsonl

PAGE = os.sysconf("SC_PAGE_SIZE")
GiB = 2**30


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The largest resident set of this process while the block runs, sampled every 2 ms."""

    def __enter__(self):
        self.base, self.peak, self._stop = rss(), rss(), False

        def sample():
            while not self._stop:
                self.peak = max(self.peak, rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss())
        return False

    @property
    def above(self) -> int:
        return self.peak - self.base


def _trainer(size: str):
    from sid_fast.families import TeacherSpec
    from sid_fast.networks import build_network
    from sid_fast.networks.edm2 import edm2_config
    from sid_fast.training.config import resolve_config
    from sid_fast.training.run import build_trainer

    kwargs = dict(edm2_config(size), use_fp16=False)
    torch.manual_seed(0)
    teacher = build_network("Precond", kwargs)
    cfg = resolve_config(
        f"edm2-img512-{size}",
        dict(teacher=f"<edm2-{size}, random weights>", batch=2, batch_gpu=1, metrics="none", fsdp=True),
    )
    tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None, teacher=teacher,
                       teacher_spec=TeacherSpec("Precond", kwargs, teacher.state_dict()))  # fmt: skip
    for net, opt in ((tr.G, tr.opt_g), (tr.fake, tr.opt_fake)):  # Adam's state as after a step (no step: its
        for p in net.parameters():  # temporaries would be measured as the trainer's resident set)
            opt.state[p] = dict(step=torch.tensor(1.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    return tr


def _write_whole(tr, path: Path) -> None:
    """Every sharded tensor gathered whole on every rank; rank 0 writes one file."""
    from sid_fast import checkpoints
    from sid_fast.training.state import gathered_trained_states, training_state

    s = dict(training_state(tr.ctx, tr.progress, tr.trained, whole=False), **gathered_trained_states(tr.trained))
    if tr.rank == 0:
        checkpoints.atomic_save(s, path)
    torch.distributed.barrier()


def _read_whole(tr, path: Path) -> None:
    """Every rank reads the whole file and keeps its shard of each tensor of G and the fake score (the Adam moments are
    not restored: a lower bound of this format's cost)."""
    from torch.distributed.tensor import distribute_tensor

    s = torch.load(path, map_location="cpu", weights_only=True)
    for net, key in ((tr.G, "G"), (tr.fake, "fake_score")):
        own = net.state_dict()
        with torch.no_grad():
            for k, v in s[key].items():
                t = own[k]
                if hasattr(t, "full_tensor"):
                    t.to_local().copy_(distribute_tensor(v, t.device_mesh, t.placements).to_local())
                else:
                    t.copy_(v)


def _shard_bytes(tr) -> tuple[int, int]:
    """(bytes of this rank's shards of G, the fake score and their Adam moments; bytes of all of them, whole)."""
    local = whole = 0
    for net, opt in ((tr.G, tr.opt_g), (tr.fake, tr.opt_fake)):
        tensors = list(net.state_dict().values())
        tensors += [v for st in opt.state_dict()["state"].values() for v in st.values() if v.ndim]
        for t in tensors:
            local += (t.to_local() if hasattr(t, "to_local") else t).nbytes
            whole += t.numel() * t.element_size()
    return local, whole


def _whole_G(tr) -> dict:
    """G's tensors gathered whole (a collective), to check what was read against what was written."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in tr.G.state_dict().items()}


def _worker(rank, world, port, size, fmt, op, out_dir, results):
    """One operation (write or read) of one format in fresh processes: the resident set before it is the trainer's."""
    from sid_fast import dist as sid_dist
    from sid_fast.training import state

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    sid_dist.init()
    tr = _trainer(size)
    local, whole = _shard_bytes(tr)
    tr.run_dir = Path(out_dir) / fmt
    tr.run_dir.mkdir(parents=True, exist_ok=True)
    tr.cur_nimg = 2
    path = tr.run_dir / state.state_name(tr.cur_nimg, sharded=fmt == "sharded")
    written = tr.run_dir / "G.pt"
    torch.distributed.barrier()
    if op == "write":
        with PeakRSS() as m:
            if fmt == "sharded":
                tr.save_state()
            else:
                _write_whole(tr, path)
        g = _whole_G(tr)
        if rank == 0:
            torch.save(g, written)
    else:
        with PeakRSS() as m:
            if fmt == "sharded":
                tr.load_state_dict(state.checkpoints.read_training_state(path), path)
            else:
                _read_whole(tr, path)
        g = _whole_G(tr)
        want = torch.load(written, weights_only=True)
        assert all(torch.equal(g[k], want[k]) for k in want), "reading did not restore G as written"
    rec = dict(bench="state_memory", config=f"edm2-{size}", format=fmt, operation=op, rank=rank, world=world,
               rss_before_gib=m.base / GiB, peak_above_gib=m.above / GiB, shard_bytes_gib=local / GiB,
               whole_trained_gib=whole / GiB)  # fmt: skip
    Path(results.format(rank)).write_text(json.dumps(rec))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@command(__doc__)
@click.option("--config", default="edm2-s", show_default=True, help="edm2-xs, edm2-s, ... (an EDM2 ImageNet-512 size)")
@click.option("--formats", default="sharded", show_default=True, help="comma list of sharded, whole")
@click.option(
    "--dir", "dir", default="/tmp/sid_fast_state_memory", show_default=True, help="where the states are written"
)
@click.option("--out", default="state_memory.jsonl", show_default=True)
def main(**kw):
    a = types.SimpleNamespace(**kw)
    size = a.config.removeprefix("edm2-")
    formats = a.formats.split(",")
    results = str(Path(a.dir) / "rank{}.json")
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    env, recs = environment(), []
    for i, (fmt, op) in enumerate((f, o) for f in formats for o in ("write", "read")):
        mp.spawn(_worker, args=(2, 29400 + os.getpid() % 400 + i, size, fmt, op, a.dir, results), nprocs=2)
        for rank in range(2):
            r = dict(json.loads(Path(results.format(rank)).read_text()), **env)
            recs.append(r)
            print(f"{r['config']} {fmt:8s} {op:5s} rank {rank}: resident {r['rss_before_gib']:.2f} GiB, peak "
                  f"+{r['peak_above_gib']:.2f} GiB (its shards {r['shard_bytes_gib']:.2f} GiB, the whole trained "
                  f"state {r['whole_trained_gib']:.2f} GiB)", flush=True)  # fmt: skip
    print(f"wrote {write_jsonl(recs, a.out)}")


if __name__ == "__main__":
    main()
