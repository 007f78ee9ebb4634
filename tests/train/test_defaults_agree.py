"""One source for the PGPO method's defaults (pgpo_kernels.defaults): the loop's config, core_algos, the TRL config
and the verl adapter all agree with it (the kernels' signatures and the reference: tests/kernels/test_kernel_defaults)."""

import ast
import dataclasses
import inspect
import pathlib

import pytest

from pgpo_kernels import defaults
from pgpo_train.rl import core_algos
from pgpo_train.run.config import PGPOWeightsConfig

# option name -> defaults.py constant
METHOD = {"tau": "TAU", "beta": "BETA", "eps": "EPS", "renormalize": "RENORMALIZE", "min_spread": "MIN_SPREAD",
          "control": "CONTROL", "tau_mode": "TAU_MODE", "floor": "FLOOR", "k3_log_ratio_max": "K3_LOG_RATIO_MAX",
          "k3_score_max": "K3_SCORE_MAX"}


def _want(name):
    return getattr(defaults, METHOD[name])


def test_loop_config_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(PGPOWeightsConfig)}
    for name in METHOD:
        assert fields[name] == _want(name), name
    assert fields["estimator"] == defaults.ESTIMATOR


def test_core_algos_defaults():
    for fn in (core_algos.pgpo_weights, core_algos.weight_metrics):
        params = inspect.signature(fn).parameters
        for name in METHOD:
            if name in params:
                assert params[name].default == _want(name), (fn.__name__, name)


def test_trl_config_defaults():
    pytest.importorskip("trl")
    from pgpo_train.integrations import PGPOConfig

    fields = {f.name: f.default for f in dataclasses.fields(PGPOConfig)}
    for name in METHOD:
        assert fields[f"pgpo_{name}"] == _want(name), name
    assert fields["pgpo_estimator"] == defaults.ESTIMATOR


def test_verl_adapter_reads_every_method_default_from_defaults_py():
    """verl's `algorithm.pgpo` keys are read with cfg.get(key, fallback): each method key's fallback is defaults.X."""
    import pgpo_train.integrations.verl as verl_mod

    tree = ast.parse(pathlib.Path(verl_mod.__file__).read_text())
    seen = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value in METHOD):
            seen[node.args[0].value] = ast.unparse(node.args[1])
    assert set(seen) == set(METHOD), sorted(set(METHOD) - set(seen))
    for key, fallback in seen.items():
        assert fallback == f"defaults.{METHOD[key]}", (key, fallback)
