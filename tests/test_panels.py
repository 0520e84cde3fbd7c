"""Drawing primitives: colour maps are matplotlib's own tables, not fits."""

from __future__ import annotations

import matplotlib
import numpy as np

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
