"""The one registry: built-in rewrites plus plugins found through the entry-point group
`attention_rewrites`. This is the only place plugins are discovered.

A rewrite is a candidate GPT-2 attention sublayer with the oracle's signature

    fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head) -> array

written once against the array API (`xp = array_namespace(x)`), so it runs on NumPy,
JAX and PyTorch. A plugin package declares

    [project.entry-points.attention_rewrites]
    my_rewrite = "my_package.module:my_rewrite"

where the object is a `Rewrite` (or a list of them).

A rewrite may instead be declared at the core level (`level="core"`): `fn(q, k, v) -> o`
with q, k, v, o `[..., n_head, n_seq, head_dim]`, causal attention at scale
1/sqrt(head_dim), the shape of a library kernel (`scaled_dot_product_attention`,
`jax.nn.dot_product_attention`). The reference projections are put around it
(`around_core`), and it is verified, reported and listed like any other rewrite.

A rewrite for padded batches (`layout="padded"`) takes one more argument, last:
`attention_mask` [..., n_seq] int (1 real, 0 padding; Hugging Face's convention); one for
packed sequences (`layout="packed"`) takes `cu_seqlens` [n_docs + 1] int (FlashAttention's
convention: where each document starts, then where the last ends; padding follows). A core
kernel takes it after v. Such rewrites are searched on problems with that layout
(oracles/problem.py says what they must compute: padding rows give c_proj's bias).

Names are identities: results, counterexample files and worker look-ups are keyed by them,
so `catalogue()` makes them unique. The first rewrite to take a name keeps it (built-ins
come first); a later one of the same name is listed under its qualified name
`<distribution>:<name>` with an `error` saying whose name it took, and never runs in
another's place.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from oracles.backends import DEVICES, device
from oracles.problem import AttentionProblem
from rewrites.verify.verdicts import CLAIMS, Verdict

ENTRY_POINT_GROUP = "attention_rewrites"
KVHeads = Literal["all", "half", "one"]
KV_HEADS = ("all", "half", "one")
Layout = Literal["dense", "padded", "packed"]
LAYOUTS = ("dense", "padded", "packed")
#: What a plugin's rewrite may be called: names become file names (counterexamples), so no
#: separators or dots first.
VALID_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")


@dataclass(frozen=True)
class Rewrite:
    """One candidate, as the catalogue lists and the verifier checks it."""

    name: str
    description: str  # one line
    family: str  # e.g. "softmax", "heads", "mutant"
    fn: Callable | None  # the portable (array API) implementation
    output: Literal["full", "last"] = "full"  # `last`: returns [..., 1, n_embd], the last token's row
    claim: Verdict | str | None = None  # a Verdict but `error`; a plain string is converted
    backends: Mapping[str, Callable] = field(default_factory=dict)  # per-backend overrides of fn
    source: str = "built-in"  # "built-in" or "plugin <distribution>"
    load_error: str | None = None  # set when a plugin could not be loaded
    level: Literal["sublayer", "core"] = "sublayer"  # core: fn(q, k, v) -> o, projections supplied
    devices: tuple[str, ...] = DEVICES  # where it can run: a CUDA-only kernel says ("cuda",)
    requires: str | None = None  # a module it needs beyond its backend (e.g. "transformers")
    kv_heads: KVHeads = "all"  # core level: the k, v heads the kernel gets (grouped-query attention)
    layout: Layout = "dense"  # padded: takes attention_mask last; packed: cu_seqlens (module doc)

    def __post_init__(self) -> None:
        if self.claim is not None:
            if self.claim not in CLAIMS:
                raise ValueError(f"rewrite {self.name!r}: claim {self.claim!r} is not one of {', '.join(CLAIMS)}")
            object.__setattr__(self, "claim", Verdict(self.claim))
        if self.output not in ("full", "last"):
            raise ValueError(f"rewrite {self.name!r}: output {self.output!r} is not 'full' or 'last'")
        if self.level not in ("sublayer", "core"):
            raise ValueError(f"rewrite {self.name!r}: level {self.level!r} is not 'sublayer' or 'core'")
        if self.kv_heads not in KV_HEADS or (self.kv_heads != "all" and self.level != "core"):
            why = f"kv_heads {self.kv_heads!r} is not one of {', '.join(KV_HEADS)} on a core-level rewrite"
            raise ValueError(f"rewrite {self.name!r}: {why}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"rewrite {self.name!r}: layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if not self.devices or not set(self.devices) <= set(DEVICES):
            raise ValueError(f"rewrite {self.name!r}: devices {self.devices!r} are not among {DEVICES}")

    def implementation(self, backend: str) -> Callable | None:
        """The sublayer function to run on `backend` (a core one with the projections around it)."""
        fn = self.backends.get(backend, self.fn)
        return around_core(fn, self.kv_heads, self.layout) if fn is not None and self.level == "core" else fn

    def group(self, n_head: int) -> int:
        """Query heads per k, v head: 1 but for a grouped-KV kernel."""
        return group_size(self.kv_heads, n_head)

    def takes(self, problem: AttentionProblem) -> AttentionProblem:
        """The problem as this rewrite is judged on it: for a grouped-KV kernel, its key and
        value heads tied in the kernel's groups (the multi-head problem it computes exactly)."""
        return problem.with_kv_heads(kv_head_count(self.kv_heads, problem.n_head))

    def runs_on(self, backend: str) -> bool:
        """Whether this rewrite exists for `backend` (a library kernel exists for one only)
        and can run here (`unavailable`); a plugin that failed to load is run everywhere, to be reported."""
        return self.exists_for(backend) and self.unavailable() is None

    def exists_for(self, backend: str) -> bool:
        """Whether there is code of this rewrite for `backend`, wherever it can run."""
        return self.load_error is not None or self.fn is not None or backend in self.backends

    def unavailable(self) -> str | None:
        """Why this rewrite cannot run here (None: it can): a library it needs is not
        installed, or it exists on another device only."""
        if self.requires is not None and importlib.util.find_spec(self.requires) is None:
            return f"{self.name} needs {self.requires}, which is not installed"
        here = device()
        return None if here in self.devices else f"{self.name} runs on {' or '.join(self.devices)} only, not {here}"

    @property
    def identity(self) -> tuple[str, str]:
        """(source, name): what results are keyed by and what workers look a rewrite up by."""
        return (self.source, self.name)


def kv_head_count(kv_heads: KVHeads, n_head: int) -> int:
    """How many k, v heads a kernel gets: all n_head; "half" (groups of 2 query heads, where
    n_head is even, else all); "one" (multi-query attention)."""
    return {"all": n_head, "half": n_head // 2 if n_head % 2 == 0 else n_head, "one": 1}[kv_heads]


def group_size(kv_heads: KVHeads, n_head: int) -> int:
    """Query heads per k, v head."""
    return n_head // kv_head_count(kv_heads, n_head)


_AROUND: dict[tuple, Callable] = {}  # one wrapper per core function: JAX caches compilations by function


def around_core(core: Callable, kv_heads: KVHeads = "all", layout: Layout = "dense") -> Callable:
    """The sublayer `fn(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head[, layout])` that
    runs the core-level `core(q, k, v[, layout])` between the reference projections; with
    fewer `kv_heads`, k and v of each group's first head only (`Rewrite.takes` ties the
    problem's heads so)."""
    if (core, kv_heads, layout) not in _AROUND:
        from rewrites.common import heads_qkv, project_out

        def sublayer(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head, *mask):
            xp, q, k, v = heads_qkv(x, c_attn_w, c_attn_b, n_head)  # [..., n_head, n_seq, head_dim] x3
            g = group_size(kv_heads, n_head)
            k, v = k[..., ::g, :, :], v[..., ::g, :, :]  # [..., n_kv_head, n_seq, head_dim]
            return project_out(xp, core(q, k, v, *mask), c_proj_w, c_proj_b)  # [..., n_seq, n_embd]

        sublayer.__name__ = getattr(core, "__name__", "core")
        _AROUND[core, kv_heads, layout] = sublayer
    return _AROUND[core, kv_heads, layout]


def rewrite(
    *,
    family: str,
    claim: Verdict | str | None = None,
    output: Literal["full", "last"] = "full",
    name: str | None = None,
    level: Literal["sublayer", "core"] = "sublayer",
    backend: str | None = None,
    devices: tuple[str, ...] = DEVICES,
    kv_heads: KVHeads = "all",
    layout: Layout = "dense",
) -> Callable[[Callable], Rewrite]:
    """Decorator: turn an attention function into a `Rewrite` named after it, described by
    the first line of its docstring. `level="core"`: fn(q, k, v) -> o (module doc).
    `backend`: fn is that backend's code only (a library kernel), not array-API code.
    `devices`: where it can run at all, e.g. ("cuda",) for a CUDA-only kernel (skipped elsewhere).
    `kv_heads`: a core kernel's k and v heads, "all", "half" or "one" (grouped-query attention).
    `layout`: "padded" (takes attention_mask) or "packed" (takes cu_seqlens): module doc."""

    def wrap(fn: Callable) -> Rewrite:
        doc = (fn.__doc__ or "").strip().splitlines()
        portable, only = (None, {backend: fn}) if backend else (fn, {})
        desc = doc[0] if doc else ""
        return Rewrite(name or fn.__name__, desc, family, portable, output, claim, only, level=level, devices=devices,
                       kv_heads=kv_heads, layout=layout)  # fmt: skip

    return wrap


def builtin() -> list[Rewrite]:
    """The built-in catalogue, in a stable order (family by family)."""
    from rewrites.catalogue import CATALOGUE

    return list(CATALOGUE)


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    """The plugin's distribution name, safe inside a file name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", ep.dist.name if ep.dist else "?")


def _from_entry_point(ep: importlib.metadata.EntryPoint) -> list[Rewrite]:
    dist = _distribution(ep)
    source = f"plugin {dist}"
    try:
        obj = ep.load()
        items = [obj] if isinstance(obj, Rewrite) else list(obj) if isinstance(obj, Iterable) else [obj]
        bad = [i for i in items if not isinstance(i, Rewrite)]
        if bad or not items:
            raise TypeError(f"{ep.value} is {type(bad[0] if bad else obj).__name__}, not a rewrites.Rewrite")
    except (Exception, SystemExit) as e:  # a broken plugin is reported, never fatal (sys.exit on import too)
        msg = f"plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}"
        return [Rewrite(_valid(ep.name, dist), "could not be loaded", "plugin", None, source=source, load_error=msg)]
    return [_checked_name(Rewrite(**{**r.__dict__, "source": source}), dist) for r in items]


def _valid(name: str, dist: str) -> str:
    return name if VALID_NAME.fullmatch(name) else f"{dist}:{re.sub(r'[^A-Za-z0-9_.+-]', '_', name)[:100]}"


def _checked_name(r: Rewrite, dist: str) -> Rewrite:
    """A rewrite whose name could not be a file name keeps a safe one and gets an error."""
    if VALID_NAME.fullmatch(r.name):
        return r
    error = f"name {r.name!r} is not a valid rewrite name (letters, digits and _ . + -, at most 100)"
    return Rewrite(**{**r.__dict__, "name": _valid(r.name, dist), "load_error": r.load_error or error})


def plugins() -> list[Rewrite]:
    """Every rewrite registered by an installed package under `attention_rewrites`."""
    found: list[Rewrite] = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        found += _from_entry_point(ep)
    return found


def catalogue(include_plugins: bool = True, names: Iterable[str] = ()) -> list[Rewrite]:
    """Built-ins then plugins, each under a unique name (module doc), optionally only those
    called `names` (unknown names raise)."""
    seen: dict[str, Rewrite] = {}
    for r in builtin() + (plugins() if include_plugins else []):
        if r.name in seen:
            r = _renamed(r, seen)
        seen[r.name] = r
    wanted = list(names)
    if not wanted:
        return list(seen.values())
    unknown = [n for n in wanted if n not in seen]
    if unknown:
        raise ValueError(f"unknown rewrite {', '.join(map(repr, unknown))}; `attention-rewrites list` shows them")
    return [seen[n] for n in wanted]


def _renamed(r: Rewrite, seen: Mapping[str, Rewrite]) -> Rewrite:
    """`r` under its qualified name, `<distribution>:<name>` (then `#2`, `#3`... if a plugin
    repeats itself), with an error naming who holds the name: it must not run as the other."""
    base = f"{r.source.removeprefix('plugin ')}:{r.name}"
    qualified = next(n for n in (base, *(f"{base}#{k}" for k in range(2, len(seen) + 3))) if n not in seen)
    holder = seen[r.name].source
    error = f"name {r.name!r} is already taken by {holder}" + (" (the same plugin)" if holder == r.source else "")
    return Rewrite(**{**r.__dict__, "name": qualified, "load_error": r.load_error or error})
