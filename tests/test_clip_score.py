"""CLIP score (sid_fast.metrics.clip_score) on a tiny random CLIP model saved in Hugging Face's format: the CLI's
score against the official pipeline written out here in float64 (uint8 / 255, bicubic resize of the whole image to
the input side, OpenAI mean/std, projections, unit vectors, mean dot product), image i paired with prompt line i."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from support.sd_tiny import write_tokenizer  # noqa: E402

from sid_fast.metrics import clip_score as cs  # noqa: E402

PROMPTS = ["a cat on a mat", "the dog", "a red car", "a handwritten seven", "the moon over the sea"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    write_tokenizer(root)
    tok = CLIPTokenizer.from_pretrained(str(root))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from sid_fast.sampling import save_image

    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (len(PROMPTS), 3, 48, 40), generator=g, dtype=torch.uint8)  # not square
    for i, img in enumerate(images):
        save_image(img.permute(1, 2, 0).numpy(), root / f"{i:06d}.png")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root, images


def official_float64(clip_dir, images, texts) -> float:
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(clip_dir)).double().eval()
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    x = F.interpolate(images.double() / 255.0, size=(32, 32), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).reshape(1, 3, 1, 1)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=(x - mean) / std).pooler_output)
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return float((F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1).mean())


def test_the_cli_scores_pairs_as_the_official_pipeline(clip_dir, pairs, tmp_path):
    from click.testing import CliRunner

    root, images = pairs
    want = official_float64(clip_dir, images, PROMPTS)
    out = tmp_path / "clip.jsonl"
    r = CliRunner().invoke(cs.main, ["--images", str(root), "--prompts", str(root / "prompts.txt"), "--clip",
                                     str(clip_dir), "--batch", "2", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["num"] == len(PROMPTS) and abs(got["value"] - want) < 1e-5, (got, want)  # fp32 vs float64
    # The pairing matters: the same images against the prompts in reverse order score otherwise.
    scorer = cs.CLIPScorer.load(clip_dir)
    shuffled, _ = cs.clip_score(scorer, root, PROMPTS[::-1], range(len(PROMPTS)))
    assert abs(shuffled - want) > 1e-3
    assert abs(official_float64(clip_dir, images, PROMPTS[::-1]) - shuffled) < 1e-5


def test_refusals_are_one_sentence(clip_dir, pairs, tmp_path):
    from click.testing import CliRunner

    root, _ = pairs
    more = tmp_path / "more.txt"
    more.write_text("\n".join(PROMPTS + ["one more"]) + "\n")
    for args, message in (
        (["--prompts", str(more)], "no image 000005.png for prompt line 5"),
        (["--clip", str(tmp_path)], "not a CLIP model folder in Hugging Face's format"),
        (["--num", "9"], "9 pairs, but"),
    ):
        base = {"--images": str(root), "--prompts": str(root / "prompts.txt"), "--clip": str(clip_dir)}
        for k, v in zip(args[::2], args[1::2]):
            base[k] = v
        r = CliRunner().invoke(cs.main, [x for kv in base.items() for x in kv])
        assert r.exit_code != 0 and message in r.output, (args, r.output)
