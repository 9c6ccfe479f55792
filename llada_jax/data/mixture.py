"""Several datasets mixed by weight, deterministically and resumably (grain's `MapDataset.mix`).

`Mixture(sources, weights)` stands wherever the pipelines take one `MapDataset` of examples
(`sft_dataset`, `packed_sft_dataset`, `cpt_dataset`). Each source is shuffled with a seed of its
own derived from the run seed (a new permutation per epoch) and repeated, then the sources are
interleaved by weight: `MapDataset.mix` places element i of the mixture by a fixed rule, so
after n examples source k has contributed `n * w_k / sum(w)` of them (to within one), and the
mixture is random-access. It is therefore as deterministic as a single dataset, and the grain
iterator state the trainer checkpoints resumes it exactly. The mixture is formed before each
process takes its rows of every global batch, so global batch s holds the same examples on any
number of processes.

`parse_mixture("name1:weight1,name2:weight2")` reads the config field `data.mixture` (a string or
a list of "name:weight" strings or (name, weight) pairs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import grain

from llada_jax.data.records import DataError


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Datasets of `{"messages", "meta"}` examples and their (positive, unnormalised) weights."""

    sources: tuple[grain.MapDataset, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        object.__setattr__(self, "names", tuple(self.names) or tuple(f"source{i}" for i in range(len(self.sources))))
        if not self.sources:
            raise DataError("Mixture.sources: expected at least one dataset, found none")
        if len(self.weights) != len(self.sources) or len(self.names) != len(self.sources):
            raise DataError(f"Mixture: expected one weight and one name per source ({len(self.sources)}), found "
                            f"{len(self.weights)} weights and {len(self.names)} names")
        for name, w, src in zip(self.names, self.weights, self.sources):
            if not (math.isfinite(w) and w > 0):
                raise DataError(f"Mixture weight of {name!r}: expected a positive number, found {w}")
            if len(src) == 0:
                raise DataError(f"Mixture source {name!r}: expected examples, found an empty dataset")

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def ordered(self, *, seed: int, shuffle: bool, num_epochs: int | None) -> grain.MapDataset:
        """The mixed stream: each source shuffled (seed derived from `seed` and its index) and
        repeated `num_epochs` times (None: forever), then interleaved by weight. With a finite
        `num_epochs` the mixture ends when a source runs out at its share."""
        parts = []
        for i, src in enumerate(self.sources):
            ds = src.shuffle((seed * 1_000_003 + i) % 2**31) if shuffle else src
            parts.append(ds.repeat(num_epochs))
        if len(parts) == 1:
            return parts[0]
        return grain.MapDataset.mix(parts, list(self.weights))


def parse_mixture(spec: Any, field: str = "data.mixture") -> list[tuple[str, float]]:
    """`"a:3,b:1"`, `["a:3", "b:1"]` or `[("a", 3), ("b", 1)]` -> `[("a", 3.0), ("b", 1.0)]`.

    A name may hold `/` (`chat_jsonl/my_sft`); the weight follows its last `:`. Errors name
    `field`, the expected and the found value."""
    items: Sequence[Any] = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise DataError(f"{field}: expected 'name:weight[,name:weight...]', found {spec!r}")
    out, seen = [], set()
    for item in items:
        if isinstance(item, str):
            name, sep, weight = item.rpartition(":")
            if not sep or not name:
                raise DataError(f"{field}: expected 'name:weight' items, found {item!r} in {spec!r}")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            name, weight = item
        else:
            raise DataError(f"{field}: expected 'name:weight' strings or (name, weight) pairs, found {item!r}")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise DataError(f"{field}: expected a number as the weight of {name!r}, found {weight!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise DataError(f"{field}: expected a positive weight for {name!r}, found {weight!r}")
        if name in seen:
            raise DataError(f"{field}: expected each dataset once, found {name!r} twice")
        seen.add(name)
        out.append((str(name), w))
    return out
