"""One import name: sid_fast installs the top-level name `sid_fast` only, and no name the repository puts on sys.path
(its root for `python3 train.py`, tests/ for pytest) is also provided by an installed distribution or the standard
library. Hugging Face's `kernels` (required by transformers >= 5.25) once collided with a top-level `kernels/`.
Then sid_fast and the bundled Stable Diffusion folder load in fresh processes from the repository root and from
another directory, with the network blocked."""

import importlib.metadata as md
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
OURS = "sid_fast"


def provided_names(dists) -> dict[str, set[str]]:
    """{top-level import name: names of the distributions that install it} (as packages_distributions() reads it:
    top_level.txt, else the first part of each installed file's path)."""
    out: dict[str, set[str]] = {}
    for d in dists:
        names = (d.read_text("top_level.txt") or "").split()
        if not names:
            names = [f.parts[0].removesuffix(".py") for f in d.files or () if f.parts and ".." not in f.parts[0]]
            names = [
                n for n in names if not n.endswith((".dist-info", ".egg-info", ".pth", ".data")) and n.isidentifier()
            ]
        dist = re.sub(r"[-_.]+", "_", d.metadata["Name"]).lower()
        for n in set(names):
            out.setdefault(n, set()).add(dist)
    return out


def repo_names() -> set[str]:
    """Top-level names importable because the repository root or tests/ is on sys.path."""
    names = set()
    for folder in (ROOT, TESTS):
        for p in folder.iterdir():
            if p.is_dir() and (p / "__init__.py").is_file():
                names.add(p.name)
            elif p.suffix == ".py" and not p.name.startswith("test_"):
                names.add(p.stem)
    return names


def clashes(dists, extra=()) -> dict[str, list[str]]:
    """{name: other providers} for every top-level name sid_fast installs or the repository exposes (`extra`)."""
    provided = provided_names(dists)
    ours = {n for n, who in provided.items() if OURS in who} | set(extra)
    out = {}
    for name in sorted(ours):
        others = sorted(provided.get(name, set()) - {OURS}) + (
            ["the standard library"] if name in sys.stdlib_module_names else []
        )
        if others:
            out[name] = others
    return out


def test_sid_fast_installs_one_import_name():
    ours = {n for n, who in provided_names(md.distributions()).items() if OURS in who}
    assert ours == {"sid_fast"}


def test_no_project_import_name_is_provided_by_another_distribution():
    names = repo_names()
    assert {"sid_fast", "bench", "studies", "train", "support", "conftest"} <= names  # the listing sees them
    assert "kernels" not in names and "profile" not in names  # no top-level kernels/; profile/ is not a package
    assert clashes(md.distributions(), extra=names) == {}


def test_the_clash_check_sees_a_reinstalled_kernels_name(tmp_path):
    """Planted: a sid_fast that installs a top-level `kernels` beside Hugging Face's `kernels` distribution."""

    def dist(name, files):
        info = tmp_path / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))

    dist("sid_fast", ["sid_fast/__init__.py", "kernels/__init__.py", "kernels/attention.py"])
    dist("kernels", ["kernels/__init__.py", "kernels/layer.py"])
    dist("other", ["other/__init__.py"])
    dists = list(md.distributions(path=[str(tmp_path)]))
    assert clashes(dists) == {"kernels": ["kernels"]}
    assert clashes(dists, extra={"profile"}) == {"kernels": ["kernels"], "profile": ["the standard library"]}


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import support.netblock  # noqa: F401  (before anything else: no connection beyond loopback from here on)
    import profile
    assert not profile.__file__.startswith({root!r}), profile.__file__  # the standard library's, not profile/
    import sid_fast.ops
    from diffusers import UNet2DConditionModel  # noqa: F401  (transformers' hub-kernel integration imports `kernels`)
    from sid_fast.t2i import digits
    from sid_fast.t2i.sd import load_sd
    sd = load_sd(digits.FOLDER)
    assert getattr(sd.text_encoder, "use_kernels", False) is False  # plain torch layers, nothing fetched
    emb = sd.encode_text(["a handwritten seven"])
    print("ok", sid_fast.ops.__file__, tuple(emb.shape))
    """
)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_sid_fast_and_the_bundled_sd_folder_load_offline_in_a_fresh_process(tmp_path, where):
    cwd = ROOT if where == "root" else tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache: nothing can come from an earlier download
    code = CHILD.format(tests=str(TESTS), root=str(ROOT) + os.sep)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("ok ") and line.split()[1] == str(ROOT / "sid_fast" / "ops.py"), line


def test_the_network_block_stops_a_planted_download(tmp_path):
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import support.netblock, urllib.request\n"
    code += "urllib.request.urlopen('https://huggingface.co/api/models', timeout=5)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "network blocked by the test" in r.stderr, r.stderr[-2000:]
