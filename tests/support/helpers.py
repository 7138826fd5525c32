"""Test-only helpers: float64 references the library does not need, and the small trainer set-up the trainer,
fast-path and FID tests share (the teacher-file fixture itself is in conftest.py)."""

import contextlib
import math
import os

import torch

from sid_fast.kernels.attention import split_qkv
from sid_fast.losses import finite_rows
from sid_fast.training.config import resolve_config
from sid_fast.training.run import build_trainer

# A tiny conditional DDPM++ with attention and augment labels: every path of the trainer, in seconds.
NET = dict(
    model_type="SongUNet",
    img_resolution=8,
    img_channels=1,
    label_dim=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    augment_dim=9,
    dropout=0.0,
)


def child_env(**extra) -> dict:
    """The environment of a train.py the test starts: its threads are this pytest-xdist worker's share of the cores
    (one each when -n 2 runs on two cores, as CI does), so that two workers' runs do not oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return dict(os.environ, **{"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}, **extra)


def cfg_for(teacher, **kw):
    base = dict(
        teacher=teacher,
        resolution=8,
        channels=1,
        label_dim=3,
        cond=True,
        metrics="none",
        batch=8,
        batch_gpu=4,
        lr=1e-4,
        glr=1e-4,
        augment=0.3,
        dropout=0.1,
        ema=0.001,
        seed=3,
    )
    base.update(kw)
    return resolve_config("digits", base)


def cpu_trainer(cfg):
    return build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)


def damp_adam(tr):
    """Parameters whose exact gradient is zero (e.g. the key part of qkv.bias: softmax ignores it) get round-off
    gradients whose values depend on summation order; Adam would turn them into full +-lr steps. A large eps (the
    same in every run compared) keeps those at round-off size while real gradients still move the weights."""
    for opt in (tr.opt_g, tr.opt_fake):
        for group in opt.param_groups:
            group["eps"] = 1e-3
    return tr


def trainer_params(tr):
    return {
        f"{n}.{k}": v.clone()
        for n, m in (("G", tr.G), ("G_ema", tr.G_ema), ("fake", tr.fake))
        for k, v in m.state_dict().items()
    }


def attention_reference_fp64(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Float64 attention over EDM's interleaved qkv channels: plain math, no custom backward."""
    n, c3, h, w = qkv.shape
    q, k, v = (t.double() for t in split_qkv(qkv, num_heads))
    s = torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(q.shape[1])
    a = torch.einsum("nqk,nck->ncq", s.softmax(dim=2), v)
    return a.reshape(n, c3 // 3, h, w)


def sid_generator_loss_rowdrop(x_g, y_real, y_fake, alpha: float, loss_scale: float, batch_total: int):
    """The official formulation with boolean row dropping, kept for the equality test against masking."""
    ok = finite_rows(x_g, y_real, y_fake)
    x_g, y_real, y_fake = (t[ok] if t.dtype == torch.float64 else t[ok].float() for t in (x_g, y_real, y_fake))
    with torch.no_grad():
        w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
    loss = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w
    return loss.sum() * (loss_scale / batch_total)


@contextlib.contextmanager
def gloo_process(rank: int, world: int, port: int):
    """Inside a process started by torch.multiprocessing.spawn: torchrun's environment, one thread, the process group
    initialised as train.py does (sid_fast.dist.init), and torn down on the way out."""
    import torch.distributed as dist

    from sid_fast import dist as sid_dist

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        sid_dist.init()
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_kernel_within_torch(kernel, composite, exact, atol: float, msg=None) -> None:
    """The project's tolerance for a low-precision kernel: its largest error against the float64 reference `exact` is
    at most twice what PyTorch's own composite in the same dtype reaches against it, plus a small `atol` (which
    callers scale to the reference's magnitude)."""
    got, allowed = max_abs_err(kernel, exact), 2 * max_abs_err(composite, exact) + atol
    assert got <= allowed, f"{msg or 'kernel'}: error {got:.3e} > {allowed:.3e} (twice PyTorch's + {atol:.1e})"
