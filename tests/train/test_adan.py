"""Adan against its update equations, written out in float64 one parameter at a time."""
import copy

import pytest
import torch

from masked_dit.train.optim import Adan


def reference_adan(p0, grads, lr, betas, eps, wd, no_prox):
    b1, b2, b3 = betas
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    n = torch.zeros_like(p)
    prev = grads[0]
    out = []
    for k, g in enumerate(grads, start=1):
        diff = g - prev
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * diff
        n = b3 * n + (1 - b3) * (g + b2 * diff) ** 2
        u = (m / (1 - b1 ** k) + b2 * v / (1 - b2 ** k)) / ((n / (1 - b3 ** k)).sqrt() + eps)
        if no_prox:
            p = p * (1 - lr * wd) - lr * u
        else:
            p = (p - lr * u) / (1 + lr * wd)
        prev = g
        out.append(p.clone())
    return out


@pytest.mark.parametrize("wd, no_prox", [(0.0, False), (0.02, False), (0.02, True)])
def test_adan_matches_update_equations(wd, no_prox):
    torch.manual_seed(0)
    p0 = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) for _ in range(6)]
    betas, lr, eps = (0.98, 0.92, 0.99), 0.01, 1e-8
    ref = reference_adan(p0, grads, lr, betas, eps, wd, no_prox)
    param = torch.nn.Parameter(p0.clone())
    other = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))  # second tensor: exercises the foreach path
    opt = Adan([param, other], lr=lr, betas=betas, eps=eps, weight_decay=wd, no_prox=no_prox)
    for k, g in enumerate(grads):
        param.grad = g.clone()
        other.grad = torch.full_like(other, 0.5)
        opt.step()
        torch.testing.assert_close(param.detach(), ref[k], rtol=1e-12, atol=1e-12)
    assert int(opt.state[param]["step"]) == len(grads)


def test_adan_first_step_is_normalised_gradient():
    # Step 1: diff = 0, so u = g / (|g| + eps): every coordinate moves by ~lr.
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p.grad = torch.tensor([2.0, -3.0, 0.5, -0.1], dtype=torch.float64)
    Adan([p], lr=0.1).step()
    torch.testing.assert_close(p.detach(), -0.1 * torch.sign(p.grad), rtol=1e-6, atol=1e-7)


def test_adan_state_dict_roundtrip():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(3))
    opt = Adan([a], lr=0.1)
    for _ in range(2):
        a.grad = torch.randn(3)
        opt.step()
    b = torch.nn.Parameter(a.detach().clone())
    opt2 = Adan([b], lr=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # (a plain load aliases the tensors)
    g = torch.randn(3)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(a, b)


def test_adan_rejects_bad_betas():
    with pytest.raises(ValueError, match="three values"):
        Adan([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 0.99))
