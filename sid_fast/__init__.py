"""sid_fast: a fast, faithful Score identity Distillation (SiD) trainer for EDM diffusion models."""

__version__ = "0.1.0"
