"""A generalist the user brings (``generalist.init``): weights from a file or the MLflow registry.

``generalist.init`` names one of::

    PATH.safetensors          a state dict of the ``generalist.model`` architecture, e.g. an earlier
                              run's RUN/generalist/model.safetensors (its model.json beside it, when
                              there is one, is checked against the data too)
    PATH.pt | PATH.pth        a state dict saved with ``torch.save(model.state_dict(), PATH)``,
                              read with ``torch.load(weights_only=True)``; for
                              ``generalist.model=tv.<name>`` also the plain torchvision model's
                              state dict (torchvision's parameter names, e.g. a local copy of
                              published weights)
    models:/NAME@ALIAS        an MLflow registered model version (or ``models:/NAME/VERSION``)
                              whose artifacts hold ``model.safetensors`` (+ ``model.json``)

Nothing is downloaded from the internet and nothing is unpickled: a checkpoint that holds more
than tensors (a whole pickled model) is refused with the reason. The weights must fit the data:
a class count or an input shape that differs is named with both sides.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from orchestration.checkpoints import CheckpointError
from orchestration.files import sha256_file

REGISTRY_PREFIX, TV_PREFIX = "models:/", "tv."
_REGISTRY = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class InitWeights:
    """The weights a generalist starts from and where they came from."""

    source: str                         # generalist.init as given
    resolved: str                       # the file read (a registry source: name, version, its URI)
    sha256: str                         # of the weights file
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] | None         # the model.json beside the weights, if any

    def record(self) -> dict[str, str]:
        return {"source": self.source, "resolved": self.resolved, "sha256": self.sha256}


def init_identity(source: str, tracking_uri: str) -> str:
    """What identifies ``source`` without reading all of it: a file's sha256, a registry version."""
    if source.startswith(REGISTRY_PREFIX):
        name, version = _version(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), source, tracking_uri)
        return f"{name}/{version.version}:{version.source}"
    return sha256_file(_existing(Path(source)))


def read_init(source: str, tracking_uri: str) -> InitWeights:
    """The state dict (and metadata) ``generalist.init`` names; CheckpointError naming the fix."""
    if source.startswith(REGISTRY_PREFIX):
        return _from_registry(source, tracking_uri)
    path = _existing(Path(source))
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and path.suffix == ".safetensors" else None
    return InitWeights(source, str(path), sha256_file(path), read_state(path), meta)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"generalist.init={path} does not exist; point it at a .safetensors or .pt "
                              "state dict, or models:/NAME@ALIAS")
    return path


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights-only torch file; refuses pickled objects."""
    if path.suffix == ".safetensors":
        try:
            return st_load(path.read_bytes())
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"generalist.init {path} is corrupt or truncated ({exc}); export the "
                                  "weights again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"generalist.init {path} is refused: it holds pickled Python objects, not only tensors (e.g. a "
            f"whole model saved with torch.save(model)), and those are never unpickled ({str(exc)[:200]}); "
            "save its state dict instead: torch.save(model.state_dict(), PATH), or safetensors") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"generalist.init {path} is corrupt or not a torch file ({exc}); export the "
                              "weights again") from None
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"generalist.init {path} is not a state dict (a mapping of names to tensors); "
                              "save it with torch.save(model.state_dict(), PATH)")
    return state


def _version(client: MlflowClient, source: str, tracking_uri: str):
    match = _REGISTRY.match(source)
    if match is None:
        raise CheckpointError(f"generalist.init={source} is not a registered model URI; write models:/NAME@ALIAS "
                              "or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        found = ", ".join(m.name for m in client.search_registered_models(max_results=20)) or "none"
        raise CheckpointError(f"generalist.init={source}: there is no registered model {name!r} at "
                              f"{tracking_uri} (registered models: {found}); register "
                              "it first or fix the name") from None
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        aliases = ", ".join(sorted(model.aliases)) if model.aliases else "none"
        raise CheckpointError(f"generalist.init={source}: registered model {name!r} has no {what} (its "
                              f"aliases: {aliases}); set the alias with MlflowClient().set_registered_model_alias "
                              "or fix the URI") from None
    return name, found


def _from_registry(source: str, tracking_uri: str) -> InitWeights:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, version = _version(client, source, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="specdistill-init-") as tmp:
        folder = Path(tmp)
        _download(version.source, folder, tracking_uri)
        weights = sorted(folder.rglob("*.safetensors"), key=lambda p: p.name != "model.safetensors")
        if not weights:
            held = ", ".join(sorted(p.name for p in folder.rglob("*") if p.is_file())[:8]) or "nothing"
            raise CheckpointError(
                f"generalist.init={source} (version {version.version}) holds no safetensors weights ({held}); "
                "a pickled mlflow.pytorch model is never unpickled: register a folder holding "
                "model.safetensors (+ model.json), e.g. an earlier run's RUN/generalist/")
        meta_path = weights[0].with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        return InitWeights(source, f"{name} version {version.version} ({version.source})",
                           sha256_file(weights[0]), read_state(weights[0]), meta)


def _download(uri: str, folder: Path, tracking_uri: str) -> None:
    from mlflow.artifacts import download_artifacts

    download_artifacts(artifact_uri=uri, dst_path=str(folder), tracking_uri=tracking_uri)


def check_fits(weights: InitWeights, model: torch.nn.Module, spec: dict[str, Any], class_names: list[str]) -> None:
    """CheckpointError unless the weights fit the model built for the data (classes, input shape)."""
    data = (f"the data has {spec['num_classes']} classes and {spec['in_channels']}x{spec['image_size']}x"
            f"{spec['image_size']} images")
    theirs = (weights.meta or {}).get("model")
    if theirs:
        shape = (theirs.get("num_classes"), theirs.get("in_channels"), theirs.get("image_size"))
        if shape != (spec["num_classes"], spec["in_channels"], spec["image_size"]):
            raise CheckpointError(f"generalist.init {weights.resolved} was made for {shape[0]} classes and "
                                  f"{shape[1]}x{shape[2]}x{shape[2]} images, but {data}; bring a model of this "
                                  "data's classes and image shape, or change data.options")
        if theirs.get("name") != spec["name"]:
            raise CheckpointError(f"generalist.init {weights.resolved} is a {theirs.get('name')} model, but "
                                  f"generalist.model={spec['name']}; set generalist.model={theirs.get('name')} "
                                  f"(width {theirs.get('width')}, depth {theirs.get('depth')})")
    if spec["name"].startswith(TV_PREFIX) and set(weights.state) != set(model.state_dict()):
        _load_torchvision_state(weights, model, spec, data)
    else:
        _check_layer_shapes(weights, model, data)
    names = (weights.meta or {}).get("class_names")
    if names is not None and list(names) != list(class_names):
        first = next(i for i, (a, b) in enumerate(zip(names, class_names, strict=False)) if a != b)
        raise CheckpointError(f"generalist.init {weights.resolved} names class {first} {names[first]!r}, the "
                              f"data {class_names[first]!r}: its outputs are other classes (or in another order)")


def _load_torchvision_state(weights: InitWeights, model: torch.nn.Module, spec: dict[str, Any], data: str) -> None:
    """Weights of the plain torchvision model (its own parameter names, e.g. from a local copy of
    published weights) loaded into the ``tv.<name>`` wrapper ``model``, which holds the same modules."""
    import torchvision

    from generalist.models.tv import adapt_first_conv, wrap_torchvision_model

    name = spec["name"][len(TV_PREFIX):]
    base = torchvision.models.get_model(name, weights=None, num_classes=spec["num_classes"])
    adapt_first_conv(base, spec["in_channels"])
    if set(weights.state) != set(base.state_dict()):
        missing = sorted(set(base.state_dict()) - set(weights.state))[:3]
        raise CheckpointError(f"generalist.init {weights.resolved} is neither a {spec['name']} nor a torchvision "
                              f"{name} state dict (it lacks e.g. {', '.join(missing)}); set generalist.model to "
                              "the architecture it was saved from")
    _check_layer_shapes(weights, base, data)
    model.load_state_dict(wrap_torchvision_model(name, base, spec["in_channels"]).state_dict(), strict=True)


def _check_layer_shapes(weights: InitWeights, model: torch.nn.Module, data: str) -> None:
    """The output layer's class count and the first convolution's input channels, named plainly."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    head = weights.state.get(f"{linears[-1]}.weight") if linears else None
    if head is not None and head.shape[0] != model.get_submodule(linears[-1]).out_features:
        raise CheckpointError(f"generalist.init {weights.resolved} predicts {head.shape[0]} classes, but {data}; "
                              "bring a model trained on this data's classes")
    stem = weights.state.get(f"{convs[0]}.weight") if convs else None
    if stem is not None and stem.shape[1] != model.get_submodule(convs[0]).in_channels:
        raise CheckpointError(f"generalist.init {weights.resolved} takes {stem.shape[1]}-channel images, but "
                              f"{data}; bring a model for this data's image shape")
    try:
        model.load_state_dict(weights.state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"generalist.init {weights.resolved} does not fit generalist.model: {exc}; set "
                              "generalist.model, width and depth to the architecture it was saved from") from None

