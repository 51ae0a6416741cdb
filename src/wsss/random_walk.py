"""Random walk on IRNet's affinities, sparse: neighbours within the radius only, never N x N.

Affinity between grid pixels i and j within ``radius``: ``a_ij = 1 - max boundary on the path``
(:mod:`wsss.affinity`), symmetric, with ``a_ii = 1``. The transition matrix is ``T = A ** beta``
with each column divided by its sum. The foreground CAMs times ``(1 - boundary)`` are row
vectors ``x`` (one per class) propagated ``2 ** exp_times`` steps: ``x <- x T``. irn computes
``T^(2^exp_times)`` densely by repeated squaring (N x N, ~1 GB per 128 x 128 grid); here each
step is one sparse product with ~``2K + 1`` non-zeros per column (69 for radius 5), and many
images walk together as one block-diagonal matrix: scipy CSR when the maps are on the CPU, torch's
sparse CSR on the maps' device otherwise (a GPU walks where IRNet ran; ``backend`` picks one).

Pseudo masks: the walked maps are upsampled x4 (bilinear, cropped to the image), then
(``irnet.background``):

- ``plane`` (irn, the paper): divided by their global maximum, a constant background plane at
  ``irnet.threshold`` goes in front, argmax.
- ``walk`` (AffinityNet's way): a background seed ``1 - max_c CAM_c / max CAM_c`` is walked with
  the classes (:func:`walk_seeds`); every walked map is divided by its own maximum, the background
  map is multiplied by ``irnet.bg_weight``, argmax. Where CAMs are coarse the background region
  picks up the CAMs' spill and floods under a constant plane; a walked background does not.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from wsss.affinity import half_plane_offsets, inside_mask, pair_affinities


def transition_entries(boundary: torch.Tensor, radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zeros of ``T^T`` for a boundary map ``[h, w]``: (rows, cols, values), N = h * w.

    Row j of ``T^T`` holds column j of T, so ``(x T)^T = T^T @ x^T``."""
    height, width = boundary.shape
    offsets = half_plane_offsets(radius)
    affinity = pair_affinities(boundary[None], offsets)[0].clamp(min=0.0) ** beta  # [K, h, w]
    inside = inside_mask(height, width, offsets, boundary.device)
    index = torch.arange(height * width, device=boundary.device).view(height, width)
    sources, targets = [index.flatten()], [index.flatten()]
    values = [torch.ones(height * width, dtype=boundary.dtype, device=boundary.device)]
    for k, (dy, dx) in enumerate(offsets):
        valid = inside[k]
        i = index[valid]
        j = (index + dy * width + dx)[valid]
        a = affinity[k][valid]
        sources += [i, j]
        targets += [j, i]
        values += [a, a]
    rows, cols, vals = torch.cat(sources), torch.cat(targets), torch.cat(values)  # A[rows, cols] = vals
    column_sums = torch.zeros(height * width, dtype=vals.dtype, device=boundary.device).index_add_(0, cols, vals)
    return cols, rows, vals / column_sums[cols]


def _block_entries(boundaries: list[torch.Tensor], radius: int, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    rows, cols, values, offset = [], [], [], 0
    for boundary in boundaries:
        r, c, v = transition_entries(boundary, radius, beta)
        rows.append(r + offset)
        cols.append(c + offset)
        values.append(v)
        offset += boundary.numel()
    return torch.cat(rows), torch.cat(cols), torch.cat(values), offset


def transition_matrix(boundaries: list[torch.Tensor], radius: int, beta: float) -> scipy.sparse.csr_matrix:
    """Block-diagonal sparse ``T^T`` (scipy CSR) of one or more boundary maps."""
    rows, cols, values, size = _block_entries(boundaries, radius, beta)
    return scipy.sparse.csr_matrix((values.cpu().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())), shape=(size, size))


def transition_tensor(boundaries: list[torch.Tensor], radius: int, beta: float) -> torch.Tensor:
    """The same block-diagonal ``T^T`` as a torch sparse CSR tensor on the boundaries' device."""
    rows, cols, values, size = _block_entries(boundaries, radius, beta)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long-standing
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (size, size), check_invariants=False)
        return coo.coalesce().to_sparse_csr()


BACKENDS = ("auto", "scipy", "torch")


def propagate_many(cams: list[torch.Tensor], boundaries: list[torch.Tensor], radius: int, beta: float, exp_times: int,
                   backend: str = "auto") -> list[torch.Tensor]:
    """Walk several images at once: one block-diagonal sparse matrix, one product per step.

    ``cams[b]`` is ``[C_b, h_b, w_b]`` (any number of classes), ``boundaries[b]`` ``[h_b, w_b]``, all on
    one device. ``backend``: ``scipy`` (CPU), ``torch`` (sparse CSR on the maps' device) or ``auto``
    (scipy on the CPU, torch elsewhere). The results are on the device of ``cams``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown random-walk backend {backend!r}; expected one of {BACKENDS}")
    width_of_state = max((c.shape[0] for c in cams), default=0)
    if width_of_state == 0:
        return [cam.clone() for cam in cams]
    device = boundaries[0].device
    dtype = torch.float64 if boundaries[0].dtype == torch.float64 else torch.float32
    boundaries = [boundary.to(dtype) for boundary in boundaries]
    use_torch = backend == "torch" or (backend == "auto" and device.type != "cpu")
    states, starts, offset = [], [], 0
    for cam, boundary in zip(cams, boundaries, strict=True):
        state = torch.zeros(boundary.numel(), width_of_state, dtype=boundary.dtype, device=device)
        if cam.shape[0]:
            state[:, : cam.shape[0]] = (cam * (1.0 - boundary)[None]).reshape(cam.shape[0], -1).T
        states.append(state)
        starts.append(offset)
        offset += boundary.numel()
    state = torch.cat(states)
    if use_torch:
        matrix = transition_tensor(boundaries, radius, beta)
        for _ in range(2**exp_times):
            state = matrix @ state
        walked = state
    else:
        matrix = transition_matrix(boundaries, radius, beta)
        values = state.cpu().numpy()
        matrix = matrix.astype(values.dtype)
        for _ in range(2**exp_times):
            values = matrix @ values
        walked = torch.from_numpy(values)
    return [walked[start : start + b.numel(), : c.shape[0]].T.reshape(c.shape).to(c.device)
            for start, c, b in zip(starts, cams, boundaries, strict=True)]


def propagate(cams: torch.Tensor, boundary: torch.Tensor, radius: int, beta: float, exp_times: int) -> torch.Tensor:
    """Walk ``cams * (1 - boundary)`` (``[C, h, w]``) for ``2 ** exp_times`` steps."""
    return propagate_many([cams], [boundary], radius, beta, exp_times)[0]


def dense_transition(boundary: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """Dense ``T`` (``N x N``) filled offset by offset, as irn builds it; benchmark reference."""
    height, width = boundary.shape
    offsets = half_plane_offsets(radius)
    affinity = pair_affinities(boundary[None], offsets)[0].clamp(min=0.0) ** beta
    inside = inside_mask(height, width, offsets, boundary.device)
    size = height * width
    matrix = torch.eye(size, dtype=boundary.dtype, device=boundary.device)
    index = torch.arange(size, device=boundary.device).view(height, width)
    for k, (dy, dx) in enumerate(offsets):
        i = index[inside[k]]
        j = i + dy * width + dx
        matrix[i, j] = affinity[k][inside[k]]
        matrix[j, i] = affinity[k][inside[k]]
    return matrix / matrix.sum(dim=0, keepdim=True)


def propagate_dense(cams: torch.Tensor, boundary: torch.Tensor, radius: int, beta: float, exp_times: int) -> torch.Tensor:
    """The same walk as :func:`propagate` by repeated squaring of the dense matrix (irn's way)."""
    channels, height, width = cams.shape
    power = dense_transition(boundary, radius, beta)
    for _ in range(exp_times):
        power = power @ power
    state = (cams * (1.0 - boundary)[None]).reshape(channels, -1)
    return (state @ power).reshape(channels, height, width)


def walk_seeds(cams: torch.Tensor, background: str) -> torch.Tensor:
    """The maps to walk: the class maps ``[C, h, w]``, with a background seed in front when
    ``background == "walk"``: ``1 - max over the classes of each map divided by its own max``."""
    if background == "plane" or cams.shape[0] == 0:
        return cams
    peaks = cams.flatten(1).amax(dim=1).clamp(min=1e-5)[:, None, None]
    seed = 1.0 - (cams / peaks).amax(dim=0)
    return torch.cat([seed.clamp(min=0.0)[None], cams])


def floor_background(seeds: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``seeds`` (:func:`walk_seeds` with a walked background first) with the background seed raised
    to at least ``floor`` (``[h, w]``, same grid): regions known to be background (the person behind
    the objects, :mod:`wsss.person`) then hold the background in the walk against the class maps."""
    if floor.shape != seeds.shape[1:]:
        raise ValueError(f"background floor {tuple(floor.shape)} and seeds {tuple(seeds.shape[1:])} differ in size")
    return torch.cat([torch.maximum(seeds[0], floor.to(seeds.dtype))[None], seeds[1:]])


def pseudo_mask(walked: torch.Tensor, class_ids: np.ndarray, image_size: tuple[int, int], threshold: float,
                upsample: int = 4, background: str = "plane", bg_weight: float = 1.0) -> np.ndarray:
    """Upsample walked maps (x4 for the stride-4 grid; x2 when the walk ran on the image enlarged
    twice), crop to the image, then a background plane at ``threshold`` before the maps divided by
    their global max (``background="plane"``), or, for a walked background (first row of
    ``walked``, :func:`walk_seeds`), each map divided by its own max and the background weighted
    by ``bg_weight``; argmax, mapped to the dataset's class ids."""
    height, width = image_size
    if len(class_ids) == 0:
        return np.zeros(image_size, dtype=np.uint8)
    up = F.interpolate(walked[None], scale_factor=upsample, mode="bilinear", align_corners=False)[0, :, :height, :width]
    if background == "plane":
        up = up / (up.max() + 1e-5)
        scores = torch.cat([torch.full((1, height, width), threshold, dtype=up.dtype, device=up.device), up])
    else:
        if up.shape[0] != len(class_ids) + 1:
            raise ValueError(f"a walked background needs {len(class_ids) + 1} maps, got {up.shape[0]}")
        scores = up / (up.flatten(1).amax(dim=1)[:, None, None] + 1e-5)
        scores[0] *= bg_weight
    lookup = np.concatenate([[0], class_ids]).astype(np.uint8)
    return lookup[scores.argmax(dim=0).cpu().numpy()]
