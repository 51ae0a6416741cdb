"""The embedded default dataset: Fashion-MNIST objects pasted on real photo crops.

Each image is a crop of a scikit-image photo, blurred and darkened so that a small CNN trained
from scratch can learn the objects (sharp cluttered backgrounds with strong tints did not learn,
see the environment notes), with 1..k coloured Fashion-MNIST objects on top. The mask is exact:
an object's pixels are those whose Fashion-MNIST value is > 0 (after resizing, > 0.5 of the
resized binary mask). The class ``person_class`` plays LID's 'person': it is drawn underneath the
other objects, larger, in ``person_frequency`` of the images, so the others overlap it; the
``head_classes`` are drawn ``head_weight`` times as often as the tail classes.

Every image has its own random stream ``(seed, subset, index)``: the same seed gives the same
bytes, and one image does not depend on how many come before it.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from wsss.config import FASHION_MNIST_CLASSES, EmbeddedParams
from wsss.data.fashion_mnist import ObjectPool

_SUBSET_STREAM = {"train": 1, "heldout": 2}
_MAX_PLACEMENT_TRIES = 25


@dataclass(frozen=True)
class Composite:
    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) uint8 class ids, 0 = background
    instances: np.ndarray  # (S, S) int32: 0 = background, k = the k-th placed object
    objects: list[dict]  # provenance: class, Fashion-MNIST split and index, side, position, area


@cache
def load_background(name: str) -> np.ndarray:
    """A scikit-image sample photo as float32 RGB in [0, 1] (these ship inside its wheel)."""
    import skimage.data

    photo = getattr(skimage.data, name)()
    if isinstance(photo, tuple):  # stereo_motorcycle returns (left, right, disparity)
        photo = photo[0]
    photo = np.asarray(photo)
    if photo.dtype == bool:
        photo = photo.astype(np.uint8) * 255
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    photo = photo[..., :3].astype(np.float32)
    return photo / 255.0 if photo.max() > 1.0 else photo


def background_crop(rng: np.random.Generator, photo: np.ndarray, size: int, blur: float, brightness: float) -> np.ndarray:
    """A random square crop (30-80% of the photo's short side), resized, blurred and darkened."""
    height, width = photo.shape[:2]
    side = int(rng.uniform(0.3, 0.8) * min(height, width))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = photo[top : top + side, left : left + side]
    resized = np.asarray(
        Image.fromarray((crop * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR),
        dtype=np.float32,
    ) / 255.0
    if blur > 0:
        resized = gaussian_filter(resized, sigma=(blur, blur, 0))
    return resized * brightness


def render_object(rng: np.random.Generator, grey: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a 28x28 object to ``side`` pixels and colour it; return (RGB float, bool mask)."""
    grey_image = Image.fromarray(grey)
    intensity = np.asarray(grey_image.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    binary = Image.fromarray(((grey > 0) * 255).astype(np.uint8))
    mask = np.asarray(binary.resize((side, side), Image.Resampling.BILINEAR)) > 127
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.4, 1.0), rng.uniform(0.75, 1.0)
    colour = np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)
    rgb = colour[None, None, :] * (0.35 + 0.65 * intensity[..., None])
    return rgb, mask


def _place(
    rng: np.random.Generator,
    canvas: np.ndarray,
    instances: np.ndarray,
    areas: list[int],
    rgb: np.ndarray,
    mask: np.ndarray,
    min_visible: float,
) -> tuple[int, int] | None:
    """Paste an object on top at a random position that keeps every earlier object
    at least ``min_visible`` visible; return its position, or None when no try succeeds."""
    size = canvas.shape[0]
    side = mask.shape[0]
    new_id = len(areas) + 1
    for _ in range(_MAX_PLACEMENT_TRIES):
        top = int(rng.integers(0, size - side + 1))
        left = int(rng.integers(0, size - side + 1))
        trial = instances.copy()
        trial[top : top + side, left : left + side][mask] = new_id
        visible = np.bincount(trial.ravel(), minlength=new_id + 1)
        if all(visible[i + 1] >= min_visible * area for i, area in enumerate(areas)):
            instances[:] = trial
            canvas[top : top + side, left : left + side][mask] = rgb[mask]
            areas.append(int(mask.sum()))
            return top, left
    return None


def compose(
    rng: np.random.Generator,
    params: EmbeddedParams,
    pool: ObjectPool,
    pool_split: str,
    person_class: str,
    class_ids: dict[str, int],
) -> Composite:
    """Draw one image: background, optional person underneath, then the other objects."""
    size = params.image_size
    background_name = params.backgrounds[int(rng.integers(len(params.backgrounds)))]
    canvas = background_crop(rng, load_background(background_name), size, params.background_blur, params.background_brightness)
    instances = np.zeros((size, size), dtype=np.int32)
    areas: list[int] = []
    placed: list[dict] = []

    others = [name for name in params.classes if name != person_class]
    weights = np.array([params.head_weight if name in params.head_classes else 1.0 for name in others])
    count = int(rng.integers(params.objects_per_image[0], params.objects_per_image[1] + 1))
    wanted = []
    if rng.uniform() < params.person_frequency:
        wanted.append((person_class, params.person_scale))
    wanted += [(others[i], params.object_scale) for i in rng.choice(len(others), size=count, p=weights / weights.sum())]

    for name, (low, high) in wanted:
        candidates = pool.of_class(FASHION_MNIST_CLASSES.index(name))
        choice = int(candidates[rng.integers(len(candidates))])
        side = max(4, int(round(rng.uniform(low, high) * size)))
        rgb, mask = render_object(rng, pool.images[choice], side)
        if rng.uniform() < 0.5:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        position = _place(rng, canvas, instances, areas, rgb, mask, params.min_visible)
        if position is not None:
            placed.append(
                {"class": name, "fm_split": pool_split, "fm_index": int(pool.indices[choice]), "side": side,
                 "top": position[0], "left": position[1], "area": areas[-1]}
            )

    class_of_instance = np.array([0] + [class_ids[obj["class"]] for obj in placed], dtype=np.uint8)
    label_mask = class_of_instance[instances]
    image = np.clip(np.round(canvas * 255.0), 0, 255).astype(np.uint8)
    return Composite(image=image, mask=label_mask, instances=instances, objects=placed)


def generate(
    params: EmbeddedParams,
    pools: dict[str, ObjectPool],
    subset: str,
    count: int,
    seed: int,
    person_class: str,
) -> Iterator[Composite]:
    """Yield ``count`` composites of ``subset`` ("train" uses Fashion-MNIST train objects,
    "heldout" its test objects)."""
    pool_split = "train" if subset == "train" else "test"
    class_ids = {name: index + 1 for index, name in enumerate(params.classes)}
    for index in range(count):
        rng = np.random.default_rng([seed, _SUBSET_STREAM[subset], index])
        yield compose(rng, params, pools[pool_split], pool_split, person_class, class_ids)
