"""Drawing primitives: colour maps are matplotlib's own tables, not fits."""

from __future__ import annotations

import matplotlib
import numpy as np
import torch

from pl_pmse.panels.render import diverging, magma


def test_colour_maps_are_matplotlibs_tables() -> None:
    levels = np.linspace(0, 1, 256)
    expected = matplotlib.colormaps["magma"](levels, bytes=True)[:, :3]  # what matplotlib itself draws in 8 bits
    assert np.array_equal(magma(levels), expected)
    table = np.asarray(matplotlib.colormaps["magma"].colors) * 255  # the published 256-colour table
    assert np.abs(magma(levels) - table).max() < 1
    assert np.array_equal(magma(np.array([np.nan, -1.0, 2.0])), expected[[0, 0, 255]])
    coolwarm = matplotlib.colormaps["coolwarm"](levels, bytes=True)[:, :3]
    assert np.array_equal(diverging(np.array([-3.0, 0.0, 3.0]), 3.0), coolwarm[[0, 128, 255]])


def test_rgba_is_shown_in_colour_over_a_checkerboard() -> None:
    """Before: 4 channels were drawn as channel 0 in grey."""
    from pl_pmse.panels.render import to_rgb

    red = torch.zeros(4, 16, 16)
    red[0], red[3] = 1.0, 1.0  # opaque red
    assert (to_rgb(red, (0.0, 1.0)) == np.array([255, 0, 0], dtype=np.uint8)).all()
    red[3, :, 8:] = 0.0  # the right half transparent: the checkerboard shows through, grey
    picture = to_rgb(red, (0.0, 1.0))
    right = picture[:, 8:].reshape(-1, 3)
    assert (right[:, 0] == right[:, 1]).all() and {204, 153} == set(right[:, 0].tolist())
    assert (picture[:, :8] == np.array([255, 0, 0], dtype=np.uint8)).all()
