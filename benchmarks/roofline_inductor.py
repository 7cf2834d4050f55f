"""The Inductor kernels of a compiled training step, counted on the CPU (roofline_step.py's compiled variants).

A TorchDispatchMode cannot see inside compiled code (dynamo runs eager under one), so the compiled floor is
put together from two counts of the same step:

* the eager trace (``torch.compiler.set_stance("force_eager")``) with every op tagged in or out of a
  compiled region (:class:`RegionTagger`: forward by module hooks, backward by the autograd node running
  it). Ops outside the compiled blocks (embedders, final layer, loss, optimizer, EMA) and every matmul run
  the same when compiled: they are kept;
* the non-matmul in-block ops are replaced by the kernels Inductor generated for the blocks
  (:class:`InductorGraphs`), each with the scheduler's own byte count (``get_read_write_buffers_sizes``:
  every buffer read and written once at that kernel's fusion), times the calls of its graph in one step.

The CPU (C++) backend fuses with the same scheduler as the GPU (Triton) one, though not always alike
(reductions, templates): a proxy for the GPU's kernels, to be checked against a profile.
"""
from __future__ import annotations

from collections import Counter
from contextlib import ExitStack

import torch
from torch import nn

from benchmarks.roofline_step import ATTENTION_OPS, GEMM_OPS, _tensors, classify


#################################################################################
#                          Tagging ops in compiled regions                      #
#################################################################################

class RegionTagger:
    """Says whether the op running now belongs to one of ``modules`` (forward or backward).

    Forward: a depth counter set by pre/post hooks. Backward: after each forward the autograd graph is
    walked from the module's outputs back to its inputs; the nodes on the way (sequence numbers) are the
    module's backward, recognised later through ``torch._C._current_autograd_node()``."""

    def __init__(self, modules: list[nn.Module]):
        self.depth = 0
        self.backward_nodes: set[int] = set()
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._leave, with_kwargs=True))

    def _enter(self, module, args, kwargs):
        self.depth += 1

    def _leave(self, module, args, kwargs, output):
        self.depth -= 1
        stops = {t.grad_fn._sequence_nr() for t in _tensors((args, kwargs)) if t.grad_fn is not None}
        todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            seq = node._sequence_nr()
            if seq in stops or seq in self.backward_nodes or type(node).__name__ == "AccumulateGrad":
                continue
            self.backward_nodes.add(seq)
            todo.extend(fn for fn, _ in node.next_functions if fn is not None)

    def inside(self) -> bool:
        if self.depth:
            return True
        node = torch._C._current_autograd_node()
        return node is not None and node._sequence_nr() in self.backward_nodes

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


#################################################################################
#                              Inductor's kernels                               #
#################################################################################

def _compiled_fx_graph_class():
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:  # torch < 2.6 kept it in codecache
        from torch._inductor.codecache import CompiledFxGraph
    return CompiledFxGraph


def _aten_name(target) -> str:
    """aten.gelu.default -> 'gelu'; other targets by their str."""
    name = getattr(getattr(target, "_overloadpacket", None), "__name__", None)
    return name or str(target).split(".")[-1]


def node_record(snode) -> tuple | None:
    """(name, category, flops, bytes read, bytes written, dtype, in_block, origin) of one scheduler node, or
    None for a node that moves nothing (views, reinterpretations, no-op kernels). Matmuls are recorded with
    category gemm/attention (and 0 FLOPs: the eager trace carries the same matmuls with their FLOPs).
    ``origin``: the FX nodes it computes, by name: the same kernel at another batch size has the same."""
    from torch._inductor import scheduler as S

    if isinstance(snode, S.NopKernelSchedulerNode):
        return None
    nbytes = int(snode.get_read_write_buffers_sizes())
    fx_nodes = [o for sub in snode.get_nodes() if sub.node is not None for o in sub.node.get_origins()]
    origin = ",".join(sorted(o.name for o in fx_nodes))
    if isinstance(snode, S.ExternKernelSchedulerNode):
        node = snode.node
        kernel = getattr(node, "python_kernel_name", None) or str(getattr(node, "op_overload", "") or "")
        if not kernel or not nbytes:
            return None
        name = kernel.replace("torch.ops.", "").replace("extern_kernels.", "")
        name = name[:-len(".default")] if name.endswith(".default") else name
        if name.startswith("aten."):
            name = name[len("aten."):]
        cat = "attention" if any(s in name for s in ATTENTION_OPS) else \
            "gemm" if name in GEMM_OPS or name.split(".")[0] in GEMM_OPS else classify(name, None)
        return (name, cat, 0.0, nbytes, 0, "", True, origin)
    if snode.is_template():  # a GEMM template (max-autotune): the eager trace carries this matmul
        return ("template", "gemm", 0.0, nbytes, 0, "", True, origin)
    ops = sorted({_aten_name(o.target) for o in fx_nodes if o.op == "call_function"})
    if not nbytes:
        return None
    name = "inductor:" + "+".join(ops[:4]) + ("+..." if len(ops) > 4 else "")
    return (name, "inductor", 0.0, nbytes, 0, "", True, origin)


class InductorGraphs:
    """Records the kernels of every graph Inductor compiles while active, and how often each graph runs.

    The FX graph and AOTAutograd caches are off meanwhile: a cache hit would skip the lowering that knows
    the kernels."""

    def __init__(self):
        self.graphs: list[list[tuple]] = []
        self.calls: Counter = Counter()
        self._stack: ExitStack | None = None

    def __enter__(self):
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        cls = _compiled_fx_graph_class()
        init, call = cls.__init__, cls.__call__
        owner = self

        def patched_init(graph_self, current_callable, graph, *args, **kwargs):
            init(graph_self, current_callable, graph, *args, **kwargs)
            graph_self._roofline_id = len(owner.graphs)
            owner.graphs.append([r for r in map(node_record, graph.scheduler.nodes) if r is not None])

        def patched_call(graph_self, *args, **kwargs):
            owner.calls[getattr(graph_self, "_roofline_id", None)] += 1
            return call(graph_self, *args, **kwargs)

        self._stack = ExitStack()
        self._stack.enter_context(inductor_config.patch(fx_graph_cache=False))
        if hasattr(functorch_config, "enable_autograd_cache"):
            self._stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        cls.__init__, cls.__call__ = patched_init, patched_call

        def restore():
            cls.__init__, cls.__call__ = init, call
        self._stack.callback(restore)
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def restart_calls(self) -> None:
        """Forgets the calls so far: :meth:`records` then describes what runs from here (a step after the
        compiling ones)."""
        self.calls.clear()

    def records(self) -> list[tuple]:
        """Every kernel of one counted step, graph by graph, each graph's kernels repeated per call. Within
        a graph the kernels come sorted by name and origin: Inductor orders them by heuristics that depend on
        sizes (peak memory), which would misalign the traces of two batch sizes (a weight's cast paired
        with an activation's)."""
        if None in self.calls:
            raise RuntimeError("a compiled graph ran that was built before counting began (cache hit?)")
        out = []
        for gid, graph in enumerate(self.graphs):
            out.extend(sorted(graph, key=lambda r: (r[0], r[7])) * self.calls.get(gid, 0))
        return out
