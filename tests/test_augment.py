"""Augmentation of uint8 training batches: shifts, flips and random erasing."""

from __future__ import annotations

import numpy as np
import pytest

from classic_cnn.data.batches import (
    ERASE_RATIO,
    ERASE_SCALE,
    Augment,
    augment_batch,
    erase_boxes,
)


def test_erase_boxes_lie_inside_the_image_with_the_stated_area_and_aspect():
    h, w = 28, 28
    boxes = erase_boxes(4000, h, w, np.random.default_rng(0), p=1.0)
    top, left, eh, ew = boxes.T
    assert (eh > 0).all() and (ew > 0).all()  # 28×28 always has room within 10 tries
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + eh <= h).all() and (left + ew <= w).all()
    area = eh * ew / (h * w)
    # rounding each side to whole pixels moves the area a little beyond the drawn range
    assert area.min() >= ERASE_SCALE[0] * 0.5 and area.max() <= ERASE_SCALE[1] * 1.3
    aspect = eh / ew
    assert aspect.min() >= ERASE_RATIO[0] * 0.6 and aspect.max() <= ERASE_RATIO[1] / 0.6
    # the areas spread over the range, not one size; tall and wide boxes both occur
    assert area.mean() == pytest.approx(np.mean(ERASE_SCALE), abs=0.03)
    assert (aspect > 1.5).mean() > 0.2 and (aspect < 1 / 1.5).mean() > 0.2
    # every top-left corner that fits can be drawn: the boxes touch all four edges
    assert (top == 0).any() and (left == 0).any()
    assert (top + eh == h).any() and (left + ew == w).any()


def test_erase_boxes_erase_the_asked_share_of_images():
    boxes = erase_boxes(20000, 28, 28, np.random.default_rng(1), p=0.3)
    erased = boxes[:, 2] > 0
    assert erased.mean() == pytest.approx(0.3, abs=0.015)  # 4.6 binomial standard deviations
    assert (boxes[~erased] == 0).all()
    assert not erase_boxes(100, 28, 28, np.random.default_rng(1), p=0.0).any()


def test_erasing_fills_one_box_with_random_values_and_leaves_the_rest():
    n, h, w, c = 300, 20, 24, 3
    images = np.full((n, h, w, c), 7, dtype=np.uint8)
    out = augment_batch(images, np.random.default_rng(2), erase=1.0)
    boxes = erase_boxes(n, h, w, np.random.default_rng(2), p=1.0)  # the same draws
    inside = np.zeros(images.shape, dtype=bool)
    for i, (t, left, eh, ew) in enumerate(boxes):
        inside[i, t : t + eh, left : left + ew] = True
    assert (out[~inside] == 7).all()
    noise = out[inside]
    assert (noise != 7).mean() > 0.98  # random values, 1 in 256 equals 7 by chance
    assert noise.min() == 0 and noise.max() == 255
    assert noise.mean() == pytest.approx(127.5, abs=2)
    assert (images == 7).all()  # the input is untouched


def test_no_erasing_draws_nothing_more_from_the_stream():
    images = np.random.default_rng(3).integers(0, 256, (16, 10, 10, 1), dtype=np.uint8)
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    out_a = augment_batch(images, a, shift=2, flip=True)
    out_b = augment_batch(images, b, shift=2, flip=True, erase=0.0)
    assert np.array_equal(out_a, out_b)
    assert a.random() == b.random()


def test_augment_counts_erasing_alone_as_augmentation_and_records_it():
    assert not Augment()
    assert Augment(erase=0.5)
    assert Augment(shift=2, erase=0.5).to_dict() == {"shift": 2, "flip": False, "erase": 0.5}


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_an_erasing_probability_outside_0_to_1_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"erase must be a probability in \[0, 1\]"):
        Augment(erase=bad)
