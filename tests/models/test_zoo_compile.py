"""torch.compile(fullgraph=True) runs DiT, SiT and REPA-SiT forwards with zero graph breaks
(input validation included: the label range check becomes an in-graph assert when compiling).

Kept tiny and on the `aot_eager` backend: Dynamo tracing is what decides graph breaks, and CPU
Inductor compilation would cost minutes of CI time for nothing more on that question.
"""
import pytest
import torch

from masked_dit.models import build

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _model_and_inputs(family):
    torch.manual_seed(0)
    extra = {}
    if family.startswith("repa_sit"):  # repa_sit_qk_norm: REPA's --qk-norm
        extra = dict(z_dims=[8], encoder_depth=1, projector_dim=16, qk_norm=family.endswith("qk_norm"))
        family = "repa_sit"
    model = build(family, **TINY, **extra)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    t = torch.tensor([3, 700]) if family == "dit" else torch.tensor([0.2, 0.9])
    return model, (torch.randn(2, 4, 8, 8), t, torch.tensor([1, 10]))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("family", ["dit", "sit", "repa_sit", "repa_sit_qk_norm"])
@pytest.mark.parametrize("train", [False, True])
def test_no_graph_breaks(family, train):
    model, inputs = _model_and_inputs(family)
    model.train(train)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_fullgraph_compile_matches_eager_and_checks_labels():
    model, inputs = _model_and_inputs("sit")
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match=r"labels y: label out of range \[0, 11\)"):
            compiled(inputs[0], inputs[1], torch.tensor([1, 11]))


def test_forward_with_cfg_no_graph_breaks():
    model, (x, t, y) = _model_and_inputs("dit")
    model.eval()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.forward_with_cfg)(x, t, y, 4.0)
    assert explained.graph_break_count == 0, explained.break_reasons
