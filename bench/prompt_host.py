"""Host time per text-to-image micro-batch spent turning drawn prompt lines into token ids: the tokenizer called on
the prompts (the official loop, and sid_fast before sid_fast.t2i.tokens), the ids of each line tokenised on first use
and kept (cold: the first draws of a run; warm: every line seen), and the ids gathered from the memory-mapped token
file. Side by side in one process; the median of `--repeats` micro-batches of `--batch` prompts drawn uniformly.

    python -m bench.prompt_host                     # appends to bench/results/prompt_host.jsonl

The tokenizer is the bundled digits teacher's (a word-level CLIP tokenizer, the fastest case) and a byte-level CLIP
BPE tokenizer written here (every character a symbol: a slower case); SD's own CLIP tokenizer is not on this machine.
The prompts are the digits prompts, each followed by a filler of `--words` words, `--lines` lines in all.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from bench.common import command, environment, write_jsonl
from sid_fast.data.prompts import read_prompts
from sid_fast.families.base import ASSETS
from sid_fast.t2i import tokens as tk


def _byte_bpe(folder: Path):
    """A CLIP BPE tokenizer with a byte-level vocabulary and no merges (each character a token)."""
    import json

    from transformers import CLIPTokenizer

    # The byte-to-symbol map of GPT-2/CLIP BPE: printable bytes stand for themselves, the rest for 256, 257, ...
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _time(fn, repeats) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


@command(__doc__)
@click.option("--batch", default="16,128", show_default=True, help="prompts per micro-batch (comma list)")
@click.option("--lines", default=20000, show_default=True, help="prompt file lines")
@click.option("--words", default=12, show_default=True, help="filler words after each digits prompt")
@click.option("--repeats", default=20, show_default=True)
@click.option("--out", default=None, help="append here instead of bench/results/prompt_host.jsonl")
def main(batch, lines, words, repeats, out):
    from transformers import CLIPTokenizer

    env = environment()
    base = (ASSETS / "digits-prompts.txt").read_text().split("\n")
    base = [p for p in base if p.strip()]
    filler = " ".join(["seven", "one", "the", "digit", "a", "number"] * words)[: 6 * words]
    recs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.txt"
        path.write_text("\n".join(f"{base[i % len(base)]} {filler}" for i in range(lines)) + "\n")
        toks = {
            "digits word-level": CLIPTokenizer.from_pretrained(str(ASSETS / "digits-sd"), subfolder="tokenizer"),
            "byte-level BPE": _byte_bpe(Path(tmp) / "bpe"),
        }
        for name, tok in toks.items():
            prompts = read_prompts(path)
            for b in map(int, batch.split(",")):
                rng = np.random.default_rng(0)
                draws = [rng.integers(0, len(prompts), b) for _ in range(repeats)]
                it = iter(draws)
                inline = _time(lambda: tk.tokenize(tok, [prompts[int(i)] for i in next(it)]), repeats)
                lazy = tk.PromptTokens(prompts, tok)
                it = iter(draws)
                cold = _time(lambda: lazy.ids(next(it)), repeats)
                lazy.ids(np.arange(len(prompts)))  # every line seen
                it = iter(draws)
                warm = _time(lambda: lazy.ids(next(it)), repeats)
                tk.write_token_file(path, tok, log=lambda *a: None)
                mapped = tk.PromptTokens(read_prompts(path), tok)
                it = iter(draws)
                mm = _time(lambda: mapped.ids(next(it)), repeats)
                for f in tk.token_paths(path):
                    f.unlink()
                rec = dict(bench="prompt_host", tokenizer=name, batch=b, lines=lines,
                           ms_tokenizer=round(inline, 4), ms_first_use=round(cold, 4), ms_kept=round(warm, 4),
                           ms_token_file=round(mm, 4), **env)  # fmt: skip
                recs.append(rec)
                print(f"{name:18s} batch {b:4d}: tokenizer {inline:8.3f} ms, first use {cold:8.3f} ms, kept "
                      f"{warm:6.3f} ms, token file {mm:6.3f} ms per micro-batch")  # fmt: skip
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.writelines(__import__("json").dumps(r) + "\n" for r in recs)
    else:
        print(f"appended to {write_jsonl(recs, 'prompt_host.jsonl')}")


if __name__ == "__main__":
    main()
