"""The fuzz target for sid_fast's parsers of what users type: prompt files, seed lists and flag values. Shared by the
atheris driver (fuzz_parsers.py) and the suite.

One input = bytes. They are read as a prompt file (sid_fast.data.prompts.PromptFile), and decoded as text they are
given as a seed list (sid_fast.sample.parse_int_list), as a numeric flag value (sid_fast.flags.DomainType) and as the
value of a training flag (sid_fast.training.config.resolve_config). The contract checked:
- the only exceptions are the parsers' own one-sentence refusals (PromptError, click.BadParameter, ConfigError), each a
  single line;
- what is accepted holds what the parser promises: prompts non-empty and stripped of ASCII whitespace, seeds
  within [0, MAX_SEED] and at most MAX_SEEDS of them, flag values inside their domain.
A violation raises FuzzFinding.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from sid_fast.data.prompts import ASCII_WHITESPACE, PromptError, PromptFile
from sid_fast.flags import Domain, DomainType
from sid_fast.sample import MAX_SEED, MAX_SEEDS, parse_int_list
from sid_fast.training.config import DOMAINS, ConfigError, resolve_config

FLAGS = ("alpha", "tmax", "ema", "batch", "seed", "init_sigma", "lr")
TYPES = [DomainType(Domain(float, 0, 80, lo_open=True)), DomainType(Domain(int, 1, 65536))]


class FuzzFinding(AssertionError):
    """A parser broke its contract on this input."""


def _one_sentence(name: str, e: Exception) -> None:
    text = e.format_message() if isinstance(e, click.ClickException) else str(e)
    if not text or "\n" in text.strip():
        raise FuzzFinding(f"{name}: a refusal that is not one line: {text!r}")


def _within_contract(name: str, refusal: type, parse) -> None:
    """`parse()`, which checks what it accepted itself; only `refusal`, in one line, may escape it."""
    try:
        parse()
    except refusal as e:
        _one_sentence(name, e)
    except FuzzFinding:
        raise
    except Exception as e:
        raise FuzzFinding(f"{name}: {type(e).__name__}: {e}") from e


def check_input(data: bytes) -> None:
    path = Path(tempfile.gettempdir()) / f"sid_fast_fuzz_prompts_{os.getpid()}.txt"
    path.write_bytes(data)
    text = data.decode("utf-8", "replace")

    def prompts():
        got = list(PromptFile(path))
        if not got or any(not p or p != p.strip(ASCII_WHITESPACE) or "\n" in p for p in got):
            raise FuzzFinding(f"PromptFile: accepted {got[:5]!r}")

    def seeds():
        got = parse_int_list(text)
        if not got or len(got) > MAX_SEEDS or not all(0 <= s <= MAX_SEED for s in got):
            raise FuzzFinding(f"parse_int_list: accepted {len(got)} seeds, first {got[:3]}")

    def flag_value(t):
        v = t.convert(text, None, None)
        if not t.domain.admits(v):
            raise FuzzFinding(f"DomainType: accepted {v!r} outside {t.domain.describe()}")

    _within_contract("PromptFile", PromptError, prompts)
    _within_contract("parse_int_list", click.BadParameter, seeds)
    for t in TYPES:
        _within_contract("DomainType", click.BadParameter, lambda t=t: flag_value(t))

    name = FLAGS[data[0] % len(FLAGS)] if data else FLAGS[0]
    try:
        value = DOMAINS[name].kind(text.strip())
    except (ValueError, OverflowError):
        return  # click refuses what does not parse as the flag's type before the configuration sees it

    def training_flag():
        cfg = resolve_config("digits", {name: value})
        if not DOMAINS[name].admits(getattr(cfg, name)):
            raise FuzzFinding(f"resolve_config: accepted --{name} {value!r}")

    _within_contract("resolve_config", ConfigError, training_flag)


SEEDS = {
    "prompts.txt": b"a handwritten one\n\nthe digit 7\n  \n",
    "blank-end.txt": b"a handwritten one\n\n",
    "blanks.txt": b"\n\n\n",
    "seeds.txt": b"0-63,100",
    "float.txt": b"2.5",
    "int.txt": b"64",
}
