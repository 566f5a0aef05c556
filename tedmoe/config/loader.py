"""Run configs as TOML: load (with unknown keys named), ``--set key=value`` overrides, dump."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from tedmoe.config.schema import ModelConfig, RunConfig, preset
from tedmoe.config.validation import coerce, field_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# settings that no longer exist -> why, for a clear refusal of an old TOML file
REMOVED = {"model.moe.hidden_size": "the experts' width is model.hidden_size; remove the key"}


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict written by an older tedmoe (a checkpoint's meta, ``model_config.json``) in
    today's form: ``model.moe.hidden_size`` equal to ``model.hidden_size`` is dropped."""
    out = dict(values)
    if isinstance(out.get("model"), dict):
        out["model"] = _upgrade_model(out["model"])
    return out


def _upgrade_model(model: dict[str, Any]) -> dict[str, Any]:
    model = dict(model)
    moe = model.get("moe")
    if isinstance(moe, dict) and "hidden_size" in moe and moe["hidden_size"] == model.get("hidden_size"):
        model["moe"] = {k: v for k, v in moe.items() if k != "hidden_size"}
    return model


def apply_values(obj: Any, values: dict[str, Any], where: str = "") -> None:
    """Set a (nested) dataclass's fields from a dict, naming any unknown key and the valid ones;
    each value is checked against its field's annotation (type and range)."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = field_hints(type(obj))
    for key, value in values.items():
        if f"{where}{key}" in REMOVED:
            raise ValueError(f"'{where}{key}' is no longer a setting: {REMOVED[where + key]}")
        if key not in fields:
            table = f" in [{where.rstrip('.')}]" if where else ""
            raise ValueError(f"unknown config key '{where}{key}'; valid keys{table}: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{key} is a table; set its keys, e.g. {where}{key}.<key>=...")
            apply_values(current, value, f"{where}{key}.")
        elif isinstance(value, dict):
            raise ValueError(f"{where}{key} is a value, not a table; set it as {where}{key}=...")
        else:
            setattr(obj, key, coerce(f"{where}{key}", value, hints[key]))


def parse_override(text: str) -> dict[str, Any]:
    """``"model.moe.top_k=1"`` -> ``{"model": {"moe": {"top_k": 1}}}`` (values parsed as TOML,
    bare words as strings)."""
    if "=" not in text:
        raise ValueError(f"--set {text!r} is not key=value (e.g. --set train.max_steps=100)")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_model_config(path: str) -> ModelConfig:
    """The ``[model]`` table of a TOML file as a ``ModelConfig``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model file {path} does not exist")
    model = ModelConfig()
    try:
        values = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"model file {path} is not valid TOML: {err}") from None
    if not isinstance(values.get("model"), dict):
        raise ValueError(f"model file {path} has no [model] table")
    apply_values(model, values["model"], "model.")
    return model


def model_config_from_dict(values: dict) -> ModelConfig:
    """A ``ModelConfig`` from its dict form (``model_config.json``, a checkpoint's meta)."""
    model = ModelConfig()
    apply_values(model, _upgrade_model(values), "model.")
    return model


def model_differences(a: dict, b: dict) -> list[str]:
    """The fields in which two model configs in dict form differ (a checkpoint's, written by any
    tedmoe, and today's): both are read back first, so fields added since take their defaults and
    JSON's lists equal tuples."""
    x, y = (dataclasses.asdict(model_config_from_dict(d)) for d in (a or {}, b))
    return sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))


def load_run_config(path: str | None = None, preset_name: str = "default", overrides: list[str] = ()) -> RunConfig:
    """The preset, then the TOML file (if any), then the overrides, in that order."""
    cfg = preset(preset_name)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            apply_values(cfg, tomllib.loads(p.read_text()), "")
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from None
    for text in overrides:
        apply_values(cfg, parse_override(text), "")
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump_run_config(cfg: Any, prefix: str = "") -> str:
    """TOML text of a config (``None`` fields are left out: TOML has no null)."""
    scalars, tables = [], []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            tables.append(dump_run_config(v, f"{prefix}{f.name}."))
        elif v is not None:
            scalars.append(f"{f.name} = {_toml_value(v)}")
        else:
            scalars.append(f"# {f.name} is unset (None)")
    head = [f"[{prefix.rstrip('.')}]"] if prefix else []
    return "\n".join(head + scalars) + "\n" + "".join("\n" + t for t in tables)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> RunConfig:
    cfg = RunConfig()
    apply_values(cfg, upgrade(values), "")
    return cfg
