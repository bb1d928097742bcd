"""Each use's gradient of a parameter, handed over where autograd computes it.

A parameter that a forward pass uses k times (a tied embedding: source lookup, target lookup,
output projection) gets k gradients, which autograd sums in the input buffer of the
parameter's ``AccumulateGrad`` node before any hook of the parameter sees them. For sparse COO
gradients that sum is a concatenation: every use's values are copied into a new tensor
(twice for three uses, 64 MiB each at the NMT paper's scale), which is TensorFlow's "assumed
sparse" accumulation that arXiv 1905.04035 replaces by densifying. :class:`UseTaps` lets the
data-parallel reducer densify each use's gradient straight into its bucket slot instead: after
every forward of ``module`` with gradients enabled it walks the autograd graph from the
outputs, finds the nodes that feed a watched parameter's ``AccumulateGrad`` and registers a
post-hook on each (the hooks live as long as that graph). When such a node has run, the hook
offers the gradient on that edge to ``take(param, grad)``; if ``take`` returns True the edge
carries no gradient on to autograd, so autograd sums nothing for that use. ``take`` is only
called in a backward pass that will run the parameter's ``AccumulateGrad`` (not in
``autograd.grad``, which returns the parameter's gradient whole, nor in a ``backward(inputs=)``
without the parameter); the parameter's own hooks (``register_hook``,
``register_post_accumulate_grad_hook``) still run once per pass, after every use, with
whatever was not taken (``None`` when all was).

Uses the graph walk cannot see (a use outside ``module``'s forward, a recomputation inside
backward) reach ``AccumulateGrad`` as usual, so nothing is lost: the reducer adds what arrives
there to what it took.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

Take = Callable[[torch.Tensor, torch.Tensor], bool]


class UseTaps:
    """Post-hooks on the autograd nodes that use ``params`` inside ``module``'s forward (see the
    module docstring). Not collective; :meth:`remove` stops tapping new forwards."""

    def __init__(self, module: nn.Module, params: Sequence[torch.Tensor], take: Take) -> None:
        # The AccumulateGrad nodes, held so that every forward's graph feeds these same nodes
        # (torch keeps a parameter's node only while something references it).
        with torch.enable_grad():
            self._accumulators = {p.view_as(p).grad_fn.next_functions[0][0]: p for p in params}
        self._take = take
        self._handle = module.register_forward_hook(self._after_forward)

    def remove(self) -> None:
        self._handle.remove()

    def _after_forward(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        for node, edges in self._users(output).items():
            node.register_hook(self._hook(edges))

    def _users(self, output: Any) -> dict[Any, list[tuple[int, Any]]]:
        """Each graph node reachable from ``output`` that feeds a watched ``AccumulateGrad``,
        with ``(input index, accumulator)`` of each such edge."""
        stack = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        seen, users = set(stack), {}
        while stack:
            node = stack.pop()
            for i, (nxt, _) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                if nxt in self._accumulators:
                    users.setdefault(node, []).append((i, nxt))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return users

    def _hook(self, edges: list[tuple[int, Any]]) -> Callable[..., Any]:
        accumulators, take = self._accumulators, self._take

        def hook(grad_inputs: tuple[Any, ...], _grad_outputs: tuple[Any, ...]) -> Any:
            out, taken = list(grad_inputs), False
            for i, acc in edges:
                grad = out[i]
                if grad is not None and _accumulates(acc) and take(accumulators[acc], grad):
                    out[i], taken = None, True
            return tuple(out) if taken else None

        return hook


def _accumulates(accumulator: Any) -> bool:
    """Whether the running backward pass will run ``accumulator`` (an ``AccumulateGrad``
    node): not in a ``backward(inputs=...)`` without its parameter, nor in ``autograd.grad``,
    which hands leaf gradients back instead of accumulating them."""
    try:
        return torch._C._will_engine_execute_node(accumulator)
    except RuntimeError as exc:  # torch refuses the question for a leaf in autograd.grad()
        if "autograd.grad" in str(exc):
            return False
        raise


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a forward's output (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
