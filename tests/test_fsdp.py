"""--fsdp: G and the fake score sharded with FSDP2 (fully_shard) over two gloo processes on the CPU give the steps
of the
unsharded single process, and a sharded run resumes exactly: SiD and SiDA on the EDM2 digits teacher, SiD and SiDA
(with its elementwise gradient clipping) on EDM's SongUNet. The SiDA cases write their state before G's first step
(the warm-up), where PyTorch's own optimizer state-dict helper would have initialised Adam with a zero step."""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from support.helpers import damp_adam, gloo_process

from sid_fast.training.config import ASSETS, resolve_config
from sid_fast.training.run import build_trainer, load_state_file
from sid_fast.training.state import gathered_trained_states

EDM2_TEACHER = str(ASSETS / "digits_edm2_teacher.pt")
STEPS = 2


# batch 8 = 2 processes x 2 rounds x 2: gradient accumulation with the sync switch, and one process x 4 rounds.
CASES = {
    "edm2-sid": dict(preset="digits-edm2", teacher=EDM2_TEACHER),
    # SiDA calls the sharded fake score twice (fake and real branches) before one backward; the GAN term from the start
    "edm2-sida": dict(
        preset="digits-edm2",
        teacher=EDM2_TEACHER,
        method="sida",
        data="digits",
        sida_g_start_kimg=0.0,
        sida_gan_start_kimg=0.0,
    ),
    # EDM's SongUNet (helpers.NET, conditional, with augmentation labels): UNetBlocks sharded
    "edm-sid": dict(preset="digits", resolution=8, channels=1, label_dim=3, cond=True),
    # SiDA on EDM's SongUNet: the fake score's gradients are clipped elementwise at 1 (EDM loop), here on shards; a
    # huge --lsd so that the clipping bites. data=None: labelled PNGs the test writes.
    "edm-sida": dict(
        preset="digits",
        resolution=8,
        channels=1,
        label_dim=3,
        cond=True,
        method="sida",
        data=None,
        lsd=1e4,
        sida_g_start_kimg=0.0,
        sida_gan_start_kimg=0.0,
    ),
}


def _cfg(case, teacher=None, **kw):
    c = dict(CASES[case])
    preset = c.pop("preset")
    c["teacher"] = c.get("teacher", teacher)
    return resolve_config(
        preset, dict(c, batch=8, batch_gpu=2, metrics="none", dropout=0.0, lr=1e-3, glr=1e-3, seed=5, **kw)
    )


def _params(tr) -> dict:
    """Whole tensors of G, G_ema and the fake score (gathered onto rank 0 under --fsdp)."""
    s = gathered_trained_states(tr.trained)
    out = {f"G.{k}": v.clone() for k, v in s["G"].items()}
    out.update({f"fake.{k}": v.clone() for k, v in s["fake_score"].items()})
    out.update({f"G_ema.{k}": v.clone() for k, v in tr.G_ema.state_dict().items()})
    return out


def _data(case, tmp_path) -> dict:
    if "data" not in CASES[case] or CASES[case]["data"] is not None:
        return {}
    from support.fid_helpers import write_png_folder

    folder = tmp_path / "data"
    write_png_folder(folder, 20, size=8, channels=1, labels=[i % 3 for i in range(20)])
    return dict(data=str(folder))


def _worker(rank, world, port, out_dir, case, teacher, data):
    import torch.distributed as dist

    with gloo_process(rank, world, port):
        tr = damp_adam(build_trainer(_cfg(case, teacher, fsdp=True, **data), torch.device("cpu"), log=lambda *a: None))
        assert tr.world == world  # really distributed
        for net in (tr.G, tr.fake, tr.teacher):  # sharded, the frozen teacher too
            assert tr.par.fsdp and all(hasattr(p, "full_tensor") for p in net.parameters() if p.ndim)
        tr.step()
        tr.run_dir = Path(out_dir)
        path = tr.save_state()  # collective: a sharded state, each rank writes its shards
        assert path.name == "training-state-000000000008.dcp" and (path / "meta.pt").is_file()
        dist.barrier()
        for _ in range(STEPS - 1):
            tr.step()
        straight = _params(tr)
        resumed = damp_adam(
            build_trainer(_cfg(case, teacher, fsdp=True, **data), torch.device("cpu"), log=lambda *a: None)
        )
        resumed.load_state_dict(load_state_file(path), path)
        for _ in range(STEPS - 1):
            resumed.step()
        again = _params(resumed)
        if rank == 0:
            torch.save(dict(straight=straight, resumed=again), os.path.join(out_dir, "fsdp.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_two_processes_equal_one_unsharded_process_and_resume_exactly(case, teacher_file, tmp_path):
    data = _data(case, tmp_path)
    single = damp_adam(build_trainer(_cfg(case, teacher_file, **data), torch.device("cpu"), log=lambda *a: None))
    init = {k: v.clone() for k, v in single.G.state_dict().items()}
    for _ in range(STEPS):
        single.step()
    ref = _params(single)
    mp.spawn(
        _worker,
        args=(2, 29700 + os.getpid() % 200 + 211 * list(CASES).index(case), str(tmp_path), case, teacher_file, data),
        nprocs=2,
    )
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert got["straight"].keys() == ref.keys()
    bad = []
    for k in ref:
        # Sharded gradients are reduce-scattered in another summation order than one process's accumulation:
        # round-off (~1e-7 relative) that Adam turns into differences far below the distance each tensor moved.
        name = k.split(".", 1)[1]
        travelled = (ref[k] - init[name]).abs().max().item() if name in init else ref[k].abs().max().item()
        diff = (got["straight"][k] - ref[k]).abs().max().item()
        if diff > 0.02 * travelled + 1e-6:
            bad.append((k, diff, travelled))
        assert torch.equal(got["resumed"][k], got["straight"][k]), k  # the sharded resume is exact
    assert not bad, bad[:4]
    moved = max((ref[f"G.{k}"] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-4  # the comparison is not between untrained copies
