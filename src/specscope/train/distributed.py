"""More than one process: gloo workers on one machine, FSDP2 wrapping, and distributed checkpoints.

    results = spawn(fn, world=2, *args)      # fn(rank, world, *args) in 2 processes; their return values
    heartbeat()                              # in fn, once a step: spawn's timeout counts from the rank's last one
    shard(model, blocks)                     # fully_shard each block, then the root (FSDP2, DTensor params)
    save(path, model, opt, monitor)          # torch.distributed.checkpoint: every rank writes its shards
    load(path, model, opt, monitor)          # at any world size (2 -> 4, 2 -> 1): DCP reshards on load

Under `torchrun` the process group is already there: call `shard`, `save` and `load` directly.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import os
import pickle
import queue as queue_mod
import re
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from specscope.errors import ConfigError, RunStoreError, SpecscopeError
from specscope.store import integrity
from specscope.train.loop import sigint_ignored
from specscope.train.processes import die_with_parent, exit_reason


# ---------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerError(SpecscopeError):
    """A spawned rank failed or died. The message is one line; the worker's traceback is in `.worker_traceback`."""

    def __init__(self, message: str, rank: int, worker_traceback: str = "") -> None:
        super().__init__(message)
        self.rank = rank
        self.worker_traceback = worker_traceback


class _RemoteTraceback(Exception):
    """The worker's traceback as the cause of a WorkerError: shown under SPECSCOPE_DEBUG=1 and by pytest."""

    def __str__(self) -> str:
        return "\n\n" + self.args[0]


_ALIVE = "alive"  # a rank's heartbeat on spawn's queue (a result is bytes)
_BEAT_SECONDS = 1.0  # a rank sends at most one heartbeat a second
# a rank's start — a new interpreter importing torch and the work's module, then the process group's rendezvous, which
# waits for the slowest rank's start — is no silence of the work: until a rank announces itself it has at least this
# long (5 s on 2 busy cores measured, against a timeout of 4 s in a test)
_STARTUP_SECONDS = 120.0
_heartbeat: Callable[[], None] | None = None  # set in a rank that spawn() started


def heartbeat() -> None:
    """In a rank started by `spawn`: the rank is making progress, so spawn's `timeout` for it counts from now (at
    most one message a second reaches spawn). A no-op in any other process (torchrun, a single process)."""
    if _heartbeat is not None:
        _heartbeat()


def _beats(rank: int, queue) -> Callable[[], None]:
    last = time.monotonic()

    def beat() -> None:
        nonlocal last
        if (now := time.monotonic()) - last >= _BEAT_SECONDS:
            last = now
            queue.put((rank, _ALIVE, None))

    return beat


def _entry(rank: int, world: int, port: int, parent: int, fn: Callable, args: tuple, queue) -> None:
    global _heartbeat
    die_with_parent(parent)  # a killed spawn() takes its workers with it
    _heartbeat = _beats(rank, queue)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started ignoring it (see spawn): Ctrl-C from here on
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)  # waits for every rank's start
        queue.put((rank, _ALIVE, None))  # started: spawn's timeout counts this rank's silence from here
        buf = io.BytesIO()
        torch.save(fn(rank, world, *args), buf)  # bytes, not shared-memory tensors: safe after this process exits
        queue.put((rank, buf.getvalue(), None))
    except BaseException as e:  # reported to spawn(), which raises it; not printed here a second time
        summary = traceback.format_exception_only(type(e), e)[-1].strip()
        queue.put((rank, None, (summary, traceback.format_exc())))
    finally:  # after the report: the peers see this rank leave only once its error is on its way
        if dist.is_initialized():
            dist.destroy_process_group()


_PEER_LOST = re.compile(r"closed by peer|reset by peer|broken pipe|remote worker|connection refused", re.IGNORECASE)
_GRACE = 2.0  # seconds to wait for a dead rank's queued result, or for a peer's death, before reporting


def _cause(world: int, procs: list, errors: dict[int, tuple[str, str]], done: set[int]) -> WorkerError:
    """The failure to report: a rank that died without a word, else the first rank whose error is its own (not
    gloo's report that a peer went away: that is only the echo of the failure)."""
    for r, p in enumerate(procs):
        if r not in done and r not in errors and p.exitcode is not None:
            return WorkerError(f"rank {r} of {world} died ({exit_reason(p.exitcode)}) without a result", r)
    causes = [r for r, (summary, _) in errors.items() if not _PEER_LOST.search(summary)]
    r = causes[0] if causes else next(iter(errors))
    summary, tb = errors[r]
    return WorkerError(f"rank {r} of {world} failed: {summary}", r, tb)


def _stopped(pid: int | None) -> bool:
    """Whether a process is stopped (SIGSTOP, Ctrl-Z): state T in /proc (Linux; elsewhere never said)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _timed_out(procs: list, stalled: list[int], timeout: float, started: list[bool]) -> WorkerError:
    if not_started := [r for r in stalled if not started[r] and not _stopped(procs[r].pid)]:
        return WorkerError(f"spawn timed out: rank(s) {not_started} of {len(procs)} did not start within "
                           f"{max(timeout, _STARTUP_SECONDS):g} s (a new Python process importing torch and the work's "
                           "module); check that the machine is not out of memory or swapping", not_started[0])
    stopped = [r for r in stalled if _stopped(procs[r].pid)]
    why = (f"; rank(s) {stopped} stopped (SIGSTOP or Ctrl-Z: `kill -CONT` resumes a stopped process)" if stopped
           else "; raise timeout= if a step of the work is that long")
    return WorkerError(f"spawn timed out: rank(s) {stalled} of {len(procs)} sent neither a result nor a heartbeat() "
                       f"for {timeout:g} s{why}", stalled[0])


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(rank, world, *args) in `world` CPU processes joined by a gloo process group; per rank its result.

    fn must be importable (a module-level function) and return something torch.save can write. A rank that
    raises or dies makes this raise WorkerError at once (one line; `.worker_traceback` has the worker's
    traceback) and stops the other ranks; so does a rank silent for `timeout` seconds once started: no result and
    no `heartbeat()` (which fn calls as it makes progress; without it, `timeout` bounds the whole run). A rank's
    start (the new interpreter's imports) has max(timeout, 120 s). Workers die with this process.
    """
    if isinstance(world, bool) or not isinstance(world, numbers.Integral) or world < 1:
        raise ConfigError(f"world must be an int >= 1 (the number of processes), got {world!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ConfigError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    world = int(world)
    try:  # what each spawned process is sent: a lambda or a nested function is a PicklingError, after the start
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise ConfigError(f"spawn: fn {getattr(fn, '__qualname__', fn)!r} cannot be sent to the spawned processes "
                          f"({type(e).__name__}); define it with def at the top level of an importable module, not "
                          "as a lambda or inside another function") from None
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, os.getpid(), fn, args, queue)) for r in range(world)]
    # SIGINT ignored while workers start: they inherit the disposition, so a Ctrl-C during their imports (before
    # `_entry` restores it) reaches only this process, whose lab runner checkpoints and stops
    with sigint_ignored():  # a Ctrl-C while a worker imports is the parent's to handle, not a traceback and a dead rank
        for p in procs:
            p.start()
    out: dict[int, bytes] = {}
    errors: dict[int, tuple[str, str]] = {}
    alive = [time.monotonic()] * world  # each rank's last sign of progress: its start, then its heartbeats
    started = [False] * world  # announced by the rank itself (`_entry`): from then on `timeout` bounds its silence
    failing_since: float | None = None
    ok = False
    try:
        while len(out) < world:
            try:
                rank, data, err = queue.get(timeout=0.2)
                if data == _ALIVE:
                    alive[rank], started[rank] = time.monotonic(), True
                elif err is None:
                    out[rank] = data
                else:
                    errors[rank] = err
            except queue_mod.Empty:
                pass
            if stopped := [r for r, (summary, _) in errors.items() if summary.startswith("KeyboardInterrupt")]:
                raise KeyboardInterrupt(f"rank {stopped[0]} of {world} was interrupted")  # Ctrl-C: not a failure
            now = time.monotonic()
            silent = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in out and r not in errors]
            if not (errors or silent):
                failing_since = None  # a rank that exited had its result still in the pipe
            elif failing_since is None:
                failing_since = now
            if failing_since is not None and now - failing_since > _GRACE:
                err = _cause(world, procs, errors, set(out))
                raise err from (_RemoteTraceback(err.worker_traceback) if err.worker_traceback else None)
            # a rank not yet heard from has the start's allowance, unless it is stopped (its announcement may still
            # sit in its queue's feeder thread)
            if stalled := [r for r in range(world) if r not in out and now - alive[r] > timeout and (
                    started[r] or now - alive[r] > _STARTUP_SECONDS or _stopped(procs[r].pid))]:
                raise _timed_out(procs, stalled, timeout, started)
        ok = True
    finally:
        for p in procs:
            if ok:
                p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        queue.close()
    return [torch.load(io.BytesIO(out[r]), weights_only=False) for r in range(world)]  # our own workers' bytes


# ---------------------------------------------------------------- FSDP2


def shard(model: nn.Module, blocks: Iterable[nn.Module] = (), ignored: Iterable[nn.Parameter] = ()) -> nn.Module:
    """FSDP2: `fully_shard` each block (its parameters gathered only while it runs), then the root.

    Parameters become row-sharded DTensors (Shard(0)); gradients are averaged over ranks on backward.
    `ignored` parameters stay plain tensors (their gradients are then yours to average, as under DDP).
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ConfigError("shard() needs a torch.distributed process group; launch with torchrun (or spawn())")
    for b in blocks:
        fully_shard(b)
    fully_shard(model, ignored_params=set(ignored) or None)
    return model


# ---------------------------------------------------------------- checkpoints


def _blob(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


CHECKSUMS = "checksums.json"  # {file name: SHA-256} of every file `save` wrote, checked by `load`


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_checksums(path: str) -> None:
    """On rank 0 (or the one process), once every rank's files are written: the SHA-256 of each (DCP's `.metadata`
    and shards), sealed as a run's JSON files are; every rank waits for it."""
    if _rank() == 0:
        files = sorted(f for f in os.listdir(path) if f != CHECKSUMS and os.path.isfile(os.path.join(path, f)))
        integrity.write_json(Path(path) / CHECKSUMS, {"files": {f: _sha256(os.path.join(path, f)) for f in files}}, checksum=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _verify_checksums(path: str) -> None:
    """RunStoreError, on every rank, naming each file of the checkpoint that is missing or whose bytes changed since
    `save` hashed them (a flipped bit once loaded as a wrong weight, a truncated shard read as "does not fit"). The
    files are split over the ranks, each hashed once, the verdicts summed by one all-reduce. A checkpoint saved
    before checksums were kept has no CHECKSUMS file and is read as before."""
    fix = "the checkpoint is damaged; load an earlier one, or delete it and train from the last good one"
    listed = os.path.join(path, CHECKSUMS)
    if not os.path.exists(listed):
        return
    files = integrity.read_json(Path(listed), checksum=True, fix=fix).get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise RunStoreError(f"{listed} does not list the checkpoint's files; {fix}")
    names = sorted(files)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    bad = torch.zeros(len(names), dtype=torch.float64)
    for i in range(_rank(), len(names), world):
        f = os.path.join(path, names[i])
        if os.path.sep in names[i] or names[i] in ("", ".", "..") or not os.path.isfile(f):
            bad[i] = 1
        elif _sha256(f) != files[names[i]]:
            bad[i] = 2
    if world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        reduced = bad.to(device)
        dist.all_reduce(reduced)
        bad = reduced.cpu()
    if bool(bad.any()):
        what = [f"{names[i]} ({'missing' if v == 1 else 'changed since it was saved'})" for i, v in enumerate(bad.tolist()) if v]
        raise RunStoreError(f"checkpoint {path}: {', '.join(what[:4])}{' …' if len(what) > 4 else ''}; {fix}")


def _params(optimizer: Any) -> list[nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _stateless(optimizer: Any) -> list[int]:
    """Positions (in param_groups order) of the parameters the optimizer holds no state for: not stepped yet (before
    the first step, or a branch or expert no batch has used)."""
    return [i for i, p in enumerate(_params(optimizer)) if not optimizer.state.get(p)]


def _fill_state(optimizer: Any, missing: list[int]) -> None:
    """Give the parameters at `missing` optimizer state by a zero-gradient, lr=0 step on them alone, as torch's
    `get_state_dict` does only for an optimizer with no state and no gradient at all (it left a partly stepped one, or
    one whose parameters held gradients, as it was: a checkpoint then lacked those parameters' keys, and a load target
    got none, so DCP loaded no optimizer state in silence); the step's AutoGeometry choices and records are undone by
    the caller. Every parameter's gradient is put back as it was."""
    params = _params(optimizer)
    if not missing:  # (all of them too: torch's initialisation does nothing where any parameter holds a gradient)
        return
    grads = [p.grad for p in params]
    lrs = [g.get("lr") for g in optimizer.param_groups]
    try:
        for i, p in enumerate(params):
            p.grad = torch.zeros_like(p) if i in set(missing) and p.requires_grad else None
        for g in optimizer.param_groups:
            if "lr" in g:
                g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad
        for g, lr in zip(optimizer.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr


def _state(model: nn.Module, optimizer: Any, monitor: Any, extra: dict | None, stateless: list[int] | None,
           choices: dict | None) -> dict[str, Any]:
    """The state DCP reads and writes: model and optimizer keyed by parameter name (sharded tensors stay
    DTensors, so DCP can reshard them), Monitor state, `extra`, the positions of the parameters that had no
    optimizer state (`stateless`) and AutoGeometry's `choices` as one replicated blob each (`stateless` or `choices`
    None: a checkpoint from before they were kept, or an optimizer without choices)."""
    _fill_state(optimizer, _stateless(optimizer))
    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optim": osd}
    if monitor is not None:
        state["monitor"] = _blob(monitor.state_dict())
    state["extra"] = _blob(extra or {})
    for key, value in (("stateless", stateless), ("choices", choices)):
        if value is not None:
            state[key] = _blob(value)
    return state


def _choices(optimizer: Any) -> dict | None:
    """A copy of AutoGeometry's `choices` (layer -> geometry); None for an optimizer without them."""
    return dict(optimizer.choices) if isinstance(getattr(optimizer, "choices", None), dict) else None


def _undo_filled(optimizer: Any, stateless: list[int], choices: dict | None, made: int) -> None:
    """Drop the zero-step state of the parameters at `stateless` and what that step chose and recorded."""
    params = _params(optimizer)
    for i in stateless:
        if i < len(params):
            optimizer.state.pop(params[i], None)
    if choices is not None:
        optimizer.choices.clear()
        optimizer.choices.update(choices)
    if isinstance(getattr(optimizer, "_records", None), list):
        del optimizer._records[made:]


def _check_extra(extra: Any) -> None:
    """`extra` must load with weights_only=True, as `load` reads it: checked before anything is written."""
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise ConfigError(f"save(extra={type(extra).__name__}): pass a dict (of numbers, strings, lists, dicts and tensors)")
    try:
        torch.load(_blob(extra), weights_only=True)
    except Exception as e:
        raise ConfigError(f"save(extra=...): it holds something a checkpoint cannot load without running code "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); keep to numbers, strings, "
                          "lists, tuples, dicts and tensors") from None


def save(path: str | os.PathLike, model: nn.Module, optimizer: Any, monitor: Any = None, extra: dict | None = None) -> None:
    """Write a distributed checkpoint (a directory): each rank writes its own shards; call on every rank.

    Parameters with no optimizer state yet (before the first step, or a branch not used yet) get one by a
    zero-gradient, lr=0 step, so that every parameter's keys are written (torch's `get_state_dict` does this only
    for an optimizer with no state at all); the checkpoint lists them, and `load` leaves them without state again, so
    a resumed run steps exactly as the saving one. The optimizer is left as it was before the save (that step's
    counters, buffers, records and AutoGeometry choices undone), so saving never changes the training that follows.
    `extra` must load with weights_only=True (checked before anything is written)."""
    from torch.distributed.checkpoint.api import CheckpointException

    _check_extra(extra)
    stateless = _stateless(optimizer)
    choices = _choices(optimizer)
    made = len(getattr(optimizer, "_records", ()))
    try:
        dcp.save(_state(model, optimizer, monitor, extra, stateless, choices), checkpoint_id=os.fspath(path))
        _write_checksums(os.fspath(path))
    except CheckpointException as e:  # a BaseException whose message is each rank's traceback
        cause = next((f[0] if isinstance(f, tuple) and f else f for f in getattr(e, "failures", {}).values()), e)
        raise RunStoreError(f"could not write the checkpoint {os.fspath(path)!r} ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''}): give a directory path that can be "
                            "created and written") from None
    finally:
        _undo_filled(optimizer, stateless, choices, made)


# What a DCP `.metadata` written by `save` references (torch 2.13): the Metadata dataclasses, the filesystem
# writer's per-item storage info, torch.Size, dtypes and layouts by name, and the path it was saved to.
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch's layouts by name
    ("collections", "OrderedDict"),
} | {(module, name) for module in ("pathlib", "pathlib._local")
     for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata`, admitting only the classes it legitimately holds: no code from the file runs."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which a checkpoint's metadata never holds")


def read_metadata(path: str | os.PathLike) -> Any:
    """The DCP Metadata in the file `path` (a checkpoint's `.metadata`), read without running code from it;
    RunStoreError naming the file when it is missing, damaged or not what `save` writes."""
    from torch.distributed.checkpoint.metadata import Metadata

    fix = "it was not written by specscope.train.distributed.save; delete the checkpoint directory and save it again"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise RunStoreError(f"checkpoint metadata {os.fspath(path)} is missing; {fix}") from None
    except Exception as e:  # a damaged or hostile file: whatever the unpickler raised, nothing of it ran
        raise RunStoreError(f"checkpoint metadata {os.fspath(path)} is corrupt or tampered with ({e}); {fix}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise RunStoreError(f"checkpoint metadata {os.fspath(path)} is not a checkpoint's metadata "
                            f"(it holds a {type(metadata).__name__}); {fix}")
    return metadata


class _SafeReader(dcp.FileSystemReader):
    """torch's FileSystemReader, except that `.metadata` is read by `read_metadata` (torch uses pickle.load)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load(path: str | os.PathLike, model: nn.Module, optimizer: Any, monitor: Any = None) -> dict | None:
    """Load a checkpoint written by `save` at any world size (or in one process); returns its `extra`.

    Call on every rank, after building the model (sharded as it will train), the optimizer and the monitor.
    The checkpoint's `.metadata` is read without running code from it: a damaged or tampered one is a
    RunStoreError naming the file.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    if not os.path.isdir(path):
        raise ConfigError(f"no distributed checkpoint at {os.fspath(path)!r} (a directory written by specscope.train.distributed.save)")
    # Checked here first, on every rank: torch would swallow the error and report a missing rank-local file.
    metadata = read_metadata(os.path.join(os.fspath(path), ".metadata"))
    _verify_checksums(os.fspath(path))
    kept, chosen = (any(k == key or k.startswith(key + ".") for k in metadata.state_dict_metadata)
                    for key in ("stateless", "choices"))
    choices = _choices(optimizer)
    state = _state(model, optimizer, monitor, {}, [] if kept else None, {} if chosen and choices is not None else None)
    _check_optimizer_keys(os.fspath(path), metadata, state["optim"])
    try:
        dcp.load(state, checkpoint_id=os.fspath(path), storage_reader=_SafeReader(os.fspath(path)))
    except CheckpointException as e:  # each rank's error, wrapped (with its frames); a BaseException, not an Exception
        causes = [f[0] if isinstance(f, tuple) and f else f for f in getattr(e, "failures", {}).values()]
        for cause in causes:
            if isinstance(cause, RunStoreError):
                raise RunStoreError(str(cause)) from None
        cause = causes[0] if causes else e
        if isinstance(cause, (OSError, EOFError)) or any(w in str(cause) for w in ("PytorchStreamReader", "zip archive")):
            # a file gone or unreadable, in a checkpoint without checksums.json (saved before it was written) to name it
            raise RunStoreError(f"a file of the checkpoint {os.fspath(path)!r} is missing or damaged ({type(cause).__name__}: "
                                f"{str(cause).splitlines()[0] if str(cause) else ''}); it was saved without checksums.json, "
                                "which would name the file: restore the checkpoint from a copy, or start the run again") from None
        raise ConfigError(f"the checkpoint {os.fspath(path)!r} does not fit what it is loaded into "
                          f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}): load it into the "
                          "model, optimizer and Monitor it was saved with, built the same way (a checkpoint saved without "
                          "a Monitor: load(path, model, optimizer))") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # the parameters that had no state when saved have none now (the next step is the saving run's), and AutoGeometry's
    # choices are the saved ones (those from before the load, of a checkpoint saved before they were kept)
    _undo_filled(optimizer, _read(state["stateless"]) if kept else [],
                 _read(state["choices"]) if "choices" in state else choices, len(getattr(optimizer, "_records", ())))
    if hasattr(optimizer, "pop_records"):  # get_state_dict's zero-gradient, lr=0 step to create state recorded nothing real
        optimizer.pop_records()
    if monitor is not None:
        monitor.load_state_dict(_read(state["monitor"]))
    return _read(state["extra"])


def _read(blob: io.BytesIO) -> Any:
    """A blob DCP loaded, read with weights_only=True: data from disk, no code runs."""
    blob.seek(0)
    return torch.load(blob, weights_only=True)


def _check_optimizer_keys(path: str, metadata: Any, osd: dict) -> None:
    """One ConfigError, before anything loads, when the checkpoint's optimizer state is not what the optimizer keeps:
    DCP loads the keys its target asks for and ignores the others, so another optimizer's state (AdamW's moments loaded
    into SGD's momentum, an option such as AutoGeometry's euclidean= set otherwise) would be dropped in silence while
    its param groups' options load. (A key the target asks for and the checkpoint lacks DCP reports itself.)"""
    wanted = {f"optim.state.{name}": set(map(str, entry)) for name, entry in osd.get("state", {}).items()}
    saved: dict[str, set[str]] = {}
    for key in metadata.state_dict_metadata:
        parts = key.split(".")
        if parts[:2] == ["optim", "state"]:  # optim.state.<parameter name, dotted>.<state key>[.<nested>]
            at = next((i for i in range(3, len(parts)) if ".".join(parts[:i]) in wanted), len(parts) - 1)
            saved.setdefault(".".join(parts[:at]), set()).add(parts[at])
    extra = {name: sorted(keys - wanted.get(name, set())) for name, keys in saved.items() if keys - wanted.get(name, set())}
    if not extra:
        return
    name, keys = next(iter(extra.items()))
    keeps = sorted(wanted.get(name, ()))
    more = f", and {len(extra) - 1} more parameters" if len(extra) > 1 else ""
    raise ConfigError(f"the checkpoint {path!r} holds optimizer state this optimizer does not keep (for parameter "
                      f"'{name.removeprefix('optim.state.')}': {keys}; it keeps {keeps}{more}): "
                      "it was saved by another optimizer, or one with other settings (an algorithm, AutoGeometry's "
                      "euclidean=, a momentum); build the optimizer as the run that saved it, then load")
