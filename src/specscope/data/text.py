"""Byte-level text corpora found on the machine: the Python standard library's source by default, or a user's files.

No download. The stdlib corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]`, except the
test suites and site-packages, in sorted path order; every `val_every`-th file goes to validation, so
the split is by file and the same on every run (its size depends on the Python version: 661 files,
11.8 MB (11.2 MB train, 0.6 MB validation) on CPython 3.11.7).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from specscope.errors import ConfigError

VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class TextCorpus:
    train: torch.Tensor  # uint8 tokens
    val: torch.Tensor
    source: str
    n_files: int
    sha256: str = ""  # of the train and validation bytes: what a resumed run checks it still reads

    vocab_size: int = VOCAB_SIZE

    def describe(self) -> str:
        return f"{self.source}: {self.n_files} files, {len(self.train):,} train / {len(self.val):,} val bytes"


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be a whole number ≥ {minimum}; give an integer ≥ {minimum}")


def _read(f: Path, limit: int | None = None) -> bytes:
    """The file's bytes (at most `limit`, reading no more than that); an unreadable file is a ConfigError naming it."""
    try:
        with open(f, "rb") as fh:
            return fh.read() if limit is None else fh.read(limit)
    except OSError as e:
        raise ConfigError(f"text corpus file {f} could not be read ({e.strerror or e}); check it exists and is readable") from e


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3"}
    return [f for f in sorted(root.rglob("*.py")) if not skip.intersection(f.relative_to(root).parts[:-1])]


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        # not in a hidden folder either (.git's objects are binary), nor a bytecode cache
        files = [f for f in sorted(path.rglob("*")) if f.is_file()
                 and not any(part.startswith(".") or part == "__pycache__" for part in f.relative_to(path).parts)]
        if files:
            return files
    raise ConfigError(f"text corpus {path} is not a file or a folder with files; give a .txt file or a folder of text files")


def _split(files: list[Path], val_every: int, max_bytes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every val_every-th file is validation; with max_bytes, each side stops at its share of the budget. Fewer
    files than val_every (one file, a small folder): the last 1/val_every of their joined text is validation."""
    if len(files) < val_every:  # no val_every-th file: a small folder's files would all be training
        data = b"\n".join(_read(f, max_bytes) for f in files)[:max_bytes]  # one file: as it was read before
        cut = len(data) - len(data) // val_every
        return _bytes(data[:cut]), _bytes(data[cut:])
    budget = {True: math.inf, False: math.inf} if max_bytes is None else {True: max_bytes / val_every, False: max_bytes * (1 - 1 / val_every)}
    chunks: dict[bool, list[bytes]] = {True: [], False: []}
    used = {True: 0, False: 0}
    for i, f in enumerate(files):
        is_val = i % val_every == val_every - 1
        if used[is_val] < budget[is_val]:
            data = _read(f)
            chunks[is_val].append(data)
            used[is_val] += len(data)
        if used[True] >= budget[True] and used[False] >= budget[False]:
            break
    return _bytes(b"\n".join(chunks[False])), _bytes(b"\n".join(chunks[True]))


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def load_corpus(path: str | Path | None = None, *, val_every: int = 20, max_bytes: int | None = None) -> TextCorpus:
    """The stdlib corpus (path None or "stdlib"), or a user's text file / folder, as byte tokens.

    `max_bytes` caps what is read: of one file, its first max_bytes bytes (the last 1/val_every of them validation);
    of a folder, whole files in sorted order until each split has its share (validation 1/val_every of max_bytes),
    so a split may pass its share by the rest of its last file (files are never cut).

    The last corpus read is kept while its files are unchanged (same paths, sizes and modification times)."""
    _check_int("val_every", val_every, 2)  # every val_every-th file (or the last 1/val_every of one file) is validation
    if max_bytes is not None:
        _check_int("max_bytes", max_bytes, 1)
    if path in (None, "", "stdlib"):
        files, source = stdlib_files(), "python-stdlib"
    else:
        files, source = _files(Path(path)), str(path)
    try:
        key = (source, tuple((str(f), *_stamp(f)) for f in files), val_every, max_bytes)
    except OSError as e:
        raise ConfigError(f"text corpus file {e.filename} could not be read ({e.strerror or e}); check it exists") from e
    if _LAST.get("key") != key:
        try:
            train, val = _split(files, val_every, max_bytes)
        except MemoryError:  # the corpus's fault, not the lab's sizes (which the CLI's memory error would name)
            size = sum(f.stat().st_size for f in files)
            raise ConfigError(f"text corpus {source} ({size} bytes in {len(files)} file(s)) does not fit in memory; "
                              "set max_bytes (e.g. --set max_bytes=100000000) to read a part of it") from None
        if len(train) < 2 or len(val) < 2:
            raise ConfigError(f"text corpus {source} is too small to split into train and validation ({len(train)}/{len(val)} bytes)")
        digest = hashlib.sha256(train.numpy().tobytes() + b"\0val\0" + val.numpy().tobytes()).hexdigest()
        _LAST.update(key=key, corpus=TextCorpus(train, val, source, len(files), digest))
    return _LAST["corpus"]


_LAST: dict = {}


def _stamp(f: Path) -> tuple[int, int]:
    st = os.stat(f)
    return st.st_size, st.st_mtime_ns


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1], as int64."""
    _check_int("batch_size", batch_size, 1)
    _check_int("seq_len", seq_len, 1)
    if len(tokens) <= seq_len + 1:
        fix = f"lower seq_len to at most {len(tokens) - 2}, or " if len(tokens) > 2 else ""
        raise ConfigError(f"sequence length {seq_len} does not fit a corpus split of {len(tokens)} tokens (a window "
                          f"takes seq_len + 1 of them): {fix}use a larger corpus")
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = tokens[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def unigram_loss(corpus: TextCorpus) -> float:
    """Cross-entropy (nats/token) of the validation split under the train split's byte frequencies (add-one).

    The baseline a language model must clearly beat."""
    counts = torch.bincount(corpus.train.long(), minlength=corpus.vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[corpus.val.long()].mean())


def bits_per_byte(loss_nats: float) -> float:
    return loss_nats / math.log(2)
