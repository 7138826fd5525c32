"""Token ids of a prompt file, so that a text-to-image training step does not run the tokenizer.

SiD-LSG's loop tokenises every micro-batch's prompts inside the step (official training/sid_sd_util.py): on a GPU
the device then waits while the host runs the tokenizer, twice per micro-batch pair. sid_fast tokenises each line of
the prompt file once:

- `python -m sid_fast.t2i.tokens --prompts aesthetics_6_plus.txt --teacher stable-diffusion-v1-5` writes the ids of
  every line beside the file (`aesthetics_6_plus.txt.tokens.npy`, int32 [lines, model_max_length], and
  `.tokens.json`: the line count, the tokenizer's fingerprint and the prompt file's SHA-256). Every rank memory-maps
  it (one copy in the page cache per node); a step gathers its rows, pins them and copies them without blocking.
- Without that file, the ids of a line are computed the first time it is drawn and kept for the run (a lazily
  committed int32 array: 308 bytes per line at 77 tokens), so each line meets the tokenizer once per process.

The ids are the tokenizer's own: padded to its model_max_length and truncated beyond it, exactly what the per-call
tokenisation gives (tests/test_t2i_tokens.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import click
import numpy as np
import torch

from sid_fast.data.prompts import PromptError, PromptFile, read_prompts
from sid_fast.progress import Timer, bar, summary

CHUNK = 4096  # lines per tokenizer call when writing the file


class TokenFileError(ValueError):
    """A token file that does not belong to its prompt file or tokenizer (one sentence naming it)."""


def token_paths(prompt_file) -> tuple[Path, Path]:
    p = Path(prompt_file)
    return p.with_name(p.name + ".tokens.npy"), p.with_name(p.name + ".tokens.json")


def fingerprint(tokenizer) -> str:
    """SHA-256 of what decides a tokenizer's ids: its class, maximum length, vocabulary and BPE merges."""
    h = hashlib.sha256()
    h.update(json.dumps([type(tokenizer).__name__, int(tokenizer.model_max_length)]).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    ranks = getattr(tokenizer, "bpe_ranks", None)
    if ranks:
        h.update(json.dumps(sorted([list(k), v] for k, v in ranks.items())).encode())
    return h.hexdigest()


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def tokenize(tokenizer, texts, length: int | None = None) -> np.ndarray:
    """int32 [len(texts), length]: padded to `length` (default: the tokenizer's model_max_length), truncated beyond
    it."""
    ids = tokenizer(list(texts), padding="max_length", max_length=length or tokenizer.model_max_length,
                    truncation=True, return_tensors="np").input_ids  # fmt: skip
    return ids.astype(np.int32)


class PromptTokens:
    """The token ids of a prompt file's lines: from its token file when one matches, else tokenised on first use.
    `length`: pad and truncate to this many tokens instead of the tokenizer's model_max_length (then no token file is
    read: a token file holds one tokenizer's ids at its own length)."""

    def __init__(self, prompts: PromptFile, tokenizer, length: int | None = None):
        self.prompts, self.tokenizer = prompts, tokenizer
        self.length = int(length or tokenizer.model_max_length)
        # A PromptFile; tests may give a list of prompts.
        path = getattr(prompts, "path", None) if length is None else None
        ids_path, meta_path = token_paths(path) if path is not None else (None, None)
        self.mapped = ids_path is not None and ids_path.is_file()
        if self.mapped:
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                raise TokenFileError(f"{meta_path}: missing or unreadable beside {ids_path}.") from None
            want = dict(lines=len(prompts), length=self.length, tokenizer=fingerprint(tokenizer))
            bad = [k for k, v in want.items() if meta.get(k) != v]
            if not bad and meta.get("prompts_sha256") != file_digest(prompts.path):
                bad = ["prompts_sha256"]
            if bad:
                raise TokenFileError(
                    f"{ids_path}: written for another {' and '.join(bad)} than {prompts.path} with this tokenizer has; "
                    "delete it or write it again with python -m sid_fast.t2i.tokens."
                )
            self._ids = np.load(ids_path, mmap_mode="r")
            if self._ids.shape != (len(prompts), self.length) or self._ids.dtype != np.int32:
                raise TokenFileError(f"{ids_path}: holds {self._ids.dtype} {list(self._ids.shape)}, not int32 "
                                     f"[{len(prompts)}, {self.length}].")  # fmt: skip
        else:
            self._ids = np.zeros((len(prompts), self.length), np.int32)  # pages committed as lines are filled
            self._done = np.zeros(len(prompts), bool)

    def ids(self, indices) -> torch.Tensor:
        """int64 [len(indices), model_max_length] token ids of those lines."""
        idx = np.asarray(indices, dtype=np.int64)
        if not self.mapped:
            todo = np.unique(idx[~self._done[idx]])
            if len(todo):
                self._ids[todo] = tokenize(self.tokenizer, [self.prompts[int(i)] for i in todo], self.length)
                self._done[todo] = True
        return torch.from_numpy(self._ids[idx].astype(np.int64))


def write_token_file(prompt_file, tokenizer, log=print) -> Path:
    """Tokenise every line of `prompt_file` into its token file (written to temporary names, then renamed)."""
    prompts = read_prompts(prompt_file)
    ids_path, meta_path = token_paths(prompts.path)
    length = int(tokenizer.model_max_length)
    tmp_ids, tmp_meta = ids_path.with_name(ids_path.name + ".tmp"), meta_path.with_name(meta_path.name + ".tmp")
    timer = Timer()
    out = np.lib.format.open_memmap(tmp_ids, mode="w+", dtype=np.int32, shape=(len(prompts), length))
    progress = bar(len(prompts), "tokens", unit="line")
    for lo in range(0, len(prompts), CHUNK):
        hi = min(lo + CHUNK, len(prompts))
        out[lo:hi] = tokenize(tokenizer, [prompts[i] for i in range(lo, hi)])
        progress.update(hi - lo)
    progress.close()
    out.flush()
    del out
    meta = dict(lines=len(prompts), length=length, tokenizer=fingerprint(tokenizer),
                prompts_sha256=file_digest(prompts.path))  # fmt: skip
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_meta, meta_path)
    log(summary(f"wrote {ids_path}", len(prompts), "lines", timer.seconds))
    return ids_path


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--prompts", "prompt_file", help="Prompt file, one per line", metavar="FILE", required=True)
@click.option("--teacher", help="The Stable Diffusion folder whose tokenizer/ the run uses", metavar="DIR",
              required=True)  # fmt: skip
def main(prompt_file, teacher):
    """Tokenise a prompt file once, beside it, for the text-to-image trainer to memory-map."""
    from transformers import CLIPTokenizer  # an optional dependency: text-to-image only

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(teacher), subfolder="tokenizer")
    except Exception as e:
        raise click.BadParameter(f"{teacher}: no tokenizer/ loads ({type(e).__name__}).", param_hint="--teacher")
    try:
        write_token_file(prompt_file, tokenizer, log=click.echo)
    except PromptError as e:
        raise click.BadParameter(str(e), param_hint="--prompts") from None


if __name__ == "__main__":
    main()
