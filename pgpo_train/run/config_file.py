"""Config files: `pgpo-train --config FILE` (YAML, any flag; flags on the command line override it) and the
resolved config a run writes to RUN_DIR/config.yaml, so `pgpo-train --config RUN_DIR/config.yaml` repeats it.

Keys are the flags' names without the dashes, `_` or `-` alike (`max_new_tokens`, `max-new-tokens`); nested
options as a mapping (`pgpo: {tau: 0.4}`) or dotted (`pgpo.tau: 0.4`). An unknown key is one error naming it and
the file, before any work.
"""

from __future__ import annotations

import dataclasses
import difflib

from pgpo_train.run.config import CHOICES
from pgpo_train.run.config import TrainConfig

# the run's place, not its recipe: a config file that sets them would make every repeat reuse one run dir
RUN_ONLY = ("out_dir", "resume", "overwrite")


def _leaves() -> dict[str, tuple[type, bool]]:
    """dotted field name -> (its type, whether None means "auto" there), for every leaf field of TrainConfig."""
    from pgpo_train.run.validate import _fields
    from pgpo_train.run.validate import _is_auto

    cfg = TrainConfig()
    return {name: (kind, _is_auto(cfg, name)) for name, _, kind in _fields(cfg)}


def _flatten(d: dict, path: str, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise ValueError(f"--config {path}: key {k!r} is not a flag name")
        key = prefix + k.replace("-", "_")
        if isinstance(v, dict):
            out.update(_flatten(v, path, key + "."))
        else:
            out[key] = v
    return out


def _coerce(key: str, value, kind: type, auto: bool, path: str):
    """YAML value -> the field's type (YAML 1.1 reads 1e-6 as a string, 2 as an int for a float field); `auto` or
    null where the field's default is auto."""
    where = f"--config {path}: {key}"
    if auto and (value is None or value == "auto"):
        return None
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number{' or auto' if auto else ''}, got {value!r}") from None
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is not type(None) and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where} must be {kind.__name__}{' or auto' if auto else ''}, got {value!r} "
                         f"({type(value).__name__})")
    return value


def read_config_file(path: str) -> dict[str, object]:
    """{dotted field name: value} from a YAML config file; ValueError naming the file and the first unknown key,
    a value of the wrong type, or a file that is not a YAML mapping."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: must be a mapping of flag names to values, got {type(raw).__name__}")
    known = _leaves()
    out = {}
    for key, value in _flatten(raw, path).items():
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"--config {path}: unknown key {key!r}: not a pgpo-train flag{hint}")
        out[key] = _coerce(key, value, *known[key], path)
        choices = CHOICES.get(key.rsplit(".", 1)[-1], [])
        if choices and out[key] not in choices and out[key] is not None:
            raise ValueError(f"--config {path}: {key} must be one of {', '.join(choices)}, got {out[key]!r}")
    return out


def config_yaml(cfg: TrainConfig) -> str:
    """The config as YAML in read_config_file's format (nested pgpo section), without RUN_ONLY's fields."""
    import yaml

    d = dataclasses.asdict(cfg)
    for k in RUN_ONLY:
        d.pop(k, None)
    head = (
        "# pgpo-train's resolved config of this run ('auto' values filled in). Repeat the run with\n"
        "#   pgpo-train --config THIS_FILE [--out-dir DIR]\n"
        "# or continue it with: pgpo-train --config THIS_FILE --out-dir RUN_DIR --resume\n"
    )
    return head + yaml.safe_dump(d, sort_keys=False, default_flow_style=False)


def argv_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config FILE of a command line, the command line without it)."""
    rest, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a FILE (a YAML config, e.g. recipes/tiny.yaml)")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


def apply_config_file(parser, path: str) -> None:
    """Sets the parser's defaults from the file: flags given on the command line still win."""
    values = read_config_file(path)
    parser.set_defaults(**{k.replace(".", "__"): v for k, v in values.items()})


def config_from_file(path: str) -> TrainConfig:
    """The TrainConfig a config file describes (defaults for what it leaves out)."""
    from pgpo_train.run.config import config_from_dict

    nested: dict = {}
    for key, value in read_config_file(path).items():
        *groups, leaf = key.split(".")
        d = nested
        for g in groups:
            d = d.setdefault(g, {})
        d[leaf] = value
    return config_from_dict(nested)
