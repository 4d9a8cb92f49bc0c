"""Atomic checkpoints that load without executing code (`torch.load(..., weights_only=True)`)."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from specscope.errors import RunStoreError

FORMAT = "specscope-checkpoint-v1"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, fsync, then rename: a crash leaves the old checkpoint or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; a missing, truncated or foreign file is a RunStoreError."""
    path = Path(path)
    if not path.is_file():
        raise RunStoreError(f"checkpoint {path} does not exist; start a new run instead of resuming")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise RunStoreError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); delete it to restart that arm from scratch"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RunStoreError(f"checkpoint {path} was not written by specscope ({FORMAT}); refusing to load it")
    return payload
