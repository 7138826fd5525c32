"""Declared domains of numeric flags, and the click type that checks them where a command parses its flags.

A flag's domain is its type, finiteness and range, stated once: the training configuration checks every field
against its Domain (sid_fast.training.config.DOMAINS), and the samplers' and exporters' options use `DomainType`, so
that NaN, infinities and out-of-range values are refused in one sentence naming the flag (click's own FloatRange
admits NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import click


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the flag and the expected value (raised by the training
    configuration, the teacher families' loaders and the commands)."""


@dataclass(frozen=True)
class Domain:
    """The values a numeric flag accepts: finite, of its type, in [lo, hi] (an end is open when `*_open`)."""

    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""  # e.g. "SiD uses 1.2"

    def admits(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind is int and not isinstance(v, int):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        lo, hi = (None if v is None else (str(int(v)) if self.kind is int else f"{v:g}") for v in (self.lo, self.hi))
        if lo is not None and hi is not None:
            where = f" in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif lo is not None:
            where = f" {'>' if self.lo_open else '>='} {lo}"
        elif hi is not None:
            where = f" {'<' if self.hi_open else '<='} {hi}"
        else:
            where = ""
        return what + where + (f" ({self.hint})" if self.hint else "")


class DomainType(click.ParamType):
    """A click parameter type: an int or a float (as the domain's kind), refused unless the domain admits it."""

    def __init__(self, domain: Domain, metavar: str | None = None):
        self.domain = domain
        self.name = "integer" if domain.kind is int else "float"
        self._metavar = metavar or ("INT" if domain.kind is int else "FLOAT")

    def get_metavar(self, param, ctx=None) -> str:
        return self._metavar

    def convert(self, value, param, ctx):
        if isinstance(value, self.domain.kind) and not isinstance(value, bool) and self.domain.admits(value):
            return value
        try:
            v = int(str(value).strip()) if self.domain.kind is int else float(str(value).strip())
        except ValueError:
            self.fail(f"must be {self.domain.describe()}, got {str(value)!r}.", param, ctx)
        if not self.domain.admits(v):
            self.fail(f"must be {self.domain.describe()}, got {str(value)!r}.", param, ctx)
        return v


class AliasOption(click.Option):
    """A click option whose --help shows its first name only: flags are spelt with dashes, and the official
    SiD/EDM/SiD-LSG underscore spellings (--init_sigma, --data_prompt_text, ...) stay accepted as hidden aliases."""

    def get_help_record(self, ctx):
        names = self.opts
        self.opts = names[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = names


class ImagesType(click.ParamType):
    """An image count in Mimg, SiD's and EDM's unit for --duration: a bare number is Mimg (the official meaning), and a
    number with a suffix counts images, as EDM2's nimg flags do: 8k = 8,000 images, 10M = 10 million, 1G = 10^9."""

    name = "images"
    SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}

    def get_metavar(self, param, ctx=None) -> str:
        return "MIMG|Nk|NM"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip()
        scale = self.SUFFIXES.get(text[-1:]) if text else None
        try:
            number = float(text[:-1] if scale else text)
        except ValueError:
            self.fail(f"{text!r} is not a number of Mimg nor a count of images such as 8k, 10M or 1G.", param, ctx)
        return number * scale / 1e6 if scale else number


# A one-step generator's noise level, as the samplers, FID and the exporter take it (train.py's --init-sigma is the
# configuration's, whose domain keeps EDM's sigma_min as its lower end).
SIGMA_INIT = Domain(float, 0, 80, lo_open=True, hint="SiD uses 2.5")


def init_sigma_option(help: str):
    """`--init-sigma` (official spelling `--init_sigma`, a hidden alias) within SIGMA_INIT."""
    return click.option(
        "--init-sigma", "--init_sigma", "init_sigma", cls=AliasOption, help=help, type=DomainType(SIGMA_INIT)
    )
