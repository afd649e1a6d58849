"""Property tests: every output shape matches output_shape() and the size formula
H' = 1 + (H + pad_top + pad_bottom − KH) // stride."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import classic_cnn as cc
from classic_cnn import ops


@st.composite
def conv_case(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = draw(st.integers(1, 4))
    padding = draw(st.sampled_from(["valid", "same", 0, 1, 2]))
    pad = 0 if padding in ("valid", "same") else padding
    h = draw(st.integers(max(kh - 2 * pad, 1), 14))
    w = draw(st.integers(max(kw - 2 * pad, 1), 14))
    c = draw(st.integers(1, 4))
    return (h, w, c), dict(
        filters=draw(st.integers(1, 4)), kernel_size=(kh, kw), stride=stride, padding=padding
    )


@settings(max_examples=60, deadline=None)
@given(conv_case())
def test_conv_output_shape_matches_formula(case):
    (h, w, c), kwargs = case
    layer = cc.Conv2D(**kwargs)
    y = layer.forward(np.zeros((2, h, w, c)))
    assert y.shape[1:] == layer.output_shape((h, w, c))
    kh, kw = kwargs["kernel_size"]
    stride = kwargs["stride"]
    (pt, pb), (pl, pr) = layer.pads((h, w))
    assert y.shape[1] == 1 + (h + pt + pb - kh) // stride
    assert y.shape[2] == 1 + (w + pl + pr - kw) // stride
    assert y.shape[3] == kwargs["filters"]
    if kwargs["padding"] == "same":
        # Keras's rule: ceil(H / stride), the odd extra row/column at the bottom/right
        assert y.shape[1:3] == (math.ceil(h / stride), math.ceil(w / stride))
        assert 0 <= pb - pt <= 1 and 0 <= pr - pl <= 1
    elif isinstance(kwargs["padding"], int):
        assert pt == pb == pl == pr == kwargs["padding"]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(4, 14),
    st.integers(4, 14),
    st.sampled_from([cc.MaxPool2D, cc.AvgPool2D]),
)
def test_pool_output_shape_matches_formula(ph, pw, stride, h, w, cls):
    layer = cls((ph, pw), stride)
    y = layer.forward(np.random.default_rng(0).normal(size=(1, h, w, 2)))
    assert y.shape[1:] == layer.output_shape((h, w, 2))
    assert y.shape[1:3] == (1 + (h - ph) // stride, 1 + (w - pw) // stride)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 7), st.integers(1, 4))
def test_same_padding_gives_ceil_size(size, kernel, stride):
    lo, hi = ops.same_padding(size, kernel, stride)
    assert ops.output_size(size, kernel, stride, lo, hi) == math.ceil(size / stride)
    assert hi - lo in (0, 1)
