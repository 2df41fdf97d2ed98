"""The pipeline's stages, in order."""

from orchestration.pipeline import Stage
from orchestration.stages import clustering, distill, ensemble, generalist, specialists

STAGES: tuple[Stage, ...] = (
    generalist.STAGE, clustering.STAGE, specialists.STAGE, ensemble.STAGE, distill.STAGE,
)


def stage_names() -> list[str]:
    return [stage.name for stage in STAGES]
