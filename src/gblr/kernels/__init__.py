"""Inference kernels for frozen GBLR layers: the torch reference (a loop over blocks, in
:class:`gblr.FrozenGBLRLinear`), the tiled CPU paths (:mod:`gblr.kernels.tiled`) and the Triton
kernel for CUDA (:mod:`gblr.kernels.segmented`)."""
