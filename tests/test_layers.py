"""The package's import graph (README "Architecture"): no cycles, function-level imports included, and no module
imports a layer above its own. Read from the source with ast, nothing is imported."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# bottom to top; a module may import its own layer and the ones below. Unlisted pgpo_train modules fail the test,
# so a new module has to say where it belongs.
LAYERS = [
    ["pgpo_kernels"],
    ["pgpo_train.validate", "pgpo_train.config", "pgpo_train.signals", "pgpo_train.nonfinite", "pgpo_train.rundir",
     "pgpo_train.checkpoint", "pgpo_train.distributed", "pgpo_train.dist_checkpoint", "pgpo_train.timing",
     "pgpo_train.rewards", "pgpo_train.plot", "pgpo_train.synthetic", "pgpo_train.tasks", "pgpo_train.config_file"],
    ["pgpo_train.model_family", "pgpo_train.lm_head", "pgpo_train.weight_variants", "pgpo_train.core_algos", "pgpo_train.processor",
     "pgpo_train.tiny", "pgpo_train.tiny_families", "pgpo_train.data", "pgpo_train.text_only"],
    ["pgpo_train.policy", "pgpo_train.batching", "pgpo_train.refill", "pgpo_train.sampling", "pgpo_train.scoring",
     "pgpo_train.update", "pgpo_train.run_log", "pgpo_train.integrations", "pgpo_train.hf_export"],
    ["pgpo_train.train", "pgpo_train.inspect_run", "pgpo_train.evaluation"],
    ["pgpo_train.cli", "pgpo_train.__main__", "pgpo_train"],
]


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in ("pgpo_kernels", "pgpo_train"):
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> first-party modules it imports anywhere in its body (a parent package is not an edge: Python
    always loads it first)."""
    out = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            hit = next((t for t in targets if t in mods), None)  # `from pkg import submodule` is the submodule
            if hit and hit != name and not name.startswith(hit + "."):
                deps.add(hit)
        out[name] = deps
    return out


def _layer(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layers.py: add it where it belongs")


def test_no_import_cycles_even_through_function_level_imports():
    graph = _imports(_modules())
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_lower_layers_never_import_upper_ones():
    graph = _imports(_modules())
    bad = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]
    assert not bad, bad
    # the recipe is imported by nothing but the CLI and the package's lazy `pgpo_train.train` export
    users = sorted(m for m, deps in graph.items() if "pgpo_train.train" in deps)
    assert users == ["pgpo_train.cli"], users


def test_old_import_paths_resolve_for_one_release_with_a_warning():
    """pgpo_train.train's old helpers, config.PGPOConfig and pgpo_train.PGPOConfig still resolve, each warning with
    its new home; the TRL config is the only PGPOConfig that does not warn."""
    import warnings

    import pytest

    import pgpo_train
    from pgpo_train import batching
    from pgpo_train import config
    from pgpo_train import model_family
    from pgpo_train import scoring
    from pgpo_train import train

    for old, new, where in ((lambda: train.build_sequences, batching.build_sequences, "batching"),
                            (lambda: train.pgpo_weights, scoring.token_weights, "scoring.token_weights"),
                            (lambda: train.check_vlm, model_family.check_processor, "check_processor"),
                            (lambda: config.PGPOConfig, config.PGPOWeightsConfig, "PGPOWeightsConfig"),
                            (lambda: pgpo_train.PGPOConfig, config.PGPOWeightsConfig, "PGPOWeightsConfig")):
        with pytest.warns(DeprecationWarning, match=where):
            assert old() is new
    with pytest.raises(AttributeError):
        _ = train.no_such_helper
    trl = pytest.importorskip("trl")
    from pgpo_train.integrations import PGPOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert issubclass(PGPOConfig, trl.GRPOConfig)
