"""The file readers under fuzzing: the committed corpus replayed, a short coverage-guided run, and the findings.

The long run and its figures are in README.md ("Reliability"). Each finding below failed before its fix.
"""

import io
import pickle
import shutil
import struct
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch

from sid_fast.checkpoints import CheckpointError, load_network_file, save_network
from sid_fast.networks import build_network

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))
import loader_target  # noqa: E402


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    paths = loader_target.seed_files(tmp_path_factory.mktemp("fuzz_seeds"))
    loader_target.warm_up(paths)
    return paths


def test_seed_files_are_valid_inputs(seeds):
    """The fuzzer starts from files the readers accept, so its mutations reach past the first check."""
    net, info = load_network_file(seeds[0])
    assert info["source"] == "edm-pickle" and net.img_resolution == 4
    net, info = load_network_file(seeds[1])
    assert info["source"] == "sid_fast"


def test_corpus_replays_within_the_contract(seeds):
    files = sorted((FUZZ / "corpus").iterdir()) + list(seeds)
    assert len(files) >= 20
    for f in files:
        loader_target.check_input(f.read_bytes())


def test_the_contract_can_fail(seeds, monkeypatch):
    """The harness reports a foreign exception, a slow read and an import: it is not a check that cannot fail."""
    import sid_fast.checkpoints as ck

    def boom(*a, **k):
        raise KeyError("x")

    monkeypatch.setattr(loader_target, "load_network_file", boom)
    with pytest.raises(loader_target.FuzzFinding, match="KeyError"):
        loader_target.check_input(b"\x80\x04N.")
    monkeypatch.undo()

    def slow(*a, **k):  # busy, as a hang would be (a sleep uses no CPU time)
        end = time.process_time() + loader_target.TIME_LIMIT_S + 0.05
        while time.process_time() < end:
            pass
        raise CheckpointError("slow")

    monkeypatch.setattr(loader_target, "load_network_file", slow)
    with pytest.raises(loader_target.FuzzFinding, match="took"):
        loader_target.check_input(b"\x80\x04N.")
    monkeypatch.undo()

    def imports(*a, **k):  # what resolving a global outside the allow-list would do: a new entry in sys.modules
        sys.modules["sid_fast_fuzz_probe"] = types.ModuleType("sid_fast_fuzz_probe")
        raise CheckpointError("imported")

    monkeypatch.setattr(loader_target, "load_network_file", imports)
    try:
        with pytest.raises(loader_target.FuzzFinding, match="sid_fast_fuzz_probe"):
            loader_target.check_input(b"\x80\x04N.")
    finally:
        sys.modules.pop("sid_fast_fuzz_probe", None)
    assert ck.load_network_file is load_network_file


def test_short_coverage_guided_run(tmp_path):
    """2,000 atheris (libFuzzer) executions from a fixed seed on a copy of the corpus: no finding. A fixed seed and
    count, not a time box, so that CI runs the same inputs on every machine (new findings belong to the long run)."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus", corpus)
    proc = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "fuzz_loader.py"),
            str(corpus),
            "-runs=2000",
            "-seed=1",
            "-timeout=10",
            "-rss_limit_mb=4096",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    runs = [
        int(line.split(":")[-1])
        for line in proc.stderr.splitlines()
        if line.startswith("stat::number_of_executed_units")
    ]
    assert runs and runs[0] >= 2000, tail
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))


# ----------------------------------------------------------------------------------------------------------------
# Findings of the long run, each pinned.


def test_memo_index_does_not_allocate(tmp_path):
    """LONG_BINPUT with index 2^31 - 1: CPython's C unpickler grows its memo array to that index (a 48 kB fuzzed file
    took 78 s and gigabytes); the reader uses the pure-Python unpickler, whose memo is a dict."""
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x04N" + b"r" + struct.pack("<I", 2**31 - 1) + b".")
    start = time.process_time()
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_network_file(path)
    assert time.process_time() - start < loader_target.TIME_LIMIT_S


def test_claimed_length_does_not_allocate(tmp_path):
    """BINBYTES8 claiming 2^40 bytes: the bounded reader never asks the file for more than is left."""
    path = tmp_path / "bytes.pkl"
    path.write_bytes(b"\x80\x04" + b"\x8e" + struct.pack("<Q", 1 << 40) + b"abc")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_network_file(path)


def test_corrupt_zip_assertion_is_a_checkpoint_error(tmp_path, seeds):
    """torch's weights_only reader asserts on a record that names a missing storage; that is corruption too."""
    data = bytearray(seeds[1].read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pkl = z.read(name)
    # Rename every storage key in data.pkl so that none matches a file in the archive.
    bad = pkl.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x00z")  # storage key '0' -> 'z' (protocol 2 strings)
    assert bad != pkl
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, bad if item.filename == name else zin.read(item.filename))
    path = tmp_path / "bad.pt"
    path.write_bytes(out.getvalue())
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_network_file(path)


def test_implausible_kwargs_are_refused_before_building(tmp_path):
    path = tmp_path / "huge.pt"
    net = build_network("EDMPrecond", loader_target.TINY_NET)
    save_network(path, net, dict(loader_target.TINY_NET, model_channels=1 << 20))
    with pytest.raises(CheckpointError, match="model_channels=1048576 is outside"):
        load_network_file(path)
    save_network(path, net, dict(loader_target.TINY_NET, num_blocks=10**4))
    with pytest.raises(CheckpointError, match="num_blocks=10000 is outside"):
        load_network_file(path)


def test_shape_mismatch_is_named_before_building(tmp_path):
    """Kwargs that build a different network than the tensors: the meta-device build names the mismatch."""
    path = tmp_path / "wide.pt"
    net = build_network("EDMPrecond", loader_target.TINY_NET)
    save_network(path, net, dict(loader_target.TINY_NET, model_channels=8))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_network_file(path)


def test_wrongly_typed_kwargs_and_structures(tmp_path):
    path = tmp_path / "typed.pt"
    net = build_network("EDMPrecond", loader_target.TINY_NET)
    save_network(path, net, dict(loader_target.TINY_NET, channel_mult="abc"))
    with pytest.raises(CheckpointError, match="typed.pt"):
        load_network_file(path)
    torch.save(
        dict(format="sid_fast.network", version=1, class_name="EDMPrecond", init_kwargs=[1], state_dict={}), path
    )
    with pytest.raises(CheckpointError, match="without class_name, init_kwargs and state_dict"):
        load_network_file(path)
    # A pickle whose 'ema' stub has a state that is not a module's __dict__.
    pkl = tmp_path / "stub.pkl"
    with open(pkl, "wb") as f:
        pickle.Pickler(f, protocol=4).dump({"ema": None})
    with pytest.raises(CheckpointError, match="not an EDM persistent network"):
        load_network_file(pkl)


def test_readers_import_nothing_new(seeds):
    """In a fresh interpreter, reading every seed file imports no module beyond those imported by loading sid_fast
    and reading once (so an allow-list escape that imports would show)."""
    code = (
        f"import sys; sys.path.insert(0, {str(FUZZ)!r}); import loader_target as t; from pathlib import Path; "
        f"paths=[Path(p) for p in {[str(p) for p in seeds]!r}]; t.warm_up(paths); before=set(sys.modules); "
        "[t.check_input(p.read_bytes()) for p in paths]; print(sorted(set(sys.modules)-before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
