"""Small models and shortcuts shared by the tests of convert_ and its parts (targets, allocation,
calibration, save / load).

Most tests use ``method="svd"`` so that their cost does not grow with ``gblr.decompose``'s search.
"""

from __future__ import annotations

import pytest
from torch import nn

import gblr
from gblr.targets import target_names

SVD = {"method": "svd"}
UNIFORM_SVD = {"method": "svd", "allocation": "uniform"}


def quiet(model, config, calibration=None):
    return gblr.convert_(model, config, calibration, progress=False, verbose=False)


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.xquery = nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return self.ffn(self.query(x) + self.xquery(x))


class Net(nn.Module):
    def __init__(self, width=16, classes=10):
        super().__init__()
        self.layers = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def get_output_embeddings(self):
        return self.head


def names(model, **config):
    """The names of the targets ``GBLRConfig(**config)`` selects in ``model``."""
    return target_names(model, gblr.GBLRConfig(**config))


BLOCK = ["query", "xquery", "ffn.0", "ffn.2"]


def tiny_bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
