"""Checkpoints: atomic saves, safe loads (``weights_only=True``), resume only when compatible.

A training stage writes ``last.pt`` after every epoch. It holds a *fingerprint* of everything the
run depends on (its params, the seed, the hashes of its inputs); a re-run resumes from it only
if the fingerprint matches, otherwise it starts again: a stale checkpoint is never continued.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.errors import DataError
from wsss.io import atomic_write_bytes


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (params dumps, input hashes, seeds)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a kill leaves the previous one intact."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(path, "checkpoint not found") from None
    except Exception as error:  # noqa: BLE001 - a corrupt or foreign file
        raise DataError(path, f"not a readable checkpoint ({error})") from None


def load_if_compatible(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists, is readable and belongs to this configuration."""
    if not Path(path).is_file():
        return None
    try:
        state = load(path)
    except DataError:
        return None
    return state if state.get("fingerprint") == expected_fingerprint else None


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived from non-negative integers, e.g. ``(seed, epoch, sample index)``."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for one epoch or one run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
