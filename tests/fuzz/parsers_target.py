"""The fuzz target for sid_fast's parsers of what users type: prompt files, seed lists and flag values. Shared by the
atheris driver (fuzz_parsers.py) and the suite.

One input = bytes. They are read as a prompt file (sid_fast.t2i.sd.PromptFile), and decoded as text they are given as
a seed list (sid_fast.sample.parse_int_list), as a numeric flag value (sid_fast.flags.DomainType) and as the value
of a training flag (sid_fast.training.config.resolve_config). The contract checked:
- the only exceptions are the parsers' own one-sentence refusals (SDError, click.BadParameter, ConfigError), each a
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

from sid_fast.flags import Domain, DomainType
from sid_fast.sample import MAX_SEED, MAX_SEEDS, parse_int_list
from sid_fast.t2i.sd import ASCII_WHITESPACE, PromptFile, SDError
from sid_fast.training.config import DOMAINS, ConfigError, resolve_config

FLAGS = ("alpha", "tmax", "ema", "batch", "seed", "init_sigma", "lr")
TYPES = [DomainType(Domain(float, 0, 80, lo_open=True)), DomainType(Domain(int, 1, 65536))]


class FuzzFinding(AssertionError):
    """A parser broke its contract on this input."""


def _one_sentence(name: str, e: Exception) -> None:
    text = e.format_message() if isinstance(e, click.ClickException) else str(e)
    if not text or "\n" in text.strip():
        raise FuzzFinding(f"{name}: a refusal that is not one line: {text!r}")


def check_input(data: bytes) -> None:
    path = Path(tempfile.gettempdir()) / f"sid_fast_fuzz_prompts_{os.getpid()}.txt"
    path.write_bytes(data)
    try:
        prompts = list(PromptFile(path))
        if not prompts or any(not p or p != p.strip(ASCII_WHITESPACE) or "\n" in p for p in prompts):
            raise FuzzFinding(f"PromptFile: accepted {prompts[:5]!r}")
    except SDError as e:
        _one_sentence("PromptFile", e)
    except FuzzFinding:
        raise
    except Exception as e:
        raise FuzzFinding(f"PromptFile: {type(e).__name__}: {e}") from e

    text = data.decode("utf-8", "replace")
    try:
        seeds = parse_int_list(text)
        if not seeds or len(seeds) > MAX_SEEDS or not all(0 <= s <= MAX_SEED for s in seeds):
            raise FuzzFinding(f"parse_int_list: accepted {len(seeds)} seeds, first {seeds[:3]}")
    except click.BadParameter as e:
        _one_sentence("parse_int_list", e)
    except FuzzFinding:
        raise
    except Exception as e:
        raise FuzzFinding(f"parse_int_list: {type(e).__name__}: {e}") from e

    for t in TYPES:
        try:
            v = t.convert(text, None, None)
            if not t.domain.admits(v):
                raise FuzzFinding(f"DomainType: accepted {v!r} outside {t.domain.describe()}")
        except click.BadParameter as e:
            _one_sentence("DomainType", e)
        except FuzzFinding:
            raise
        except Exception as e:
            raise FuzzFinding(f"DomainType: {type(e).__name__}: {e}") from e

    name = FLAGS[data[0] % len(FLAGS)] if data else FLAGS[0]
    kind = DOMAINS[name].kind
    try:
        value = kind(text.strip())
    except (ValueError, OverflowError):
        return  # click refuses what does not parse as the flag's type before the configuration sees it
    try:
        cfg = resolve_config("digits", {name: value})
        if not DOMAINS[name].admits(getattr(cfg, name)):
            raise FuzzFinding(f"resolve_config: accepted --{name} {value!r}")
    except ConfigError as e:
        _one_sentence("resolve_config", e)
    except FuzzFinding:
        raise
    except Exception as e:
        raise FuzzFinding(f"resolve_config: {type(e).__name__}: {e}") from e


SEEDS = {
    "prompts.txt": b"a handwritten one\n\nthe digit 7\n  \n",
    "blank-end.txt": b"a handwritten one\n\n",
    "blanks.txt": b"\n\n\n",
    "seeds.txt": b"0-63,100",
    "float.txt": b"2.5",
    "int.txt": b"64",
}
