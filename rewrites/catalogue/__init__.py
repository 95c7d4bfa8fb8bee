"""The built-in catalogue, one module per family. Each rewrite is written as a user would
write it: a plain function with the oracle's signature, decorated with its claim."""

from rewrites.catalogue import (
    grouped_kv,
    heads,
    huggingface,
    kv_cache,
    last_token,
    length_mutants,
    libraries,
    masks,
    mutants,
    padding,
    projections,
    scale,
    serving,
    softmax,
    tiles,
)
from rewrites.registry import Rewrite

FAMILIES = (
    last_token,
    kv_cache,
    heads,
    grouped_kv,
    softmax,
    scale,
    masks,
    projections,
    tiles,
    serving,
    padding,
    libraries,
    huggingface,
    length_mutants,
    mutants,
)


def _collect(modules: tuple) -> tuple[Rewrite, ...]:
    """Each module's rewrites in order; one that a module imports from another (a mutant
    built on `batched_heads`) is listed once, where it is first met."""
    found: dict[int, Rewrite] = {}
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, Rewrite):
                found.setdefault(id(obj), obj)
    return tuple(found.values())


CATALOGUE: tuple[Rewrite, ...] = _collect(FAMILIES)
