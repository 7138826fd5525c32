"""Prompt files: one prompt per line, as the official SiD-LSG training prompts (Aesthetics 6+) and the evaluation
captions are stored. Read by the text-to-image family (sid_fast.t2i), the samplers and the CLIP score alike."""

from __future__ import annotations

import codecs
import mmap
from pathlib import Path

import numpy as np


class PromptError(ValueError):
    """A prompt file that cannot be used: the message names the file and what is wrong."""


ASCII_WHITESPACE = " \t\r\n\x0b\x0c"


class PromptFile:
    """The prompts of a text file, one per line (lines of ASCII whitespace skipped, each stripped of it), as a read-only
    sequence backed by the file memory-mapped and an index of its lines: the official Aesthetics 6+ file holds millions
    of prompts, and every rank of a multi-node run opens it; a list of Python strings would cost each rank gigabytes of
    host memory, this costs 16 bytes per prompt (line start and end, int64). The file is checked once when opened
    (UTF-8, in 64 MiB pieces)."""

    CHUNK = 64 << 20

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PromptError(f"{self.path}: no such prompt file (one prompt per line).")
        size = self.path.stat().st_size
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        data = np.frombuffer(self._map, dtype=np.uint8) if size else np.zeros(0, np.uint8)
        decoder = codecs.getincrementaldecoder("utf-8")()
        for i in range(0, size, self.CHUNK):
            try:
                decoder.decode(self._map[i : i + self.CHUNK], final=i + self.CHUNK >= size)
            except UnicodeDecodeError as e:
                raise PromptError(f"{self.path}: not a UTF-8 text file ({e.reason} near byte {i + e.start}).") from None
        ends = np.flatnonzero(data == 10)
        ends = np.append(ends, size) if (size and (not len(ends) or ends[-1] != size - 1)) else ends
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
        keep = np.zeros(len(starts), bool)
        white = np.zeros(256, np.uint8)
        white[list(ASCII_WHITESPACE.encode())] = 1
        step = 1 << 16
        for lo in range(0, len(starts), step):  # lines holding a byte other than ASCII whitespace, in pieces
            st, en = starts[lo : lo + step], ends[lo : lo + step]
            a, b = int(st[0]), int(en[-1])
            # Non-whitespace bytes before each position of the piece: a line [s, e) holds ink when the count grows
            # over it (empty lines, anywhere in the file and at its end, count zero).
            ink = np.zeros(b - a + 1, np.int64 if b - a >= 1 << 31 else np.int32)
            np.cumsum(1 - white[data[a:b]], dtype=ink.dtype, out=ink[1:])
            keep[lo : lo + len(st)] = ink[en - a] > ink[st - a]
        self._starts, self._ends = starts[keep], ends[keep]
        if not len(self._starts):
            raise PromptError(f"{self.path}: the prompt file holds no prompt (one per line).")

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return bytes(self._map[self._starts[i] : self._ends[i]]).decode("utf-8").strip(ASCII_WHITESPACE)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def read_prompts(path) -> PromptFile:
    """One prompt per line (blank lines skipped), as the official prompt files (Aesthetics 6+) hold them."""
    return PromptFile(path)
