"""Atomic, checksummed checkpoints that load without executing code (`torch.load(..., weights_only=True)`).

On disk: a SHA-256 header (`specscope.store.integrity.seal`) and then the bytes of `torch.save`. The hash is
checked before torch sees a byte, so a flipped bit or a cut-off file is an error naming the file, never a
silently different model.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from specscope.errors import RunStoreError
from specscope.store.integrity import seal, unseal, write_atomic

FORMAT = "specscope-checkpoint-v2"
_FIX = "delete it to restart that arm from scratch"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, fsync, then rename: a crash leaves the old checkpoint or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    write_atomic(path, seal(buf.getvalue()), fault="checkpoint_rename")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; a missing, altered, truncated or foreign file is a RunStoreError."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise RunStoreError(f"checkpoint {path} is a folder (or another non-file), not a checkpoint; {_FIX}")
    if not path.is_file():
        raise RunStoreError(f"checkpoint {path} does not exist; start a new run instead of resuming")
    body = unseal(path, path.read_bytes(), _FIX)
    try:
        with warnings.catch_warnings():  # torch's own note on a legacy pickle body: the error below says what is wrong
            warnings.simplefilter("ignore")
            payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        raise RunStoreError(f"checkpoint {path} is corrupt ({type(e).__name__}); {_FIX}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RunStoreError(f"checkpoint {path} was not written by this specscope ({FORMAT}); refusing to load it")
    return payload
