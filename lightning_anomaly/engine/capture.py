"""Capture conv feature maps with forward hooks and reduce them to per-filter points in the hook.

Only one layer's maps are alive at a time: each hook turns its layer's ``(N, C, H, W)`` output
into ``(C, N, q)`` PCA points plus per-filter statistics before the forward moves on, so memory is
bounded by one layer's probe activations plus ``O(filters x N)``.

A module that runs more than once in one forward (a shared block, a recurrent stem) fires its
hook once per call. Each call is analysed as its own *layer*: the first keeps the module's name, the
i-th later call is named ``"<name>#<i>"`` (``"block#1"`` for the second call).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_anomaly.engine.pca import batched_pca, batched_pca_with_global

__all__ = [
    "DEGENERATE_REASONS",
    "LayerCapture",
    "LayerSpec",
    "MapStash",
    "capture_layers",
    "eval_mode",
    "reduce_maps",
    "select_layers",
]

#: Codes of :attr:`LayerCapture.reason`: why a filter cannot be clustered (0: it can).
DEGENERATE_REASONS: dict[int, str] = {
    0: "ok",
    1: "non-finite maps (NaN or Inf)",
    2: "constant over the probe (dead or saturated)",
    3: "no clustering into 2 or more groups was possible",
}
# Relative spread under which a filter's maps count as constant over the probe (float32 noise).
_CONSTANT_RTOL = 1e-6
# Bytes of float32 maps reduced at once inside a hook.
_REDUCE_CHUNK_BYTES = 16 << 20

LayerSpec = str | type[nn.Module]
PCAFn = Callable[[Tensor, int], tuple[Tensor, Tensor]]


@dataclass
class LayerCapture:
    """One analysed layer: a conv module's output during one call.

    Attributes:
        name: Layer name (module name, ``#i`` appended for repeated calls).
        module_name: Name of the module in ``model.named_modules()``.
        map_shape: ``(H, W)`` of the feature maps.
        points: ``(C, N, q)`` float32 PCA points, scaled per filter to unit mean squared norm;
            zeros for degenerate filters.
        explained: ``(C,)`` float32 share of the filter's variance that the ``q`` components keep.
        activation: ``(C,)`` float64 mean absolute activation over the probe (0 if non-finite).
        reason: ``(C,)`` int8 degeneracy code, see :data:`DEGENERATE_REASONS`.
        global_points: With class groups and ``global_view``: the same filters' points with only
            the whole probe's mean map removed, ``(C, N, q)``; ``None`` otherwise.
        global_reason: Their degeneracy codes ``(C,)``, or ``None``.
    """

    name: str
    module_name: str
    map_shape: tuple[int, int]
    points: Tensor
    explained: Tensor
    activation: Tensor
    reason: Tensor
    call_index: int = 0
    global_points: Tensor | None = None
    global_reason: Tensor | None = None

    @property
    def n_filters(self) -> int:
        """Number of output channels."""
        return int(self.points.shape[0])

    @property
    def n_components(self) -> int:
        """Dimensions the filters were clustered in: ``min(n_components, H * W)``."""
        return int(self.points.shape[-1])


def _describe(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return shown + more


def named_exactly(layers: Sequence[LayerSpec] | LayerSpec | None) -> set[str]:
    """The entries of ``layers`` that name one module exactly (not a pattern or a class).

    Those must run in the probe forward; modules matched by a pattern, a class or the default
    selection may be left out when they do not (auxiliary heads that only run in training).
    """
    if layers is None:
        return set()
    specs = [layers] if isinstance(layers, (str, type)) else list(layers)
    return {s for s in specs if isinstance(s, str) and not any(ch in s for ch in "*?[")}


def select_layers(model: nn.Module, layers: Sequence[LayerSpec] | None = None) -> list[tuple[str, nn.Module]]:
    """Pick the modules to analyse, in ``named_modules()`` order, each once.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> [n for n, _ in select_layers(net)]
        ['0', '2']
        >>> [n for n, _ in select_layers(net, ["2"])]
        ['2']

    Args:
        model: The network.
        layers: ``None`` for every :class:`torch.nn.Conv2d`; otherwise module names, glob patterns
            over names (``"layer1.*"``) or module classes (``nn.Conv2d``), in any mix.

    Raises:
        ValueError: No conv layer, an unknown name or a pattern that matches nothing (the message
            lists the valid names).
        TypeError: An entry is neither a string nor a module class.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
    if layers is None:
        if not convs:
            raise ValueError(
                f"{type(model).__name__} has no nn.Conv2d layer to analyse; pass layers=[...] naming "
                "modules that output (N, C, H, W) maps"
            )
        return [(n, m) for n, m in named if isinstance(m, nn.Conv2d)]
    if isinstance(layers, (str, type)):
        layers = [layers]
    chosen: set[str] = set()
    names = [n for n, _ in named]
    for spec in layers:
        if isinstance(spec, str):
            is_pattern = any(ch in spec for ch in "*?[")
            hits = fnmatch.filter(names, spec) if is_pattern else [spec] if spec in names else []
            if not hits:
                raise ValueError(
                    f"layers entry {spec!r} matches no module of {type(model).__name__}; "
                    f"conv layers are: {_describe(convs) or 'none'}"
                )
            chosen.update(hits)
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            hits = [n for n, m in named if isinstance(m, spec)]
            if not hits:
                raise ValueError(f"layers entry {spec.__name__} matches no module of {type(model).__name__}")
            chosen.update(hits)
        else:
            raise TypeError(f"layers entries must be names, glob patterns or nn.Module classes, got {spec!r}")
    return [(n, m) for n, m in named if n in chosen]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def hooked_forward(
    model: nn.Module,
    inputs: Any,
    handles: Sequence[torch.utils.hooks.RemovableHandle],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Any:
    """One forward under ``no_grad`` in eval mode (modes restored); ``handles`` removed afterwards, also on error.

    Returns:
        The model's output.
    """
    try:
        with torch.no_grad(), eval_mode(model):
            return model(inputs) if forward is None else forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


def _filter_norms(x: Tensor, order: int) -> Tensor:
    """``(c, N, D)`` -> ``(c,)`` float64 sum of ``|x|`` (``order=1``) or of ``x^2`` (``order=2``) per filter.

    Partial sums in float32 over one contiguous run at a time, the rest in float64: a float32
    reduction of a whole filter at once accumulates naively and loses digits (1e-3 on 256 x 1024
    values). Large maps reduce along their pixels; small maps (few pixels per sample, where a
    per-row reduction is slow) along the probe.
    """
    dim = -1 if x.shape[-1] >= 64 else 1
    part = torch.linalg.vector_norm(x, order, dim=dim).double()
    return (part if order == 1 else part.square()).sum(-1)


def reduce_maps(
    maps: Tensor,
    n_components: int,
    pca: PCAFn = batched_pca,
    groups: Tensor | None = None,
    global_out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reduce one layer's maps to per-filter points and statistics.

    With ``groups`` (the probe's class labels), each group's mean map is subtracted before the PCA:
    the points then show how a sample differs from its own class, not which class it is in, so a
    filter that merely answers one class has nothing left to split off.

    Args:
        maps: ``(N, C, H, W)`` output of the layer, any float dtype or memory format.
        n_components: PCA dimensions (clipped to ``H * W`` and ``N``).
        pca: Function ``(x (B, N, D), q) -> (scores (B, N, q), variance (B, q))``.
        groups: ``(N,)`` int64 group ids in ``[0, G)`` (class labels), or ``None`` for one group.
        global_out: With ``groups``, ``(points (C, N, q), reason (C,))`` buffers to fill with the
            global view: the same maps with only the whole probe's mean removed. With the default
            PCA both views share their products (:func:`~lightning_anomaly.engine.pca.batched_pca_with_global`).

    Returns:
        ``points`` ``(C, N, q)``, ``explained`` ``(C,)``, ``activation`` ``(C,)`` and ``reason``
        ``(C,)`` as in :class:`LayerCapture`.
    """
    n, c = maps.shape[:2]
    d = maps[0, 0].numel()
    q = min(n_components, d, n)
    dev = maps.device
    points = torch.zeros(c, n, q, dtype=torch.float32, device=dev)
    explained = torch.zeros(c, dtype=torch.float32, device=dev)
    activation = torch.zeros(c, dtype=torch.float64, device=dev)
    reason = torch.zeros(c, dtype=torch.int8, device=dev)
    step = max(1, min(c, _REDUCE_CHUNK_BYTES // max(1, n * d * 4)))
    # Without groups, the whole probe is one group: its mean map is removed the same way.
    ids = groups.to(dev) if groups is not None else torch.zeros(n, dtype=torch.long, device=dev)
    onehot = torch.nn.functional.one_hot(ids, int(ids.max()) + 1).float()  # (N, G)
    sizes = onehot.sum(0)  # (G,)
    means_of = onehot.mT / sizes.clamp_min(1)[:, None]  # (G, N): each group's mean
    share = (sizes / n).double()[:, None]  # (G, 1)
    # One buffer for every chunk's centred maps: a fresh tensor of this size costs more in page
    # faults than the arithmetic that fills it.
    buffer = torch.empty(step, n, d, dtype=torch.float32, device=dev)
    tiny = torch.finfo(torch.float32).tiny
    for lo in range(0, c, step):
        hi = min(c, lo + step)
        # reshape, not view: channels_last maps are not contiguous in this order. For contiguous
        # maps this is a strided view; every statistic below reads it without a copy.
        x = maps[:, lo:hi].float().reshape(n, hi - lo, d).transpose(0, 1)  # (c, N, D)
        l1 = _filter_norms(x, 1)  # NaN or Inf anywhere in a filter's maps makes it non-finite
        finite = torch.isfinite(l1)
        activation[lo:hi] = torch.where(finite, l1 / (n * d), torch.zeros((), dtype=l1.dtype, device=dev))
        # Within-group residuals x - onehot @ (means_of @ x), written once into the buffer.
        group_means = torch.bmm(means_of.expand(hi - lo, -1, -1), x)  # (c, G, D)
        xs = torch.baddbmm(x, onehot.expand(hi - lo, -1, -1), group_means, alpha=-1.0, out=buffer[: hi - lo])
        # Spread over the probe = within-group + between-group sums of squares: both non-negative,
        # so a near-constant filter's spread is not lost to cancellation.
        within = _filter_norms(xs, 2)
        gm = group_means.double()
        mean = (gm * share).sum(1, keepdim=True)  # (c, 1, D)
        between = ((gm - mean).square().sum(-1) * share.mT).sum(-1) * n
        spread = within + between
        scale = spread + mean.square().sum((1, 2)) * n
        constant = finite & (spread <= (_CONSTANT_RTOL**2) * scale)
        ok = finite & ~constant
        r = reason[lo:hi]
        r[~finite] = 1
        r[constant] = 2
        if global_out is not None:
            global_out[1][lo:hi] = r
        idx = ok.nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        if idx.numel() < hi - lo:
            xs, within = xs.index_select(0, idx), within[idx]
        if global_out is None:
            scores, var = pca(xs, q)
        else:
            between = (group_means.index_select(0, idx) - mean.index_select(0, idx).float()).float()
            if pca is batched_pca:
                (scores, var), (scores_g, _) = batched_pca_with_global(xs, between, onehot, q)
            else:  # another PCA (the reference backend): the global view on its own
                scores, var = pca(xs, q)
                scores_g, _ = pca(xs + onehot @ between, q)
            _store(scores_g, global_out, lo, idx)
        _store(scores, (points, reason), lo, idx)
        explained[lo + idx] = (var.sum(-1).double() * (n - 1) / within.clamp_min(tiny)).clamp(0, 1).float()
    return points, explained, activation, reason


def _store(scores: Tensor, out: tuple[Tensor, Tensor], lo: int, idx: Tensor) -> None:
    """Scale ``scores`` of the filters ``lo + idx`` to unit mean squared norm into ``out`` (points, reason).

    A filter whose scores are all zero has nothing to cluster: its points stay zero and its reason is 2.
    """
    norm = scores.square().sum(-1).mean(-1).sqrt()
    lost = norm <= 0
    out[0][lo + idx] = (scores / norm.clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]).float()
    if bool(lost.any()):
        out[1][lo + idx[lost]] = 2
        out[0][lo + idx[lost]] = 0


class _Reducer:
    """One layer's maps -> its :class:`LayerCapture`, with the analysis' settings."""

    def __init__(self, n_components: int, pca: PCAFn, groups: Tensor | None, global_view: bool) -> None:
        self.n_components, self.pca, self.groups = n_components, pca, groups
        self.global_view = global_view and groups is not None

    def __call__(self, name: str, call_index: int, maps: Tensor) -> LayerCapture:
        """Reduce ``maps`` ``(N, C, H, W)``, the output of module ``name``'s call ``call_index``."""
        # Out of any autocast region (bf16-mixed, fp16-mixed): the PCA runs in float32 or better.
        with torch.autocast(maps.device.type, enabled=False):
            global_out = None
            if self.global_view:
                q = min(self.n_components, maps[0, 0].numel(), maps.shape[0])
                global_out = (
                    maps.new_zeros(maps.shape[1], maps.shape[0], q, dtype=torch.float32),
                    torch.zeros(maps.shape[1], dtype=torch.int8, device=maps.device),
                )
            extra = {} if global_out is None else {"global_out": global_out}
            points, explained, activation, reason = reduce_maps(maps, self.n_components, self.pca, self.groups, **extra)
        return LayerCapture(
            name if call_index == 0 else f"{name}#{call_index}",
            name,
            (int(maps.shape[2]), int(maps.shape[3])),
            points,
            explained,
            activation,
            reason,
            call_index=call_index,
            global_points=None if global_out is None else global_out[0],
            global_reason=None if global_out is None else global_out[1],
        )


def capture_layers(
    model: nn.Module,
    inputs: Any,
    layers: Sequence[tuple[str, nn.Module]],
    n_components: int,
    *,
    pca: PCAFn = batched_pca,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    on_layer: Callable[[str], None] | None = None,
    required: Collection[str] | None = None,
    groups: Tensor | None = None,
    global_view: bool = False,
) -> list[LayerCapture]:
    """Run one probe forward and return the reduced output of every selected layer (one per call of each module).

    Layers come in the order of ``layers`` (module definition order), repeated calls of a module
    after its first one.

    The forward runs under ``torch.no_grad()`` with the model in eval mode; every submodule's
    train/eval mode is restored and every hook removed afterwards, also when the forward raises.

    Args:
        model: The network (not a DDP wrapper).
        inputs: Probe batch, passed to ``forward`` (default ``model(inputs)``).
        layers: ``(name, module)`` pairs from :func:`select_layers`.
        n_components: PCA dimensions.
        pca: Batched PCA function (the reference backend passes scikit-learn's).
        forward: How to call the model; defaults to ``model(inputs)``.
        on_layer: Called with each layer name once it is reduced (progress reporting).
        required: Names of the selected modules that must run (all of them when ``None``);
            others that did not run (auxiliary heads that only run in training) are left out.
        groups: ``(N,)`` class ids; each class's mean map is removed before the PCA (see
            :func:`reduce_maps`).
        global_view: With ``groups``, also reduce each layer's maps with only the probe's mean
            removed (:attr:`LayerCapture.global_points`), from the same forward.

    Raises:
        ValueError: A selected module's output is not a 4-D tensor, or a required module never ran.
    """
    calls: dict[str, int] = {}
    out: list[LayerCapture] = []
    reduce = _Reducer(n_components, pca, groups, global_view)

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.ndim != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) produced {shape}; only modules whose "
                    "output is an (N, C, H, W) tensor can be analysed, pick others with layers=[...]"
                )
            i = calls.get(name, 0)
            calls[name] = i + 1
            out.append(reduce(name, i, output.detach()))
            if on_layer is not None:
                on_layer(out[-1].name)

        return hook

    hooked_forward(model, inputs, [module.register_forward_hook(make_hook(name)) for name, module in layers], forward)
    # Definition order (then call order): the same whichever subset of layers one call analyses.
    rank = {name: i for i, (name, _) in enumerate(layers)}
    out.sort(key=lambda cap: (rank[cap.module_name], cap.call_index))
    missing = [name for name, _ in layers if name not in calls and (required is None or name in required)]
    if missing:
        raise ValueError(
            f"layers {_describe(missing)} did not run in the probe forward; drop them from layers=[...] "
            "or check the model's forward"
        )
    return out


class MapStash:
    """The selected layers' outputs gathered over another pass's chunked forward, reduced afterwards.

    The per-sample gradient norms run a batched forward of the probe in chunks; with a stash attached
    to it, the capture reduces the maps of that forward instead of running one of its own. The stash
    holds a copy of every selected layer's output for the whole probe, so it gives up (and frees what
    it held) once that would pass ``max_bytes``; also when a layer's output is not a 4-D tensor or a
    module's calls do not line up over the chunks. :meth:`captures` then returns ``None`` and the caller
    runs :func:`capture_layers`.

    Args:
        layers: ``(name, module)`` pairs from :func:`select_layers`.
        n_samples: Probe size: the rows each call of a module must add up to over the chunks.
        max_bytes: Most bytes of maps to hold.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], n_samples: int, max_bytes: int) -> None:
        self.layers = list(layers)
        self.n_samples = n_samples
        self.max_bytes = max_bytes
        self.held = 0
        self.failed = False
        self._maps: dict[str, list[Tensor]] = {name: [] for name, _ in self.layers}

    def give_up(self) -> None:
        """Drop everything held; :meth:`captures` returns ``None`` from now on."""
        self.failed = True
        self._maps = {}
        self.held = 0

    def attach(self, copied: Collection[nn.Module] = ()) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks on the selected modules, for the caller to remove.

        Args:
            copied: Modules whose output a hook registered after these replaces with a copy (the
                gradient pass does so for the layers it differentiates by): nothing downstream can
                change their own output, so it is kept as it is instead of copied once more.
        """
        keep = {id(m) for m in copied}

        def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if self.failed:
                    return
                if not isinstance(output, Tensor) or output.ndim != 4:
                    self.give_up()  # capture_layers raises the error that names the layer
                    return
                self.held += output.numel() * output.element_size()
                if self.held > self.max_bytes:
                    self.give_up()
                    return
                # Otherwise a copy: later in-place operations (ReLU(inplace=True), out += x) would change it.
                out = output.detach()
                self._maps[name].append(out if id(module) in keep else out.clone())

            return hook

        return [module.register_forward_hook(make_hook(name)) for name, module in self.layers]

    def captures(
        self,
        n_components: int,
        *,
        pca: PCAFn = batched_pca,
        on_layer: Callable[[str], None] | None = None,
        required: Collection[str] | None = None,
        groups: Tensor | None = None,
        global_view: bool = False,
    ) -> list[LayerCapture] | None:
        """The layers as :func:`capture_layers` returns them (same arguments), or ``None`` if the stash gave up.

        Each layer's copy is freed once reduced.
        """
        calls = {}
        for name, _ in self.layers:
            calls[name] = self._split_calls(name) if not self.failed else None
            if calls[name] is None or (not calls[name] and (required is None or name in required)):
                self.give_up()  # a required module that never ran: capture_layers raises
                return None
        reduce = _Reducer(n_components, pca, groups, global_view)
        out = []
        for name, _ in self.layers:  # definition order, then call order, as capture_layers
            parts = calls[name]
            assert parts is not None
            self._maps.pop(name)
            for i in range(len(parts)):
                maps = torch.cat(parts[i]) if len(parts[i]) > 1 else parts[i][0]
                parts[i] = []
                out.append(reduce(name, i, maps))
                del maps
                if on_layer is not None:
                    on_layer(out[-1].name)
        self.held = 0
        return out

    def _split_calls(self, name: str) -> list[list[Tensor]] | None:
        """Module ``name``'s outputs as one list of chunks per call, or ``None`` if they do not line up.

        A forward of a chunk calls the module ``r`` times in the same order, so its outputs arrive as
        runs of ``r`` with one batch size per run, which add up to the probe over the chunks.
        """
        seen = self._maps[name]
        rows = sum(int(t.shape[0]) for t in seen)
        if rows % self.n_samples:
            return None
        r = rows // self.n_samples
        if r == 0:
            return []
        parts: list[list[Tensor]] = [[] for _ in range(r)]
        for lo in range(0, len(seen), r):
            run = seen[lo : lo + r]
            if len(run) != r or any(t.shape != run[0].shape for t in run):
                return None
            for i, t in enumerate(run):
                parts[i].append(t)
        return parts
