"""Core containers of the data layer: `Split`, `DataBundle`, `DataError`, `to_float`.

Every data set, built in or external, is materialised in memory as three `Split`s of
uint8 images and int64 labels, so the rest of the system never touches files::

    images  # (N, C, H, W) uint8, contiguous
    labels  # (N,) int64 in [0, K)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

SPLIT_NAMES = ("train", "holdout", "test")


class DataError(ValueError):
    """A data set could not be built; the message names the problem and the fix."""


def _as_index(indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn a list / array / tensor of positions (or a bool mask) into an index tensor."""
    index = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
    if index.dtype == torch.bool:
        return index
    if index.numel() == 0:
        return index.to(torch.int64).reshape(0)
    if index.dtype.is_floating_point or index.dtype.is_complex:
        raise DataError(
            f"Split.subset got indices of dtype {index.dtype}; pass integer positions "
            "or a bool mask instead."
        )
    return index.to(torch.int64).reshape(-1)


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a data set, held in memory.

    images: (N, C, H, W) uint8, contiguous.
    labels: (N,) int64, class ids in [0, K).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                "Split.images must be a uint8 tensor shaped (N, C, H, W); got "
                f"{_describe_tensor(images)}. Convert with images.to(torch.uint8) and add "
                "the channel dimension if missing."
            )
        if not torch.is_tensor(labels) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise DataError(
                f"Split.labels must be an int64 tensor shaped (N,); got {_describe_tensor(labels)}. "
                "Convert with labels.to(torch.int64).reshape(-1)."
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"Split has {images.shape[0]} images but {labels.shape[0]} labels; pass one "
                "label per image."
            )
        object.__setattr__(self, "images", images.contiguous())
        object.__setattr__(self, "labels", labels.contiguous())

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Split:
        """The samples at `indices` (int positions or a bool mask of length N), in that order."""
        index = _as_index(indices)
        return Split(self.images[index].contiguous(), self.labels[index].contiguous())

    def sha256(self) -> str:
        """sha256 hex digest of the image bytes followed by the little-endian label bytes."""
        digest = hashlib.sha256()
        digest.update(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().astype("<i8").tobytes())
        return digest.hexdigest()


def _describe_tensor(value: object) -> str:
    if torch.is_tensor(value):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"an object of type {type(value).__name__}"


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A data set ready for training: K named classes and train / holdout / test splits.

    `holdout` is used unlabeled by clustering and labeled for early stopping.
    `info` holds JSON-serialisable extras (fonts used, merged characters, superclass_of...).
    """

    name: str
    class_names: tuple[str, ...]
    train: Split
    holdout: Split
    test: Split
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if len(self.class_names) < 2:
            raise DataError(
                f"data set {self.name!r} has {len(self.class_names)} class(es); a classifier "
                "needs at least 2 classes: add more classes to the data."
            )
        shapes = {tuple(s.images.shape[1:]) for s in self._splits().values()}
        if len(shapes) != 1:
            raise DataError(
                f"data set {self.name!r} has splits with different image shapes {sorted(shapes)}; "
                "resize every split to the same (C, H, W)."
            )
        for split_name, split in self._splits().items():
            _check_labels(self.name, split_name, split, len(self.class_names))
        try:
            json.dumps(self.info)
        except (TypeError, ValueError) as err:
            raise DataError(
                f"DataBundle.info of {self.name!r} is not JSON-serialisable ({err}); store "
                "only str / int / float / bool / None, lists and dicts of those."
            ) from err

    def _splits(self) -> dict[str, Split]:
        return {"train": self.train, "holdout": self.holdout, "test": self.test}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)

    def describe(self) -> dict:
        """JSON-serialisable summary pinning the exact data: sizes and sha256 per split."""
        names_digest = hashlib.sha256("\n".join(self.class_names).encode("utf-8")).hexdigest()
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "class_names_sha256": names_digest,
            "splits": {
                name: {"size": len(split), "sha256": split.sha256()}
                for name, split in self._splits().items()
            },
        }


def _check_labels(name: str, split_name: str, split: Split, num_classes: int) -> None:
    if len(split) == 0:
        return
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"data set {name!r}: {split_name} labels span [{low}, {high}] but there are "
            f"{num_classes} class names; labels must lie in [0, {num_classes}) - give one "
            "name per class."
        )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 (N, C, H, W) in [0, 1]."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        raise DataError(
            f"to_float expects a uint8 tensor, got {_describe_tensor(images)}; pass "
            "Split.images (already uint8) or convert with .to(torch.uint8)."
        )
    return images.to(torch.float32).div_(255.0)
