"""Step 2: pair offsets, IRNet losses, IR labels, frozen backbone, sparse random walk."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.affinity import affinity_loss, displacement_loss, half_plane_offsets, pair_affinities, pair_masks, path_points
from wsss.config import CrfParams
from wsss.errors import ConfigError
from wsss.ir_labels import IrInput, combine, ir_labels_many, seed_maps
from wsss.models.classifier import build_classifier
from wsss.models.irnet import IRNet, classifier_stages
from wsss.person import person_floor
from wsss.random_walk import floor_background, propagate, propagate_many, pseudo_mask, walk_seeds
from wsss.uncertain import uncertain_pixels
from wsss.stages.ir_labels import confident_ids


@pytest.mark.parametrize(("radius", "count"), [(10, 152), (5, 34)])
def test_offset_counts(radius, count):
    offsets = half_plane_offsets(radius)
    assert len(offsets) == count
    assert len(set(offsets)) == count
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in offsets)  # one of each symmetric couple
    assert all(dy * dy + dx * dx < radius * radius for dy, dx in offsets)


def test_paths_join_both_ends_within_distance_one():
    for offset in half_plane_offsets(5):
        points = path_points(offset)
        assert (0, 0) in points and offset in points
        dy, dx = offset
        for py, px in points:
            assert abs(py * dx - px * dy) / math.hypot(dy, dx) < 1
    assert path_points((0, 3)) == ((0, 0), (0, 1), (0, 2), (0, 3))


def test_affinity_is_one_minus_the_strongest_boundary_on_the_path():
    boundary = torch.zeros(1, 1, 5, 5)
    boundary[0, 0, 2, 2] = 0.9  # a boundary pixel in the middle
    affinities = pair_affinities(boundary, ((0, 2), (1, 0)))
    assert affinities[0, 0, 2, 1] == pytest.approx(0.1)  # (2,1)->(2,3): the path crosses it
    assert affinities[0, 0, 2, 0] == pytest.approx(0.1)  # (2,0)->(2,2) ends on it
    assert affinities[0, 0, 0, 0] == pytest.approx(1.0)  # (0,0)->(0,2): far from it
    assert affinities[0, 0, 4, 1] == pytest.approx(1.0)  # (4,1)->(4,3): passes two rows below
    assert affinities[0, 1, 1, 2] == pytest.approx(0.1)  # (1,2)->(2,2) vertical


def test_pair_types_and_each_loss_term_on_a_hand_made_label_map():
    labels = torch.tensor([[[0, 0, 1, 1, 255]]])  # one row: bg bg fg fg unsure
    offsets = ((0, 1),)
    masks = pair_masks(labels, offsets)
    assert masks.positive_bg[0, 0, 0].tolist() == [True, False, False, False, False]
    assert masks.positive_fg[0, 0, 0].tolist() == [False, False, True, False, False]
    assert masks.negative[0, 0, 0].tolist() == [False, True, False, False, False]  # 255 pairs are never used

    affinities = torch.tensor([[[[0.8, 0.3, 0.6, 0.5, 0.5]]]])
    losses = affinity_loss(affinities, masks)
    assert losses["pos_bg"].item() == pytest.approx(-math.log(0.8 + 1e-5))
    assert losses["pos_fg"].item() == pytest.approx(-math.log(0.6 + 1e-5))
    assert losses["neg"].item() == pytest.approx(-math.log(1 + 1e-5 - 0.3))
    expected = ((losses["pos_bg"] + losses["pos_fg"]) / 2 + losses["neg"]) / 2
    assert losses["affinity"].item() == pytest.approx(expected.item())

    displacement = torch.zeros(1, 2, 1, 5)
    displacement[0, 1, 0, 2] = 0.5  # pixel 2 points 0.5 right; its fg partner (pixel 3) points nowhere
    dp = displacement_loss(displacement, masks, offsets)
    # fg pair (2 -> 3): |D_2 - D_3 - (0, 1)|_1 = |0 - 0 - 0| + |0.5 - 0 - 1| = 0.5; bg pair (0 -> 1): 0
    assert dp["dp_fg"].item() == pytest.approx(0.5)
    assert dp["dp_bg"].item() == pytest.approx(0.0)
    assert dp["displacement"].item() == pytest.approx(0.25)


def test_ir_label_logic_on_a_toy_cam():
    cams = np.zeros((1, 8, 8), dtype=np.float32)
    cams[0, 2:6, 2:6] = 0.9  # confident core
    cams[0, 1, 1:7] = 0.2  # weak rim: above conf_bg, below conf_fg
    foreground, background = seed_maps(cams, np.array([4]), conf_fg=0.3, conf_bg=0.05)
    labels = combine(foreground, background)
    assert (labels[2:6, 2:6] == 4).all()  # fg
    assert (labels[1, 1:7] == 255).all()  # unsure: fg map says bg, bg map says object
    assert labels[7, 7] == 0 and labels[0, 0] == 0  # both say background
    image = np.full((8, 8, 3), 20, dtype=np.uint8)
    image[2:6, 2:6] = 200  # the object the CAM found
    refined = ir_labels_many([IrInput("toy", image, cams, np.array([4]))], 0.3, 0.05, CrfParams(workers=1))["toy"]
    assert set(np.unique(refined)) <= {0, 4, 255} and (refined[3:5, 3:5] == 4).all()


def test_a_cutoff_that_keeps_nothing_names_the_parameter():
    index = {"images": {"train": [{"id": "a", "confidence": 0.5}, {"id": "b", "confidence": 0.7}]}}
    assert confident_ids(index, 0.6) == ["b"]
    with pytest.raises(ConfigError, match=r"irnet.confidence_cutoff: 0.9 keeps no training image \(the highest confidence is 0.700\)"):
        confident_ids(index, 0.9)


def test_frozen_backbone_gets_no_update_and_stays_in_eval_mode():
    torch.manual_seed(0)
    net = IRNet(classifier_stages(build_classifier("small_cnn", 3, 1)))
    net.train()
    assert not net.backbone.training
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    head_before = net.boundary_head.weight.clone()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for _ in range(2):
        boundary, displacement = net(torch.randn(4, 3, 32, 32))
        assert boundary.shape == (4, 1, 8, 8) and displacement.shape == (4, 2, 8, 8)
        loss = boundary.sigmoid().mean() + displacement.abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert not torch.equal(head_before, net.boundary_head.weight)
    assert all(not p.requires_grad for p in net.backbone.parameters())


def dense_reference_walk(cams: np.ndarray, boundary: np.ndarray, radius: int, beta: float, steps: int) -> np.ndarray:
    """Written independently of wsss.random_walk: every pixel pair, explicit distances and paths."""
    height, width = boundary.shape
    size = height * width
    affinity = np.eye(size)
    for i in range(size):
        yi, xi = divmod(i, width)
        for j in range(size):
            yj, xj = divmod(j, width)
            dy, dx = yj - yi, xj - xi
            if i == j or dy * dy + dx * dx >= radius * radius or abs(dy) >= radius or abs(dx) >= radius:
                continue
            a, b = (i, j) if (dy > 0 or (dy == 0 and dx > 0)) else (j, i)  # walk the path from the half-plane end
            ya, xa = divmod(a, width)
            yb, xb = divmod(b, width)
            ey, ex = yb - ya, xb - xa
            strongest = 0.0
            for py in range(min(0, ey) - 1, max(0, ey) + 2):
                for px in range(min(0, ex) - 1, max(0, ex) + 2):
                    along, cross = py * ey + px * ex, py * ex - px * ey
                    inside = 0 <= ya + py < height and 0 <= xa + px < width
                    if 0 <= along <= ey * ey + ex * ex and cross * cross < ey * ey + ex * ex and inside:
                        strongest = max(strongest, boundary[ya + py, xa + px])
            affinity[i, j] = (1 - strongest) ** beta
    transition = affinity / affinity.sum(axis=0, keepdims=True)
    state = (cams * (1 - boundary)[None]).reshape(len(cams), -1)
    return (state @ np.linalg.matrix_power(transition, steps)).reshape(cams.shape)


def test_sparse_walk_equals_the_dense_reference():
    rng = np.random.default_rng(0)
    boundary = rng.random((9, 7)) * 0.6
    cams = rng.random((3, 9, 7))
    expected = dense_reference_walk(cams, boundary, radius=3, beta=4.0, steps=2**5)
    walked = propagate(torch.from_numpy(cams), torch.from_numpy(boundary), radius=3, beta=4.0, exp_times=5).numpy()
    assert np.abs(walked - expected).max() < 1e-5

    together = propagate_many([torch.from_numpy(cams), torch.from_numpy(cams[:1] * 2), torch.zeros(0, 9, 7, dtype=torch.float64)],
                               [torch.from_numpy(boundary)] * 3, 3, 4.0, 5)
    assert np.abs(together[0].numpy() - expected).max() < 1e-5
    assert np.abs(together[1].numpy() - 2 * expected[:1]).max() < 1e-5
    assert together[2].shape == (0, 9, 7)


def test_torch_sparse_walk_equals_the_scipy_walk():
    """The device path (torch sparse CSR; on a GPU it runs there) gives scipy's maps on the CPU, in the
    pipeline's float32, for a batch of images of different sizes and class counts."""
    rng = np.random.default_rng(1)
    sizes = [(24, 17), (9, 30), (16, 16)]
    boundaries = [torch.from_numpy(rng.random(size).astype(np.float32) * 0.8) for size in sizes]
    cams = [torch.from_numpy(rng.random((count, *size)).astype(np.float32)) for count, size in zip((3, 1, 0), sizes)]
    by_scipy = propagate_many(cams, boundaries, 5, 10.0, 8, backend="scipy")
    by_torch = propagate_many(cams, boundaries, 5, 10.0, 8, backend="torch")
    for scipy_maps, torch_maps, cam in zip(by_scipy, by_torch, cams):
        assert torch_maps.shape == cam.shape and torch_maps.dtype == torch.float32
        assert scipy_maps.numel() == 0 or torch.abs(scipy_maps - torch_maps).max() < 1e-6
    assert by_scipy[0].abs().max() > 0.01  # a walk that kept its mass, not two zero maps
    with pytest.raises(ValueError, match="backend"):
        propagate_many(cams, boundaries, 5, 10.0, 8, backend="cupy")


def test_pseudo_mask_background_plane_and_class_ids():
    walked = torch.zeros(2, 3, 3)
    walked[0, 0, 0] = 1.0
    walked[1, 2, 2] = 0.5
    mask = pseudo_mask(walked, np.array([3, 6]), (12, 12), threshold=0.3)
    assert mask.shape == (12, 12) and mask[0, 0] == 3 and mask[11, 11] == 6 and mask[6, 0] == 0
    assert pseudo_mask(torch.zeros(0, 3, 3), np.array([], dtype=int), (12, 12), 0.3).max() == 0


def test_pseudo_mask_from_a_walk_on_the_enlarged_image():
    walked = torch.zeros(1, 6, 6)  # a 6x6 grid of a 12x12 image enlarged x2 (stride 4 -> 2 px)
    walked[0, :3, :3] = 1.0
    mask = pseudo_mask(walked, np.array([5]), (12, 12), threshold=0.5, upsample=2)
    assert mask.shape == (12, 12) and mask[0, 0] == 5 and mask[5, 5] == 5 and mask[11, 11] == 0


def test_walk_seeds_put_a_background_seed_first_only_for_a_walked_background():
    cams = torch.zeros(2, 4, 4)
    cams[0, 0, 0], cams[0, 1, 1] = 4.0, 2.0  # class maps of different strength
    cams[1, 3, 3] = 0.5
    assert walk_seeds(cams, "plane") is cams
    seeds = walk_seeds(cams, "walk")
    assert seeds.shape == (3, 4, 4) and torch.equal(seeds[1:], cams)
    # 1 - max over the classes of each map divided by its own max
    assert seeds[0, 0, 0] == 0.0 and seeds[0, 1, 1] == 0.5 and seeds[0, 3, 3] == 0.0 and seeds[0, 2, 0] == 1.0
    assert walk_seeds(torch.zeros(0, 4, 4), "walk").shape == (0, 4, 4)


def test_pseudo_mask_with_a_walked_background_normalises_each_map_and_weighs_the_background():
    walked = torch.zeros(3, 3, 3)  # background, class 2, class 7 on a 3x3 grid of a 12x12 image
    walked[0] = 0.5
    walked[0, 1, 1] = 1.0
    walked[1, 0, 0] = 10.0  # a strong class
    walked[2, 2, 2] = 0.1  # a weak class: its own max makes it count as much as the strong one
    mask = pseudo_mask(walked, np.array([2, 7]), (12, 12), threshold=0.9, background="walk", bg_weight=1.0)
    assert mask[0, 0] == 2 and mask[11, 11] == 7 and mask[6, 6] == 0
    # a heavier background takes the weak pixels where the class is only as strong as 1.5x the background
    walked[0, 2, 2] = 0.7
    assert pseudo_mask(walked, np.array([2, 7]), (12, 12), 0.9, background="walk", bg_weight=1.0)[11, 11] == 7
    assert pseudo_mask(walked, np.array([2, 7]), (12, 12), 0.9, background="walk", bg_weight=1.5)[11, 11] == 0
    with pytest.raises(ValueError, match="3 maps"):
        pseudo_mask(walked[1:], np.array([2, 7]), (12, 12), 0.9, background="walk")


def test_person_floor_is_the_weighted_max_normalised_person_cam():
    person = np.array([[0.0, 2.0], [4.0, 1.0]])
    assert person_floor(person, 0.5).tolist() == [[0.0, 0.25], [0.5, 0.125]]
    assert person_floor(np.zeros((2, 2)), 0.5).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_floor_background_raises_the_background_seed_only():
    seeds = torch.tensor([[[0.2, 0.9]], [[0.8, 0.1]]])  # background seed, one class; a 1x2 grid
    floored = floor_background(seeds, torch.tensor([[0.5, 0.5]]))
    assert floored[0, 0].tolist() == pytest.approx([0.5, 0.9]) and torch.equal(floored[1], seeds[1])
    assert seeds[0, 0].tolist() == pytest.approx([0.2, 0.9])  # the input is left alone
    with pytest.raises(ValueError, match="differ in size"):
        floor_background(seeds, torch.zeros(2, 2))


def test_a_floored_background_stops_a_class_walking_over_the_person():
    """An object's CAM spills over the person next to it (no boundary between them, as when IRNet misses one):
    without the floor the walk gives the object the spill's edge, with the person's floor it stays background."""
    cams = torch.zeros(1, 4, 10)
    cams[0, :, :3] = 1.0  # the object: columns 0-2
    cams[0, :, 3:6] = 0.8  # its CAM spilling over the person (columns 3-9)
    person = torch.zeros(4, 10)
    person[:, 3:] = 1.0

    def labels(seeds):
        walked = propagate(seeds, torch.zeros(4, 10), radius=2, beta=1.0, exp_times=1)
        return pseudo_mask(walked, np.array([3]), (4, 10), threshold=0.0, upsample=1, background="walk", bg_weight=1.6)

    plain = labels(walk_seeds(cams, "walk"))
    floored = labels(floor_background(walk_seeds(cams, "walk"), 0.5 * person))
    assert (plain[:, :5] == 3).all() and (plain[:, 5:] == 0).all()
    assert (floored[:, :4] == 3).all() and (floored[:, 4:] == 0).all()  # column 4, inside the person, is background now


def test_uncertain_pixels_are_where_walk_and_crf_disagree_unless_the_person_merge_changed_them():
    walked = np.array([[0, 1, 1], [0, 2, 0]], dtype=np.uint8)
    refined = np.array([[0, 1, 0], [2, 2, 0]], dtype=np.uint8)  # the CRF moved (0, 2) and (1, 0)
    final = np.array([[0, 1, 0], [7, 2, 7]], dtype=np.uint8)  # the merge made (1, 0) and (1, 2) person
    assert uncertain_pixels(walked, refined, final).tolist() == [[False, False, True], [False, False, False]]
    assert not uncertain_pixels(walked, walked, walked).any()
    with pytest.raises(ValueError, match="differ in size"):
        uncertain_pixels(walked, refined, final[:, :2])
