"""The kernels' signatures and the float64 reference take the PGPO defaults from pgpo_kernels.defaults, and the kernel
modules share helpers only through public names."""

import ast
import inspect
import pathlib

import pytest

import pgpo_kernels
from pgpo_kernels import defaults
from pgpo_kernels import reference

# parameter name -> the defaults.py constant it must default to
_PARAMS = {"tau": "TAU", "beta": "BETA", "eps": "EPS", "renormalize": "RENORMALIZE", "estimator": "ESTIMATOR",
           "temperature": "TEMPERATURE"}
_FUNCTIONS = [
    pgpo_kernels.token_kl, pgpo_kernels.token_stats, pgpo_kernels.reshape_weights, pgpo_kernels.pgpo_token_weights,
    pgpo_kernels.fused_linear_token_kl, pgpo_kernels.fused_linear_token_stats,
    reference.token_kl_ref, reference.token_logprob_ref, reference.token_entropy_ref, reference.reshape_weights_ref,
    reference.pgpo_token_weights_ref, reference.token_kl_grad_ref,
]


@pytest.mark.parametrize("fn", _FUNCTIONS, ids=lambda f: f.__name__)
def test_signature_defaults_come_from_defaults_py(fn):
    params = inspect.signature(fn).parameters
    checked = [name for name in _PARAMS if name in params]
    assert checked, f"{fn.__name__} takes none of {sorted(_PARAMS)}"
    for name in checked:
        want = getattr(defaults, _PARAMS[name])
        got = params[name].default
        assert type(got) is type(want) and got == want, f"{fn.__name__}({name}=...) defaults to {got!r}, " \
                                                         f"defaults.{_PARAMS[name]} is {want!r}"


def test_method_defaults():
    # the paper's best setting (arXiv 2604.01840); a change here changes every caller at once
    assert (defaults.TAU, defaults.BETA, defaults.EPS) == (0.4, 2.0, 1e-6)
    assert (defaults.RENORMALIZE, defaults.ESTIMATOR, defaults.TEMPERATURE) == (True, "full", 1.0)
    assert (defaults.MIN_SPREAD, defaults.CONTROL, defaults.TAU_MODE, defaults.FLOOR) == (0.0, "none", "absolute", 0.0)


def _private_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pgpo_kernels"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    yield f"{path.name}:{node.lineno} from {node.module} import {alias.name}"


def test_no_kernel_module_imports_a_private_of_another():
    root = pathlib.Path(pgpo_kernels.__file__).parent
    found = [hit for path in sorted(root.rglob("*.py")) for hit in _private_imports(path)]
    assert found == [], "shared helpers belong in online_softmax.py / utils.py / torch_fallback/common.py as " \
                        f"public names: {found}"
