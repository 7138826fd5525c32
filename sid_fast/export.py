"""Export a one-step generator as an AOTInductor package that runs without Python (native/sid_sample.cpp).

    python -m sid_fast.export --network runs/.../network-snapshot-XXXXXXXXXXXX --out gen.pt2 [--device cuda]

The package holds `torch.export` of `G(sigma_init * z, sigma_init, one_hot(label))` at the generator's fixed noise
level, with a dynamic batch dimension (1..--max-batch), compiled ahead of time by AOTInductor for the CPU or for CUDA.
Inputs: latents z float32 [B, C, H, W] and, for conditional generators, class indices int64 [B]; output: images
float32 [B, C, H, W] in about [-1, 1], exactly what `sid_fast.sampling.onestep_sample` returns. The package's
metadata (read by the native sampler) records resolution, channels, label_dim, sigma_init, max_batch and the source.

After compiling, the package is loaded back and compared with the eager generator on a few seeds; the export fails
if they differ by more than --tolerance.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from sid_fast.checkpoints import CheckpointError, load_network_file
from sid_fast.files import DestinationError, check_file_destination
from sid_fast.flags import SIGMA_INIT, Domain, DomainType, init_sigma_option
from sid_fast.sampling import StackedRandomGenerator


class ExportError(ValueError):
    """A network or option that cannot be exported; the message names the file or flag."""


class OneStepGenerator(torch.nn.Module):
    """forward(z[, labels]) = G(sigma_init * z, sigma_init, one_hot(labels)) in float32."""

    def __init__(self, net: torch.nn.Module, sigma_init: float):
        super().__init__()
        self.net = net
        self.sigma_init = float(sigma_init)
        self.label_dim = int(net.label_dim)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.full([z.shape[0], 1, 1, 1], self.sigma_init, dtype=torch.float32, device=z.device)
        c = F.one_hot(labels, self.label_dim).to(torch.float32) if self.label_dim else None
        return self.net(self.sigma_init * z.to(torch.float32), sigma, c)


def generator_from_file(path, init_sigma: float | None = None) -> tuple[OneStepGenerator, dict]:
    net, info = load_network_file(path)
    meta = info.get("meta", {})
    if init_sigma is None:
        if meta.get("kind") != "generator":
            raise ExportError(
                f"{path}: not a sid_fast generator snapshot (no sigma_init recorded); if it is a SiD generator pickle, "
                f"pass --init-sigma (SiD uses 2.5)."
            )
        init_sigma = float(meta.get("sigma_init", 2.5))
    if int(meta.get("steps", 1)) > 1:
        raise ExportError(
            f"{path}: a {meta['steps']}-step generator; the export package holds one-step generators (sample it with "
            "python -m sid_fast.sample)."
        )
    if not SIGMA_INIT.admits(init_sigma):
        raise ExportError(f"--init-sigma must be {SIGMA_INIT.describe()}, got {init_sigma}.")
    return OneStepGenerator(net.eval().requires_grad_(False), init_sigma), info


def example_inputs(gen: OneStepGenerator, batch: int, device, seeds=None):
    """Latents (and class indices) drawn per seed exactly as sid_fast.sampling.latents_and_labels draws them."""
    seeds = list(range(batch)) if seeds is None else list(seeds)
    net = gen.net
    rnd = StackedRandomGenerator(device, seeds)
    z = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    if gen.label_dim:
        return z, rnd.randint(gen.label_dim, size=[len(seeds)], device=device)
    return (z,)


def export_generator(network, out, device="cpu", max_batch=256, init_sigma=None, tolerance=1e-4, log=print):
    """Export, compile and verify; returns the package path."""
    out = Path(out)
    if out.suffix != ".pt2":
        raise ExportError(f"--out {out}: AOTInductor packages must end in .pt2.")
    if not 1 <= max_batch <= 65536:
        raise ExportError(f"--max-batch must be in [1, 65536], got {max_batch}.")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is available on this machine.")
    if device.type not in ("cpu", "cuda"):
        raise ExportError(f"--device must be cpu or cuda, got {device}.")
    gen, info = generator_from_file(network, init_sigma)
    gen = gen.to(device)
    net = gen.net
    net.use_fp16 = False  # the package runs fp32, like the reference sampler

    inputs = example_inputs(gen, min(2, max_batch), device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = {"z": {0: batch}}
    if gen.label_dim:
        dynamic["labels"] = {0: batch}
    log(
        f"Exporting {network} ({info['class_name']}, {net.img_channels}x{net.img_resolution}x{net.img_resolution}, "
        f"{net.label_dim} classes, sigma_init {gen.sigma_init}) for {device.type}, batch 1..{max_batch}"
    )
    with torch.no_grad():
        ep = torch.export.export(gen, inputs, dynamic_shapes=dynamic)
    meta = dict(
        sid_fast_format="1",
        img_resolution=net.img_resolution,
        img_channels=net.img_channels,
        label_dim=net.label_dim,
        sigma_init=repr(gen.sigma_init),
        max_batch=max_batch,
        device=device.type,
        source=str(network),
        class_name=info["class_name"],
    )
    meta = {k: str(v) for k, v in meta.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".part.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": meta}
        )

    # Verify the compiled package against the eager generator.
    runner = torch._inductor.aoti_load_package(str(tmp))
    worst = 0.0
    for seeds in ([0], list(range(3, 3 + min(5, max_batch)))):
        x = example_inputs(gen, len(seeds), device, seeds)
        with torch.no_grad():
            worst = max(worst, (runner(*x) - gen(*x)).abs().max().item())
    if not worst <= tolerance:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"{out}: the compiled package differs from the eager generator by {worst:.3g} (> {tolerance})."
        )
    os.replace(tmp, out)
    log(f"Wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); max |package - eager| = {worst:.3g}")
    return out


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option(
    "--network",
    help="Generator: a snapshot folder, a Hub id, a sid_fast .pt, or a SiD .pkl with --init-sigma",
    metavar="PATH|ID|URL",
    required=True,
)
@click.option("--out", help="Package to write", metavar="FILE.pt2", required=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing package at --out")
@click.option(
    "--device", help="Compile for this device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True
)
@click.option(
    "--max-batch",
    "max_batch",
    help="Largest batch the package accepts",
    type=DomainType(Domain(int, 1, 65536)),
    default=256,
    show_default=True,
)
@init_sigma_option("Generator noise level (default: the snapshot's)")
@click.option(
    "--tolerance",
    help="Largest accepted |package - eager|",
    type=DomainType(Domain(float, 0)),
    default=1e-4,
    show_default=True,
)
def main(network, out, overwrite, device, max_batch, init_sigma, tolerance):
    """Export a one-step generator as an AOTInductor package."""
    try:
        check_file_destination(out, "export", overwrite)
    except DestinationError as e:
        raise click.ClickException(str(e)) from None
    try:
        export_generator(network, out, device, max_batch, init_sigma, tolerance)
    except (ExportError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
