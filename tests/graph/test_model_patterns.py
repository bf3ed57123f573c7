"""Patterns of real-world models (timm) that once broke the graph: token-mixing MLPs over a conv's spatial
positions, head sizes computed from a pruned tensor's shape, slices whose bounds are computed at run time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from reparam.graph import prune, trace

from .helpers import random_keep
from .nets import CachedBias


class TokenMixer(nn.Module):
    """MLP-Mixer: a Linear over the tokens (a conv's flattened spatial positions) and one over channels."""

    def __init__(self, dim: int = 8, tokens: int = 9):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.tokens, self.channels = (
            nn.Sequential(nn.Linear(tokens, 12), nn.GELU(), nn.Linear(12, tokens)),
            nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim)),
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.tokens(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.channels(x)
        return self.head(x.mean(1))


class ComputedHeads(nn.Module):
    """Attention whose head size is computed from its input's shape (``C // heads``, C read at run time)."""

    def __init__(self, dim: int = 12, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(5, dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.inp(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, -1))
        return self.head(x.mean(1))


class RunTimeSlice(nn.Module):
    """A slice whose bound is computed from a shape at run time."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head(self.b(y[:, : y.shape[1] // 2])).mean((2, 3))


@pytest.mark.parametrize(
    "cls, shape",
    [(TokenMixer, (2, 3, 6, 6)), (ComputedHeads, (2, 4, 5)), (RunTimeSlice, (2, 3, 5, 5)), (CachedBias, (2, 3, 3, 3))],
)
def test_pruned_model_runs_with_the_predicted_shapes(cls, shape):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(shape)
    graph = trace(model, x)
    keep = random_keep(graph, 0.6, np.random.default_rng(0))
    assert keep  # something is still prunable
    small = prune(model, x, keep, graph=graph)  # verifies every node's shape against the groups
    assert small(x).shape == model(x).shape
    assert small(torch.randn(3, *shape[1:])).shape[0] == 3  # batch sizes stay dynamic


def test_token_positions_are_never_channels():
    graph = trace(TokenMixer().eval(), torch.randn(2, 3, 6, 6))
    (tokens,) = [g for g in graph.groups if any(p.module == "tokens.2" for p in g.producers)]
    assert not tokens.prunable and "spatial extent" in tokens.reason
    assert any(g.prunable for g in graph.groups if any(p.module == "tokens.0" for p in g.producers))


def test_a_trace_leaves_no_proxy_in_the_model():
    """Tracing twice (or tracing, then pruning, which traces again) once failed with "Node add referenced
    nonexistent value getitem": the first trace's proxy, kept in the model's cache, was read by the second."""
    model, x = CachedBias().eval(), torch.randn(2, 3, 3, 3)
    first = trace(model, x)
    assert model.cache == {}
    second = trace(model, x)
    assert [g.size for g in first.groups] == [g.size for g in second.groups]
    small = prune(model, x, random_keep(second, 0.5, np.random.default_rng(0)), graph=second)
    assert small(x).shape == (2, 2)
    model.cache["kept"] = torch.zeros(())  # what was there before a trace stays
    trace(model, x)
    assert list(model.cache) == ["kept"]
