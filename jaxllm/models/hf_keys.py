"""Hub-key tables: how each Hugging Face tensor maps onto a jaxllm parameter.

A family writes its checkpoint layout as a list of entries
`(kind, hub key template, param path template, transform[, aliases])` with `{i}` the layer and
`{e}` the expert, and expands it for one config with `expand_table`: the loader and writer in
`models/hf.py` then work for every family alike.

Each transform also reads a box of our parameter (`read_box`): the part of the hub tensor under it
and no more, so a process of a multi-host run reads from the files only what its devices hold. A
box is one (start, stop) pair per dimension of our shape. Flattened dimension groups are read as
one contiguous range that covers the box (the box widened where its flat indices are not one
range: sharding splits one dimension of a group, so this is rarely wider than the box).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

Box = tuple[tuple[int, int], ...]


def _widen(box: Box, dims) -> Box:
    """The smallest box holding `box` whose row-major flat indices over `dims` form one range."""
    for k, (start, stop) in enumerate(box):
        if stop - start > 1:  # the first dimension spanning more than one index: later ones go whole
            return tuple(box[: k + 1]) + tuple((0, n) for n in dims[k + 1 :])
    return tuple(box)


def _flat_range(box: Box, dims) -> tuple[int, int]:
    """[lo, hi) of a `_widen`ed box's flat indices over `dims`."""
    strides = [math.prod(dims[k + 1 :]) for k in range(len(dims))]
    lo = sum(start * s for (start, _), s in zip(box, strides))
    hi = sum((stop - 1) * s for (_, stop), s in zip(box, strides)) + 1
    return lo, hi


def _lengths(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def _within(box: Box, outer: Box) -> tuple[slice, ...]:
    """`box` as indices into an array holding `outer`."""
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, outer))


def _read_flat(get, hub_shape, lo: int, hi: int):
    """Flat elements [lo, hi) of a hub tensor, reading whole rows of its first dimension only."""
    row = math.prod(hub_shape[1:])
    first, last = lo // row, (hi - 1) // row + 1
    w = get((slice(first, last),) + tuple(slice(0, n) for n in hub_shape[1:]))
    return w.reshape(-1)[lo - first * row : hi - first * row]


@dataclasses.dataclass(frozen=True)
class Identity:
    def hf_shape(self, shape):
        return tuple(shape)

    def to_ours(self, w, shape):
        return w.reshape(shape)

    def to_hf(self, p, shape):
        return p

    def read_box(self, get, shape, box: Box):
        return get(tuple(slice(a, b) for a, b in box))


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch Linear weight [out, in] <-> our kernel [*in_dims(n_in), *out_dims]."""

    n_in: int = 1

    def hf_shape(self, shape):
        return (math.prod(shape[self.n_in :]), math.prod(shape[: self.n_in]))

    def to_ours(self, w, shape):
        return w.T.reshape(shape)

    def to_hf(self, p, shape):
        return p.reshape(math.prod(shape[: self.n_in]), -1).T

    def read_box(self, get, shape, box: Box):
        n = self.n_in
        box_in, box_out = _widen(box[:n], shape[:n]), _widen(box[n:], shape[n:])
        (i0, i1), (o0, o1) = _flat_range(box_in, shape[:n]), _flat_range(box_out, shape[n:])
        w = get((slice(o0, o1), slice(i0, i1))).T.reshape(_lengths(box_in + box_out))
        return w[_within(box, box_in + box_out)]


@dataclasses.dataclass(frozen=True)
class Conv:
    """torch depthwise Conv1d weight [C, 1, W] <-> our [W, *channel_dims]."""

    def hf_shape(self, shape):
        return (math.prod(shape[1:]), 1, shape[0])

    def to_ours(self, w, shape):
        return w[:, 0, :].T.reshape(shape)

    def to_hf(self, p, shape):
        return p.reshape(shape[0], -1).T[:, None, :]

    def read_box(self, get, shape, box: Box):
        box_ch = _widen(box[1:], shape[1:])
        c0, c1 = _flat_range(box_ch, shape[1:])
        (w0, w1), outer = box[0], (box[0],) + box_ch
        w = get((slice(c0, c1), slice(0, 1), slice(w0, w1)))[:, 0, :].T.reshape(_lengths(outer))
        return w[_within(box, outer)]


@dataclasses.dataclass(frozen=True)
class Reshape:
    """Same values, different shape: `hf(shape)` gives the hub shape from ours."""

    hf: Callable

    def hf_shape(self, shape):
        return tuple(self.hf(shape))

    def to_ours(self, w, shape):
        return w.reshape(shape)

    def to_hf(self, p, shape):
        return p.reshape(self.hf_shape(shape))

    def read_box(self, get, shape, box: Box):
        outer = _widen(box, shape)
        lo, hi = _flat_range(outer, shape)
        w = _read_flat(get, self.hf_shape(shape), lo, hi).reshape(_lengths(outer))
        return w[_within(box, outer)]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    hf_key: str
    path: tuple[str, ...]
    transform: object
    expert: int | None = None
    aliases: tuple[str, ...] = ()


def expand_table(table, *, global_kinds, layer_kinds, num_experts: int = 0) -> list[KeySpec]:
    """Every hub key a checkpoint must hold.

    global_kinds: the entry kinds outside the layers (e.g. {"global", "lm_head"} when untied);
    layer_kinds: one set of entry kinds per layer (entries of kind "expert" expand over
    `num_experts` with `{e}`).
    """
    specs = []

    def add(entry, **fmt):
        hf, path, transform = entry[1:4]
        aliases = tuple(a.format(**fmt) for a in (entry[4] if len(entry) > 4 else ()))
        specs.append(
            KeySpec(hf.format(**fmt), tuple(path.format(**fmt).split("/")), transform, fmt.get("e"), aliases)
        )

    for entry in table:
        if entry[0] in global_kinds:
            add(entry)
    for i, kinds in enumerate(layer_kinds):
        for entry in table:
            if entry[0] not in kinds:
                continue
            if entry[0] == "expert":
                for e in range(num_experts):
                    add(entry, i=i, e=e)
            else:
                add(entry, i=i)
    return specs
