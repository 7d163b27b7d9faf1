"""The embedded default model: a tiny trained Qwen3.5-architecture checkpoint in the Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
HELDOUT_TEXT = Path(__file__).resolve().parent / "heldout.txt"


def resolve_checkpoint(name: str | Path) -> Path:
    """'default' names the embedded default model; anything else is a folder path."""
    return CHECKPOINT_DIR if str(name) == "default" else Path(name)
