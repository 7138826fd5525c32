"""Smoke test of the native sampler (run by ctest): export a small conditional generator, sample it with sid_sample
and with the Python sampler for the same seeds, compare, and check the error exits.

    python native/smoke_test.py build/sid_sample build/smoke
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from sid_fast.checkpoints import load_network_file, save_network
from sid_fast.export import export_generator
from sid_fast.networks import build_network
from sid_fast.sampling import latents_and_labels, onestep_sample, to_uint8

NET = dict(
    model_type="SongUNet",
    img_resolution=8,
    img_channels=3,
    label_dim=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.0,
)


def check(cond, msg):
    if not cond:
        print(f"FAIL: {msg}")
        sys.exit(1)
    print(f"ok: {msg}")


def main(binary, work):
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_network("EDMPrecond", NET)
    with torch.no_grad():  # non-trivial output layers, so that the images carry the network's work
        for name, p in net.named_parameters():
            if "conv1" in name or "proj" in name or "aux" in name:
                p.normal_(0, 0.05)
    save_network(work / "gen.pt", net, NET, kind="generator", sigma_init=2.5)
    package = export_generator(work / "gen.pt", work / "gen.pt2", max_batch=16)

    seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1000, 4294967297]  # the last wraps mod 2^32 as in Python
    for extra, class_idx in (([], None), (["--class", "2"], 2)):
        out = work / f"out{'' if class_idx is None else class_idx}"
        r = subprocess.run(
            [
                binary,
                "--package",
                str(package),
                "--seeds",
                ",".join(map(str, seeds)),
                "--outdir",
                str(out),
                "--batch",
                "5",
                "--raw",
                str(out / "raw.npy"),
            ]
            + extra,
            capture_output=True,
            text=True,
        )
        check(r.returncode == 0, f"sid_sample runs (class {class_idx}): {r.stdout.strip()} {r.stderr.strip()}")
        g, _ = load_network_file(work / "gen.pt")
        z, labels, _ = latents_and_labels(g, seeds, class_idx=class_idx)
        with torch.no_grad():
            ref = onestep_sample(g, z, 2.5, labels)
        raw = np.load(out / "raw.npy")
        err = float(np.abs(raw - ref.numpy()).max())
        check(
            raw.shape == tuple(ref.shape) and err <= 1e-5,
            f"raw output within 1e-5 of the Python sampler (max {err:.3g})",
        )
        png = np.stack([np.asarray(PIL.Image.open(out / f"{s:06d}.png")) for s in seeds])
        u8 = to_uint8(ref).permute(0, 2, 3, 1).numpy()
        diff = int(np.abs(png.astype(int) - u8.astype(int)).max())
        check(png.shape == u8.shape and diff <= 1, f"images within 1 grey level of the Python sampler (max {diff})")

    (work / "junk.pt2").write_bytes(b"not a package")
    cases = [
        (["--package", str(work / "missing.pt2")], 1, "no such package file"),
        (["--package", str(work / "junk.pt2")], 1, "not an AOTInductor package"),
        (["--package", str(work / "gen.pt")], 1, "not an AOTInductor package"),
        (["--package", str(package), "--batch", "17"], 2, "batches of 1..16"),
        (["--package", str(package), "--batch", "0"], 2, "batches of 1..16"),
        (["--package", str(package), "--class", "3"], 2, "classes 0..2"),
        (["--package", str(package), "--seeds", "4-2"], 2, "--seeds 4-2"),
        (["--package", str(package), "--bogus", "1"], 2, "unknown option --bogus"),
    ]
    for args, code, text in cases:
        r = subprocess.run([binary, *args, "--outdir", str(work / "err")], capture_output=True, text=True)
        check(
            r.returncode == code and text in r.stderr,
            f"{' '.join(args[2:]) or args[1]} -> exit {r.returncode}: {r.stderr.strip()}",
        )
    print("native smoke test passed")


if __name__ == "__main__":
    main(*sys.argv[1:3])
