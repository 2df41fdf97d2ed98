"""What several places load from a run directory: the ensemble of a finished run, for the
ensemble and distill stages, the query API (:mod:`orchestration.ensemble_api`), serving and
the soft-target cache's actors; and where the ensemble stage keeps its soft-target cache.

The files themselves are named, and the generalist, groups and specialists loaded, by the
stage modules that write them. ``orchestration.stages`` imports every stage and the ensemble
and distill stages import this module, so those stage modules are imported inside the two
functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from orchestration.rundir import read_json
from specialists.ensemble import RoutedEnsemble, build_ensemble

CACHE_DIR = "cache"  # the soft-target cache, inside the ensemble stage's folder


@dataclass(frozen=True)
class LoadedEnsemble:
    """A run's ensemble, ready for inference."""

    ensemble: RoutedEnsemble
    class_names: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W) the generalist expects


def cache_dir(run_dir: str | Path) -> Path:
    """Where the ensemble stage of run ``run_dir`` writes its soft-target cache."""
    return Path(run_dir) / "ensemble" / CACHE_DIR


def ensemble_inputs(run_path: Path) -> dict[str, Path]:
    """Stage name -> the file of that stage the run's ensemble is built from: the generalist's
    weights, the clustering groups and the specialists' index."""
    from orchestration.stages.clustering import GROUPS_FILE
    from orchestration.stages.generalist import FINAL
    from orchestration.stages.specialists import INDEX

    return {"generalist": run_path / "generalist" / f"{FINAL}.safetensors",
            "clustering": run_path / "clustering" / GROUPS_FILE,
            "specialists": run_path / "specialists" / INDEX}


def require_stage_output(path: Path, stage: str) -> None:
    """FileNotFoundError naming the unfinished stage and the command that runs it, unless
    ``path`` (a file the stage writes into ``RUN/<stage>/``) exists."""
    if not path.exists():
        run = path.parents[1]
        raise FileNotFoundError(
            f"{path} is missing: the {stage} stage of run {run} has not finished; run it with "
            f"`specdistill run CONFIG run.dir={run}` (or `specdistill {stage} CONFIG run.dir={run}`)"
        )


def load_ensemble(run_path: Path, *, top_n: int = 1, tol: float = 1e-10, max_iter: int = 1000,
                  device: torch.device | str = "cpu") -> LoadedEnsemble:
    """Generalist + specialists of a finished run, checked against the clustering groups.

    Raises FileNotFoundError naming the missing stage output and the command that makes it.
    """
    from orchestration.stages.clustering import load_groups
    from orchestration.stages.generalist import load_generalist
    from orchestration.stages.specialists import GroupsError, check_groups, load_specialist

    inputs = ensemble_inputs(run_path)
    for stage, path in inputs.items():
        require_stage_output(path, stage)
    generalist, meta = load_generalist(run_path / "generalist")
    class_names = list(meta["class_names"])
    groups = check_groups(load_groups(run_path / "clustering"), class_names)
    entries = read_json(inputs["specialists"])["specialists"]
    if [list(e["classes"]) for e in entries] != [list(g["classes"]) for g in groups]:
        raise GroupsError(
            f"the specialists in {run_path / 'specialists'} were trained for other groups than "
            f"{inputs['clustering']} holds; re-train them: "
            f"specdistill run CONFIG run.dir={run_path} --from specialists"
        )
    specialists = [load_specialist(run_path / "specialists" / e["dir"])[0].to(device) for e in entries]
    ensemble = build_ensemble(generalist.to(device), specialists, top_n=top_n, tol=tol, max_iter=max_iter)
    spec = meta["model"]
    return LoadedEnsemble(ensemble, class_names, (spec["in_channels"], spec["image_size"], spec["image_size"]))

