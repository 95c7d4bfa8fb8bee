"""Candidate rewrites of GPT-2 attention, and the machinery that gives each a verdict.

Plugin authors need only `Rewrite` / `rewrite` (and may use `rewrites.common`)."""

from rewrites.registry import Rewrite, rewrite

__all__ = ["Rewrite", "rewrite"]
