"""SiT ODE likelihood: exact on Gaussian data, SiT's algorithm step for step, and its error paths."""
import math

import pytest
import torch

from masked_dit.diffusion import Transport, ode_likelihood, prior_logp
from masked_dit.diffusion.transport import expand_t_like_x

S = torch.tensor([0.3, 0.7, 1.0, 1.6, 2.5], dtype=torch.float64)  # data std per dimension


def gaussian_moments(transport, x, t):
    """alpha, d alpha, sigma, d sigma at t and the marginal variance alpha^2 s^2 + sigma^2 of x_t."""
    t = expand_t_like_x(t, x)
    (a, da), (s, ds) = transport.path.alpha(t), transport.path.sigma(t)
    return a, da, s, ds, a ** 2 * S ** 2 + s ** 2


def exact_model(transport):
    """The exact network for data N(0, diag(S^2)): its output is linear in x_t with a diagonal Jacobian,
    so Hutchinson's Rademacher estimate of the divergence is exact and so is the likelihood."""
    def model(x, t):
        a, da, s, ds, var = gaussian_moments(transport, x, t)
        if transport.prediction == "velocity":
            return x * (a * da * S ** 2 + s * ds) / var
        if transport.prediction == "noise":
            return x * s / var
        return -x / var
    return model


def gaussian_logp(x, var):
    return (-0.5 * (x ** 2 / var + torch.log(2 * math.pi * var))).sum(1)


@pytest.mark.parametrize("backend", ["native", "torchdiffeq"])
@pytest.mark.parametrize("path,prediction", [("Linear", "velocity"), ("Linear", "noise"), ("GVP", "velocity"),
                                             ("GVP", "score"), ("VP", "velocity"), ("VP", "noise")])
def test_exact_on_gaussian_data(path, prediction, backend):
    if backend == "torchdiffeq":
        pytest.importorskip("torchdiffeq")
    transport = Transport(path, prediction)
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * S
    logp, z = ode_likelihood(transport, exact_model(transport), x, atol=1e-9, rtol=1e-9, backend=backend)
    t0, t1 = transport.interval(eval=True)
    var0 = gaussian_moments(transport, x, torch.full((6,), t0, dtype=torch.float64))[-1]
    var1 = gaussian_moments(transport, x, torch.full((6,), t1, dtype=torch.float64))[-1]
    # The flow carries p_t1 onto p_t0 exactly; the model's density swaps p_t0 for the N(0, I) prior.
    expected = gaussian_logp(x, var1) + prior_logp(z) - gaussian_logp(z, var0)
    assert torch.allclose(logp, expected, rtol=1e-6, atol=1e-6), (logp - expected).abs().max()
    # and z is x pushed through the exact linear flow: x * sqrt(var0 / var1) per dimension
    assert torch.allclose(z, x * (var0 / var1).sqrt(), rtol=1e-6, atol=1e-7)
    if path == "Linear" and prediction == "velocity":  # t from 1 to 0: the data's own density
        assert torch.allclose(logp, gaussian_logp(x, S ** 2), rtol=1e-6)


class CurvedNet(torch.nn.Module):
    """A small nonlinear network with a dense Jacobian (Hutchinson's estimate is then random)."""

    def __init__(self, dim):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = torch.nn.Parameter(torch.randn(dim + 1, 16, generator=g) / 2)
        self.w2 = torch.nn.Parameter(torch.randn(16, dim, generator=g) / 4)

    def forward(self, x, t):
        h = torch.cat([x.flatten(1), t[:, None].to(x.dtype)], 1)
        return (torch.tanh(h @ self.w1.to(x.dtype)) @ self.w2.to(x.dtype)).reshape(x.shape) - x


def sit_likelihood(transport, model, x, num_steps=50, atol=1e-6, rtol=1e-3):
    """SiT's sample_ode_likelihood written out: tuple state (x, logp), model time 1 - s over SiT's
    interval, a Rademacher draw from the global RNG per evaluation, torchdiffeq dopri5."""
    from torchdiffeq import odeint

    def f(s, state):
        y, _ = state
        eps = torch.randint(2, y.size(), dtype=torch.float) * 2 - 1
        t = torch.ones(y.size(0)) * (1 - s)
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            v = transport.velocity(model(y, t), y, t)
            grad = torch.autograd.grad(torch.sum(v * eps), y)[0]
        return -v.detach(), torch.sum(grad * eps, dim=tuple(range(1, y.dim())))

    t0, t1 = transport.interval(eval=True, reverse=False)
    xs, dlogp = odeint(f, (x, torch.zeros(x.size(0))), torch.linspace(t0, t1, num_steps), method="dopri5",
                       atol=[atol, atol], rtol=[rtol, rtol])
    z = xs[-1]
    n = z[0].numel()
    return -n / 2 * math.log(2 * math.pi) - z.pow(2).flatten(1).sum(1) / 2 - dlogp[-1], z


@pytest.mark.parametrize("path,prediction", [("Linear", "velocity"), ("GVP", "noise")])
def test_matches_sit_step_for_step(path, prediction):
    """Same draws (global RNG), same adaptive steps (the packed state's mixed norm): same numbers."""
    pytest.importorskip("torchdiffeq")
    transport, net = Transport(path, prediction), CurvedNet(2 * 3 * 3)
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    ref_logp, ref_z = sit_likelihood(transport, net, x)
    for backend in ("torchdiffeq", "native"):
        torch.manual_seed(7)
        logp, z = ode_likelihood(transport, net, x, backend=backend)
        assert torch.allclose(z, ref_z, rtol=1e-4, atol=1e-5), backend
        assert torch.allclose(logp, ref_logp, rtol=1e-4), (backend, logp, ref_logp)
    assert all(p.grad is None for p in net.parameters())  # gradients of the state only


def test_generator_reproduces_the_estimate():
    transport, net = Transport("Linear", "velocity"), CurvedNet(8)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    runs = [ode_likelihood(transport, net, x, method="heun", num_steps=20,
                           generator=torch.Generator().manual_seed(s))[0] for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # the estimate is random for a dense Jacobian


@pytest.mark.parametrize("method,num_steps,tol", [("euler", 2000, 2e-3), ("midpoint", 200, 1e-4), ("heun", 200, 1e-4)])
def test_fixed_step_methods_converge(method, num_steps, tol):
    transport = Transport("GVP", "velocity")
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * S
    logp, _ = ode_likelihood(transport, exact_model(transport), x, method=method, num_steps=num_steps)
    expected, _ = ode_likelihood(transport, exact_model(transport), x, atol=1e-10, rtol=1e-10)
    assert (logp - expected).abs().max() < tol * expected.abs().max()


def test_bf16_input_and_model_kwargs():
    transport = Transport("Linear", "velocity")
    seen = []

    def model(x, t, y=None):
        seen.append(y)
        return -x
    logp, z = ode_likelihood(transport, model, torch.ones(2, 4, dtype=torch.bfloat16), model_kwargs={"y": 3})
    assert logp.dtype == torch.float32 and z.dtype == torch.float32 and set(seen) == {3}
    # v = -x carries x to x * e over t in [1, 0] (to dopri5's rtol 1e-3); div v = -4 everywhere: delta = -4
    assert torch.allclose(z, torch.full((2, 4), math.e), rtol=1e-3)
    assert torch.allclose(logp, prior_logp(z) + 4.0, rtol=1e-6)


@pytest.mark.parametrize("x", [torch.zeros(3), torch.zeros(0, 4), torch.zeros(2, 0)])
def test_bad_input_is_one_line(x):
    with pytest.raises(ValueError, match="x must be a non-empty batch"):
        ode_likelihood(Transport(), lambda y, t: y, x)
