"""Where counterexamples are remembered between runs: a Hypothesis example database.

Every failing problem a search finds (the deterministic run, an exploration with other
seeds, another machine, a GPU) is saved under its search's key and tried first by later
runs, before any generated problem. What is saved is the problem itself (its arrays, as
an .npz), not Hypothesis's choice sequence: it stays the same problem when the strategies
change, and it is tried as an extra example, so the search that follows is the full one
(a fixed rewrite with stale entries is judged as without them, which then drop out) and an
empty database gives the verdicts of no database, byte for byte. Hypothesis's own use of a
database (with its Pareto front) would change what a derandomised search draws.

A database is named by a string, so that it travels to the workers: a folder (Hypothesis's
`DirectoryBasedExampleDatabase`), or `module:attribute` for any Hypothesis database a user
builds (its GitHub-artifact or Redis databases, to share one between CI and a team)."""

from __future__ import annotations

import hashlib
import importlib
import io
import zipfile
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from oracles.problem import AttentionProblem


@cache
def open_database(spec: str | None) -> ExampleDatabase | None:
    """The database `spec` names: None (no database), a folder, or `module:attribute` (an
    ExampleDatabase built by the user's module). One line naming `spec` if it is not one."""
    if spec is None:
        return None
    module, sep, attribute = spec.partition(":")
    if sep and module and attribute and not Path(spec).exists() and "/" not in module:
        try:
            db = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--database {spec}: cannot load {attribute} from {module} ({e})") from e
        if not isinstance(db, ExampleDatabase):
            raise ValueError(f"--database {spec}: {type(db).__name__} is not a Hypothesis ExampleDatabase")
        return db
    if Path(spec).exists() and not Path(spec).is_dir():
        raise ValueError(f"--database {spec}: is a file, not a folder")
    return DirectoryBasedExampleDatabase(spec)


def unit_key(source: str, rewrite: str, backend: str, dtype: str, stage: str) -> bytes:
    """The key of one search's entries. No device in it: what a GPU found is tried on the
    CPU too, and the other way round."""
    return hashlib.sha256(repr(("attention-rewrites", 1, source, rewrite, backend, dtype, stage)).encode()).digest()


def remembered(db: ExampleDatabase | None, key: bytes) -> list[tuple[bytes, AttentionProblem]]:
    """The problems saved under `key`, smallest first; unreadable entries are dropped."""
    if db is None:
        return []
    found = []
    for value in db.fetch(key):
        try:
            found.append((value, decode(value)))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # another format, or damaged
            db.delete(key, value)
    return sorted(found, key=lambda vp: vp[1].x.size)


def encode(problem: AttentionProblem) -> bytes:
    """The problem as the bytes of the .npz that `AttentionProblem.save` writes."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **problem.fields())
    return buffer.getvalue()


def decode(value: bytes) -> AttentionProblem:
    return AttentionProblem.load(io.BytesIO(value))
