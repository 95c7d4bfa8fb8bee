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
CATALOGUE: tuple[Rewrite, ...] = tuple(
    obj for family in FAMILIES for obj in vars(family).values() if isinstance(obj, Rewrite)
)
