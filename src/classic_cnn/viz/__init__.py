"""Pictures of what a network does, as pure functions on arrays.

:mod:`~classic_cnn.viz.arrays` turns weights, feature maps and results into the arrays a picture
shows (NumPy only, and what the tests check); :mod:`~classic_cnn.viz.plots` draws them with
matplotlib (no pyplot, no global state) and returns ``Figure`` objects;
:mod:`~classic_cnn.viz.report` puts PNGs into one self-contained HTML file. Nothing here is
called from inside a layer.
"""
