"""Configurations and shapes the fixtures never cover: every registered name at other input sizes,
empty and one-sample batches, odd widths, few channels, one-step diffusions, edge masks, and the
fused ops at sizes the model tests do not reach. Each check compares with a float64 reference
written here (or with a plain forward), or asserts a one-line ValueError naming the argument.

Regressions fixed with this file (see the report): empty batch in Attention, Python-number
timesteps, forward_with_cfg with fewer than 3 channels, MDT mask ratios that can keep no token,
one-step ADM diffusions and "ddim1", Heun SDE at a singular end time, CFG scale 1.
"""
import math

import pytest
import torch

from masked_dit import ops
from masked_dit.diffusion.edm_sampling import heun_sampler
from masked_dit.diffusion.gaussian import GaussianDiffusion
from masked_dit.diffusion.guidance import ClassifierFreeGuidance, power_cosine_scale
from masked_dit.diffusion.ode import sample_ode
from masked_dit.diffusion.respace import create_diffusion, space_timesteps
from masked_dit.diffusion.sde import sample_sde
from masked_dit.diffusion.transport import create_transport
from masked_dit.models import MODEL_CONFIGS, build, build_model
from masked_dit.nn.masking import packed_masking
from masked_dit.ops import dispatch, use_backend
from masked_dit.ops.attention import relative_position_index, use_attention_backend

TINY = dict(hidden_size=32, num_heads=4)


def _tiny_overrides(family: str, input_size: int) -> dict:
    """Shrinks a registered configuration (the width/depth are not what these tests are about)."""
    kw = dict(TINY, input_size=input_size, depth=2)
    if family == "mdtv2":
        kw["decode_layer"] = 0
    elif family == "mdtv1":
        kw["decode_layer"] = 1
    elif family == "maskdit":
        kw.update(decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2)
    elif family == "repa_sit":
        kw.update(encoder_depth=1, projector_dim=16, z_dims=(8,))
    return kw


def _call(model, family, x, t, y, **kw):
    """Forward of any family -> the prediction tensor (MaskDiT gets sigma > 0, REPA drops zs)."""
    if family == "maskdit":
        return model(x, t.float() + 0.5, y, **kw)
    out = model(x, t, y, **kw)
    return out[0] if family == "repa_sit" else out


#################################################################################
#                                     Models                                    #
#################################################################################

@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_registered_name_runs_at_an_unseen_input_size(name):
    """Every registry name, shrunk, at input 24 (grid 12/6/3: not the fixtures' 32) and batch 1."""
    family, config = MODEL_CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(name, **_tiny_overrides(family, 24)).eval()
    x, t, y = torch.randn(1, 4, 24, 24), torch.tensor([7]), torch.tensor([3])
    out = _call(model, family, x, t, y)
    channels = 8 if family in ("dit", "mdtv2", "mdtv1") else 4
    assert out.shape == (1, channels, 24, 24) and torch.isfinite(out).all()
    net = model.model if family == "maskdit" else model
    assert net.x_embedder.grid_size == 24 // config["patch_size"]


@pytest.mark.parametrize("family", ["dit", "sit", "repa_sit", "mdtv2", "mdtv1", "maskdit"])
def test_empty_batch_forward(family):
    """A batch of 0 (e.g. an uneven split of a sampling job) gives an empty output of the right shape."""
    model = build(family, patch_size=2, **_tiny_overrides(family, 8)).eval()
    x, t, y = torch.randn(0, 4, 8, 8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    out = _call(model, family, x, t, y)
    assert out.shape[0] == 0 and out.shape[2:] == (8, 8)


@pytest.mark.parametrize("family", ["dit", "sit", "mdtv2"])
def test_python_number_timestep_is_broadcast(family):
    """t given as a Python int/float means that timestep for every sample (as a 0-d tensor does)."""
    torch.manual_seed(0)
    model = build(family, patch_size=2, **_tiny_overrides(family, 8)).eval()
    for p in model.parameters():  # adaLN-Zero init would hide the timestep entirely
        p.data.normal_(0, 0.05)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    for t in (7, 0.25):
        expected = model(x, torch.full((2,), t), y)
        torch.testing.assert_close(model(x, t, y), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="timesteps t must be a tensor or a number"):
        model(x, "7", y)
    if family == "mdtv2":  # its forward_with_cfg reads t for the power-cosine schedule
        xx, yy = torch.cat([x[:1], x[:1]]), torch.tensor([1, 1000])
        torch.testing.assert_close(model.forward_with_cfg(xx, 500, yy, 3.0),
                                   model.forward_with_cfg(xx, torch.tensor([500, 500]), yy, 3.0), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["dit", "sit", "repa_sit", "mdtv2", "mdtv1", "maskdit"])
def test_one_timestep_or_label_of_shape_1_is_broadcast(family):
    """t or y of shape [1] with a batch of 3: the official models broadcast their embeddings over the batch,
    so the call runs and equals the one with t / y repeated (it raised here)."""
    torch.manual_seed(0)
    model = build(family, patch_size=2, **_tiny_overrides(family, 8)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([7.0]), torch.tensor([2])
    with torch.no_grad():
        for tt, yy in ((t, y.repeat(3)), (t.repeat(3), y), (t, y)):
            torch.testing.assert_close(_call(model, family, x, tt, yy), _call(model, family, x, t.repeat(3), y.repeat(3)),
                                       rtol=0, atol=0)
        if family == "maskdit":  # one one-hot label, [1, K] or [K]
            one_hot = torch.nn.functional.one_hot(y, model.num_classes).float()
            for lab in (one_hot, one_hot[0]):
                torch.testing.assert_close(model(x, 7.5, lab), model(x, 7.5, y.repeat(3)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="must have shape|must be a scalar or have 3"):  # 2 of 3 is no broadcast
        _call(model, family, x, t.repeat(2), y.repeat(3))


@pytest.mark.parametrize("family", ["dit", "mdtv2"])
@pytest.mark.parametrize("in_channels", [1, 2, 4])
def test_forward_with_cfg_default_guides_official_channels(family, in_channels):
    """Default guidance = official channels 0-2, every data channel when a model has fewer than 3;
    checked against cond/uncond forwards combined in float64 here."""
    torch.manual_seed(0)
    model = build(family, patch_size=2, in_channels=in_channels, **_tiny_overrides(family, 8)).double().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t = torch.randn(1, in_channels, 8, 8, dtype=torch.float64), torch.tensor([900, 900])
    y, scale = torch.tensor([3, 1000]), 2.5
    out = model.forward_with_cfg(torch.cat([x, x]), t, y, scale)
    cond, uncond = model(x, t[:1], y[:1]), model(x, t[:1], y[1:])
    if family == "mdtv2":  # the schedule of the integer t, in float32 as the official code computes it
        scale = power_cosine_scale(t[:1], scale).to(torch.float64).view(-1, 1, 1, 1)
    g = min(3, in_channels)
    guided = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    torch.testing.assert_close(out[:1, :g], guided, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[:1, g:], cond[:, g:], rtol=1e-10, atol=1e-10)  # rest (and sigma): cond's own


def test_class_dropout_zero_has_no_null_row_and_says_so():
    """class_dropout_prob=0: no extra embedding row (as official DiT); the null label is out of range."""
    model = build("dit", patch_size=2, class_dropout_prob=0.0, num_classes=10, **_tiny_overrides("dit", 8))
    assert model.y_embedder.embedding_table.num_embeddings == 10
    with pytest.raises(ValueError, match=r"labels y: class labels must be in \[0, 9\]"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 1]), torch.tensor([0, 10]))


def test_bad_widths_name_the_argument():
    base = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="decoder_hidden_size 30 must be divisible by decoder_num_heads 4"):
        build("maskdit", decoder_hidden_size=30, decoder_num_heads=4, decoder_depth=1, **base)
    with pytest.raises(ValueError, match="decoder_hidden_size 18 must be divisible by decoder_num_heads 3 and by 4"):
        build("maskdit", decoder_hidden_size=18, decoder_num_heads=3, decoder_depth=1, **base)
    with pytest.raises(ValueError, match=r"width \(hidden_size\) divisible by 4, got 30"):
        build("dit", **{**base, "hidden_size": 30, "num_heads": 3})


@pytest.mark.parametrize("cls_name,ratio", [("mdtv2", 0.8), ("mdtv2", 0.75), ("mdtv1", 0.95)])
def test_mdt_mask_ratio_that_can_keep_no_token_is_rejected(cls_name, ratio):
    """MDTv2 draws ratio + 0.2 U: at 0.8 a draw can keep nothing (the reference then keeps L - 1 via a
    negative slice). On 16 patches 0.75 + 0.2 can also keep 0; v1 at 0.95 keeps int(0.8) = 0."""
    with pytest.raises(ValueError, match="mask_ratio=.* may keep no token of the 16 patches"):
        build(cls_name, patch_size=2, mask_ratio=ratio, **_tiny_overrides(cls_name, 8))


@pytest.mark.parametrize("cls_name,ratio", [("mdtv2", 0.7), ("mdtv1", 0.9)])
def test_mdt_highest_valid_mask_ratio_trains(cls_name, ratio):
    """The largest accepted ratios keep >= 1 token on every draw and run the masked training path."""
    model = build(cls_name, patch_size=2, mask_ratio=ratio, **_tiny_overrides(cls_name, 8)).train()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 1000]), enable_mask=True,
                    generator=g)
        assert torch.isfinite(out).all()


def test_mdtv2_objective_rejects_ratios_that_can_keep_no_token():
    """The objective's own ratio draw (mask_ratio + jitter U) is checked up front, not at the first
    unlucky step; a model with few patches is checked at the first call."""
    from masked_dit.diffusion.objectives import MDTv2Objective

    with pytest.raises(ValueError, match=r"\[mask_ratio, mask_ratio \+ mask_ratio_jitter\) = \[0.9, 1.1"):
        MDTv2Objective(diffusion_steps=50, mask_ratio=0.9, mask_ratio_jitter=0.2)
    model = build("mdtv2", patch_size=4, **_tiny_overrides("mdtv2", 8))  # 4 patches
    batch = {"x": torch.randn(2, 4, 8, 8), "y": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="may keep no token of the model's 4 patches"):
        MDTv2Objective(diffusion_steps=50, mask_ratio=0.6, mask_ratio_jitter=0.2)(model, batch)
    assert torch.isfinite(MDTv2Objective(diffusion_steps=50)(model, batch)["loss"])


def test_maskdit_bf16_preconditions_in_float32():
    """A bf16 MaskDiT (weights and input) is told the noise level c_noise = ln(sigma) / 4 from a
    float32 sigma, as the official EDMPrecond (a bf16 sigma is off by up to 0.4%); D keeps x's dtype."""
    torch.manual_seed(0)
    model = build("maskdit", patch_size=2, num_classes=10, **_tiny_overrides("maskdit", 8)).eval().bfloat16()
    seen = []
    model.model.t_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    sigma = torch.tensor([0.0123, 37.7], dtype=torch.float64)
    x = torch.randn(2, 4, 8, 8).bfloat16()
    for out in (model(x, sigma, torch.tensor([1, 2])), model.forward_with_cfg(x, sigma, torch.tensor([1, 2]), 1.5)):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    want = sigma.float().log() / 4
    torch.testing.assert_close(seen[0], want, rtol=0, atol=0)
    torch.testing.assert_close(seen[1], torch.cat([want, want]), rtol=0, atol=0)


def test_packed_masks_with_single_token_samples_match_dense():
    """MaskDiT (and MDTv1) packed batches where samples keep 1 token or all: equal to dense per sample."""
    torch.manual_seed(0)
    pm = packed_masking([1, 16, 1, 7], 16, generator=torch.Generator().manual_seed(1))
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 500, 999, 20]), torch.tensor([0, 5, 1, 2])
    for family in ("maskdit", "mdtv1"):
        model = build(family, patch_size=2, **_tiny_overrides(family, 8)).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.05)
        out = _call(model, family, x, t, y, ids_keep=pm.ids_keep, cu_seqlens=pm.cu_seqlens)
        for b in range(4):
            ids_b = pm.ids_keep[pm.cu_seqlens[b]:pm.cu_seqlens[b + 1]][None]
            ref = _call(model, family, x[b:b + 1], t[b:b + 1], y[b:b + 1], ids_keep=ids_b)
            torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)


def test_unconditional_maskdit_objective_trains_and_samples():
    """num_classes=0 (no label embedder; the official model allows it): the EDM objective passes no
    labels instead of one-hot encoding into 0 classes, and guidance says it needs classes."""
    from masked_dit.diffusion.objectives import EDMMaskDiTObjective

    torch.manual_seed(0)
    model = build("maskdit", patch_size=2, num_classes=0, **_tiny_overrides("maskdit", 8))
    objective = EDMMaskDiTObjective()
    batch = {"x": torch.randn(2, 4, 8, 8), "y": torch.zeros(2, dtype=torch.long)}
    terms = objective(model, batch)
    assert torch.isfinite(terms["loss"]) and torch.isfinite(terms["mae"])
    assert objective.sample(model, torch.randn(2, 4, 8, 8), batch["y"], steps=2).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="cfg_scale=1.5 needs a class-conditional model"):
        objective.sample(model, torch.randn(2, 4, 8, 8), batch["y"], steps=2, cfg_scale=1.5)


#################################################################################
#                                 Token / adaLN ops                             #
#################################################################################

def _backends():
    out = ["torch"]
    if dispatch.availability("triton", "cpu")[0]:
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("B,N,D,K", [(1, 1, 1, 1), (2, 7, 72, 0), (2, 7, 100, 7), (1, 300, 1000, 3), (0, 5, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gather_scatter_edge_shapes(backend, B, N, D, K, dtype):
    """K = 0 or N, D = 1 / 100 / 1000, batch 0/1, a transposed (non-contiguous) x; exact values and grads."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, N, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    ids = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)]) if B else torch.zeros(0, K).long()
    fill = torch.randn(D, generator=g).to(dtype).requires_grad_()
    kept = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        kept[b, ids[b]] = True
    with use_backend(backend):
        out = ops.scatter_tokens(ops.gather_tokens(x, ids), ids, fill, N)
        expected = torch.where(kept[..., None], x.detach(), fill.detach())
        assert torch.equal(out, expected)
        grad = torch.randn(B, N, D, generator=g, dtype=torch.float64)
        out.backward(grad.to(dtype))
    assert torch.equal(x.grad, (grad * kept[..., None]).to(dtype))
    ref_fill = (grad * ~kept[..., None]).sum((0, 1))
    tol = 1e-2 * math.sqrt(max(1, B * N)) if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(fill.grad.double(), ref_fill, rtol=tol, atol=tol)


def _adaln_ref(x, shift, scale, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("B,L,D", [(2, 3, 1), (2, 3, 3), (1, 2, 72), (1, 2, 4096), (0, 3, 8), (2, 0, 8)])
def test_adaln_ops_edge_widths_match_float64(backend, B, L, D):
    """D = 1 (LayerNorm output 0) / 3 / 72 / 4096 and empty batches, fwd and bwd of both fused ops
    in float32 against float64 autograd of the formulas; modulations are strided chunk views."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, L, D, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    branch = torch.randn(B, L, D, generator=g, dtype=torch.float64).requires_grad_()
    mod = torch.randn(B, 5 * D, generator=g, dtype=torch.float64).requires_grad_()
    grads = torch.randn(2, B, L, D, generator=g, dtype=torch.float64)

    def run(xx, bb, mm, fused):
        shift, scale, gate, shift2, scale2 = mm.chunk(5, dim=1)
        if fused:
            h = ops.adaln_modulate(xx, shift, scale)
            r, h2 = ops.gated_residual_adaln(xx, bb, gate, shift2, scale2)
        else:
            h = _adaln_ref(xx, shift, scale)
            r = xx + gate[:, None] * bb
            h2 = _adaln_ref(r, shift2, scale2)
        return h, r, h2

    leaves32 = [t.detach().float().requires_grad_() for t in (x, branch, mod)]
    with use_backend(backend):
        outs = run(*leaves32, fused=True)
        (outs[0] * grads[0] + outs[2] * grads[1] + outs[1]).sum().backward()
    refs = run(x, branch, mod, fused=False)
    (refs[0] * grads[0] + refs[2] * grads[1] + refs[1]).sum().backward()
    for got, want in zip(outs, refs):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    for got, want in zip(leaves32, (x, branch, mod)):
        magnitude = 1 + (want.grad.abs().max().item() if want.grad.numel() else 0.0)
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4 * magnitude)


@pytest.mark.parametrize("backend", _backends())
def test_block_broadcasts_one_conditioning_over_the_batch(backend):
    """A drop-in FusedDiTBlock / FinalLayer given c [1, C] for a batch of B (the official blocks
    broadcast it in ``modulate``) equals c expanded to [B, C]; its gradient sums back to [1, C]."""
    from masked_dit.nn.block import FinalLayer, FusedDiTBlock

    torch.manual_seed(0)
    block, final = FusedDiTBlock(16, 2).double(), FinalLayer(16, 2, 4).double()
    for p in list(block.parameters()) + list(final.parameters()):
        p.data.normal_(0, 0.1)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    c = torch.randn(1, 16, dtype=torch.float64, requires_grad=True)
    c_rows = c.detach().expand(3, 16).clone().requires_grad_()
    with use_backend(backend):
        out, ref = final(block(x, c), c), final(block(x, c_rows), c_rows)
        grad = torch.randn_like(ref)
        (out * grad).sum().backward()
        (ref * grad).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.grad, c_rows.grad.sum(0, keepdim=True), rtol=1e-10, atol=1e-10)


#################################################################################
#                                    Attention                                  #
#################################################################################

def _attention_ref(q, k, v, bias):
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5 + bias
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)


@pytest.mark.parametrize("grid,K,head_dim", [(3, 9, 1), (8, 13, 72), (5, 1, 96)])
def test_rel_pos_bias_attention_other_grids_any_order(grid, K, head_dim):
    """MDT's bias on grids other than 16, kept tokens in arbitrary (shuffled) order, dense and packed
    (a 1-token sequence included): fwd and grads (q, k, v, table) against a float64 reference."""
    g = torch.Generator().manual_seed(grid)
    H, N = 2, grid * grid
    index = relative_position_index(grid)
    table = torch.randn((2 * grid - 1) ** 2 + 3, H, generator=g, dtype=torch.float64).requires_grad_()
    q, k, v = (torch.randn(2, K, H, head_dim, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    pos = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(2)])

    def bias(p):
        return table[index[p[:, :, None], p[:, None, :]]].permute(0, 3, 1, 2)

    with use_attention_backend("math"):
        dense = ops.attention(q, k, v, rel_pos_bias=(table, index), positions=pos)
        # packed: sample 0 keeps all K tokens, sample 1 only its first
        cu = torch.tensor([0, K, K + 1], dtype=torch.int32)
        packed = ops.attention(*(torch.cat([z[0], z[1, :1]]) for z in (q, k, v)), cu_seqlens=cu, max_seqlen=K,
                               rel_pos_bias=(table, index), positions=torch.cat([pos[0], pos[1, :1]]))
    ref = _attention_ref(q, k, v, bias(pos))
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed[:K], ref[0], rtol=1e-10, atol=1e-10)
    ref_one = _attention_ref(q[1:, :1], k[1:, :1], v[1:, :1], bias(pos[1:, :1]))
    torch.testing.assert_close(packed[K:], ref_one[0], rtol=1e-10, atol=1e-10)

    grad = torch.randn_like(dense)
    got = torch.autograd.grad((dense * grad).sum(), (q, k, v, table))
    want = torch.autograd.grad((ref * grad).sum(), (q, k, v, table))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


#################################################################################
#                                    Diffusion                                  #
#################################################################################

def _adm_space_reference(T, spec):
    """ADM's space_timesteps written out independently (set of kept timesteps); ddimN may use stride T."""
    if spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == n:
                return set(range(0, T, stride))
        return None
    counts = [int(c) for c in spec.split(",")]
    size_per, extra = divmod(T, len(counts))
    start, steps = 0, set()
    for i, c in enumerate(counts):
        size = size_per + (i < extra)
        if size < c:
            return None
        stride = 1 if c <= 1 else (size - 1) / (c - 1)
        cur = 0.0
        for _ in range(c):
            steps.add(start + round(cur))
            cur += stride
        start += size
    return steps


@pytest.mark.parametrize("T", [37, 100, 1000, 4000])
@pytest.mark.parametrize("spec", ["ddim25", "ddim1", "250", "10,10,5", "7,3", "1", "27"])
def test_respacing_strings_at_other_lengths(T, spec):
    """Respacing at diffusion lengths other than 1000 keeps ADM's steps, and the respaced schedule's
    alpha_bar equals the original's at every kept step (float64)."""
    want = _adm_space_reference(T, spec)
    if want is None:
        with pytest.raises(ValueError):
            space_timesteps(T, spec)
        return
    assert set(space_timesteps(T, spec)) == want
    d = create_diffusion(spec, diffusion_steps=T)
    full = GaussianDiffusion(create_diffusion("", diffusion_steps=T).betas)
    kept = d.timestep_map
    torch.testing.assert_close(d.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec,steps", [("1", 1000), ("ddim1", 1000), ("", 1)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_one_step_adm_diffusion(spec, steps, learn_sigma):
    """A one-step diffusion (respaced to 1 step, or diffusion_steps=1) samples and trains: the step at
    t = 0 returns the clipped x0 prediction (float64 formula here), the VLB is finite."""
    d = create_diffusion(spec, learn_sigma=learn_sigma, diffusion_steps=steps, coefficient_dtype=torch.float64)
    assert d.num_timesteps == 1 and d.timestep_map.tolist() == [0]

    def model(x, t):
        eps = 0.5 * torch.tanh(x)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ab = float(d.alphas_cumprod[0])
    x0 = (noise / math.sqrt(ab) - math.sqrt(1 / ab - 1) * 0.5 * torch.tanh(noise)).clamp(-1, 1)
    for loop in (d.p_sample_loop, d.ddim_sample_loop):
        torch.testing.assert_close(loop(model, noise.shape, noise=noise), x0, rtol=1e-12, atol=1e-12)
    losses = d.training_losses(model, torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1)
    assert torch.isfinite(losses["loss"]).all()


def test_bad_schedule_lengths_and_respacing_strings_name_the_argument():
    with pytest.raises(ValueError, match="diffusion_steps=10 gives beta_end=2 > 1"):
        create_diffusion("", diffusion_steps=10)
    with pytest.raises(ValueError, match="timestep_respacing 'ddim' is not 'ddimN'"):
        create_diffusion("ddim")
    with pytest.raises(ValueError, match="timestep_respacing '25x' is not 'ddimN' or comma-separated ints"):
        create_diffusion("25x")


def test_sde_heun_at_singular_end_time_is_rejected():
    """Heun + last_step=None on a Linear velocity model evaluates the score at sigma = 0 (SiT: NaN)."""
    transport = create_transport("Linear", "velocity")
    with pytest.raises(ValueError, match="method='Heun' with last_step=None ends at t=1.0"):
        sample_sde(transport, lambda x, t: -x, torch.randn(2, 1, 2, 2), method="Heun", last_step=None, num_steps=5)
    out = sample_sde(transport, lambda x, t: -x, torch.randn(2, 1, 2, 2), method="Euler", last_step=None, num_steps=5)
    assert torch.isfinite(out).all()


def _gaussian_velocity(path, mu, s):
    """Exact velocity of a path for data N(mu, s^2) per coordinate (x_t = alpha x1 + sigma x0)."""
    def model(x, t):
        tt = t.reshape(-1, 1, 1, 1).to(torch.float64)
        alpha, d_alpha = path.alpha(tt)
        sigma, d_sigma = path.sigma(tt)
        var = alpha ** 2 * s ** 2 + sigma ** 2
        centred = x - alpha * mu
        return d_alpha * (mu + alpha * s ** 2 / var * centred) + d_sigma * (sigma / var * centred)
    return model


@pytest.mark.parametrize("path", ["Linear", "GVP"])
def test_ode_transports_gaussian_data_exactly(path):
    """With the exact velocity of Gaussian data, the probability flow maps noise x0 to mu + s x0
    (the monotone affine map between the Gaussians): dopri5 reproduces it, heun converges to it."""
    transport = create_transport(path, "velocity")
    model = _gaussian_velocity(transport.path, 0.3, 0.5)
    x0 = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_ode(transport, model, x0, method="dopri5", num_steps=2, atol=1e-10, rtol=1e-10, backend="native")
    torch.testing.assert_close(out, 0.3 + 0.5 * x0, rtol=1e-7, atol=1e-7)
    out = sample_ode(transport, model, x0, method="heun", num_steps=200)
    torch.testing.assert_close(out, 0.3 + 0.5 * x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma_min,sigma_max,steps", [(0.01, 5.0, 7), (1e-4, 1000.0, 12), (0.1, 10.0, 2)])
def test_edm_heun_other_sigma_ranges_match_algorithm_2(sigma_min, sigma_max, steps):
    """EDM's Heun sampler at noise ranges other than MaskDiT's, against Algorithm 2 written here."""
    sd = 0.7

    def net(x, sigma, labels=None):
        return x * sd ** 2 / (sd ** 2 + sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2)

    z = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rho = 7.0
    ts = [(sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
          for i in range(steps)] + [0.0]
    x = z * ts[0]
    for i in range(steps):
        d = (x - x * sd ** 2 / (sd ** 2 + ts[i] ** 2)) / ts[i]
        x_next = x + (ts[i + 1] - ts[i]) * d
        if i < steps - 1:
            d2 = (x_next - x_next * sd ** 2 / (sd ** 2 + ts[i + 1] ** 2)) / ts[i + 1]
            x_next = x + (ts[i + 1] - ts[i]) * (0.5 * d + 0.5 * d2)
        x = x_next
    out = heun_sampler(net, z, num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_cfg_scale_one_runs_one_batch_and_equals_the_model():
    """Guidance at scale 1 (constant or MDT's power-cosine schedule) skips the doubled batch."""
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return x * (y.view(-1, 1, 1, 1) + 1.0) + t.view(-1, 1, 1, 1)

    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 1, 2])
    for cfg in (ClassifierFreeGuidance(model, 1.0, null_label=10),
                ClassifierFreeGuidance(model, 1.0, null_label=10, schedule=lambda t, s: s)):
        assert torch.equal(cfg(x, t, y), model(x, t, y))
    assert calls == [3, 3, 3, 3]
    guided = ClassifierFreeGuidance(model, 2.0, null_label=10)(x, t, y)  # still doubled when guiding
    assert calls[-1] == 6
    torch.testing.assert_close(guided, 2 * model(x, t, y) - model(x, t, torch.full_like(y, 10)))


def test_ops_compile_fullgraph_dynamic_across_unseen_shapes():
    """gather -> adaLN -> scatter and the biased attention under torch.compile(fullgraph=True,
    dynamic=True): changing B, N, K and grids give eager's results (aot_eager keeps it
    cheap on CPU; the fake kernels and dynamic shapes are what is under test)."""
    torch._dynamo.reset()

    def tokens(x, ids, fill, shift, scale):
        return ops.scatter_tokens(ops.adaln_modulate(ops.gather_tokens(x, ids), shift, scale), ids, fill, x.shape[1])

    def attn(q, k, v, table, index, pos):
        return ops.attention(q, k, v, rel_pos_bias=(table, index), positions=pos)

    c_tokens = torch.compile(tokens, fullgraph=True, dynamic=True, backend="aot_eager")
    c_attn = torch.compile(attn, fullgraph=True, dynamic=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    for B, N, D, K in ((2, 16, 72, 5), (3, 25, 72, 7), (1, 9, 72, 9)):
        args = (torch.randn(B, N, D, generator=g).requires_grad_(),
                torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)]),
                torch.randn(D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, D, generator=g))
        out = c_tokens(*args)
        torch.testing.assert_close(out, tokens(*args), rtol=0, atol=0)
        out.sum().backward()
    for grid, K in ((4, 5), (6, 11)):
        index = relative_position_index(grid)
        q, k, v = (torch.randn(2, K, 2, 8, generator=g) for _ in range(3))
        table = torch.randn((2 * grid - 1) ** 2 + 3, 2, generator=g)
        pos = torch.stack([torch.randperm(grid * grid, generator=g)[:K] for _ in range(2)])
        torch.testing.assert_close(c_attn(q, k, v, table, index, pos), attn(q, k, v, table, index, pos), rtol=0, atol=0)
