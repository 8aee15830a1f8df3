"""A *tail* of a network: an ordered chain of named modules that ends at the head.

A posterior over a tail's weights keeps the speed of the head construction: what enters each
tail module during one forward pass is recorded by forward pre-hooks (:meth:`Tail.capture`), and
the tail alone is then re-run under M weight draws in one batched call
(``torch.func.vmap`` over ``torch.func.functional_call``, :meth:`TailDraws.apply`).

How the chain is re-run (:meth:`Tail.run`): module ``k`` gets the arguments it was called with,
except its first positional argument (or its first parameter, where the body passes it by
keyword), which is the output of module ``k - 1`` (reshaped to the
recorded shape: the e3nn denoiser reshapes its last layer's ``(B*N, C)`` output to ``(B, N, C)``
before the head).  Every other argument (a UNet up-block's skip tensors and time embedding, a
graph's edges, attention masks) comes from the body and is reused as recorded, so the tail must
be a *chain*: nothing the body computes after the first tail module may depend on tail weights.
One exception widens the chain to a small graph: an argument (first or not, also inside a
tuple, list or dict) that *is* an output of an earlier tail module in the same pass (the same
tensor object, or one element of a tuple output) is fed from that module's re-run output.  EDM's
last block returns ``(h, x)``: the head takes ``h``, and a parameter-free readout takes the head's
output and ``x`` (:mod:`genunc.zoo.edm`).  A module called several times
in one pass (a backbone that runs its last layer once per chunk of atoms) is re-run once per
recorded call; the outputs are concatenated along dim 0 when the next module is called once.

The head of today's posteriors is the special case "tail of one module".

*Rows*: a recorded pass is **row-separable** when every tensor it recorded has the batch's rows
on its leading axis (UNets, transformers).  Its rows can then be selected (fitting one row per
sample) and split into the row groups of a batched run of several trajectories (the semantic
score: draw ``g`` re-runs the tail on group ``g``'s own recorded inputs).  Graph models that
flatten atoms and edges are not; for them a trajectory group runs the model with the draw's
tail weights swapped in (:meth:`Tail.swapped`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from genunc.adapters.base import resolve_module
from genunc.errors import GenuncError, HeadNotCalledError, ShapeMismatchError
from genunc.posterior.heads import check_finite
from genunc.posterior.stacked import StackedDraws


@dataclass(frozen=True)
class _Slot:
    """Stands for a recorded argument that a tail module's re-run output replaces: only its
    shape is kept.  ``source``: ``(module, call, element)`` of the earlier tail module's output
    it was (``element`` None: the whole output, else that element of a tuple output); None: the
    first argument, fed from the previous module's output(s)."""

    shape: tuple[int, ...]
    source: tuple[int, int, int | None] | None = None


@dataclass
class TailInputs:
    """What entered every tail module during one forward pass.

    ``calls[k]`` lists ``(args, kwargs)`` of each call of tail module ``k``; for ``k > 0`` the
    first positional argument is a :class:`_Slot` (only its shape), since the re-run feeds the
    previous module's output there.  ``rows``: the leading size of the model input (the batch).
    """

    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]
    rows: int

    # ---------------------------------------------------------------- row structure
    def _leaves(self) -> list[Any]:
        return tree_flatten(self.calls)[0]

    @property
    def separable(self) -> bool:
        """Every recorded tensor (and slot) has the rows on its leading axis, and every module
        was called once."""
        if any(len(c) != 1 for c in self.calls):
            return False
        for leaf in self._leaves():
            shape = leaf.shape if isinstance(leaf, (Tensor, _Slot)) else None
            if shape is not None and (len(shape) == 0 or shape[0] != self.rows):
                return False
        return True

    def _require_separable(self, what: str) -> None:
        if not self.separable:
            raise ShapeMismatchError(
                f"{what} needs row-separable tail inputs (every recorded tensor with the "
                f"{self.rows} rows on its leading axis, each module called once); this tail's "
                "are not (a graph model flattens atoms and edges)")

    def _map(self, fn: Any) -> "TailInputs":
        leaves, spec = tree_flatten(self.calls)
        return replace(self, calls=tree_unflatten([fn(x) for x in leaves], spec))

    def select(self, rows: Tensor | Sequence[int] | slice) -> "TailInputs":
        """The recorded inputs of some rows (a row-separable pass)."""
        self._require_separable("selecting rows")
        index = torch.arange(self.rows)[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        index = index.reshape(-1)

        def pick(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.index_select(0, index.to(x.device))
            if isinstance(x, _Slot):
                return replace(x, shape=(len(index), *x.shape[1:]))
            return x

        out = self._map(pick)
        out.rows = len(index)
        return out

    def split(self, groups: int) -> "TailInputs":
        """``(G*B, ...)`` leaves -> ``(G, B, ...)``: one row group per trajectory (vmap's axis)."""
        self._require_separable("splitting into trajectory groups")
        if self.rows % groups:
            raise ShapeMismatchError(f"{self.rows} rows do not split into {groups} groups")

        def cut(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.reshape(groups, self.rows // groups, *x.shape[1:])
            if isinstance(x, _Slot):
                return replace(x, shape=(self.rows // groups, *x.shape[1:]))
            return x

        out = self._map(cut)
        out.rows = self.rows // groups
        return out

    def to(self, *args: Any, **kwargs: Any) -> "TailInputs":
        return self._map(lambda x: x.to(*args, **kwargs) if isinstance(x, Tensor) else x)

    def tensor_parts(self) -> tuple[tuple[Tensor, ...], Callable[[Sequence[Tensor]], "TailInputs"]]:
        """The recorded tensors, and how to rebuild these inputs with others in their places
        (what ``vmap`` needs: it maps over tensors, not over the recorded call structure)."""
        leaves, spec = tree_flatten(self.calls)
        where = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]

        def rebuild(tensors: Sequence[Tensor]) -> "TailInputs":
            flat = list(leaves)
            for i, x in zip(where, tensors):
                flat[i] = x
            return TailInputs(tree_unflatten(flat, spec), self.rows)

        return tuple(leaves[i] for i in where), rebuild


@dataclass
class _Recorder:
    """Filled by the pre-hooks during a forward pass."""

    n_modules: int
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = field(default_factory=list)
    rows: int = 0
    #: id -> (tensor, module, call, element) of every output of a tail module in this pass
    #: (the tensor is kept, so that its id is not reused by another one before the reset)
    produced: dict[int, tuple[Tensor, int, int, int | None]] = field(default_factory=dict)

    def reset(self) -> None:
        self.calls = [[] for _ in range(self.n_modules)]
        self.produced = {}

    def source_of(self, value: Tensor) -> tuple[int, int, int | None] | None:
        entry = self.produced.get(id(value))
        return entry[1:] if entry is not None and entry[0] is value else None


#: draws a batched block re-run evaluates at once: the block's activations are held for this
#: many draws, not all M (memory grew by one block's activations per draw), and batches of
#: this size keep most of the batching's speed
DRAWS_PER_PASS = 4


class Tail:
    """An ordered chain of named modules of `model`, the last one the head.

    Args:
        model: the denoiser.
        names: the tail's module names, in call order (``["up_blocks.2", "conv_norm_out",
            "conv_act", "conv_out"]``); modules without parameters (activations) may be named.
        tied: what to do with a tail parameter that a body module also uses (tied embeddings):
            ``"untie"`` (default) perturbs it in the tail only, the body keeps its pretrained
            value; ``"error"`` refuses the tail.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, tied: str = "untie") -> None:
        names = list(names)
        if not names:
            raise GenuncError("a tail names at least one module")
        if tied not in ("untie", "error"):
            raise GenuncError(f"tied must be 'untie' or 'error', got {tied!r}")
        if len(set(names)) != len(names):
            raise GenuncError(f"tail modules repeat: {names}")
        for a in names:
            for b in names:
                if a != b and b.startswith(a + "."):
                    raise GenuncError(f"tail modules nest: '{b}' lies inside '{a}'")
        self.model = model
        self.names = names
        self._reruns = 0  # > 0 while the tail re-runs itself: recording hooks stand aside
        self.modules = [resolve_module(model, n) for n in names]
        #: vmap has no batching rule for attention's fused kernel and falls back to a slow
        #: per-draw loop of its own: one plain call per draw is faster (2x on a text block)
        self.loop_draws = any(isinstance(m, nn.MultiheadAttention)
                              for module in self.modules for m in module.modules())
        #: ``"<module>.<param>"`` -> shape, in the order of the flat posterior vector
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        seen: dict[int, str] = {}
        for name, module in zip(names, self.modules):
            for pname, p in module.named_parameters():
                key = f"{name}.{pname}"
                if id(p) in seen:
                    raise GenuncError(f"tail parameters '{seen[id(p)]}' and '{key}' are one tensor; "
                                      "name a tail whose modules share no weights")
                seen[id(p)] = key
                self.param_shapes[key] = tuple(p.shape)
        if not self.param_shapes:
            raise GenuncError(f"tail {names} has no parameters to perturb")
        inside = set(seen)
        tail_ids = {id(m) for module in self.modules for m in module.modules()}
        #: tail parameters the body uses too (perturbed in the tail only)
        self.tied = sorted({seen[id(p)] for m in model.modules() if id(m) not in tail_ids
                            for p in m.parameters(recurse=False) if id(p) in inside})
        if self.tied and tied == "error":
            raise GenuncError(f"tail parameters {self.tied} are shared with the body (tied "
                              "weights); untie them (tied='untie': the body keeps the pretrained "
                              "value, draws perturb the tail's use only) or choose another tail")

    # ---------------------------------------------------------------- parameters
    @property
    def n_params(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.param_shapes.values())

    def parameters(self) -> dict[str, Tensor]:
        """The tail's own (pretrained) parameters, by key."""
        return {f"{name}.{pname}": p for name, module in zip(self.names, self.modules)
                for pname, p in module.named_parameters()}

    def flat_parameters(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parameters().values()])

    def split_flat(self, flat: Tensor) -> dict[str, Tensor]:
        """``(M, P)`` -> key -> ``(M, *shape)``."""
        out, offset = {}, 0
        for key, shape in self.param_shapes.items():
            size = int(torch.Size(shape).numel())
            out[key] = flat[:, offset : offset + size].reshape(flat.shape[0], *shape)
            offset += size
        if offset != flat.shape[1]:
            raise ShapeMismatchError(f"flat draws have {flat.shape[1]} columns, the tail has {offset}")
        return out

    def _per_module(self, params: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = [{} for _ in self.modules]
        for i, name in enumerate(self.names):
            prefix = name + "."
            for key, value in params.items():
                if key.startswith(prefix) and key in self.param_shapes:
                    out[i][key[len(prefix):]] = value
        return out

    # ---------------------------------------------------------------- capture
    @contextmanager
    def capture(self) -> Iterator[_Recorder]:
        """Record what enters every tail module while the model runs (reset per forward pass
        by the caller with ``recorder.reset()``; starts reset)."""
        recorder = _Recorder(len(self.modules))
        recorder.reset()
        handles = []
        for k, module in enumerate(self.modules):
            def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     k: int = k) -> None:
                if self.rerunning:
                    return
                args, kwargs = _input_first(mod, args, kwargs)
                if not args or not isinstance(args[0], Tensor):
                    raise HeadNotCalledError(
                        f"tail module '{self.names[k]}' must get its input as the first "
                        "positional tensor argument")
                first = _link(args[0], recorder)
                if k > 0 and not isinstance(first, _Slot):
                    first = _Slot(tuple(args[0].shape))
                args = (first, *(_link(a, recorder) for a in args[1:]))
                recorder.calls[k].append((args, {n: _link(v, recorder) for n, v in kwargs.items()}))

            def produced(mod: nn.Module, args: tuple[Any, ...], output: Any, k: int = k) -> None:
                if self.rerunning:
                    return
                call = len(recorder.calls[k]) - 1
                parts = enumerate(output) if isinstance(output, tuple) else [(None, output)]
                for element, value in parts:
                    if isinstance(value, Tensor):
                        recorder.produced[id(value)] = (value, k, call, element)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if k < len(self.modules) - 1:  # nothing inside the tail reads the last one's output
                handles.append(module.register_forward_hook(produced))
        try:
            yield recorder
        finally:
            for h in handles:
                h.remove()

    def inputs_of(self, recorder: _Recorder, rows: int) -> TailInputs:
        """The recorded calls of one forward pass, checked."""
        for name, calls in zip(self.names, recorder.calls):
            if not calls:
                raise HeadNotCalledError(f"tail module '{name}' was not called during the forward "
                                         "pass: it is not on the path from input to output")
        first = recorder.calls[0]
        for args, _ in first:
            check_finite(args[0], f"input of tail module '{self.names[0]}'")
        return TailInputs([list(c) for c in recorder.calls], rows)

    # ---------------------------------------------------------------- re-run
    @property
    def rerunning(self) -> bool:
        """True while :meth:`run` executes: hooks on tail modules must then leave it alone."""
        return self._reruns > 0

    def run(self, params: Mapping[str, Tensor] | None, inputs: TailInputs) -> Tensor:
        """The tail's output (the head's output) on recorded inputs, under `params` (key ->
        tensor; missing keys, or None, use the model's own weights)."""
        self._reruns += 1
        try:
            return self._run(params, inputs)
        finally:
            self._reruns -= 1

    def _run(self, params: Mapping[str, Tensor] | None, inputs: TailInputs) -> Tensor:
        per_module = self._per_module(params or {})
        outs: list[list[Any]] = []  # per module, per call
        for k, (module, calls) in enumerate(zip(self.modules, inputs.calls)):
            previous = outs[-1] if outs else []

            def feed(slot: _Slot, call: int, k: int = k, previous: list[Any] = previous,
                     n_calls: int = len(calls)) -> Tensor:
                if slot.source is not None:
                    j, c, element = slot.source
                    value = outs[j][c] if element is None else outs[j][c][element]
                elif len(previous) == n_calls:
                    value = previous[call]
                elif n_calls == 1:
                    value = torch.cat(previous)
                else:
                    raise ShapeMismatchError(
                        f"tail module '{self.names[k - 1]}' was called {len(previous)} times and "
                        f"'{self.names[k]}' {n_calls} times: genunc re-runs a chain whose calls "
                        "pair up one to one, or many to one")
                if not isinstance(value, Tensor):
                    raise ShapeMismatchError(
                        f"tail module '{self.names[k]}' takes the output of the one before it, "
                        f"which returns a {type(value).__name__}: name the tail's modules so that "
                        "each takes a tensor another one returned")
                return value if tuple(value.shape) == slot.shape else value.reshape(slot.shape)

            new = []
            for call, (args, kwargs) in enumerate(calls):
                args, kwargs = _fill((args, kwargs), lambda slot, call=call: feed(slot, call))
                new.append(functional_call(module, per_module[k], args, kwargs, strict=False,
                                           tie_weights=False))
            outs.append(new)
        last = outs[-1]
        return last[0] if len(last) == 1 else torch.cat(last)

    def apply(self, params: Mapping[str, Tensor], inputs: TailInputs,
              per_draw: bool = False) -> Tensor:
        """The tail under M parameter sets (key -> ``(M, *shape)``) in one batched call,
        ``(M, B, ...)``; ``per_draw``: `inputs` are ``split`` into M row groups, group m re-run
        under draw m."""
        keys = list(self.param_shapes)
        stacked = tuple(params[k] for k in keys)
        n = stacked[0].shape[0]
        if per_draw:
            inputs = inputs.split(n)
        if self.loop_draws:
            return self._loop(params, inputs, per_draw)
        batched, rebuild = inputs.tensor_parts()

        def one(p: tuple[Tensor, ...], xs: tuple[Tensor, ...]) -> Tensor:
            return self.run(dict(zip(keys, p)), rebuild(xs))

        try:
            return vmap(one, in_dims=(0, 0 if per_draw else None),
                        chunk_size=DRAWS_PER_PASS)(stacked, batched)
        except (RuntimeError, NotImplementedError):  # ops vmap cannot batch: one call per draw
            return self._loop(params, inputs, per_draw)

    def apply_linearised(self, params: Mapping[str, Tensor], inputs: TailInputs,
                         per_draw: bool = False) -> Tensor:
        """The tail's first-order expansion around its own weights under M parameter sets,
        ``f(x; w) + J_x (w_m - w)`` (``(M, B, ...)``, ``per_draw`` as for :meth:`apply`).

        This is the predictive the Laplace approximation itself assumes (its GGN is the
        curvature of this linear model): directions the data leave undetermined, which take the
        prior's width, change the output only as far as the Jacobian reaches into them, where
        re-running the network at the drawn weights can leave the function altogether.  One
        forward-mode pass per draw (``torch.func.jvp``), batched over draws like :meth:`apply`.
        """
        keys = list(self.param_shapes)
        own = self.parameters()
        primals = tuple(own[k].detach() for k in keys)
        tangents = tuple(params[k].to(p) - p for k, p in zip(keys, primals))
        n = tangents[0].shape[0]
        if per_draw:
            inputs = inputs.split(n)
        batched, rebuild = inputs.tensor_parts()

        def one(t: tuple[Tensor, ...], xs: tuple[Tensor, ...]) -> Tensor:
            x_in = rebuild(xs)
            out, change = jvp(lambda *p: self.run(dict(zip(keys, p)), x_in), primals, t)
            return out + change

        with math_attention():
            try:
                if not self.loop_draws:
                    try:
                        return vmap(one, in_dims=(0, 0 if per_draw else None),
                                    chunk_size=DRAWS_PER_PASS)(tangents, batched)
                    except (RuntimeError, NotImplementedError):  # one call per draw below
                        pass
                return torch.stack([one(tuple(t[m] for t in tangents),
                                        tuple(x[m] for x in batched) if per_draw else batched)
                                    for m in range(n)])
            except NotImplementedError as err:
                raise GenuncError(f"linearised draws need forward-mode differentiation through "
                                  f"the tail {self.names}, which one of its operations lacks "
                                  f"({err}); use predictive='sample'") from None

    def loop_apply(self, params: Mapping[str, Tensor], inputs: TailInputs,
                   per_draw: bool = False) -> Tensor:
        """One re-run per draw: the reference the batched path is tested against."""
        n = next(iter(params.values())).shape[0]
        return self._loop(params, inputs.split(n) if per_draw else inputs, per_draw)

    def _loop(self, params: Mapping[str, Tensor], inputs: TailInputs, per_draw: bool) -> Tensor:
        n = next(iter(params.values())).shape[0]
        outs = []
        for m in range(n):
            x = inputs._map(lambda t, m=m: t[m] if isinstance(t, Tensor) else t) if per_draw \
                else inputs
            outs.append(self.run({k: v[m] for k, v in params.items()}, x))
        return torch.stack(outs)

    @contextmanager
    def swapped(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """Run the model with one draw's tail weights (key -> tensor) in place of its own; the
        body, tied weights included, keeps the pretrained values."""
        saved = []
        try:
            for i, mp in enumerate(self._per_module(params)):
                for pname, value in mp.items():
                    owner = self.modules[i].get_submodule(pname.rpartition(".")[0]) \
                        if "." in pname else self.modules[i]
                    leaf = pname.rpartition(".")[2]
                    saved.append((owner, leaf, owner._parameters[leaf]))
                    owner._parameters[leaf] = value.to(owner._parameters[leaf])
            yield
        finally:
            for owner, leaf, param in reversed(saved):
                owner._parameters[leaf] = param


@contextmanager
def math_attention() -> Iterator[None]:
    """Attention through the reference (math) kernel: the transformer layers' fused fast path
    and the CPU flash-attention kernel have no forward-mode derivative and no vmap rule for
    their backward (a slow per-vector loop), the math kernel has both."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _input_first(module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call that passes the module's input by keyword (diffusers' conditional UNets call
    ``up_block(hidden_states=..., temb=...)``) recorded as if positional: the chain feeds the
    previous module's output as the first positional argument."""
    if args:
        return args, kwargs
    parameters = list(inspect.signature(module.forward).parameters)
    first = parameters[0] if parameters else None
    if first is None or not isinstance(kwargs.get(first), Tensor):
        return args, kwargs
    rest = dict(kwargs)
    return (rest.pop(first),), rest


def _link(value: Any, recorder: _Recorder) -> Any:
    """A recorded argument: a tensor that is an earlier tail module's output becomes a slot fed
    from its re-run; any other tensor is kept (detached)."""
    if isinstance(value, Tensor):
        source = recorder.source_of(value)
        return value.detach() if source is None else _Slot(tuple(value.shape), source)
    if isinstance(value, (tuple, list)):
        return type(value)(_link(v, recorder) for v in value)
    if isinstance(value, dict):
        return {k: _link(v, recorder) for k, v in value.items()}
    return value


def _fill(value: Any, feed: Callable[[_Slot], Tensor]) -> Any:
    """`value` with every slot replaced by what `feed` gives for it."""
    if isinstance(value, _Slot):
        return feed(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_fill(v, feed) for v in value)
    if isinstance(value, dict):
        return {k: _fill(v, feed) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class TailDraws(StackedDraws):
    """M parameter sets for a tail (key -> ``(M, *shape)``), which apply themselves.

    The same contract as :class:`~genunc.posterior.draws.HeadDraws`: ``apply(inputs)`` re-runs
    the tail under every draw in one batched call, ``with_map`` says whether draw 0 is the
    posterior mean; the inputs are recorded :class:`TailInputs` instead of head features.
    """

    params: Mapping[str, Tensor]
    tail: Tail
    with_map: bool = False
    #: apply the tail's linearisation around its own weights (:meth:`Tail.apply_linearised`)
    #: instead of re-running it at the drawn weights
    linearised: bool = False

    @classmethod
    def from_flat(cls, flat: Tensor, tail: Tail, with_map: bool = False,
                  linearised: bool = False) -> "TailDraws":
        return cls(tail.split_flat(flat), tail, with_map, linearised)

    def apply(self, inputs: TailInputs, per_draw: bool = False) -> Tensor:
        """Tail outputs under every draw, ``(M, B, ...)``; ``per_draw``: the inputs hold M row
        groups (one trajectory per draw), group m re-run under draw m."""
        if self.linearised:
            return self.tail.apply_linearised(self.params, inputs, per_draw)
        return self.tail.apply(self.params, inputs, per_draw)

    def require_weights(self, what: str) -> None:
        """Refuse linearised draws where `what` runs the whole model with a draw's weights."""
        if self.linearised:
            raise GenuncError(f"{what} runs the model with each draw's block weights swapped in, "
                              "which has no linearised form; use predictive='sample' here")

