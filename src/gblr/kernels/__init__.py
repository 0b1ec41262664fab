"""Inference kernels for frozen GBLR layers: the torch reference (a loop over blocks, in
:class:`gblr.FrozenGBLRLinear`) and the tiled CPU path (:mod:`gblr.kernels.tiled`)."""
