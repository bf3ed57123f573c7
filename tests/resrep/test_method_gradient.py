"""The compactor gradient rule G_j = m_j·∂L/∂Q_j + λ·Q_j/‖Q_j‖ and its momentum dynamics."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from apps.resrep.method import compactor_gradient


@given(
    channels=st.integers(1, 8),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
    lasso=st.floats(0, 1),
    data=st.data(),
)
def test_rule_row_by_row(channels, groups, seed, lasso, data):
    channels *= groups
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, channels // groups, 1, 1, generator=gen, dtype=torch.float64)
    zero_rows = data.draw(st.lists(st.integers(0, channels - 1), max_size=channels))
    weight[zero_rows] = 0
    grad = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=channels, max_size=channels)))
    out = compactor_gradient(weight, grad, keep, lasso)
    assert out.shape == weight.shape and out.dtype == weight.dtype
    for j in range(channels):
        row, norm = weight[j].flatten(), weight[j].norm()
        expected = grad[j].flatten() if keep[j] else torch.zeros_like(row)
        if norm > 0:
            expected = expected + lasso * row / norm
        assert torch.allclose(out[j].flatten(), expected, rtol=1e-12, atol=1e-15)
    assert torch.isfinite(out).all()
    none = compactor_gradient(weight, None, keep, lasso)  # no task gradient at all
    assert torch.allclose(none, compactor_gradient(weight, torch.zeros_like(weight), keep, lasso))


def test_masked_row_decays_at_the_momentum_rate():
    """A masked row feels only λ·Q/‖Q‖: with momentum μ its velocity after t steps is
    λ·(1−μ^t)/(1−μ) along the row, so its norm drops by lr·Σ_t that, with its direction unchanged."""
    lr, lam, mu, steps = 0.01, 1e-2, 0.99, 50
    q = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64).reshape(1, 2, 1, 1))
    opt = torch.optim.SGD([q], lr=lr, momentum=mu)
    for _ in range(steps):
        q.grad = torch.randn_like(q)  # a task gradient, reset by the mask
        q.grad = compactor_gradient(q, q.grad, torch.tensor([False]), lam)
        opt.step()
    travelled = lr * lam * sum((1 - mu**t) / (1 - mu) for t in range(1, steps + 1))
    assert abs(float(q.detach().norm()) - (5.0 - travelled)) < 1e-12
    assert torch.allclose(
        q.detach().flatten() / q.detach().norm(), torch.tensor([0.6, 0.8], dtype=torch.float64), atol=1e-14
    )
