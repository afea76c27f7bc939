"""Shared checks of the ensemble-family ops tests (replug, lsr, mixture)."""
from __future__ import annotations

import torch


def compiled_matches_eager(loss_fn, x, params):
    """fullgraph torch.compile (aot_eager: the custom op's fake implementation and the autograd Function are
    traced) gives the eager loss and parameter gradients."""
    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for i, (g, e) in enumerate(zip(grads, eager_grads)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"compiled grad {i}: {m}")
