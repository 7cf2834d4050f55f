"""One check shared by the masked families: unmasked, dense-masked and packed forwards each trace
to exactly one graph, and the masked training graph compiles whole through the custom ops."""
import torch
import torch._dynamo

from masked_dit.nn.masking import packed_masking, random_masking


def check_masked_forwards_compile(model, x, c, y):
    """``model(x, c, y, ids_keep=...)`` with 16 tokens: one graph per forward kind (fullgraph=True raises
    on any break; the counting backend sees every graph dynamo makes), equal to eager; then the masked
    forward compiles with autograd (aot_eager) and backward runs."""
    ids_keep, _, _ = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    pm = packed_masking([3, 9], 16, generator=torch.Generator().manual_seed(0))

    def masked(x, c, y, ids_keep):
        return model(x, c, y, ids_keep=ids_keep)

    def packed(x, c, y, ids, cu, seg):
        return model(x, c, y, ids_keep=ids, cu_seqlens=cu, segment_ids=seg, max_seqlen=pm.max_seqlen)

    cases = [(model, (x, c, y)), (masked, (x, c, y, ids_keep)),
             (packed, (x, c, y, pm.ids_keep, pm.cu_seqlens, pm.segment_ids))]
    for fn, args in cases:
        graphs = []

        def counting_backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(fn, fullgraph=True, backend=counting_backend)(*args)
            torch.testing.assert_close(out, fn(*args))
        assert len(graphs) == 1, f"{getattr(fn, '__name__', 'unmasked')}: {len(graphs)} graphs"
    torch._dynamo.reset()
    compiled = torch.compile(masked, fullgraph=True, backend="aot_eager")
    compiled(x, c, y, ids_keep).sum().backward()
