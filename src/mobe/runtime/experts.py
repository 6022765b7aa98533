"""A drop-in for transformers' fused experts module that keeps compressed matrices as their factors.

It has the signature of `Qwen3MoeExperts` & co. (`forward(hidden_states, top_k_index, top_k_weights)`). Each
compressed matrix type is a `FactoredMatrix` child named as the checkpoint names it (`gate_proj`, Mixtral's `w1`),
whose parameters are the factor tensors under their on-disk names (`mobe_A`, `mobe_bases`, ...), so transformers'
own loader fills them; a matrix type left dense is one (E, p, d) stack (down: (E, d, p)) under its checkpoint name.

Only the experts that received tokens in a call are materialised, at most `workspace_experts` at a time. For
MoBE factors the mixed basis M_e = act(sum_j alpha_ej B_j) (r x d) is built and x W_e^T is computed as
(x M_e^T) A_e^T (or (x A_e) M_e for a transposed fit), so no dense p x d expert matrix ever exists; other methods
rebuild the touched experts' matrices.
An optional LRU cache keeps what was built for recently used experts under `cache_mib`, for decoding.

Quantised factors (`mobe quantize`, `--quantize` on a native output) stay integers in memory: a `QuantizedFactor`
child holds `qweight` and `scales` buffers under the factor's name, and only the touched experts' rows of A_e, and
the bases of the expert groups they belong to, are dequantised in a call.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..architectures import ExpertsQuirk, FusedTensor
from ..export import FACTOR_PREFIX
from ..export.native import field_scheme
from ..factorize import ExpertFactors, MobeFactors, activation_fn, get_method, mix_bases
from ..factorize.mobe import orthonormal_rows
from ..quantize import groupwise


class QuantizedFactor(nn.Module):
    """A factor tensor of logical `shape` stored as group-wise integers: `qweight` (int8, or 2/3/4-bit values packed
    in uint8) and `scales`, one per `group_size` entries of the last dimension; with `column_groups`, of the
    transpose's last dimension (groups run down the factor's columns)."""

    def __init__(self, shape: Sequence[int], bits: int, group_size: int, column_groups: bool = False):
        super().__init__()
        self.shape, self.bits, self.group_size, self.column_groups = list(shape), bits, group_size, column_groups
        stored = groupwise.stored_shape(self.shape, column_groups)
        qdtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(groupwise.packed_shape(stored, bits), dtype=qdtype))
        self.register_buffer("scales", torch.ones(groupwise.scales_shape(stored, group_size)))

    def dequantize(self, index: Tensor | int | None = None) -> Tensor:
        """The factor (or its rows `index` along the first dimension) in the scales' dtype."""
        q, s = (self.qweight, self.scales) if index is None else (self.qweight[index], self.scales[index])
        n = groupwise.stored_shape(self.shape, self.column_groups)[-1]
        out = groupwise.dequantize(groupwise.unpack(q, self.bits, n), s, self.group_size)
        return out.transpose(-2, -1) if self.column_groups else out


class FactoredMatrix(nn.Module):
    """One matrix type of one layer's experts, held as a method's factor tensors."""

    def __init__(
        self,
        method: str,
        shapes: Mapping[str, Sequence[int]],
        meta: Mapping[str, str],
        quantization: Mapping | None = None,
    ):
        """`quantization`: the native checkpoint's `mobe.quantization` section (bits, group_size, fields)."""
        super().__init__()
        quantized = set((quantization or {}).get("fields", ()))
        self.factors_cls = get_method(method).factors_cls
        missing = [f for f in self.factors_cls.tensor_fields if f not in shapes]
        if missing:
            raise ValueError(f"method {method!r} needs factor tensors {missing} (config.json mobe.factor_shapes)")
        self.meta = self.factors_cls.read_meta(meta)
        for field in self.factors_cls.tensor_fields:
            if field in quantized:
                bits, group_size, columns = field_scheme(quantization, field)  # type: ignore[arg-type]
                self.add_module(FACTOR_PREFIX + field, QuantizedFactor(shapes[field], bits, group_size, columns))
            elif field in self.factors_cls.index_fields:  # integers: a buffer, loaded but never trained or cast
                self.register_buffer(FACTOR_PREFIX + field, torch.zeros(*shapes[field], dtype=torch.long))
            else:
                self.register_parameter(FACTOR_PREFIX + field, nn.Parameter(torch.empty(*shapes[field])))
        self.quantized = tuple(f for f in self.factors_cls.tensor_fields if f in quantized)

    def tensor(self, field: str, index: Tensor | int | None = None) -> Tensor:
        """One factor tensor (or its rows `index`), dequantised if stored quantised."""
        value = getattr(self, FACTOR_PREFIX + field)
        if isinstance(value, QuantizedFactor):
            return value.dequantize(index)
        return value if index is None else value[index]

    @property
    def device(self) -> torch.device:
        value = getattr(self, FACTOR_PREFIX + self.factors_cls.tensor_fields[0])
        return value.qweight.device if isinstance(value, QuantizedFactor) else value.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the factors compute in (a quantised factor's: its scales')."""
        value = getattr(self, FACTOR_PREFIX + self.factors_cls.tensor_fields[0])
        return value.scales.dtype if isinstance(value, QuantizedFactor) else value.dtype

    def factors(self) -> ExpertFactors:
        """The method's factors object; quantised factors are dequantised whole (see `MobeExperts._built` for the
        per-expert path)."""
        tensors = {f: self.tensor(f) for f in self.factors_cls.tensor_fields}
        return self.factors_cls.from_tensors(tensors, self.meta)


def clamped_swiglu(gate: Tensor, up: Tensor, *, alpha: float, limit: float) -> Tensor:
    """gpt-oss's gating (transformers' `GptOssExperts._apply_gate` on the split projections): the gate clamped above
    and up on both sides at `limit`, then (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# The hidden state of experts whose gating is not act(gate x) * (up x), by `ExpertsQuirk.glu`.
GLU_FUNCTIONS: dict[str, Callable[..., Tensor]] = {"clamped_swiglu": clamped_swiglu}


class MobeExperts(nn.Module):
    def __init__(
        self,
        act_fn: nn.Module | None,
        num_experts: int,
        intermediate_size: int,
        hidden_size: int,
        factored: Mapping[str, FactoredMatrix],
        names: Mapping[str, str],
        workspace_experts: int = 16,
        cache_mib: float = 0.0,
        quirk: ExpertsQuirk | None = None,
        glu_kwargs: Mapping[str, float] | None = None,
        fused: Mapping[str, FusedTensor] | None = None,
    ):
        """`factored`: matrix type -> its factors; `names`: matrix type -> checkpoint name (the child's name).

        `quirk` (gpt-oss): the gating `GLU_FUNCTIONS[quirk.glu]` (with `glu_kwargs`, read from transformers' module)
        in place of `act_fn`, and the per-expert biases, dense parameters under their checkpoint names; the gate/up
        bias is split as the fused gate/up weight is (`fused`)."""
        super().__init__()
        self.act_fn = act_fn
        self.num_experts = num_experts
        self.names = dict(names)
        self.factored = tuple(m for m in ("gate", "up", "down") if m in factored)
        # Matrices whose A_e M_e is W_e^T in transformers' orientation: down (fitted as its transpose) xor a fit of
        # the transposed stack (bases on the wider side of a p > d layer). Fixed at load: off the forward path.
        self.transposed_products = frozenset(
            m for m in self.factored if (m == "down") != (factored[m].meta.get("transposed") == "1")
        )
        self.quirk = quirk
        self.glu = functools.partial(GLU_FUNCTIONS[quirk.glu], **(glu_kwargs or {})) if quirk else None
        self.fused = dict(fused or {})
        self.configure(workspace_experts, cache_mib)
        for matrix in self.factored:
            self.add_module(self.names[matrix], factored[matrix])
        for matrix in ("gate", "up", "down"):  # dense matrices stacked, as transformers stacks the per-expert ones
            if matrix not in factored:
                shape = (hidden_size, intermediate_size) if matrix == "down" else (intermediate_size, hidden_size)
                self.register_parameter(self.names[matrix], nn.Parameter(torch.empty(num_experts, *shape)))
        if quirk and quirk.gate_up_bias:
            bias = torch.empty(num_experts, self.fused["gate"].parts * intermediate_size)
            self.register_parameter(quirk.gate_up_bias, nn.Parameter(bias))
        if quirk and quirk.down_bias:
            self.register_parameter(quirk.down_bias, nn.Parameter(torch.empty(num_experts, hidden_size)))

    def _bias(self, matrix: str, experts: int | list[int]) -> Tensor | None:
        """The bias `matrix`'s projection adds for `experts` (one row, or a row per expert), or None."""
        name = None if self.quirk is None else self.quirk.down_bias if matrix == "down" else self.quirk.gate_up_bias
        if name is None:
            return None
        bias = getattr(self, name)[experts]
        return bias if matrix == "down" else self.fused[matrix].take(bias, dim=-1)

    def _hidden(self, gate: Tensor, up: Tensor) -> Tensor:
        return self.glu(gate, up) if self.glu is not None else self.act_fn(gate) * up

    def configure(self, workspace_experts: int = 16, cache_mib: float = 0.0) -> None:
        """Set the workspace (experts materialised at once) and the cache budget; clears the cache."""
        if workspace_experts < 1:
            raise ValueError(f"workspace_experts must be >= 1, got {workspace_experts}")
        self.workspace_experts = workspace_experts
        self.cache_bytes = int(cache_mib * 2**20)
        self._cache: OrderedDict[tuple[str, int], tuple[Tensor, ...]] = OrderedDict()
        self._owns: dict[tuple[str, int], bool] = {}
        self._cached_bytes = 0

    def matrix(self, name: str) -> FactoredMatrix:
        return getattr(self, self.names[name])

    def _built(self, matrix: str, experts: list[int]) -> dict[int, tuple[Tensor, ...]]:
        """Per expert, what `_project` needs: (A_e, M_e) for MoBE factors, the dense (p, d) matrix otherwise."""
        out = {e: self._cache[(matrix, e)] for e in experts if (matrix, e) in self._cache}
        for e in out:
            self._cache.move_to_end((matrix, e))
        missing = [e for e in experts if e not in out]
        if missing:
            module = self.matrix(matrix)
            dtype = module.dtype
            idx = torch.tensor(missing, device=module.device)
            if module.factors_cls is MobeFactors and module.quantized:
                built = self._built_quantized_mobe(module, missing, idx)
            elif isinstance(factors := module.factors(), MobeFactors):
                per_group = self.num_experts // factors.groups
                if factors.orthonormal == "1":  # A in orthonormal coordinates: the basis from a float32 mix
                    mixed = orthonormal_rows(factors.mixed_bases(idx))
                else:
                    act = activation_fn(factors.activation)
                    mixed = mix_bases(factors.coef[idx], factors.bases, idx // per_group, act)
                built = [(factors.A[e], m) for e, m in zip(missing, mixed.to(dtype), strict=True)]
            else:
                built = [(w,) for w in factors.reconstruct(idx).to(dtype)]
            for e, item in zip(missing, built, strict=True):
                out[e] = item
                self._remember((matrix, e), item, owns_all=bool(module.quantized))
        return out

    def _built_quantized_mobe(self, module: FactoredMatrix, experts: list[int], idx: Tensor) -> list[tuple]:
        """(A_e, M_e) of the given experts, dequantising only their rows of A and their groups' bases."""
        A = module.tensor("A", idx)
        orthonormal = module.meta.get("orthonormal") == "1"  # A in orthonormal coordinates: mix in float32
        coef = module.tensor("coef", idx).float() if orthonormal else module.tensor("coef", idx)
        per_group = self.num_experts // module.mobe_bases.shape[0]  # shape: a parameter's, or the logical one
        group_of = idx // per_group
        act = activation_fn(module.meta["activation"])
        mixed = None
        for g in group_of.unique().tolist():
            rows = (group_of == g).nonzero().squeeze(1)
            bases = module.tensor("bases", g)[None]  # (1, m/g, r, d): this group's only
            bases = bases.float() if orthonormal else bases
            part = mix_bases(coef[rows], bases, torch.zeros_like(rows), act)
            mixed = part.new_empty(len(experts), *part.shape[1:]) if mixed is None else mixed
            mixed[rows] = part
        if orthonormal:
            mixed = orthonormal_rows(mixed)
        own = (lambda t: t.clone()) if self.cache_bytes else (lambda t: t)  # a cached A_e must not pin all of A
        return [(own(A[i]), mixed[i].to(A.dtype)) for i in range(len(experts))]

    def _remember(self, key: tuple[str, int], item: tuple[Tensor, ...], owns_all: bool = False) -> None:
        """Cache `item` under the budget; `owns_all`: every tensor of it is a copy (a dequantised A_e too), where
        otherwise A_e is a view of a parameter and free."""
        size = self._item_bytes(item, owns_all)
        if size > self.cache_bytes:
            return
        while self._cached_bytes + size > self.cache_bytes:
            _, (old, old_owns) = self._cache_entry_pop()
            self._cached_bytes -= self._item_bytes(old, old_owns)
        self._cache[key] = item
        self._owns[key] = owns_all
        self._cached_bytes += size

    @staticmethod
    def _item_bytes(item: tuple[Tensor, ...], owns_all: bool) -> int:
        return sum(t.numel() * t.element_size() for t in (item if owns_all else item[-1:]))

    def _cache_entry_pop(self) -> tuple[tuple[str, int], tuple[tuple[Tensor, ...], bool]]:
        key, item = self._cache.popitem(last=False)
        return key, (item, self._owns.pop(key, False))

    def clear_cache(self) -> None:
        self._cache.clear()
        self._owns.clear()
        self._cached_bytes = 0

    def _dense(self, matrix: str, e: int) -> Tensor:
        """Expert e's dense matrix in transformers' orientation: (p, d) for gate/up, (d, p) for down."""
        return getattr(self, self.names[matrix])[e]

    def _project(self, matrix: str, x: Tensor, e: int, built: dict[str, dict[int, tuple[Tensor, ...]]]) -> Tensor:
        """x W_e^T (plus expert e's bias, if the experts have biases)."""
        bias = self._bias(matrix, e)
        out = self._project_weight(matrix, x, e, built)
        return out if bias is None else out + bias

    def _project_weight(self, matrix: str, x: Tensor, e: int, built: dict) -> Tensor:
        """x W_e^T without forming W_e for MoBE: W = A M for gate/up; down is fitted transposed, W_down^T = A M."""
        if matrix not in self.factored:
            return x @ self._dense(matrix, e).T
        item = built[matrix][e]
        if len(item) == 1:  # a rebuilt (p, d) matrix, down in its fitted (transposed) orientation
            return x @ item[0] if matrix == "down" else x @ item[0].T
        A, M = item
        return (x @ A) @ M if matrix in self.transposed_products else (x @ M.T) @ A.T

    def forward(
        self, hidden_states: Tensor, top_k_index: Tensor | None = None, top_k_weights: Tensor | None = None
    ) -> Tensor:
        if top_k_index is None:
            return self._forward_every_expert(hidden_states)
        shape = hidden_states.shape  # (tokens, d), or (batch, seq, d) where the caller passes it so (DBRX)
        hidden_states = hidden_states.reshape(-1, shape[-1])
        return self._forward_routed(hidden_states, top_k_index.reshape(-1, top_k_index.shape[-1]), top_k_weights).view(
            shape
        )

    def _forward_every_expert(self, hidden_states: Tensor) -> Tensor:
        """Llama 4's call: E blocks of rows, block e holding every token scaled by its weight for expert e (zero
        where e was not chosen). A zero row gives zero (the experts have no biases), so each block's non-zero rows
        run as tokens routed to expert e with weight 1, and the others are never computed."""
        if self.quirk is not None and self.quirk.biases:
            raise ValueError("experts with biases need the routing (top_k_index): a zero row does not give zero")
        E = self.num_experts
        routed = hidden_states.view(E, -1, hidden_states.shape[-1]).ne(0).any(dim=-1).reshape(-1, 1)
        expert = torch.arange(E, device=hidden_states.device).repeat_interleave(hidden_states.shape[0] // E)
        index = torch.where(routed, expert[:, None], E)  # E: out of range, skipped
        return self._forward_routed(hidden_states, index, torch.ones_like(index, dtype=hidden_states.dtype))

    def _forward_routed(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        flat = top_k_index.reshape(-1)
        keep = (flat >= 0) & (flat < self.num_experts)
        order = torch.argsort(torch.where(keep, flat, self.num_experts), stable=True)[: int(keep.sum())]
        experts = flat[order]  # (token, slot) pairs grouped by expert, ascending
        tokens = order // top_k_index.shape[-1]
        x, weights = hidden_states[tokens], top_k_weights.reshape(-1)[order, None]
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()  # host-side: no per-expert syncs
        hit = [e for e, n in enumerate(counts) if n]
        ends = list(itertools.accumulate(counts))
        out = torch.empty_like(x)
        for start in range(0, len(hit), self.workspace_experts):
            batch = hit[start : start + self.workspace_experts]
            built = {matrix: self._built(matrix, batch) for matrix in self.factored}
            rows = slice(ends[batch[0]] - counts[batch[0]], ends[batch[-1]])
            if all(counts[e] == 1 for e in batch):  # decoding: one token per expert, one batched matmul per step
                out[rows] = self._one_token_each(x[rows], batch, built)
                continue
            for e in batch:
                seg = slice(ends[e] - counts[e], ends[e])
                h = self._hidden(self._project("gate", x[seg], e, built), self._project("up", x[seg], e, built))
                out[seg] = self._project("down", h, e, built)
            del built
        final = torch.zeros_like(hidden_states)
        final.index_add_(0, tokens, (out * weights).to(final.dtype))
        return final

    def _one_token_each(self, x: Tensor, batch: list[int], built: dict) -> Tensor:
        """Rows of `x` belong to the experts of `batch` in order, one each: bmm over the stacked matrices."""

        def project(matrix: str, v: Tensor) -> Tensor:  # v: (n, 1, in)
            bias = self._bias(matrix, batch)
            out = project_weight(matrix, v)
            return out if bias is None else out + bias[:, None]

        def project_weight(matrix: str, v: Tensor) -> Tensor:
            if matrix not in self.factored:
                W = getattr(self, self.names[matrix])[batch]  # (n, out, in)
                return torch.bmm(v, W.transpose(1, 2))
            items = [built[matrix][e] for e in batch]
            if len(items[0]) == 1:  # rebuilt matrices, (p, d); down in its fitted (transposed) orientation
                W = torch.stack([i[0] for i in items])
                return torch.bmm(v, W) if matrix == "down" else torch.bmm(v, W.transpose(1, 2))
            A, M = torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])
            if matrix in self.transposed_products:
                return torch.bmm(torch.bmm(v, A), M)
            return torch.bmm(torch.bmm(v, M.transpose(1, 2)), A.transpose(1, 2))

        v = x.unsqueeze(1)
        h = self._hidden(project("gate", v), project("up", v))
        return project("down", h).squeeze(1)
