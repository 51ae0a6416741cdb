"""Inter-pixel relations on the stride-4 grid: pair offsets, paths, affinities and IRNet's losses.

Pairs: pixel i and i + (dy, dx) for every offset of the half-plane (dy > 0, or dy = 0 and dx > 0)
with |dy|, |dx| < r and dy^2 + dx^2 < r^2: 34 offsets for radius 5, 152 for radius 10. The path
of a pair is every grid point within distance < 1 of the segment from i to j (ends included);
the affinity is ``1 - max over the path of the boundary probability``.

Losses (IRNet; constants in method-notes): pairs with both labels != 255 are valid; same label 0
is a positive background pair, same label > 0 a positive foreground pair, different labels a
negative pair. ``L_aff = ((L_pos_bg + L_pos_fg) / 2 + L_neg) / 2`` with ``-log(a + 1e-5)`` on
positives and ``-log(1 + 1e-5 - a)`` on negatives, each averaged over its own pairs;
``L_dp = (mean |D_i - D_j - (dy, dx)|_1 over fg pairs + mean |D_i - D_j|_1 over bg pairs) / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from wsss import distributed
from wsss.io import IGNORE_INDEX

EPSILON = 1e-5


@cache
def half_plane_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Offsets (dy, dx) of the pairs within ``radius``, one of each symmetric couple."""
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius * radius]
    return tuple(offsets)


@cache
def path_points(offset: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Grid points within distance < 1 of the segment from (0, 0) to ``offset`` (ends included)."""
    dy, dx = offset
    length2 = dy * dy + dx * dx
    points = []
    for py in range(min(0, dy) - 1, max(0, dy) + 2):
        for px in range(min(0, dx) - 1, max(0, dx) + 2):
            along = py * dy + px * dx
            if along < 0 or along > length2:
                continue
            cross = py * dx - px * dy
            if cross * cross < length2:  # |cross| / |d| < 1
                points.append((py, px))
    return tuple(points)


def shift(tensor: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``out[..., y, x] = tensor[..., y + dy, x + dx]`` (``fill`` outside)."""
    height, width = tensor.shape[-2:]
    pad = max(abs(dy), abs(dx))
    padded = F.pad(tensor, (pad, pad, pad, pad), value=fill)
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def inside_mask(height: int, width: int, offsets: tuple[tuple[int, int], ...], device=None) -> torch.Tensor:
    """``[K, H, W]`` True where both ends of the pair lie in the grid."""
    ys = torch.arange(height, device=device)[:, None]
    xs = torch.arange(width, device=device)[None, :]
    masks = [((ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)) for dy, dx in offsets]
    return torch.stack(masks)


def pair_affinities(boundary: torch.Tensor, offsets: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``[N, K, H, W]`` affinity of every pixel with its neighbour at each offset, from boundary
    probabilities ``[N, 1, H, W]`` (or ``[N, H, W]``)."""
    if boundary.dim() == 4:
        boundary = boundary[:, 0]
    points = sorted({point for offset in offsets for point in path_points(offset)})
    position = {point: i for i, point in enumerate(points)}
    shifted = torch.stack([shift(boundary, py, px, 0.0) for py, px in points], dim=1)  # [N, U, H, W]
    maxima = [shifted[:, [position[p] for p in path_points(offset)]].amax(dim=1) for offset in offsets]
    return 1.0 - torch.stack(maxima, dim=1)


@dataclass(frozen=True)
class PairMasks:
    positive_bg: torch.Tensor  # [N, K, H, W] bool
    positive_fg: torch.Tensor
    negative: torch.Tensor


def pair_masks(labels: torch.Tensor, offsets: tuple[tuple[int, int], ...]) -> PairMasks:
    """Pair types from a stride-4 label map ``[N, H, W]`` (0 bg, > 0 class, 255 unsure)."""
    labels = labels.long()
    neighbours = torch.stack([shift(labels, dy, dx, IGNORE_INDEX) for dy, dx in offsets], dim=1)
    here = labels[:, None]
    valid = (here != IGNORE_INDEX) & (neighbours != IGNORE_INDEX)
    same = valid & (here == neighbours)
    return PairMasks(positive_bg=same & (here == 0), positive_fg=same & (here > 0), negative=valid & (here != neighbours))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over ``mask`` in the *global* batch. Under torchrun each process
    divides its sum by the pair count of all processes (times their number, as DDP averages the
    gradients), so N processes optimise the loss of one: pair counts differ between slices."""
    context = distributed.current()
    count = mask.sum()
    if context.distributed:
        count = torch.from_numpy(distributed.all_reduce_sum(count.detach().cpu().numpy().reshape(1), context)).to(values.device)[0]
        return (values * mask).sum() * context.world_size / count if count > 0 else values.sum() * 0.0
    return (values * mask).sum() / count if count > 0 else values.sum() * 0.0


def affinity_loss(affinities: torch.Tensor, masks: PairMasks) -> dict[str, torch.Tensor]:
    pos_bg = _masked_mean(-torch.log(affinities + EPSILON), masks.positive_bg)
    pos_fg = _masked_mean(-torch.log(affinities + EPSILON), masks.positive_fg)
    neg = _masked_mean(-torch.log(1.0 + EPSILON - affinities), masks.negative)
    return {"pos_bg": pos_bg, "pos_fg": pos_fg, "neg": neg, "affinity": ((pos_bg + pos_fg) / 2 + neg) / 2}


def displacement_loss(displacement: torch.Tensor, masks: PairMasks, offsets: tuple[tuple[int, int], ...]) -> dict[str, torch.Tensor]:
    """``displacement`` ``[N, 2, H, W]`` in grid units (dy, dx)."""
    neighbours = torch.stack([shift(displacement, dy, dx, 0.0) for dy, dx in offsets], dim=2)  # [N, 2, K, H, W]
    delta = torch.tensor(offsets, dtype=displacement.dtype, device=displacement.device).T[None, :, :, None, None]
    difference = displacement[:, :, None] - neighbours
    fg = _masked_mean((difference - delta).abs().sum(dim=1), masks.positive_fg)
    bg = _masked_mean(difference.abs().sum(dim=1), masks.positive_bg)
    return {"dp_fg": fg, "dp_bg": bg, "displacement": (fg + bg) / 2}
