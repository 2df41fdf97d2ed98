"""Typed, validated pipeline configuration.

Every section is a frozen pydantic model that rejects unknown keys. A config is loaded from
YAML, dotted ``key=value`` overrides are applied to the raw mapping, and the result is
validated once. The defaults are the quickstart: built-in glyphs, a CPU-sized generalist.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestration.config_sections import (  # noqa: F401  (the sections are part of this module's API)
    AugmentConfig,
    CacheConfig,
    ClusteringConfig,
    DataConfig,
    DataFreeConfig,
    DistillConfig,
    EnsembleConfig,
    GeneralistConfig,
    OptimizerConfig,
    RayConfig,
    RunConfig,
    SchemesConfig,
    Section,
    SpecialistsConfig,
    TrackingConfig,
)


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


class Config(Section):
    """The whole pipeline's configuration: one section per concern, validated once."""

    run: RunConfig = RunConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    generalist: GeneralistConfig = GeneralistConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    specialists: SpecialistsConfig = SpecialistsConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    distill: DistillConfig = DistillConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def section_hash(self, keys: Sequence[str]) -> str:
        """sha256 of the named dotted config keys, e.g. ("data", "generalist", "run.seed"), without
        the :data:`UNHASHED_KEYS` (how a run is kept and checked, not what it computes)."""
        dump = self.model_dump(mode="json", exclude=_nested(UNHASHED_KEYS))
        values = {key: _get_dotted(dump, key) for key in keys}
        blob = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def flat(self) -> dict[str, Any]:
        """Flattened dotted keys -> values (for MLflow params)."""
        return flatten(self.model_dump(mode="json"))


# Keys that never change a config hash: how a run directory keeps old results, checks its data and
# waits for a person; and files a key names, which count by their content (a stage's extra inputs).
UNHASHED_KEYS = ("run.keep_history", "data.verify_content", "clustering.require_approval",
                 "clustering.groups_file", "generalist.init", "generalist.init_mode")


def _nested(keys: Sequence[str]) -> dict[str, set[str]]:
    """("a.b", "c.d") -> {"a": {"b"}, "c": {"d"}}: pydantic's ``exclude`` for section fields."""
    nested: dict[str, set[str]] = {}
    for key in keys:
        section, _, name = key.partition(".")
        nested.setdefault(section, set()).add(name)
    return nested


def check_data_options(config: Config) -> None:
    """ConfigError unless ``data.name`` is a registered data set and every ``data.options`` key is
    one of its options (read from its builder; the data is not built)."""
    from generalist.data import DataError, dataset_options

    try:
        valid = dataset_options(config.data.name)
    except DataError as exc:
        raise ConfigError(f"data.name: {exc}") from None
    unknown = sorted(set(config.data.options) - set(valid))
    if unknown:
        close = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        hints = "".join(f"; did you mean 'data.options.{c[0]}' for '{k}'?" for k, c in close.items() if c)
        raise ConfigError(f"unknown data.options key(s) {', '.join(unknown)} for data set "
                          f"{config.data.name!r}{hints} (valid: {', '.join(valid)})")


def leaf_keys(section: type[BaseModel], prefix: str, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """Dotted keys of ``section``'s leaves under ``prefix`` (nested sections expanded), minus
    ``exclude`` (keys relative to the section, e.g. ``"cache.actors"``)."""
    keys: list[str] = []
    for name, field in section.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            inner = [e[len(name) + 1:] for e in exclude if e.startswith(name + ".")]
            keys += leaf_keys(annotation, f"{prefix}.{name}", inner)
        elif name not in exclude:
            keys.append(f"{prefix}.{name}")
    return tuple(keys)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load YAML at ``path`` (None = built-in defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return validate_config(raw, source=str(path) if path else "defaults")


def validate_config(raw: Mapping[str, Any], source: str = "config") -> Config:
    check_current_shape(raw, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


_OPTIMIZER_FIELDS = ("lr", "weight_decay", "momentum", "warmup_epochs")
_CACHE_FIELDS = ("split", "top_k", "dense_max_classes", "shard_size", "actors", "gpus_per_actor")
_DATA_FREE_FIELDS = ("generator_steps", "steps_per_epoch", "batch_size", "lr", "latent_dim")
# Keys of the earlier, flat config shape -> where they live now.
MOVED_KEYS: dict[str, str] = {
    "specialists.ray_address": "ray.address",
    "specialists.local_num_cpus": "ray.local_num_cpus",
    **{f"{s}.{f}": f"{s}.optimizer.{f}" for s in ("generalist", "specialists", "distill")
       for f in _OPTIMIZER_FIELDS},
    **{f"ensemble.cache_{f}": f"ensemble.cache.{f}" for f in _CACHE_FIELDS},
    **{f"distill.data_free_{f}": f"distill.data_free.{f}" for f in _DATA_FREE_FIELDS},
}
# Keys that held a scalar and are sections now -> where the scalar went.
BECAME_SECTIONS: dict[str, str] = {
    **{f"{s}.optimizer": f"{s}.optimizer.name" for s in ("generalist", "specialists", "distill")},
    "ensemble.cache": "ensemble.cache.enabled",
    "distill.data_free": "distill.data_free.enabled",
}


def check_current_shape(raw: Mapping[str, Any], source: str = "config") -> None:
    """ConfigError naming where each key of the earlier flat shape moved, if ``raw`` has any."""
    moves = [f"  {old} -> {new}" for old, new in MOVED_KEYS.items() if _has_dotted(raw, old)]
    moves += [f"  {old}: {_get_dotted(raw, old)!r} -> {new}: {_get_dotted(raw, old)!r}"
              for old, new in BECAME_SECTIONS.items()
              if _has_dotted(raw, old) and not isinstance(_get_dotted(raw, old), Mapping)]
    if moves:
        raise ConfigError(f"configuration ({source}) uses keys that moved; rename them:\n"
                          + "\n".join(moves))


def _has_dotted(data: Mapping[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; the shipped configs are in configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. generalist.epochs=3)")
    try:
        return key.strip(), yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); close every "
                          "bracket and quote, e.g. 'data.options={num_classes: 3}', and quote the "
                          "whole key=value for the shell") from None


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _get_dotted(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` (empty mappings kept as values), e.g. MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """Valid field names of the section that holds ``loc`` (the last element is the bad key)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _explain(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(loc)
            close = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
            lines.append(f"  unknown key '{key}'{hint} (valid here: {', '.join(valid)})")
        else:
            got = err.get("input")
            lines.append(f"  {key}: {err['msg']} (got {got!r})")
    return "\n".join(lines)
