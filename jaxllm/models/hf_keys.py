"""Hub-key tables: how each Hugging Face tensor maps onto a jaxllm parameter.

A family writes its checkpoint layout as a list of entries
`(kind, hub key template, param path template, transform[, aliases])` with `{i}` the layer and
`{e}` the expert, and expands it for one config with `expand_table`: the loader and writer in
`models/hf.py` then work for every family alike.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Identity:
    def hf_shape(self, shape):
        return tuple(shape)

    def to_ours(self, w, shape):
        return w.reshape(shape)

    def to_hf(self, p, shape):
        return p


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


@dataclasses.dataclass(frozen=True)
class Conv:
    """torch depthwise Conv1d weight [C, 1, W] <-> our [W, *channel_dims]."""

    def hf_shape(self, shape):
        return (math.prod(shape[1:]), 1, shape[0])

    def to_ours(self, w, shape):
        return w[:, 0, :].T.reshape(shape)

    def to_hf(self, p, shape):
        return p.reshape(shape[0], -1).T[:, None, :]


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
