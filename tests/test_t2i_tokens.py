"""A prompt file's token ids (sid_fast.t2i.tokens): the tokenizer's own ids whether tokenised on first use or read
from the token file beside the prompts, the same training step either way, and token files that do not belong to
their prompts or tokenizer refused in one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from support.sd_tiny import write_tiny_sd  # noqa: E402

from sid_fast.data.prompts import read_prompts  # noqa: E402
from sid_fast.flags import ConfigError  # noqa: E402
from sid_fast.t2i import tokens as tk  # noqa: E402
from sid_fast.training.config import resolve_config  # noqa: E402
from sid_fast.training.run import build_trainer  # noqa: E402

PROMPTS = ["a cat", "the dog on the mat", "a red car " * 30, "two birds", "the moon", "a tree"]  # one > 77 tokens


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd"))


def _tokenizer(sd):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(sd), subfolder="tokenizer")


def _want(tok, texts):
    return tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids  # fmt: skip


def test_ids_are_the_tokenizers_on_first_use_and_from_the_file(sd, tmp_path):
    tok = _tokenizer(sd)
    path = tmp_path / "p.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    prompts = read_prompts(path)
    idx = [2, 0, 2, 5, 1, 1]
    lazy = tk.PromptTokens(prompts, tok)
    assert not lazy.mapped and torch.equal(lazy.ids(idx), _want(tok, [PROMPTS[i] for i in idx]))
    assert lazy._done.sum() == 4  # each line tokenised once, only the drawn ones
    from click.testing import CliRunner

    r = CliRunner().invoke(tk.main, ["--prompts", str(path), "--teacher", str(sd)])
    assert r.exit_code == 0 and "wrote" in r.output and "6 lines" in r.output, r.output
    mapped = tk.PromptTokens(read_prompts(path), tok)
    assert mapped.mapped and torch.equal(mapped.ids(idx), lazy.ids(idx))
    assert torch.equal(mapped.ids(range(6)), _want(tok, PROMPTS))


def test_a_step_is_the_same_with_and_without_the_token_file_and_a_stale_file_is_refused(sd, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    cfg = resolve_config("sd15-lsg2", dict(teacher=str(sd), data_prompt_text=str(path), resolution=8, batch=4,
                                           batch_gpu=2))  # fmt: skip

    def one_step():
        tr = build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
        tr.step()
        return {k: v.clone() for k, v in tr.G.state_dict().items()}, tr.family.tokens.mapped

    without, mapped = one_step()
    assert not mapped
    tk.write_token_file(path, _tokenizer(sd), log=lambda *a: None)
    with_file, mapped = one_step()
    assert mapped and all(torch.equal(with_file[k], v) for k, v in without.items())
    path.write_text("\n".join(PROMPTS[::-1]) + "\n")  # the prompts changed after their token file was written
    with pytest.raises(ConfigError, match=r"--data-prompt-text .*p\.txt\.tokens\.npy: written for another "
                                          r"prompts_sha256 .*delete it or write it again"):  # fmt: skip
        build_trainer(cfg, torch.device("cpu"), log=lambda *a: None)
    tok = _tokenizer(sd)
    tok.model_max_length = 16  # another tokenizer: another length
    with pytest.raises(tk.TokenFileError, match="another length and tokenizer"):
        tk.PromptTokens(read_prompts(path), tok)
    ids, _ = tk.token_paths(path)
    np.save(ids, np.zeros((2, 3), np.int64))
    path.write_text("\n".join(PROMPTS) + "\n")
    with pytest.raises(tk.TokenFileError, match="holds int64 \\[2, 3\\], not int32"):
        tk.PromptTokens(read_prompts(path), _tokenizer(sd))


def test_the_host_time_bench_runs(tmp_path):
    from click.testing import CliRunner

    from bench import prompt_host

    out = tmp_path / "host.jsonl"
    r = CliRunner().invoke(prompt_host.main, ["--batch", "4", "--lines", "50", "--repeats", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    import json

    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and all(x["ms_tokenizer"] > 0 and x["ms_token_file"] > 0 for x in recs)
