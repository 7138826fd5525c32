"""The gigagan-coco256 protocol (sid_fast.t2i.evaluate) on test-made COCO-like folders, a tiny TorchScript Inception
with NVIDIA's `layers` and a tiny random CLIP model: each step against an independent computation (PIL for the
transforms, the tokenizer's own output for the prefix, float64 networks and the Frechet formula for the numbers), and
the refusals. With clean-fid and open_clip importable (a machine with a matching torchvision), their pipelines too."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from sid_fast.t2i import evaluate as ev  # noqa: E402

CAPTIONS = ["a cat on a mat", "the dog", "a red car near the sea", "two birds", "a photo of the moon", "the tree"]


class TinyLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.lin = torch.nn.Linear(8 * 16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4)
        return torch.tanh(self.lin(x.flatten(1))).reshape(x.shape[0], -1, 1, 1)


class TinyInception(torch.nn.Module):
    """NVIDIA's file's shape: `layers` on (x - 128) / 128 at 299, and a forward that would resize inside."""

    def __init__(self):
        super().__init__()
        self.layers = TinyLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x.to(torch.float32), size=[299, 299], mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)


def write_bpe_tokenizer(folder):
    """A CLIP BPE tokenizer whose merges make "a", "photo" and "depicts" single tokens, as OpenAI CLIP's do."""
    from support.sd_tiny import byte_symbols
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = []
    for word in ("photo", "depicts"):
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(
        str(folder)
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("coco")
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyInception().eval()), str(root / "inception-2015-12-05.pt"))
    clip = root / "clip"
    write_bpe_tokenizer(clip)
    tok = CLIPTokenizer.from_pretrained(str(clip))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(clip))
    rng = np.random.default_rng(0)

    def picture(h, w):
        yy, xx = np.mgrid[0:h, 0:w]
        base = 128 + 100 * np.sin(xx * rng.uniform(0.05, 0.3) + yy * rng.uniform(0.05, 0.3) + rng.uniform(0, 6))
        return np.clip(base[..., None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)

    ref = root / "val2014"
    ref.mkdir()
    for i, (h, w) in enumerate([(48, 64), (64, 48), (37, 52), (40, 40), (51, 33), (60, 45), (45, 60), (33, 70)] * 2):
        img = PIL.Image.fromarray(picture(h, w))
        (img.convert("L") if i == 3 else img).save(ref / f"COCO_val2014_{i:012d}.jpg", quality=95)  # one grey
    fake = root / "fake_images"
    fake.mkdir()
    for i in range(len(CAPTIONS)):
        PIL.Image.fromarray(picture(64, 64)).save(fake / f"{i:06d}.png")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\nan extra line\n")
    return root


def _features64(root, folder):
    """Every image of `folder` through the protocol written out here: PIL crop (torchvision's offsets) and LANCZOS
    resize to 256, each channel through PIL's float bicubic to 299 and clipped, the float64 network."""
    net = TinyLayers().double()
    scripted = torch.jit.load(str(root / "inception-2015-12-05.pt"))
    net.load_state_dict({k.removeprefix("layers."): v.double() for k, v in scripted.state_dict().items()})
    feats = []
    for f in sorted(folder.iterdir()):
        img = PIL.Image.open(f).convert("RGB")
        w, h = img.size
        s = min(w, h)
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
        a = np.asarray(img.crop((left, top, left + s, top + s)).resize((256, 256), PIL.Image.LANCZOS))
        chans = [np.asarray(PIL.Image.fromarray(a[:, :, c].astype(np.float32), "F").resize((299, 299),
                 PIL.Image.BICUBIC)).clip(0, 255) for c in range(3)]  # fmt: skip
        x = torch.from_numpy(np.stack(chans)[None].astype(np.float64))
        with torch.no_grad():
            feats.append(net((x - 128) / 128).flatten(1)[0].numpy())
    return np.stack(feats)


def _fid64(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(np.real(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2))))


def _clip64(root, captions):
    """GigaGAN's CLIP pipeline written out here in float64: crop and LANCZOS to 256, the float round trip through
    [-1, 1] and truncation, PIL bicubic to the model's side, OpenAI mean/std; the caption tokenised with the prefix
    as one string (the tokenizer's own output); the cosine of the projections."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(root / "clip")).double().eval()
    tok = CLIPTokenizer.from_pretrained(str(root / "clip"))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).reshape(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).reshape(3, 1, 1)
    sims = []
    for i, caption in enumerate(captions):
        img = PIL.Image.open(root / "fake_images" / f"{i:06d}.png").convert("RGB")
        p = np.asarray(img.resize((256, 256), PIL.Image.LANCZOS)).astype(np.float32)  # square: no crop
        q = (((p / np.float32(255)) - np.float32(0.5)) / np.float32(0.5) + np.float32(1)) * np.float32(127.5)
        small = PIL.Image.fromarray(np.clip(q, 0, 255).astype(np.uint8)).resize((32, 32), PIL.Image.BICUBIC)
        x = (torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).double() / 255 - mean) / std
        ids = tok("A photo depicts " + caption, padding="max_length", max_length=77, truncation=True)["input_ids"]
        ids = torch.tensor([[t if k <= ids.index(tok.eos_token_id) else 0 for k, t in enumerate(ids)]])
        with torch.no_grad():
            a = model.visual_projection(model.vision_model(pixel_values=x[None]).pooler_output)
            b = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        sims.append(float(F.cosine_similarity(a, b)[0]))
    return float(np.mean(sims))


def test_the_transforms_are_the_protocols():
    # torchvision's center_crop offsets: int(round(x / 2)) with Python's rounding (1.5 -> 2, 2.5 -> 2)
    img = PIL.Image.fromarray(np.arange(7 * 4 * 3, dtype=np.uint8).reshape(4, 7, 3))
    assert np.array_equal(np.asarray(ev.crop_long_edge(img)), np.asarray(img)[:, 2:6])
    img = PIL.Image.fromarray(np.arange(9 * 4 * 3, dtype=np.uint8).reshape(9, 4, 3)[:, :, :])
    assert np.array_equal(np.asarray(ev.crop_long_edge(img)), np.asarray(img)[2:6])
    # clean-fid's resize keeps float values (no quantisation) and clips overshoot
    a = np.zeros((8, 8, 3), np.uint8)
    a[::2] = 255
    r = ev.clean_resize(a, 299)
    assert r.dtype == np.float32 and r.shape == (299, 299, 3) and r.min() == 0 and r.max() == 255
    assert len(np.unique(r)) > 256  # values between the uint8 levels survive
    # the round trip through [-1, 1] can lower a pixel by one level, never raise it
    p = PIL.Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB")
    d = np.asarray(p).astype(int) - np.asarray(ev.roundtrip_uint8(p)).astype(int)
    assert set(np.unique(d)) <= {0, 1} and d.any()


def test_the_prefix_tokens_are_the_tokenizers_own(files):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(files / "clip"))
    got = ev.prefixed_tokens(tok, CAPTIONS)
    for row, caption in zip(got, CAPTIONS):
        ids = tok("A photo depicts " + caption)["input_ids"]
        assert row[: len(ids)].tolist() == ids and not row[len(ids) :].any()
    # a caption longer than 77 tokens: cut to 77 with the end token last, as GigaGAN's code does
    long = ev.prefixed_tokens(tok, ["x" * 200])[0]
    assert long.shape == (77,) and long[-1] == ev.EOT
    assert long[1:4].tolist() == tok("A photo depicts ")["input_ids"][1:4]
    with pytest.raises(ev.EvalError, match="not OpenAI CLIP's 3"):
        from support.sd_tiny import write_tokenizer

        write_tokenizer(files / "bytes")
        ev.prefixed_tokens(CLIPTokenizer.from_pretrained(str(files / "bytes")), ["a cat"])


def test_the_protocol_equals_its_float64_transcription(files, tmp_path):
    from click.testing import CliRunner

    n = len(CAPTIONS)
    out = tmp_path / "eval.jsonl"
    args = ["--images", str(files / "fake_images"), "--captions", str(files / "captions.txt"), "--ref",
            str(files / "val2014"), "--detector", str(files / "inception-2015-12-05.pt"), "--clip",
            str(files / "clip"), "--num-images", str(n), "--batch", "4", "--json", str(out)]  # fmt: skip
    r = CliRunner().invoke(ev.main, [*args, "--save-ref", str(tmp_path / "ref.npz")])
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    want_fid = _fid64(_features64(files, files / "fake_images"), _features64(files, files / "val2014"))
    want_clip = _clip64(files, CAPTIONS)
    # float32 networks against float64 (features agree to ~1e-6 of their size; the FID of 24-d features is O(0.1))
    assert abs(got["fid"] - want_fid) < 1e-4 * max(1.0, want_fid), (got, want_fid)
    assert abs(got["clip_score"] - want_clip) < 1e-5, (got, want_clip)
    # the pairing matters: captions in another order score otherwise
    (tmp_path / "rev.txt").write_text("\n".join(CAPTIONS[::-1]) + "\n")
    assert abs(_clip64(files, CAPTIONS[::-1]) - want_clip) > 1e-4
    # the saved reference statistics give the same FID
    args[args.index("--ref") + 1] = str(tmp_path / "ref.npz")
    r = CliRunner().invoke(ev.main, [a for a in args if a not in ("--clip", str(files / "clip"))])
    assert r.exit_code == 0, r.output
    assert abs(json.loads(out.read_text().splitlines()[-1])["fid"] - got["fid"]) < 1e-9


def test_inputs_that_do_not_fit_the_protocol_are_refused(files, tmp_path):
    import shutil

    from click.testing import CliRunner

    base = ["--captions", str(files / "captions.txt"), "--ref", str(files / "val2014"), "--detector",
            str(files / "inception-2015-12-05.pt")]  # fmt: skip

    def refused(args, message):
        r = CliRunner().invoke(ev.main, args)
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output

    refused(["--images", str(files / "fake_images"), *base], "the protocol scores exactly --num-images 30000 images")
    refused(["--images", str(files / "fake_images"), *base, "--num-images", "5"], "found 6 image files")
    (tmp_path / "short.txt").write_text("one caption\n")
    args = ["--images", str(files / "fake_images"), *base, "--num-images", "6"]
    refused([*args, "--captions", str(tmp_path / "short.txt")], "1 caption lines, fewer than --num-images 6 images")
    refused([*args, "--ref", str(tmp_path / "none")], "no such folder (the reference images, COCO-2014 val2014)")
    from support.fid_helpers import save_torchscript_detector

    save_torchscript_detector(tmp_path / "edm.pt", dim=16)
    refused([*args, "--detector", str(tmp_path / "edm.pt")], "not NVIDIA's TorchScript Inception with a `layers`")
    odd = tmp_path / "odd"
    shutil.copytree(files / "fake_images", odd)
    (odd / "000002.png").rename(odd / "image2.png")
    refused(["--images", str(odd), *base[:], "--num-images", "6"], "named 000000.png to 000005.png")


def test_clean_fid_agrees_where_it_imports(files):
    """On a machine where clean-fid imports (a torchvision matching torch), its own FID of the same folders with
    the same detector and transform equals this module's; skipped here, where no such torchvision installs."""
    cleanfid = pytest.importorskip("cleanfid.fid")
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(files), download=False)
    fid = cleanfid.compute_fid(str(files / "val2014"), str(files / "fake_images"), mode="clean",
                               custom_feat_extractor=lambda x: model(x), device=torch.device("cpu"), num_workers=0,
                               custom_image_tranform=ev.eval_array)  # fmt: skip
    mine = _fid64(_features64(files, files / "fake_images"), _features64(files, files / "val2014"))
    assert abs(fid - mine) < 1e-3 * max(1.0, mine)


def test_the_edm_protocol_is_sid_fasts_fid_on_the_same_folder(files, tmp_path):
    """--protocol edm: the detector's own call on each image as stored, against an EDM-format reference npz."""
    from click.testing import CliRunner
    from support.fid_helpers import save_torchscript_detector

    from sid_fast.metrics import save_ref_stats
    from sid_fast.metrics.inception import load_detector

    det_path = save_torchscript_detector(tmp_path / "edm.pt", dim=16)
    det = load_detector(det_path)
    imgs = [np.asarray(PIL.Image.open(files / "fake_images" / f"{i:06d}.png").convert("RGB")) for i in range(6)]
    feats = det.features(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)).numpy()
    ref = feats[::-1][:5] + 0.1  # any statistics, in the npz format sid_fast.fid ref writes
    save_ref_stats(tmp_path / "ref.npz", ref.mean(0), np.cov(ref, rowvar=False))
    r = CliRunner().invoke(ev.main, ["--protocol", "edm", "--images", str(files / "fake_images"), "--captions",
                                     str(files / "captions.txt"), "--ref", str(tmp_path / "ref.npz"), "--detector",
                                     str(det_path), "--num-images", "6", "--json",
                                     str(tmp_path / "o.jsonl")])  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "o.jsonl").read_text())["fid"]
    assert abs(got - _fid64(feats, ref)) < 1e-6 * max(1.0, got)


def test_a_generator_evaluated_over_two_processes_equals_one_process_on_its_images(files, tmp_path):
    """--network: the images made first (caption i, seed i), every rank its share, then the protocol over the ranks;
    the same numbers as one process scoring the images they wrote."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from support.sd_tiny import write_tiny_sd

    from sid_fast.t2i.export import save_unet_folder
    from sid_fast.t2i.sd import load_sd

    sd = write_tiny_sd(tmp_path / "sd")
    gen = save_unet_folder(tmp_path / "gen", load_sd(sd).unet, init_timestep=625)
    made, out = tmp_path / "made", tmp_path / "two.jsonl"
    args = ["--network", str(gen), "--teacher", str(sd), "--images", str(made), "--captions",
            str(files / "captions.txt"), "--ref", str(files / "val2014"), "--detector",
            str(files / "inception-2015-12-05.pt"), "--clip", str(files / "clip"), "--num-images", "6", "--batch", "2",
            "--json", str(out)]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "sid_fast.t2i.evaluate", *args], cwd=root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(out.read_text())
    assert sorted(p.name for p in made.iterdir()) == [f"{i:06d}.png" for i in range(6)]
    one = ev.evaluate("gigagan-coco256", made, files / "captions.txt", files / "val2014",
                      files / "inception-2015-12-05.pt", files / "clip", 6, 4, "cpu")  # fmt: skip
    assert abs(two["fid"] - one["fid"]) < 1e-9 * max(1.0, one["fid"])  # float64 sums in another order
    assert abs(two["clip_score"] - one["clip_score"]) < 1e-6
    r = subprocess.run([sys.executable, "-m", "sid_fast.t2i.evaluate", *args], cwd=root, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0 and "not empty; --network writes the generated images into a new or empty" in r.stderr


def test_a_k_step_flow_generator_is_evaluated_at_its_steps_or_at_others(files, tmp_path):
    """--network with a flow generator: its images are t2i.sample's (caption i, seed i, its K steps, or --steps), and
    the protocol scores them; --steps that would repeat a SiD-LSG generator's timesteps, or without --network, is
    refused."""
    from click.testing import CliRunner
    from support.sd3_tiny import write_tiny_sd3
    from support.sd_tiny import write_tiny_sd

    from sid_fast.families.flow import decode_flow, load_flow_generator, sample_flow, save_transformer_folder
    from sid_fast.t2i.export import save_unet_folder
    from sid_fast.t2i.sd import load_sd
    from sid_fast.t2i.sd3 import load_sd3

    sd3 = write_tiny_sd3(tmp_path / "sd3")
    gen = save_transformer_folder(tmp_path / "gen", load_sd3(sd3).transformer, steps=4, init_timestep=999,
                                  noise_type="fresh", resolution=8)  # fmt: skip
    common = ["--captions", str(files / "captions.txt"), "--ref", str(files / "val2014"), "--detector",
              str(files / "inception-2015-12-05.pt"), "--num-images", "4", "--batch", "2"]  # fmt: skip
    fids = {}
    for steps in (None, 2):
        made = tmp_path / f"made{steps}"
        args = ["--network", str(gen), "--teacher", str(sd3), "--images", str(made), "--json", str(made) + ".json"]
        r = CliRunner().invoke(ev.main, args + common + (["--steps", str(steps)] if steps else []))
        assert r.exit_code == 0, r.output
        fids[steps] = json.loads((tmp_path / f"made{steps}.json").read_text())["fid"]
        kind, meta = load_flow_generator(gen, sd3)
        captions = ev.read_captions(files / "captions.txt", 4)
        want = decode_flow(kind.vae, sample_flow(kind, meta, [captions[0], captions[1]], [0, 1], "cpu", steps), "cpu")
        for i in range(2):
            got = np.asarray(PIL.Image.open(made / f"{i:06d}.png"))
            assert np.array_equal(got, want[i].permute(1, 2, 0).numpy()), (steps, i)
    assert fids[None] != fids[2]  # two steps make other images
    sd = write_tiny_sd(tmp_path / "sd")
    one = save_unet_folder(tmp_path / "one", load_sd(sd).unet, init_timestep=3)
    r = CliRunner().invoke(ev.main, ["--network", str(one), "--teacher", str(sd), "--images", str(tmp_path / "x"),
                                     "--steps", "4", *common])  # fmt: skip
    assert r.exit_code != 0 and "--steps 4: the generator's timesteps from 3 would repeat" in r.output
    r = CliRunner().invoke(ev.main, ["--images", str(tmp_path / "x"), "--steps", "2", *common])
    assert r.exit_code != 0 and "--steps is for --network" in r.output
