"""Adan against its update equations, written out in float64 one parameter at a time; the fused
Triton step against the foreach one (on CPU under TRITON_INTERPRET=1, see tests/conftest.py)."""
import copy
import os

import pytest
import torch

from masked_dit.ops import dispatch
from masked_dit.train.optim import Adan

# the fused step on CPU tensors: Triton's interpreter (tests/conftest.py sets it only without a GPU)
needs_interpreter = pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" and dispatch.triton_importable()),
    reason="triton not importable or TRITON_INTERPRET unset")

STATE_KEYS = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad")


def reference_adan(p0, grads, lr, betas, eps, wd, no_prox):
    """lr: a float, or one per step."""
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(grads)
    b1, b2, b3 = betas
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    n = torch.zeros_like(p)
    prev = grads[0]
    out = []
    for k, (g, lr) in enumerate(zip(grads, lrs), start=1):
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


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_interpreter)])
def test_a_parameter_joining_later_is_corrected_from_its_own_first_step(fused):
    """A parameter without a gradient for the first steps (e.g. a head trained from step 3) starts its
    moments then: its bias correction counts its own steps. It used the first parameter's count (k = 3
    at its first step, so 1 - b^3 in place of 1 - b: updates ~2-3x too small while the moments warm up)."""
    dtype = torch.float32 if fused else torch.float64
    torch.manual_seed(0)
    early, late = torch.nn.Parameter(torch.randn(4, dtype=dtype)), torch.nn.Parameter(torch.randn(3, dtype=dtype))
    late0 = late.detach().clone()
    grads = [torch.randn(3, dtype=dtype) for _ in range(3)]
    opt = Adan([early, late], lr=0.01, weight_decay=0.02, fused=fused)
    for k in range(5):
        early.grad = torch.randn(4, dtype=dtype)
        late.grad = grads[k - 2].clone() if k >= 2 else None
        opt.step()
    ref = reference_adan(late0.double(), [g.double() for g in grads], 0.01, (0.98, 0.92, 0.99), 1e-8, 0.02, False)
    torch.testing.assert_close(late.detach().double(), ref[-1], rtol=1e-6, atol=1e-7)
    assert [int(opt.state[p]["step"]) for p in (early, late)] == [5, 3]


def test_max_grad_norm_clips_as_the_official_adan():
    """sail-sg/Adan's max_grad_norm (MDT trains with 1) scales every gradient by min(max / (norm + eps), 1)
    before the update: the norm over all groups, eps the optimizer's (not clip_grad_norm_'s 1e-6), and the
    first step's previous gradient is the clipped one. Adan had no max_grad_norm (the trainer clipped with
    clip_grad_norm_'s rule)."""
    torch.manual_seed(0)
    a0, b0 = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grads = [(s * torch.randn(5, 3, dtype=torch.float64), s * torch.randn(4, dtype=torch.float64))
             for s in (3.0, 0.05, 2.0, 5.0)]  # the second is under the max norm: left as it is
    lr, eps, max_norm = 0.01, 1e-2, 1.0  # a large eps: clip_grad_norm_'s rule is 1% off
    clipped = []
    for ga, gb in grads:
        coef = min(max_norm / (torch.cat([ga.flatten(), gb.flatten()]).norm().item() + eps), 1.0)
        clipped.append((ga * coef, gb * coef))
    ref_a = reference_adan(a0, [g[0] for g in clipped], lr, (0.98, 0.92, 0.99), eps, 0.0, False)
    ref_b = reference_adan(b0, [g[1] for g in clipped], lr, (0.98, 0.92, 0.99), eps, 0.0, False)
    pa, pb = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    opt = Adan([{"params": [pa]}, {"params": [pb]}], lr=lr, eps=eps, max_grad_norm=max_norm)
    for k, (ga, gb) in enumerate(grads):
        pa.grad, pb.grad = ga.clone(), gb.clone()
        opt.step()
        torch.testing.assert_close(pa.detach(), ref_a[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pb.detach(), ref_b[k], rtol=1e-12, atol=1e-12)
    assert copy.deepcopy(opt).max_grad_norm == max_norm
    with pytest.raises(ValueError, match="max_grad_norm"):
        Adan([pa], max_grad_norm=-1.0)


def test_load_state_dict_keeps_max_grad_norm_and_fused():
    """Optimizer.load_state_dict goes through __setstate__ with state and param_groups only, which reset
    the settings kept outside the groups: a resumed run stopped clipping and fused=False became auto."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = Adan([p], lr=0.01, max_grad_norm=1.0, fused=False)
    p.grad = torch.randn(3)
    opt.step()
    resumed = Adan([torch.nn.Parameter(p.detach().clone())], lr=0.01, max_grad_norm=1.0, fused=False)
    resumed.load_state_dict(opt.state_dict())
    assert (resumed.max_grad_norm, resumed.fused) == (1.0, False)
    old = {k: v for k, v in opt.__getstate__().items() if k not in ("fused", "max_grad_norm")}
    fresh = Adan.__new__(Adan)  # a pickle from before the two existed: their defaults
    fresh.__setstate__(old)
    assert (fresh.max_grad_norm, fresh.fused) == (0.0, None)


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


# -----------------------------------------------------------------------------
# fused (Triton) step against foreach
# -----------------------------------------------------------------------------

# BLOCK is 1024: 1500 and 37 * 29 end in a masked tail; 0-d, one element and empty tensors too
SHAPES = [(37, 29), (1500,), (), (1,), (0,), (5, 4, 3)]


def run_adan(p0s, grads, lrs, fused, **kw):
    params = [torch.nn.Parameter(p.clone()) for p in p0s]
    opt = Adan(params, fused=fused, **kw)
    for step_grads, lr in zip(grads, lrs):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = lr  # as the trainer's schedule does
        opt.step()
    return params, opt


def assert_same_run(a, b, rtol, atol):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol)
        for key in STATE_KEYS:
            torch.testing.assert_close(oa.state[x][key], ob.state[y][key], rtol=rtol, atol=atol, msg=key)
        assert int(oa.state[x]["step"]) == int(ob.state[y]["step"])


@needs_interpreter
@pytest.mark.parametrize("wd, no_prox", [(0.0, False), (0.02, False), (0.02, True)])
def test_fused_matches_foreach_and_equations(wd, no_prox):
    torch.manual_seed(0)
    p0s = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(5)]
    lrs = [0.01, 0.02, 0.005, 0.03, 0.01]
    kw = dict(betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=wd, no_prox=no_prox)
    fused = run_adan(p0s, grads, lrs, True, **kw)
    foreach = run_adan(p0s, grads, lrs, False, **kw)
    assert_same_run(fused, foreach, rtol=1e-6, atol=1e-7)
    for i, p0 in enumerate(p0s):  # both against the float64 equations
        ref = reference_adan(p0.double(), [g[i].double() for g in grads], lrs, kw["betas"], kw["eps"], wd, no_prox)[-1]
        for params, _ in (fused, foreach):
            torch.testing.assert_close(params[i].detach().double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=needs_interpreter),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_step_updates_unaligned_tensors_and_reuses_its_tables(device, monkeypatch):
    """One launch takes the tensors whose six addresses are 16-byte aligned (declared so to the compiler),
    another the rest (here: grads that are views at an odd element offset, and one parameter); the
    address and chunk tables are cached by content, so a step with grads at new addresses gets new ones."""
    from masked_dit.ops.triton_kernels import adan as kernels

    torch.manual_seed(4)
    shapes = [(2100,), (7, 5), (1024,), (3,)]
    p0s = [torch.randn(s, device=device) for s in shapes]

    def unaligned(x):  # contiguous, fp32, 4 bytes past a 16-byte boundary
        out = torch.empty(x.numel() + 1, device=device)[1:].view(x.shape).copy_(x)
        assert out.is_contiguous() and out.data_ptr() % 16 == 4
        return out

    grads = [[torch.randn(s, device=device) * 0.1 for s in shapes] for _ in range(3)]
    params = [torch.nn.Parameter(p.clone()) for p in p0s]
    params[2] = torch.nn.Parameter(unaligned(p0s[2]))
    opt = Adan(params, lr=0.01, weight_decay=0.02, fused=True)
    launches, launch = [], kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda *a: (launches.append(a[3]), launch(*a)))
    for i, step_grads in enumerate(grads):
        for j, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = unaligned(g) if (i + j) % 2 else g.clone()
        opt.step()
    assert sorted(launches) == [False] * 3 + [True] * 3  # each step: one aligned launch, one not
    foreach = run_adan(p0s, grads, [0.01] * 3, False, weight_decay=0.02)
    assert_same_run((params, opt), foreach, rtol=1e-6, atol=1e-7)
    before = set(kernels._TABLES)
    keep = [p.grad for p in params]
    opt.step()  # the same grads, at the same addresses: no new table
    assert set(kernels._TABLES) == before and all(p.grad is g for p, g in zip(params, keep))


def test_auto_is_foreach_on_cpu():
    # fused=None takes the Triton step on CUDA only (the interpreter is for tests): bit-equal to foreach
    torch.manual_seed(2)
    p0s = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(2)]
    (pa, _), (pb, _) = run_adan(p0s, grads, [0.01, 0.02], None), run_adan(p0s, grads, [0.01, 0.02], False)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))


@needs_interpreter
@pytest.mark.parametrize("first", [True, False])
def test_state_dict_loads_across_paths(first):
    """A checkpoint of the fused step resumes in foreach and vice versa (same state keys, same format)."""
    torch.manual_seed(3)
    p0s = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(3)]
    params, opt = run_adan(p0s, grads[:2], [0.01, 0.01], first, weight_decay=0.02)
    sd = copy.deepcopy(opt.state_dict())  # (a plain load aliases the tensors)
    assert set(sd["state"][0]) == {"step", *STATE_KEYS}
    assert set(sd["param_groups"][0]) == set(Adan([torch.nn.Parameter(torch.zeros(1))], fused=False).state_dict()["param_groups"][0])
    runs = []
    for fused in (first, not first):
        clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
        other = Adan(clones, lr=0.01, weight_decay=0.02, fused=fused)
        other.load_state_dict(copy.deepcopy(sd))
        for p, g in zip(clones, grads[2]):
            p.grad = g.clone()
        other.step()
        runs.append((clones, other))
    assert_same_run(*runs, rtol=1e-6, atol=1e-7)


def test_fused_true_fails_in_one_line_where_it_cannot_run(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU allowed: the checks below fail before any launch

    def fails(match, make):
        with pytest.raises(RuntimeError, match=match) as err:
            make()
        assert "\n" not in str(err.value) and str(err.value).startswith("Adan(fused=True): parameter")

    fails("float64", lambda: Adan([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], fused=True))
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = Adan([p], fused=True)
    p.grad = torch.zeros(3, 4).t()  # a transposed gradient: not contiguous
    fails("non-contiguous", opt.step)
    monkeypatch.delenv("TRITON_INTERPRET")
    p.grad = torch.zeros(4, 3)
    fails("TRITON_INTERPRET is not 1", opt.step)
    fails("TRITON_INTERPRET is not 1", lambda: Adan([torch.nn.Parameter(torch.zeros(3))], fused=True))


@pytest.mark.gpu
@pytest.mark.parametrize("no_prox", [False, True])
def test_fused_matches_foreach_on_cuda(no_prox):
    """~10M parameters in tensors of DiT-like shapes (fresh random inputs); lr changes every step
    without a recompile (hyper-parameters are runtime arguments)."""
    from masked_dit.ops.triton_kernels.adan import _adan_kernel

    seed = int(torch.randint(0, 2**31, (), generator=torch.Generator().manual_seed(torch.seed())))
    print(f"seed {seed}")  # fresh inputs each run: shown with a failure
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1152, 4608), (4608, 1152), (6912, 96), (1152,), (1000, 3), ()]
    p0s = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=gen) * 1e-2 for s in shapes] for _ in range(5)]
    lrs = [1e-4, 2e-4, 3e-4, 3e-4, 1e-4]
    kw = dict(weight_decay=0.02, no_prox=no_prox)
    fused = run_adan(p0s, grads[:1], lrs[:1], True, **kw)
    caches = getattr(_adan_kernel, "device_caches", {})
    compiled = sum(len(c[0]) for c in caches.values())
    for g, lr in zip(grads[1:], lrs[1:]):
        for p, x in zip(fused[0], g):
            p.grad = x.clone()
        fused[1].param_groups[0]["lr"] = lr
        fused[1].step()
    assert sum(len(c[0]) for c in caches.values()) == compiled, "a new lr recompiled the kernel"
    foreach = run_adan(p0s, grads, lrs, False, **kw)
    assert_same_run(fused, foreach, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, None])
def test_copied_and_pickled_optimizer_keeps_fused_and_steps(fused):
    """torch.optim.Optimizer pickles defaults, state and param_groups only; fused (an attribute) comes along."""
    import pickle

    p = torch.nn.Parameter(torch.randn(5))
    opt = Adan([p], lr=0.01, fused=fused)
    p.grad = torch.randn(5)
    opt.step()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.fused is fused
        q = other.param_groups[0]["params"][0]
        q.grad = p.grad.clone()
        other.step()
