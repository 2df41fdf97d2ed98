"""Query a finished run's ensemble from Python.

    from orchestration.ensemble_api import Ensemble
    ens = Ensemble.load("runs/quickstart")
    probs = ens.soft_targets(images)                     # (N, K) float64, rows sum to 1
    top = ens.soft_targets(["a.png"], top_k=3)           # [[(class name, probability), ...]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torch import Tensor

from distill.targets import check_temperature
from generalist.data.images import ImageModeError, ImageSizeError, decode_image
from orchestration.artifacts import CONFIG, LoadedEnsemble, load_ensemble
from orchestration.config import load_config
from orchestration.serve_protocol import top_k_problem
from specialists.ensemble import ensemble_soft_targets


class EnsembleInputError(ValueError):
    """Images or arguments that do not fit the ensemble (the message says expected vs got)."""


@dataclass(frozen=True)
class Ensemble:
    """A run's generalist + specialists, combined per input (eq. 5)."""

    loaded: LoadedEnsemble
    batch_size: int = 512

    @classmethod
    def load(cls, run_dir: str | Path, *, device: str = "cpu") -> Ensemble:
        """The ensemble of run directory ``run_dir`` (its ``ensemble`` config section, if any)."""
        path = Path(run_dir)
        if not (path / CONFIG).exists():
            raise FileNotFoundError(f"no run directory at {str(run_dir)!r} (no {CONFIG}); make one "
                                    f"with `specdistill run CONFIG run.dir={run_dir}`")
        cfg = load_config(path / CONFIG).ensemble
        loaded = load_ensemble(path, top_n=cfg.top_n, tol=cfg.tol, max_iter=cfg.max_iter, device=device)
        return cls(loaded, batch_size=cfg.batch_size)

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the models take."""
        return self.loaded.image_shape

    def soft_targets(self, images: Tensor | Sequence[str | Path], temperature: float = 1.0,
                     top_k: int | None = None) -> Tensor | list[list[tuple[str, float]]]:
        """Combined distribution ``softmax(log q / T)`` for ``images`` (exact zeros of ``q`` stay 0).

        Args:
            images: ``(N, C, H, W)`` uint8 (0..255) or float (in [0, 1]) tensor, or image file paths
                (converted to the model's channels; their size must match).
            temperature: ``T`` > 0; 1 gives ``q`` itself.
            top_k: None for the dense ``(N, K)`` float64 tensor, else per example the ``top_k``
                ``(class name, probability)`` pairs, most probable first.
        """
        problem = None if top_k is None else top_k_problem(top_k, len(self.class_names))
        if problem:
            raise EnsembleInputError(problem)
        x = self._as_batch(images)
        try:
            check_temperature(temperature)
        except ValueError as exc:
            raise EnsembleInputError(str(exc)) from None
        probs = ensemble_soft_targets(self.loaded.ensemble, x, temperature, batch_size=self.batch_size)
        if top_k is None:
            return probs
        values, ids = probs.topk(top_k, dim=1)
        return [[(self.class_names[c], float(p)) for p, c in zip(v.tolist(), i.tolist(), strict=True)]
                for v, i in zip(values, ids, strict=True)]

    def _as_batch(self, images: Tensor | Sequence[str | Path]) -> Tensor:
        """``(N, C, H, W)`` float32 in [0, 1], checked against :attr:`image_shape`."""
        if isinstance(images, str | Path):
            images = [images]
        if not isinstance(images, Tensor):
            images = torch.stack([self._read(p) for p in images]) if images else None
            if images is None:
                raise EnsembleInputError("no images given")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise EnsembleInputError(
                f"images must be (N, {', '.join(map(str, self.image_shape))}) (N, C, H, W) for this "
                f"run's models, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 255
        if not images.is_floating_point():
            raise EnsembleInputError(f"images must be uint8 or floating, got {images.dtype}")
        return images.float()

    def _read(self, path: str | Path) -> Tensor:
        return read_image(path, self.image_shape)


def read_image(path: str | Path, image_shape: tuple[int, int, int]) -> Tensor:
    """Image file -> ``(C, H, W)`` uint8 in the models' channels (L or RGB); the size must match."""
    channels = image_shape[0]
    if channels not in (1, 3):
        raise EnsembleInputError(f"the models take {channels}-channel images; pass a tensor instead of files")
    try:
        return torch.from_numpy(decode_image(path, image_shape))
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise EnsembleInputError(f"{path} is a folder, not an image file; pass the image files "
                                 f"in it (e.g. {Path(path) / '*.png'})") from None
    except UnidentifiedImageError:
        raise EnsembleInputError(f"{path} is not an image file PIL can read") from None
    except (ImageSizeError, ImageModeError) as exc:
        raise EnsembleInputError(str(exc)) from None
    except OSError as exc:  # truncated or unreadable file
        raise EnsembleInputError(f"cannot read image {path} ({exc}); pass a complete image file") from None
