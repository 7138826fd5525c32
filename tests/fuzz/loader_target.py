"""The fuzz target for sid_fast's file readers, shared by the atheris driver (fuzz_loader.py) and the suite.

One input = the bytes of a file. The target writes them to a scratch file and hands it to every reader a user can
point at a file: `load_network_file` (EDM/SiD pickles through the restricted unpickler, sid_fast network files
through torch.load(weights_only=True)), `read_training_state`, behind `--resume`, and the official SiD-LSG generator
pickles' reader (sid_fast.t2i.pickles.read_parts, behind every text-to-image command that takes a generator; the
diffusers UNet is then built from the configuration it returns). The contract checked:
- the only exception a reader may raise is its own one-sentence error (CheckpointError);
- no input takes more than TIME_LIMIT_S of CPU time (a hang is a bug);
- no module is imported while reading (an import would mean a global outside the allow-list was resolved; the
  standard library's codec modules and torch's own lazily imported submodules are the exceptions, see check_input).
A violation raises FuzzFinding with the reader and the cause.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch

from sid_fast.checkpoints import (  # noqa: F401  (the readers are looked up by name: READERS)
    TRAINING_STATE_FORMAT,
    CheckpointError,
    load_network_file,
    read_training_state,
    save_network,
)
from sid_fast.networks import build_network
from sid_fast.t2i.pickles import read_parts  # noqa: F401  (READERS)

TIME_LIMIT_S = 1.0

# A network small enough that a seed file is a few tens of kB (the fuzzer mutates every byte of it).
TINY_NET = dict(
    model_type="SongUNet",
    img_resolution=4,
    img_channels=1,
    label_dim=2,
    model_channels=4,
    channel_mult=[1],
    num_blocks=1,
    attn_resolutions=[4],
    augment_dim=0,
    dropout=0.0,
)


class FuzzFinding(AssertionError):
    """A reader broke its contract on this input."""


def _scratch_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"sid_fast_fuzz_{os.getpid()}"
    d.mkdir(exist_ok=True)
    return d


READERS = ("load_network_file", "read_training_state", "read_parts")  # looked up when called (tests patch them)


def check_input(data: bytes) -> None:
    """Feed `data` to every reader; raise FuzzFinding if any breaks the contract."""
    path = _scratch_dir() / "input.bin"
    path.write_bytes(data)
    for name in READERS:
        reader = globals()[name]
        before = set(sys.modules)
        start = time.process_time()  # CPU time: a hang burns it; another process on the same cores does not
        try:
            reader(path)
        except CheckpointError:
            pass
        except Exception as e:  # anything else is a finding; keep its type and message
            raise FuzzFinding(f"{name}: {type(e).__name__}: {e}") from e
        elapsed = time.process_time() - start
        if elapsed > TIME_LIMIT_S:
            raise FuzzFinding(f"{name}: took {elapsed:.2f} s of CPU time (limit {TIME_LIMIT_S} s)")
        # Not globals resolved from the file: codec modules (e.g. encodings.raw_unicode_escape for protocol 0's UNICODE
        # opcode) that the unpickler's string decoding loads, and torch's own lazy imports reached through classes on
        # torch's weights_only allow-list (a fuzzed global that names NestedTensor imports torch.nested._internal.*).
        imported = sorted(m for m in set(sys.modules) - before if not m.startswith(("encodings.", "torch.")))
        if imported:
            raise FuzzFinding(f"{name}: imported {imported} while reading")


def seed_files(out_dir: Path) -> list[Path]:
    """Valid inputs, written the way users get them: an EDM pickle, a sid_fast network file, a training state."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ for the EDM pickle writer
    from support.edm_pickle_writer import write_edm_pickle

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_network("EDMPrecond", TINY_NET)
    paths = [out_dir / "seed-edm.pkl", out_dir / "seed-network.pt", out_dir / "seed-state.pt"]
    write_edm_pickle(
        paths[0],
        net,
        dict(TINY_NET, use_fp16=False),
        module_src="raise SystemExit('never run')\n",
        extra=dict(dataset_kwargs=dict(path="x.zip")),
    )
    save_network(paths[1], net, TINY_NET, kind="teacher")
    # A training state as the trainer writes it (format tag, nested dicts of tensors, RNG states, counters).
    buf = io.BytesIO()
    torch.save(
        dict(
            format=TRAINING_STATE_FORMAT,
            version=1,
            world_size=1,
            G=net.state_dict(),
            rng=[dict(cpu=torch.get_rng_state(), cuda=None)],
            cur_nimg=64,
            stats=torch.zeros(8),
        ),
        buf,
    )
    paths[2].write_bytes(buf.getvalue())
    try:  # an official SiD-LSG snapshot: pickle.dump(dict(ema=UNet2DConditionModel)) of a tiny UNet
        from diffusers import UNet2DConditionModel
    except ImportError:
        return paths
    unet = UNet2DConditionModel(
        sample_size=4,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=1,
        norm_num_groups=2,
        cross_attention_dim=4,
        attention_head_dim=1,
    )
    paths.append(out_dir / "seed-sd.pkl")
    with open(paths[-1], "wb") as f:
        pickle.dump(dict(ema=unet.eval().requires_grad_(False)), f)
    return paths


def warm_up(seeds: list[Path]) -> None:
    """Run every reader once on valid files so that lazy imports inside torch happen before checking starts."""
    for p in seeds:
        for reader in map(globals().get, READERS):
            try:
                reader(p)
            except CheckpointError:
                pass
