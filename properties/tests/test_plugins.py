"""Plugins: discovered through the entry-point group, verified like the catalogue, and a
broken one reported as `error` without stopping the run.

The good plugin is built from the README's own example (its pyproject.toml and module),
so the documented example is known to work as written."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from rewrites import registry
from rewrites.verify import Config, Verifier

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(marker: str) -> str:
    """The fenced code block that follows the line containing `marker` in the README."""
    m = re.search(re.escape(marker) + r".*?\n```\w*\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no code block after {marker!r}"
    return m.group(1)


def fake_distribution(site: Path, name: str, entry_points: dict[str, str], files: dict[str, str]) -> None:
    """What `pip install` leaves in site-packages: the modules and a .dist-info with entry points."""
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{eps}")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith(("my_rewrites", "broken_plugin", "my_core"))]:
        del sys.modules[mod]


def install_readme_plugin(site: Path) -> list[str]:
    project = tomllib.loads(readme_block("my-rewrites/pyproject.toml"))
    eps = project["project"]["entry-points"][registry.ENTRY_POINT_GROUP]
    fake_distribution(
        site, project["project"]["name"], eps, {"my_rewrites.py": readme_block("my-rewrites/my_rewrites.py")}
    )
    return list(eps)


def install_broken_plugins(site: Path) -> None:
    fake_distribution(
        site,
        "broken-plugin",
        {
            "does_not_import": "broken_plugin.missing:thing",
            "not_a_rewrite": "broken_plugin.ok:NOT_A_REWRITE",
            "wrong_shape": "broken_plugin.ok:wrong_shape",
            "makes_nan": "broken_plugin.ok:makes_nan",
        },
        {
            "broken_plugin/__init__.py": "",
            "broken_plugin/missing.py": "raise ImportError('no module named flash_attn_9000')\n",
            "broken_plugin/ok.py": (
                "from rewrites import rewrite\n"
                "NOT_A_REWRITE = 42\n"
                "@rewrite(family='plugin', claim='equivalent')\n"
                "def wrong_shape(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):\n"
                "    '''Forgets the c_proj.'''\n"
                "    return x @ c_attn_w\n"
                "@rewrite(family='plugin', claim='equivalent')\n"
                "def makes_nan(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):\n"
                "    '''Divides by zero.'''\n"
                "    return x * 0.0 / 0.0\n"
            ),
        },
    )


def test_readme_plugin_is_discovered_and_verified(site, tmp_path):
    names = install_readme_plugin(site)
    found = {r.name: r for r in registry.plugins()}
    assert set(names) <= set(found)
    plugin = found[names[0]]
    assert plugin.source == "plugin my-rewrites" and plugin.load_error is None
    assert registry.catalogue(names=names)[0] is not None  # selectable like a built-in
    results = Verifier(Config(examples=15, report_dir=tmp_path / "report", invariance=False)).verify(
        [plugin], ["numpy"], gpt2_inputs=False
    )
    assert {r.verdict for r in results} <= {"bitwise", "equivalent", "unstable"}
    assert all(r.claim_holds for r in results), [(r.dtype, r.verdict) for r in results]


def test_faulty_plugins_give_error_verdicts_and_the_run_goes_on(site, tmp_path):
    install_broken_plugins(site)
    install_readme_plugin(site)
    plugins = {r.name: r for r in registry.plugins()}
    assert "ImportError: no module named flash_attn_9000" in plugins["does_not_import"].load_error
    assert "int, not a rewrites.Rewrite" in plugins["not_a_rewrite"].load_error
    catalogue = [*registry.catalogue(include_plugins=False, names=["batched_heads"]), *plugins.values()]
    verifier = Verifier(Config(examples=10, report_dir=tmp_path / "r", invariance=False))
    results = verifier.verify(catalogue, ["numpy"], gpt2_inputs=False)
    by = {(r.rewrite, r.dtype): r for r in results}
    for name in ("does_not_import", "not_a_rewrite", "wrong_shape", "makes_nan"):
        assert by[(name, "float32")].verdict == "error", name
    assert by[("does_not_import", "float32")].claim is None  # nothing claimed, nothing contradicted
    assert not by[("wrong_shape", "float32")].claim_holds  # claimed equivalent, could not run
    # it returns the fused qkv: 3 n_embd columns where n_embd are expected (the shrunk problem has 1 token)
    shape = re.search(r"returned shape \[1, (\d+)\], expected \[1, (\d+)\] \(full output\)",
                      by[("wrong_shape", "float32")].counterexample.message)  # fmt: skip
    assert shape and int(shape[1]) == 3 * int(shape[2]), by[("wrong_shape", "float32")].counterexample
    assert "NaN or inf on moderate float32 inputs" in by[("makes_nan", "float32")].counterexample.message
    # the rest of the run went on: the built-in and the good plugin have real verdicts
    assert by[("batched_heads", "float32")].verdict in ("bitwise", "equivalent")
    assert by[("my_exp_normalise_by_reciprocal", "float32")].verdict in ("bitwise", "equivalent")


def test_a_plugin_cannot_take_a_built_in_name(site):
    fake_distribution(
        site,
        "shadow",
        {"batched_heads": "shadow_mod:batched_heads"},
        {"shadow_mod.py": "from rewrites.catalogue.heads import batched_heads\n"},
    )
    clash = [r for r in registry.catalogue() if r.source == "plugin shadow"]
    assert clash and "already taken by built-in" in clash[0].load_error


MASK_LINE = "    z = xp.where(causal(xp, q.shape[-2], k.shape[-2]), z, -math.inf)\n"


def install_core_plugins(site: Path) -> None:
    """The README's core-level plugin, `my_core_attention`, and the same kernel without its
    mask line, `my_core_no_mask`, as one installed distribution in `site`."""
    good = readme_block("my-core/my_core.py")
    assert MASK_LINE in good, "the README's core-level example lost its mask line"
    no_mask = good.replace("my_core_attention", "my_core_no_mask").replace(MASK_LINE, "")
    fake_distribution(
        site,
        "my-core",
        {"my_core_attention": "my_core:my_core_attention", "my_core_no_mask": "my_core_bad:my_core_no_mask"},
        {"my_core.py": good, "my_core_bad.py": no_mask},
    )


def test_a_rewrite_imported_by_another_catalogue_module_is_listed_once():
    """The batch mutants are built on `batched_heads`, imported from heads.py: the
    catalogue lists it once, under its own family, and no name is taken twice."""
    from rewrites.catalogue import heads, mutants

    assert mutants.batched_heads is heads.batched_heads
    names = [r.name for r in registry.builtin()]
    assert names.count("batched_heads") == 1 and len(names) == len(set(names))
    assert {r.name: r.family for r in registry.catalogue(include_plugins=False)}["batched_heads"] == "heads"


def test_a_core_level_plugin_is_verified_and_a_wrong_one_is_caught(site, tmp_path):
    """`level="core"`: fn(q, k, v) with the projections supplied; the README's example holds
    its claim, the same kernel without its mask is inequivalent."""
    install_core_plugins(site)
    found = {r.name: r for r in registry.plugins()}
    assert found["my_core_attention"].level == "core" and found["my_core_attention"].load_error is None
    results = Verifier(Config(examples=10, report_dir=tmp_path / "report", invariance=False)).verify(
        [found["my_core_attention"], found["my_core_no_mask"]], ["numpy"], gpt2_inputs=False
    )
    by = {(r.rewrite, r.dtype): r for r in results}
    assert all(by[("my_core_attention", d)].verdict.holds_equivalence for d in ("float64", "float32"))
    assert all(by[("my_core_no_mask", d)].verdict == "inequivalent" for d in ("float64", "float32"))
