"""One process or several (torchrun): rank, device, data shards, collective helpers.

A stage started by ``torchrun --nproc_per_node N`` (``compute.launcher`` in params.yaml) runs in N
processes. :func:`init` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``) and joins the process group: gloo on CPU, NCCL on CUDA. Without that
environment it is the single process of a plain ``python`` run, and nothing here communicates.

Training keeps the meaning of ``batch_size``: it is the *global* batch. :class:`GlobalBatchSampler`
draws the batches a single process would draw (the same permutation from the same generator) and
gives each process a contiguous slice of every batch; DDP averages the gradients. So N processes
train on the very batches of one process, and a checkpoint written by one resumes in the other.

Inference splits its images into contiguous shards (:func:`shard`); every process writes its
files into one staging folder (:func:`shared_atomic_dir`), and numbers are summed
(:func:`all_reduce_sum`) or gathered in rank order (:func:`gather_rows`, :func:`gather_json`),
which is the order of a single process. Only rank 0 writes metrics, checkpoints and models and
logs to MLflow. Nothing is pickled between processes: tensors and JSON bytes only.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from wsss.errors import ConfigError, TrainingDiverged

T = TypeVar("T")
PARAMS_SOURCE = "params.yaml"


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes, its device, and the
    numeric settings of ``compute`` (precision as resolved: never ``auto``; BatchNorm across processes)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    batchnorm: str = "local"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def cpu_threads(self, requested: int = 0) -> int:
        """torch threads for this process: ``requested``, else the cores it may run on shared by the
        processes on the machine."""
        return requested or max(1, available_cpus() // self.local_world_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for a forward pass (``compute.precision``); fp32 changes nothing."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None


_current: Context | None = None


def available_cpus() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present (one GPU per local process), else the CPU; ``cpu``; ``cuda``."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(PARAMS_SOURCE, [("compute.device", "cuda is requested but torch sees no CUDA device")])
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that keep the bf16 instructions; any other cap (AVX2, ...) rules them out
_ONEDNN_BF16_ISAS = {"ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2"}
# the CPU flags (Linux /proc/cpuinfo; macOS sysctl) of native bf16 arithmetic: x86 and ARM
_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16", "FEAT_BF16"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags: Linux's ``flags`` (x86) or ``Features`` (ARM) line of /proc/cpuinfo,
    macOS's ``hw.optional`` features that are on; empty where neither can be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):
                return set(value.split())
    except OSError:
        pass
    try:
        import subprocess

        listing = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {name.split(".")[-1] for name, _, value in (line.partition(":") for line in listing.splitlines()) if value.strip() == "1"}


def cpu_has_native_bf16(flags: set[str] | None = None, capability: str | None = None,
                        onednn_cap: str | None = None) -> bool:
    """Whether this process computes bf16 natively on the CPU: the CPU has bf16 instructions
    (``avx512_bf16`` / ``amx_bf16`` on x86, ``bf16`` on ARM) and neither the capability torch runs at
    (``ATEN_CPU_CAPABILITY`` lowers it, e.g. to AVX2) nor ``ONEDNN_MAX_CPU_ISA`` rules them out. The
    arguments default to this machine and process (they are parameters for the tests)."""
    flags = cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "") if onednn_cap is None else onednn_cap
    if not flags & _BF16_CPU_FLAGS:
        return False
    if {"avx512_bf16", "amx_bf16"} & flags and not capability.upper().startswith("AVX512"):
        return False  # x86 with its AVX-512 kernels switched off: bf16 is emulated, 15-25x slower than fp32
    return not onednn_cap or onednn_cap.upper() in _ONEDNN_BF16_ISAS


def resolve_precision(requested: str, device: torch.device) -> str:
    """``compute.precision`` as the training loops use it: ``auto`` is bf16 where ``device`` computes it
    natively (a CUDA device with bf16, a CPU with bf16 instructions, :func:`cpu_has_native_bf16`), else
    fp32; an explicit value is kept."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError("environment", [(name, f"expected an integer, got {value!r}")]) from None


def init(compute=None) -> Context:
    """Join torchrun's process group if this process was started by it, pick the device, and
    check the ``compute`` settings against it; the result is also :func:`current`."""
    global _current
    device_name = getattr(compute, "device", "auto")
    precision = getattr(compute, "precision", "fp32")
    batchnorm = getattr(compute, "batchnorm", "local")
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    device = select_device(device_name, local_rank)
    precision = resolve_precision(precision, device)
    problems = []
    if device.type == "cuda" and local_world_size > torch.cuda.device_count():
        problems.append(("compute.launcher", f"{local_world_size} processes on this machine but {torch.cuda.device_count()} "
                                             "GPU(s): start at most one process per GPU"))
    if precision == "fp16" and device.type != "cuda":
        problems.append(("compute.precision", "fp16 needs CUDA; on a CPU use auto, bf16 or fp32"))
    if batchnorm == "sync" and world_size > 1 and device.type != "cuda":
        problems.append(("compute.batchnorm", "sync needs CUDA (torch's SyncBatchNorm); on CPUs use local"))
    if problems:
        raise ConfigError(PARAMS_SOURCE, problems)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _current = Context(rank, world_size, local_rank, local_world_size, device, precision, batchnorm)
    return _current


def current() -> Context:
    """The context :func:`init` made, or a single process on the automatic device."""
    return _current if _current is not None else Context(device=select_device("auto"))


def shutdown() -> None:
    """Leave the process group (end of a torchrun stage) and forget the context."""
    global _current
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _current = None


def shard_range(count: int, context: Context) -> range:
    """The contiguous share ``[start, stop)`` of ``count`` items that this process handles."""
    start = count * context.rank // context.world_size
    stop = count * (context.rank + 1) // context.world_size
    return range(start, stop)


def shard(items: Sequence[T], context: Context | None = None) -> list[T]:
    """This process's contiguous share of ``items`` (all of them in a single process)."""
    context = context or current()
    span = shard_range(len(items), context)
    return list(items[span.start : span.stop])


def barrier(context: Context | None = None) -> None:
    if (context or current()).distributed:
        dist.barrier()


def all_reduce_sum(array: np.ndarray, context: Context | None = None) -> np.ndarray:
    """The element-wise sum of ``array`` over processes (confusion matrices, counts)."""
    context = context or current()
    if not context.distributed:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(_collective_device(context))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy().astype(array.dtype, copy=False)


def all_reduce_mean(value: float, context: Context | None = None) -> float:
    """The mean of a scalar over processes (e.g. a training loss)."""
    context = context or current()
    if not context.distributed:
        return value
    return float(all_reduce_sum(np.array([value], dtype=np.float64), context)[0]) / context.world_size


def gather_rows(array: np.ndarray, context: Context | None = None) -> np.ndarray:
    """Every process's rows, concatenated in rank order (with :func:`shard`: the original order)."""
    context = context or current()
    if not context.distributed:
        return array
    device = _collective_device(context)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(context.world_size)]
    dist.all_gather(counts, torch.tensor([array.shape[0]], dtype=torch.int64, device=device))
    longest = max(int(c.item()) for c in counts)
    padded = np.zeros((longest, *array.shape[1:]), dtype=array.dtype)
    padded[: array.shape[0]] = array
    parts = [torch.empty(padded.shape, dtype=torch.from_numpy(padded).dtype, device=device) for _ in counts]
    dist.all_gather(parts, torch.from_numpy(padded).to(device))
    return np.concatenate([part.cpu().numpy()[: int(count.item())] for part, count in zip(parts, counts, strict=True)])


def gather_json(items: list, context: Context | None = None) -> list:
    """Every process's JSON-serialisable list items, concatenated in rank order."""
    context = context or current()
    if not context.distributed:
        return items
    encoded = np.frombuffer(json.dumps(items).encode(), dtype=np.uint8)
    gathered = []
    for rank in range(context.world_size):
        text = broadcast_bytes(encoded.tobytes() if rank == context.rank else b"", rank, context)
        gathered.extend(json.loads(text))
    return gathered


def broadcast_bytes(data: bytes, source: int = 0, context: Context | None = None) -> bytes:
    """``data`` of rank ``source``, on every process."""
    context = context or current()
    if not context.distributed:
        return data
    device = _collective_device(context)
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=source)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if context.rank == source:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=source)
    return buffer.cpu().numpy().tobytes()


def sync_buffers(model: nn.Module, context: Context | None = None) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics): after the last training step each
    process has updated them with its own slice, and val must score the weights rank 0 saves."""
    context = context or current()
    if not context.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def same_on_every_rank(text: str, context: Context | None = None) -> bool:
    """Whether every process holds the same ``text`` (e.g. the epoch it resumes from); all get the answer."""
    context = context or current()
    if not context.distributed:
        return True
    reference = broadcast_bytes(text.encode(), 0, context).decode()
    return int(all_reduce_sum(np.array([int(reference != text)], dtype=np.int64), context)[0]) == 0


def check_resume_agrees(start_epoch: int, checkpoint_dir: Path, context: Context | None = None) -> None:
    """Every process must resume from the same epoch (else their batches and collectives part ways)."""
    if not same_on_every_rank(str(start_epoch), context):
        raise RuntimeError(f"the processes read different checkpoints in {checkpoint_dir}: on several machines, "
                           "checkpoints/ must be on storage that every node shares")


def check_batch_sizes(batch_sizes: dict[str, int], context: Context | None = None) -> None:
    """Each global batch must split evenly into slices of 2 or more (BatchNorm needs 2 samples per process)."""
    context = context or current()
    if not context.distributed:
        return
    world = context.world_size
    problems = [(key, f"the global batch {size} must be a multiple of the {world} processes, with at least 2 samples each")
                for key, size in batch_sizes.items() if size % world or size // world < 2]
    if problems:
        raise ConfigError(PARAMS_SOURCE, problems)


def _collective_device(context: Context) -> torch.device:
    return context.device if context.device.type == "cuda" else torch.device("cpu")


@contextlib.contextmanager
def shared_atomic_dir(final: Path, context: Context | None = None) -> Iterator[Path]:
    """:func:`wsss.io.atomic_dir` for several processes: rank 0 makes the staging folder, every
    process writes its files into it, and it replaces ``final`` only when every process is done
    (a failure anywhere makes torchrun stop them all, and ``final`` stays as it was)."""
    from wsss.io import atomic_dir

    context = context or current()
    if not context.distributed:
        with atomic_dir(final) as staging:
            yield staging
        return
    if context.is_main:
        with atomic_dir(final) as staging:
            broadcast_bytes(str(staging).encode(), 0, context)
            yield staging
            barrier(context)
    else:
        staging = Path(broadcast_bytes(b"", 0, context).decode())
        yield staging
        barrier(context)


class GlobalBatchSampler(Sampler[list[int]]):
    """The batches of ``DataLoader(shuffle=True, batch_size, drop_last, generator)`` in a single
    process, each cut into ``world_size`` contiguous slices, of which this process gets its own.

    The permutation comes from ``generator``, which must also be the DataLoader's: the loader
    draws its base seed from it first, as it does with ``shuffle=True``."""

    def __init__(self, size: int, batch_size: int, drop_last: bool, generator: torch.Generator, rank: int = 0, world_size: int = 1,
                 key: str = "batch_size"):
        if batch_size % world_size:
            raise ConfigError(PARAMS_SOURCE, [(key, f"the global batch {batch_size} must be a multiple of the {world_size} processes")])
        if size < world_size:
            raise ValueError(f"{size} training samples cannot be shared by {world_size} processes")
        self.size, self.batch_size, self.drop_last = size, batch_size, drop_last
        self.generator, self.rank, self.world_size = generator, rank, world_size

    def global_batches(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for start in range(0, self.size, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            start = len(batch) * self.rank // self.world_size
            stop = len(batch) * (self.rank + 1) // self.world_size
            if start == stop:
                raise ValueError(f"a batch of {len(batch)} samples leaves process {self.rank} of {self.world_size} without any")
            yield batch[start:stop]

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


def training_loader(dataset: Dataset, batch_size: int, drop_last: bool, seed: int, workers: int,
                    context: Context | None = None, key: str = "batch_size") -> DataLoader:
    """One epoch's shuffled loader, seeded by ``seed``: in a single process the plain shuffled
    DataLoader, across processes this process's slices of the same global batches."""
    context = context or current()
    generator = torch.Generator().manual_seed(seed)
    if not context.distributed:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=generator,
                          num_workers=workers)
    sampler = GlobalBatchSampler(len(dataset), batch_size, drop_last, generator, context.rank, context.world_size, key)
    return DataLoader(dataset, batch_sampler=sampler, generator=generator, num_workers=workers)


def wrap_model(model: nn.Module, context: Context | None = None) -> nn.Module:
    """``model`` for training: as it is in a single process; across processes DDP (gradients
    averaged), with SyncBatchNorm first when ``compute.batchnorm`` is ``sync``."""
    context = context or current()
    if not context.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if context.batchnorm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   group: str, epoch: int) -> None:
    """Backward and step (through the fp16 loss scaler when there is one). A NaN or infinite loss
    raises :class:`TrainingDiverged` (params ``group``) before it reaches the weights."""
    if not torch.isfinite(loss.detach()):
        raise TrainingDiverged(group, epoch, float(loss.detach()), current().precision)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def precision_fingerprint(context: Context | None = None) -> list[dict[str, Any]]:
    """What a checkpoint's fingerprint adds for the numeric precision: nothing for fp32 (so the
    fingerprints of fp32 runs are those of runs before this setting existed), else the precision:
    a checkpoint is never resumed under another precision."""
    precision = (context or current()).precision
    return [] if precision == "fp32" else [{"precision": precision}]
