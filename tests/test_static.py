"""The ahead-of-time GPU checks (bench/static.py) that a CPU can run: every kernel compiles for sm_90 at the official
shapes in bf16 with the configurations its autotuner keeps, fits the H100's shared memory, spills nothing, and uses
wgmma where the tile allows; and the check itself catches a spilling configuration."""

import json
import os
import subprocess
import sys

import pytest

from bench.static import violations


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the GPU target
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_kept_configs_compile_fit_and_do_not_spill_on_sm90(tmp_path):
    out = tmp_path / "static.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.static",
            "--arch",
            "90",
            "--space",
            "kept",
            "--dtypes",
            "bf16",
            "--jobs",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    recs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert violations(recs) == []
    kernels = {x["kernel"] for x in recs}
    assert kernels == {
        "attention.fwd",
        "attention.bwd_dkdv",
        "attention.bwd_dq",
        "attention.delta",
        "sid_loss.fwd",
        "sid_loss.bwd",
        "edm_loss.fwd",
        "edm_loss.bwd",
        "group_norm_silu.fwd",
        "group_norm_silu.bwd",
        "ada_layer_norm.fwd",
        "ada_layer_norm.bwd",
    }
    # Every official attention shape, in all four layouts, was compiled.
    att = {(x["shape"], x["layout"]) for x in recs if x["kernel"] == "attention.fwd"}
    assert len(att) == 20
    # The vector loads the layouts allow: attention streams k and v with cp.async in NCHW and, with the blocked qkv
    # order that UNetBlock produces, in channels_last too, with no 16-bit scalar loads; GroupNorm reads 16-byte
    # or 8-byte vectors and no scalar 16-bit loads in channels_last where a group has 8 channels (DDPM++'s 256 channels
    # at 16x16; at 4x4 a tile holds one element per thread).
    piped = [
        x
        for x in recs
        if x["kernel"] == "attention.fwd"
        and x["layout"] in ("nchw", "channels_last-blocked")
        and x["config"]["num_stages"] > 1
    ]
    assert piped and all(x["cp_async"] > 0 and x["ld_b16_scalar"] == 0 for x in piped)
    gn_cl8 = [
        x
        for x in recs
        if x["kernel"].startswith("group_norm_silu")
        and x["layout"] == "channels_last"
        and x["shape"].startswith("ddpmpp-cifar10-16x16")
    ]
    assert gn_cl8 and all(x["ld_v4"] + x["ld_v2"] > 0 and x["ld_b16_scalar"] == 0 for x in gn_cl8)


@pytest.mark.slow
def test_the_check_fails_on_a_spilling_configuration(tmp_path):
    """The head-dim-256 dk/dv kernel at BLOCK_M 64, BLOCK_N 64, 4 warps, 2 stages (in the lists before bench.static)
    spills on sm_90: compiled as if the autotuner kept it, violations() must name the spill."""
    script = f"""
import json
from bench import static as S
rec = S.compile_case(S.Case("attention.bwd_dkdv", "sid_fast.kernels.attention", "_bwd_dkdv_kernel", "ddpmpp-16x16",
    "nchw", "bf16", dict(qkv_ptr="*bf16", do_ptr="*bf16", lse_ptr="*fp32", delta_ptr="*fp32", dqkv_ptr="*bf16", L=256,
    H=1, sm_scale=1 / 16, s_n=768 * 256, s_c=256, s_l=1, o_n=256 * 256, o_c=256, o_l=1, D=256, BLOCK_D=256, PREC="ieee",
    BLOCKED=False),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), True), 90)
open({str(tmp_path / "rec.json")!r}, "w").write(json.dumps(rec))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["ok"] and rec["spills"] > 0, rec
    found = violations([rec])
    assert any("spills" in v for v in found), found
