"""The capture guard (sid_fast.guard): it catches each kind of thing a CUDA graph or an asynchronous host cannot
survive (a planted case of each), stays silent on what they can (device work, host work on host tensors, non-blocking
copies), and finds nothing in a warm fast-path step of every family and method: EDM with and without augmentation,
EDM2, SiDA, Stable Diffusion (SiD-LSG). bench/capture_guard.py records the same per micro-batch and per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.helpers import cfg_for, cpu_trainer

from sid_fast.guard import CaptureGuard, allowed
from sid_fast.training.config import resolve_config

FAST = dict(precision="bf16", optimizer="fused")


def _findings(fn) -> list[str]:
    with CaptureGuard() as g:
        fn()
    return [f"{f.kind}: {f.what}" for f in g.failures()]


PLANTED = {
    "item()": lambda x: x.sum().item(),
    "tolist()": lambda x: x.tolist(),
    "bool(tensor)": lambda x: 1 if x.sum() > 0 else 0,  # a data-dependent Python branch
    "int(tensor)": lambda x: int(x[0]),
    "numpy()": lambda x: x.numpy(),
    "aten.nonzero": lambda x: x.nonzero(),
    "boolean mask": lambda x: x[x > 0],
    "aten._unique2": lambda x: torch.unique(x),
    "torch.as_tensor of host data (float) on cpu": lambda x: x * torch.as_tensor(0.5, device=x.device),
    "torch.tensor of host data (list) on cpu": lambda x: torch.tensor([1.0, 2.0], device=x.device),
    "to(meta) of a host tensor": lambda x: x.to("meta"),
    "to(cpu) of a host tensor": lambda x: torch.tensor([1, 2]).to(torch.device("cpu")),  # a host batch, blocking
    # Token ids of a memory-mapped token file (sid_fast.t2i.tokens) copied to the device without non_blocking.
    "to(cpu) of a host tensor without pinned": lambda x: torch.from_numpy(np.zeros(2)).to(torch.device("cpu")),
    "randn from a CPU generator into meta": lambda x: torch.randn(3, generator=torch.Generator(), device="meta"),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_each_kind_is_caught(name):
    x = torch.randn(6)  # made before the guard watches: a device tensor to it (on CUDA it would be one)
    found = _findings(lambda: PLANTED[name](x))
    assert len(found) == 1 and name in found[0], found


def test_what_a_graph_and_an_asynchronous_host_survive_is_not_a_finding():
    x = torch.randn(6)

    def fine():
        y = (x * 2).exp().sum() + torch.zeros(3).sum()  # device work
        z = torch.where(x > 0, x, torch.zeros_like(x))  # a mask used without a host read
        ids = torch.tensor([[3, 4]])  # host work (a tokenizer's ids, a DataLoader batch): free to read ...
        assert ids.tolist() == [[3, 4]] and int(ids[0, 0]) == 3
        ids.to(torch.device("cpu"), non_blocking=True)  # ... and copied without blocking
        mapped = torch.from_numpy(np.arange(4))  # ids of a token file: host too (torch.overrides does not see it)
        assert mapped.numpy()[1] == 1 and bool((mapped[:2] == mapped[:2]).all())
        host = torch.randint(5, [4], generator=torch.Generator().manual_seed(0))  # a host stream's draw
        return y, z, host.tolist()

    assert _findings(fine) == []
    with CaptureGuard() as g:  # a listed, justified finding is recorded with its reason, not as a failure
        with allowed("a tick's statistics"):
            x.sum().item()
    assert g.failures() == [] and g.findings[0].allowed == "a tick's statistics"
    assert "tests/" not in g.findings[0].where  # named by its sid_fast line: outside sid_fast here
    assert np.isfinite(x.numpy()).all()  # no guard: nothing recorded, nothing changed


def _step_findings(tr) -> list[str]:
    tr.step()  # warm-up: constants are made on the device at their first use
    with CaptureGuard() as g:
        tr.step()
    return [str(f) for f in g.failures()]


@pytest.mark.parametrize(
    "case",
    ["edm", "edm-augment", "edm2", "sida", "sd-lsg"],
)
def test_a_warm_fast_path_step_has_no_finding(case, teacher_file):
    over = dict(FAST, batch=8, batch_gpu=4, metrics="none")  # two micro-batches per phase
    if case == "edm":
        cfg = resolve_config("digits", over)
    elif case == "edm-augment":  # a conditional network with augment labels, EDM's augmentation on every sample
        cfg = cfg_for(teacher_file, augment=1.0, **FAST)
    elif case == "edm2":
        cfg = resolve_config("digits-edm2", over)
    elif case == "sida":  # past both warm-ups: the discriminator, real data, SiD and GAN terms
        cfg = resolve_config("digits-sida", dict(over, sida_g_start_kimg=0.0, sida_gan_start_kimg=0.0))
    else:
        cfg = resolve_config("digits-lsg", over)
    assert _step_findings(cpu_trainer(cfg)) == []


def test_the_reference_path_is_seen_too():
    """The guard is not blind on a step: the official Adam on a CPU reads its step counters (host tensors on CUDA,
    but created on the device here) and is reported; the fast path's fused Adam is not."""
    found = _step_findings(cpu_trainer(resolve_config("digits", dict(batch=8, batch_gpu=8, metrics="none"))))
    assert found and all("item()" in f for f in found)


def test_gradient_storages_are_told_apart_on_the_meta_device():
    """The meta-device counts (bench.overhead, bench.memory) clean every gradient outside the bf16 arena: storages are
    identified as objects, not by address (0 for every meta tensor, which took all gradients for the arena's)."""
    from sid_fast.training.parallel import flat_buffers, storage_key

    arena = torch.empty(12, device="meta")
    inside = [arena[0:4].view(2, 2), arena[4:12]]
    outside = [torch.empty(3, device="meta"), torch.empty(5, device="meta")]
    assert [t.untyped_storage().data_ptr() for t in (arena, *outside)] == [0, 0, 0]  # the address cannot tell them
    assert {storage_key(t) for t in inside} == {storage_key(arena)} != {storage_key(outside[0])}
    assert storage_key(outside[0]) != storage_key(outside[1])
    flat = flat_buffers([*inside, *outside])  # the arena's views tile it: one flat buffer, the others kept
    assert [t.numel() for t in flat] == [12, 3, 5]


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    import json
    import os

    from sid_fast import dist as sid_dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    sid_dist.init()
    try:
        cfg = resolve_config("digits", dict(FAST, fsdp=True, batch=16, batch_gpu=4, metrics="none"))
        found = _step_findings(cpu_trainer(cfg))
        with open(f"{out}/{rank}.json", "w") as f:
            json.dump(found, f)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_an_fsdp2_bf16_step_over_two_gloo_processes_runs_and_has_no_finding(tmp_path):
    """FSDP2 with the eager bf16 path (each UNet block sharded apart, so its embedding affine is not batched with the
    others'), warm, guarded on both ranks."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)] == [[], []]
