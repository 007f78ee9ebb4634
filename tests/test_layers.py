"""The package's import graph (README "Architecture"): no cycles, function-level imports included, and no module
imports a layer above its own. Read from the source with ast, nothing is imported."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# bottom to top, by package; a module may import its own layer and the ones below.
LAYERS = [
    ["pgpo_kernels"],
    ["pgpo_train.data"],  # datasets, embedded tasks, rewards
    ["pgpo_train.run"],  # config, checks, checkpoints, torchrun/FSDP2, run dir, logging
    ["pgpo_train.rl"],  # the RL math
    ["pgpo_train.models"],  # VLM families, lm head, processors, policy, tiny models
    ["pgpo_train.step", "pgpo_train.integrations"],  # the step phases; the trainers' adapters
    ["pgpo_train.recipe"],  # the loop
    ["pgpo_train.cli", "pgpo_train.__main__", "pgpo_train"],
]
# the only modules allowed directly under pgpo_train/: everything else lives in a layer's package
TOP_LEVEL = {"pgpo_train", "pgpo_train.cli", "pgpo_train.__main__"}


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
    # the recipe is imported by nothing but the CLI and the package's lazy `pgpo_train.recipe.train` export
    users = sorted(m for m, deps in graph.items() if "pgpo_train.recipe.train" in deps)
    assert users == ["pgpo_train.cli"], users


def test_every_module_sits_in_a_layer_package():
    mods = _modules()
    flat = sorted(m for m in mods if m.startswith("pgpo_train") and m.count(".") == 1 and m not in TOP_LEVEL
                  and not (ROOT / m.replace(".", "/")).is_dir())
    assert not flat, f"modules directly under pgpo_train/ (put them in a layer package): {flat}"
    for m in mods:
        _layer(m)  # raises for a module in no layer
