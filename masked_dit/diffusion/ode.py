"""Probability-flow ODE samplers for SiT transports (euler, midpoint, heun, dopri5; torchdiffeq's others).

``sample_ode(transport, model_fn, x)`` integrates dx/dt = v(x, t) from noise (t0) to data (t1) on
``num_steps`` equally spaced times (torch.linspace(t0, t1, num_steps)), as SiT's ``Sampler.sample_ode``:

* fixed-step methods take ``num_steps - 1`` steps between those times. The time grid is built once
  on the host in float64, so the loop issues no host-device synchronisation on GPU.
* dopri5 is adaptive (atol/rtol, Dormand-Prince 5(4) with Hairer's initial step and 4th-order dense
  output at the requested times). It uses torchdiffeq when installed (the reference's solver) and
  otherwise (or where torchdiffeq gives up on a NaN trial step) the native copy of the same
  algorithm below. Accepting or rejecting a step needs the error norm on the host, so adaptive
  solvers synchronise once per step (plus three times at start).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch

from .transport import ModelFn, Transport

FIXED_STEP_METHODS = ("euler", "midpoint", "heun")
ODE_METHODS = FIXED_STEP_METHODS + ("dopri5",)
ADAPTIVE_TORCHDIFFEQ = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # take options["norm"]

Drift = Callable[[float, torch.Tensor], torch.Tensor]
Norm = Callable[[torch.Tensor], torch.Tensor]  # 0-dim error norm of the step-size controller (default: RMS)


def time_grid(t0: float, t1: float, num_points: int) -> List[float]:
    """torch.linspace(t0, t1, num_points) in float64, as Python floats (no device tensors)."""
    if num_points < 2:
        raise ValueError(f"num_steps must be >= 2 (start and end time), got {num_points}")
    return torch.linspace(t0, t1, num_points, dtype=torch.float64).tolist()


def batch_time(t: float, x: torch.Tensor) -> torch.Tensor:
    """Scalar time -> [B] tensor on x's device; float32 at least so bf16 states keep exact times."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def progress_bar(iterable, enabled: bool, desc: str):
    """Wrap in tqdm when asked (tqdm is a dependency, imported lazily)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc)


#################################################################################
#                              Fixed-step integrators                           #
#################################################################################

def _fixed_step(f: Drift, method: str, t0: float, t1: float, x: torch.Tensor) -> torch.Tensor:
    dt = t1 - t0
    k1 = f(t0, x)
    if method == "euler":
        return x + dt * k1
    if method == "midpoint":
        return x + dt * f(t0 + 0.5 * dt, x + k1 * (0.5 * dt))
    # heun (torchdiffeq's "heun2"): trapezoid with an Euler predictor.
    k2 = f(t1, x + dt * k1)
    return x + dt * (0.5 * k1 + 0.5 * k2)


#################################################################################
#                          Dormand-Prince 5(4), adaptive                        #
#################################################################################
# Same algorithm and constants as torchdiffeq's dopri5 (Dormand & Prince 1980, Shampine 1986):
# RMS error norm of err / (atol + rtol * max(|y0|, |y1|)), safety 0.9, growth <= 10, shrink >= 0.2,
# the step is never clipped to the output times (outputs come from the dense interpolant).

_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = 5th-order solution (FSAL)
)
_DP_ERR = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
           -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1.0 / 60.0)
_DP_MID = (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
           187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).mean().sqrt()


def _combine(x: torch.Tensor, ks: Sequence[torch.Tensor], coeffs: Sequence[float], dt: float) -> torch.Tensor:
    out = x
    for k, c in zip(ks, coeffs):
        if c != 0.0:
            out = out + (c * dt) * k
    return out


def _dopri5(f: Drift, x: torch.Tensor, times: Sequence[float], atol: float, rtol: float,
            max_num_steps: int = 100_000, norm: Optional[Norm] = None, keep_all: bool = True) -> List[torch.Tensor]:
    """States at ``times`` (increasing) starting from x at times[0] (the last one only if not
    ``keep_all``); ``norm`` measures scaled errors (RMS)."""
    norm = _rms_norm if norm is None else norm

    def _rms(v: torch.Tensor) -> float:
        return float(norm(v))  # host sync: the step-size controller needs it
    order = 5
    t, y = times[0], x
    f0 = f(t, y)
    # Initial step (Hairer, Norsett & Wanner, Sec. II.4).
    scale = atol + y.abs() * rtol
    d0, d1 = _rms(y / scale), _rms(f0 / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    f1 = f(t + h0, y + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    dt = min(100 * h0, h1)

    out = [x]
    t_prev, interp = t, None
    n_steps = 0
    for t_out in times[1:]:
        while t_out > t:
            if n_steps >= max_num_steps:
                raise SolverGaveUp(f"dopri5 exceeded max_num_steps={max_num_steps}", atol, rtol)
            n_steps += 1
            if not math.isfinite(dt) or t + dt <= t:
                raise SolverGaveUp(f"dopri5 step size underflow or non-finite (dt={dt}) at t={t}", atol, rtol)
            t_next = t + dt
            ks = [f0]
            for c, a in zip(_DP_C, _DP_A):
                y_stage = _combine(y, ks, a, dt)
                ks.append(f(t_next if c == 1.0 else t + c * dt, y_stage))
            y_next = y_stage  # the last stage is the 5th-order solution, ks[-1] = f(t_next, y_next)
            err = sum((c * dt) * k for k, c in zip(ks, _DP_ERR) if c != 0.0)
            tol = atol + rtol * torch.maximum(y.abs(), y_next.abs())
            error_ratio = _rms(err / tol)
            if error_ratio <= 1:
                y_mid = _combine(y, ks, _DP_MID, dt)
                interp = _interp_fit(y, y_next, y_mid, ks[0], ks[-1], dt)
                t_prev, t, y, f0 = t, t_next, y_next, ks[-1]
            if not math.isfinite(error_ratio):
                factor = 0.2  # a NaN/inf trial step: reject and shrink (max/min would let NaN grow dt)
            elif error_ratio == 0:
                factor = 10.0
            else:
                shrink = 1.0 if error_ratio < 1 else 0.2
                factor = min(10.0, max(0.9 / error_ratio ** (1.0 / order), shrink))
            dt = dt * factor
        if interp is None:  # t_out == times[0]
            out.append(y)
        else:
            out.append(_interp_eval(interp, (t_out - t_prev) / (t - t_prev)))
        if not keep_all:
            del out[:-1]
    return out


class SolverGaveUp(FloatingPointError):
    """An adaptive solve that cannot meet its tolerances (step size underflow, too many steps): one line
    naming them, for the command line's error report."""

    def __init__(self, what: str, atol: float, rtol: float):
        super().__init__(f"{what}: the ODE cannot be solved to atol={atol}, rtol={rtol}; loosen them "
                         f"(SiT: 1e-6, 1e-3) or use a fixed-step method")


def _gave_up(exc: AssertionError) -> bool:
    """torchdiffeq's adaptive solvers give up with these assertions."""
    return "underflow in dt" in str(exc) or "max_num_steps exceeded" in str(exc)


def _interp_fit(y0, y1, y_mid, f0, f1, dt):
    """4th-order polynomial through y0, y_mid, y1 with end slopes f0, f1 (coefficients, low first)."""
    a = 2 * dt * (f1 - f0) - 8 * (y1 + y0) + 16 * y_mid
    b = dt * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * y_mid
    c = dt * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * y_mid
    return [y0, dt * f0, c, b, a]


def _interp_eval(coeffs, s: float):
    total, power = coeffs[0] + s * coeffs[1], s
    for c in coeffs[2:]:
        power = power * s
        total = total + power * c
    return total


def _norm_option(method: str, norm: Optional[Norm]) -> dict:
    """torchdiffeq ``options`` for a custom error norm (its fixed-grid solvers take none and warn)."""
    return {"norm": norm} if norm is not None and method in ADAPTIVE_TORCHDIFFEQ else {}


def check_ode_method(method: str, backend: str = "auto") -> None:
    """One-line error unless :func:`integrate_ode` can run ``method``: a native one, or (not with
    backend='native') a solver of the installed torchdiffeq."""
    if method in ODE_METHODS:
        return
    if backend == "native" or not _have_torchdiffeq():
        why = "backend='native' has" if backend == "native" else "without torchdiffeq (pip install torchdiffeq) there are"
        raise ValueError(f"unknown ODE method {method!r}: {why} only {ODE_METHODS}")
    try:
        from torchdiffeq._impl.odeint import SOLVERS  # private: if it moves, odeint's own check below still runs
    except ImportError:
        return
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {ODE_METHODS} or a torchdiffeq method")


def _torchdiffeq_only(f: Drift, x, times, method: str, atol: float, rtol: float, backend: str,
                      norm: Optional[Norm] = None) -> List[torch.Tensor]:
    """A method only torchdiffeq has (one-line errors for an unknown name or a missing torchdiffeq)."""
    check_ode_method(method, backend)
    from torchdiffeq import odeint

    t = torch.tensor(times, dtype=torch.float64, device=x.device)
    try:
        return list(odeint(lambda s, y: f(float(s), y), x, t, method=method, atol=atol, rtol=rtol,
                           options=_norm_option(method, norm)).unbind(0))
    except AssertionError as exc:
        if not _gave_up(exc):
            raise
        raise SolverGaveUp(f"{method}: {exc}", atol, rtol) from None
    except ValueError as exc:
        if "Invalid method" not in str(exc):
            raise
        raise ValueError(f"unknown ODE method {method!r}; expected one of {ODE_METHODS} or a torchdiffeq "
                         f"method") from None


def _have_torchdiffeq() -> bool:
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        return False
    return True


#################################################################################
#                                     Driver                                    #
#################################################################################

def integrate_ode(f: Drift, x: torch.Tensor, times: Sequence[float], method: str = "dopri5",
                  atol: float = 1e-6, rtol: float = 1e-3, backend: str = "auto",
                  progress: bool = False, norm: Optional[Norm] = None, keep_all: bool = True) -> List[torch.Tensor]:
    """Solve dx/dt = f(t, x) and return the states at every time in ``times`` (monotone); with
    ``keep_all=False`` the native solvers hold and return the last state only (a 250-step batch of
    256 latents would otherwise hold 1 GB of states no one reads).

    backend: "auto" (torchdiffeq for dopri5 if installed, native otherwise or when torchdiffeq
    gives up on a NaN trial step), "native" or "torchdiffeq". Fixed-step methods always run natively
    (same arithmetic as torchdiffeq's fixed grid, without its per-step host synchronisation). Any
    other torchdiffeq method (rk4, bosh3, dopri8, ...; SiT's sample.py passes its name through) runs
    in torchdiffeq, on the ``times`` grid for its fixed-grid solvers. ``norm`` (adaptive methods) replaces
    the RMS of the scaled error, e.g. torchdiffeq's max-of-RMS "mixed" norm of a packed tuple state.
    """
    if backend not in ("auto", "native", "torchdiffeq"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'native' or 'torchdiffeq'")
    times = [float(t) for t in times]
    if method not in ODE_METHODS:
        return _torchdiffeq_only(f, x, times, method, atol, rtol, backend, norm)
    if method in FIXED_STEP_METHODS:
        states = [x]
        for t0, t1 in progress_bar(list(zip(times[:-1], times[1:])), progress, f"ODE {method}"):
            states.append(_fixed_step(f, method, t0, t1, states[-1]))
            if not keep_all:
                del states[:-1]
        return states

    if backend == "torchdiffeq" or (backend == "auto" and _have_torchdiffeq()):
        from torchdiffeq import odeint
        t = torch.tensor(times, dtype=torch.float64, device=x.device)
        try:
            states = odeint(lambda s, y: f(float(s), y), x, t, method="dopri5", atol=atol, rtol=rtol,
                            options=_norm_option(method, norm))
            return list(states.unbind(0))
        except AssertionError as exc:
            # dopri5 steps past the last time; where the drift is NaN there (a VP noise/score model
            # beyond t = 1, sigma_t = sqrt(negative)) torchdiffeq's controller turns the NaN error
            # into dt -> 0 and gives up. The native copy rejects and shrinks such a step instead
            # (same steps as torchdiffeq wherever torchdiffeq finishes), so "auto" falls back to it.
            if not _gave_up(exc):
                raise
            if backend == "torchdiffeq" or "underflow in dt" not in str(exc):
                raise SolverGaveUp(f"dopri5: {exc}", atol, rtol) from None

    # Native dopri5 works with increasing time; run a decreasing grid in s = -t (as torchdiffeq does).
    if len(times) > 1 and times[0] > times[-1]:
        return _dopri5(lambda s, y: -f(-s, y), x, [-t for t in times], atol, rtol, norm=norm, keep_all=keep_all)
    return _dopri5(f, x, times, atol, rtol, norm=norm, keep_all=keep_all)


def sample_ode(transport: Transport, model_fn: ModelFn, x: torch.Tensor, *, method: str = "dopri5",
               num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3, reverse: bool = False,
               model_kwargs: Optional[dict] = None, backend: str = "auto", progress: bool = False,
               return_trajectory: bool = False):
    """SiT ODE sampling: integrate the probability flow of ``model_fn`` from noise x.

    Times: ``num_steps`` points from t0 to t1 = ``transport.interval(eval=True)`` (reverse=True runs
    data -> noise, from t1 back to t0). Returns the final state, or all ``num_steps`` states stacked when
    ``return_trajectory`` (SiT's ``sample_ode(...)(x, model)``). The model is called as
    ``model_fn(x, t [B], **model_kwargs)``; pass a CFG-wrapped model for guidance. The state is
    carried in float32 at least (a bf16 x comes back as float32).
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    # reverse runs the forward interval backwards, so it inverts forward sampling. SiT integrates
    # over the mirror interval(reverse=True) = (1 - t0, 1 - t1) instead: the same for Linear/GVP, but
    # VP's [0, 1 - eps] becomes [1, eps]: a VP score/noise model is NaN at t = 1 (sigma_t = 0) and
    # the map stops at t = eps. (A deliberate deviation from SiT for VP only.)
    t0, t1 = transport.interval(eval=True)
    if reverse:
        t0, t1 = t1, t0

    def drift(t: float, y: torch.Tensor) -> torch.Tensor:
        tb = batch_time(t, y)
        return transport.velocity(model_fn(y, tb, **model_kwargs), y, tb)

    with torch.no_grad():
        states = integrate_ode(drift, x, time_grid(t0, t1, num_steps), method, atol, rtol, backend, progress,
                               keep_all=return_trajectory)
    return torch.stack(states) if return_trajectory else states[-1]
