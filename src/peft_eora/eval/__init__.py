"""Evaluation helpers: perplexity over fixed windows (more tasks live beside it)."""

from .perplexity import load_text, make_windows, perplexity, perplexity_on_windows

__all__ = ["load_text", "make_windows", "perplexity", "perplexity_on_windows"]
