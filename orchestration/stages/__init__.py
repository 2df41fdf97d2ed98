"""The pipeline's stages, in order."""

from orchestration.pipeline import Stage
from orchestration.stages import clustering, ensemble, generalist, specialists

STAGES: tuple[Stage, ...] = (generalist.STAGE, clustering.STAGE, specialists.STAGE, ensemble.STAGE)


def stage_names() -> list[str]:
    return [stage.name for stage in STAGES]
