"""The sections of the pipeline configuration: one frozen pydantic model per concern.

Each rejects unknown keys, refuses booleans where a number is expected, and keeps its own
defaults for a sub-section given in part. :mod:`orchestration.config` assembles them into
:class:`~orchestration.config.Config` and loads, validates and explains configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Section(BaseModel):
    """A config section: frozen, unknown keys rejected, booleans never read as numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _partial_subsections(cls, data: Any) -> Any:
        """A sub-section given in part keeps this section's defaults for the rest (so
        ``distill.optimizer.lr=0.01`` keeps the students' warm-up, not the model's bare default)."""
        if not isinstance(data, Mapping):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            value = merged.get(name)
            if isinstance(value, Mapping) and field.default_factory is not None:
                default = field.default_factory()
                if isinstance(default, BaseModel):
                    merged[name] = {**default.model_dump(), **value}
        return merged

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and bool not in _leaf_types(annotation):
            raise ValueError(f"expected {_type_name(annotation)}, not a boolean (true/false)")
        return value


def _leaf_types(annotation: Any) -> set[Any]:
    args = get_args(annotation)
    if not args or get_origin(annotation) in (dict, list, Literal):
        return {annotation} if not args else {get_origin(annotation)}
    return set().union(*(_leaf_types(a) for a in args))


def _type_name(annotation: Any) -> str:
    names = [getattr(t, "__name__", str(t)) for t in _leaf_types(annotation) if t is not type(None)]
    return " or ".join(sorted(names))


class OptimizerConfig(Section):
    """Optimiser and learning-rate schedule of one training loop: linear warm-up over
    ``warmup_epochs``, then cosine decay to 0 at the last epoch; weight decay skips biases and
    norms. The generalist, the specialists and the students each have one."""

    name: Literal["sgd", "adamw"] = Field("adamw", description="sgd (Nesterov momentum) or adamw.")
    lr: float = Field(0.003, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (not on biases and norms).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum / AdamW beta1.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up length in epochs.")
    schedule: Literal["cosine", "plateau"] = Field(
        "cosine", description="cosine: decay to 0 over the epochs; plateau: constant, times plateau_factor "
        "whenever the holdout loss stalls for plateau_patience epochs (train to convergence).",
    )
    plateau_factor: float = Field(0.3, gt=0, lt=1, description="plateau: LR multiplier at each plateau.")
    plateau_patience: int = Field(2, ge=1, description="plateau: epochs without improvement before it.")


class RunConfig(Section):
    """Where the run lives, its seed and the device it trains on."""

    name: str = Field("quickstart", description="Run name; the run directory is root/name.")
    root: str = Field("runs", description="Parent folder of run directories.")
    dir: str | None = Field(None, description="Explicit run directory (overrides root/name).")
    seed: int = Field(0, description="Seed for data generation, splits, init and batch order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch default.")
    cpu_bf16: bool = Field(
        True, description="On the CPU, train in bf16 mixed precision where the CPU computes bf16 natively "
        "(Intel AMX or AVX512-BF16: about 1.5x faster there), float32 on other CPUs. Evaluation, teacher "
        "targets and the ensemble stay float32. On CUDA, generalist.amp decides for the generalist."
    )
    keep_history: int = Field(
        3, ge=0, description="Finished results of a stage that a config or data change replaces, kept "
        "in RUN/history/<stage>/ (oldest dropped); 0 keeps none. Not part of any fingerprint."
    )

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path(self.root) / self.name


class TrackingConfig(Section):
    """The MLflow tracking store every stage logs to."""

    uri: str | None = Field(
        None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."
    )
    experiment: str = Field("specdistill", description="MLflow experiment name.")


class RayTrainConfig(Section):
    """Data-parallel training of the generalist and the students on Ray Train (TorchTrainer,
    DDP): each worker reads its own part of every global batch. workers = 1 without use_gpu
    trains in the driver process, without Ray."""

    workers: int = Field(1, ge=1, description="Data-parallel workers; 1 = train in the driver process.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per worker (also its torch threads).")
    use_gpu: bool = Field(False, description="One GPU per worker (nccl); false = CPU workers (gloo).")
    max_failures: int = Field(
        2, ge=0, description="Restarts of the worker group after a worker dies; each resumes from the last epoch."
    )


class RayConfig(Section):
    """The Ray cluster every stage that uses Ray connects to (specialists, the soft-target cache,
    data-parallel training)."""

    address: str | None = Field(
        None, description="Ray cluster; None = the job's cluster under `ray job submit`, else a private local Ray."
    )
    local_num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the private local Ray (address=None); None = all cores."
    )
    train: RayTrainConfig = Field(default_factory=RayTrainConfig,
                                  description="Data-parallel training of the generalist and students.")


class AugmentConfig(Section):
    """On-the-fly augmentation of training batches (never of evaluation), seeded by run.seed and
    the epoch; each training section switches it on or off with its own ``augment`` key."""

    kind: Literal["auto", "none", "affine", "crop_flip"] = Field(
        "auto", description="auto = affine jitter for grey-scale images, crops + flips for colour ones."
    )
    rotate: float = Field(10.0, ge=0, le=180, description="affine: largest rotation (degrees).")
    scale: float = Field(0.1, ge=0, lt=1, description="affine: largest relative scale change.")
    shift: float = Field(0.1, ge=0, lt=1, description="affine: largest shift (fraction of the side).")
    padding: int = Field(4, ge=0, description="crop_flip: reflection padding (pixels) before the crop.")
    flip: bool = Field(True, description="crop_flip: horizontal flips with probability 1/2.")


class DataConfig(Section):
    """The data set: a built-in one or data on disk, its options and its augmentation."""

    name: str = Field("glyphs", description="Data set: glyphs, hierarchy, cifar100, mnist, image_folder, ...")
    root: str | None = Field(None, description="Folder holding the data for external data sets.")
    options: dict[str, Any] = Field(
        default_factory=lambda: {
            "num_classes": 320,
            "train_per_class": 30,
            "holdout_per_class": 12,
            "test_per_class": 15,
        },
        description="Data-set specific options (validated by the data set; see README).",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training augmentation.")
    verify_content: bool = Field(
        False, description="Data on disk: decide whether it changed by the files' sha256 (reads every "
        "file) instead of their names, sizes and modification times. Not part of any fingerprint."
    )
    workers: int = Field(
        0, ge=0, description="Loader worker processes that decode and augment batches (0 = in the "
        "training process; > 0 draws each batch's augmentation from (seed, epoch, batch index))."
    )


class GeneralistConfig(Section):
    """Stage 1: the classifier over all classes, trained with early stopping on the holdout loss."""

    model: str = Field("cnn_fast", description="Model in the registry (cnn, cnn_fast, resnet, tv.<name>).")
    width: float = Field(1.0, gt=0, description="Channel-width multiplier.")
    depth: float = Field(1.0, gt=0, description="Depth multiplier.")
    epochs: int = Field(40, ge=1, description="Maximum training epochs (early stopping ends it sooner).")
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    eval_batch_size: int = Field(512, ge=1, description="Batch size for holdout and test evaluation.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=0.01, warmup_epochs=0.5, schedule="plateau"),
        description="Optimiser and schedule (plateau: train to convergence).",
    )
    augment: bool = Field(True, description="Augment training batches as data.augment says.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy.")
    amp: bool = Field(True, description="Mixed precision: on CUDA bf16 (fp16 where bf16 is not supported); "
                      "on the CPU bf16 when run.cpu_bf16 allows it.")
    patience: int = Field(4, ge=1, description="Early stopping patience on holdout loss (epochs).")
    clean_epochs: int = Field(
        10, ge=0, description="After early stopping, go on from the best weights (and their optimiser "
        "state) for up to this many epochs without augmentation, early-stopped on the holdout loss as "
        "before (0 = off). A generalist trained on augmented images often still gains on clean ones: "
        "without this, extra training could pass for a specialist gain.",
    )
    init: str | None = Field(
        None, description="Start from these weights instead of training from scratch: a .safetensors or "
        "weights-only .pt state dict of generalist.model (e.g. an earlier run's RUN/generalist/"
        "model.safetensors), or models:/NAME@ALIAS from the MLflow registry.",
    )
    init_mode: Literal["evaluate", "finetune"] = Field(
        "evaluate", description="With init: evaluate the model as it is (no training), or fine-tune it.",
    )


class ClusteringConfig(Section):
    """Stage 2: confusable groups from the generalist's holdout predictions."""

    affinity: Literal["confusion", "copred", "offdiag", "covariance"] = Field(
        "confusion", description="What is clustered: the holdout soft confusion (labels), the co-prediction "
        "E[p_i p_j], the covariance without its diagonal, or the normalised covariance columns.",
    )
    n_groups: int | None = Field(None, ge=1, description="Number of groups; None = chosen on held-out confusions.")
    overlap: float = Field(
        0.25, ge=0, le=1, description="A class joins another group when this share of its confusion mass is "
        "with that group's classes (0 = disjoint; confusion/copred/offdiag affinities).",
    )
    method: Literal["auto", "kmeans", "minibatch_kmeans", "spectral", "agglomerative", "faiss"] = Field(
        "auto", description="auto = spectral for K < 2000, else faiss k-means on a PCA projection."
    )
    normalize: Literal["correlation", "l2"] = Field("correlation", description="Column normalisation.")
    group_size: int | None = Field(
        None, ge=2, description="Overlapping fixed-size groups (each centroid's nearest classes)."
    )
    min_group_size: int = Field(2, ge=1, description="Smaller groups are dropped (classes unassigned).")
    sparse_top_k: int | None = Field(
        None, ge=1, description="Sparse top-k co-prediction path for very large K; None = dense."
    )
    stability_seeds: int = Field(3, ge=0, description="Seeds for the stability ARI (< 2 skips it).")
    batch_size: int = Field(512, ge=1, description="Batch size of the generalist's holdout pass.")
    groups_file: str | None = Field(
        None, description="Edited groups (YAML by class name, as `specdistill groups RUN --export` writes "
        "them) that replace the computed ones; None = the computed groups.",
    )
    require_approval: bool = Field(
        False, description="Stop after clustering until `specdistill groups RUN --approve` approves the "
        "groups. Not part of any fingerprint.",
    )


# specialists.same_compute_recipe: its values, in words (the stage's output, the benchmark report).
SAME_COMPUTE_RECIPES = {"generalist": "the generalist's recipe", "specialists": "the specialists' recipe"}


class SpecialistsConfig(Section):
    """Stage 3: one specialist per group (group classes + dustbin), trained in parallel on Ray."""

    epochs: int = Field(8, ge=1, description="Maximum training epochs per specialist.")
    batch_size: int = Field(64, ge=2, description="Examples per batch: half in the group, half from the rest.")
    num_batches: int | None = Field(
        None, ge=1, description="Batches per epoch; None = one pass over the group's training examples."
    )
    eval_batch_size: int = Field(512, ge=1, description="Batch size for the holdout loss.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=0.001),
        description="Optimiser and schedule of the trainable parameters.",
    )
    augment: bool = Field(False, description="Augment training batches as data.augment says. Off by default: "
                          "a specialist is a short fine-tune of a generalist that ended without augmentation "
                          "(generalist.clean_epochs). On omniglot-5 the measurements disagree (1 point lower "
                          "in one ablation, about 0.5 points higher over 3 seeds in another): see docs/cluster.md.")
    soft_targets: float = Field(
        0.0, ge=0, le=1, description="Weight of the generalist's soft targets (collapsed onto the group + "
        "dustbin) against the hard labels: (1 - w) CE + w T^2 KL; 0 = hard labels only.",
    )
    temperature: float = Field(2.0, gt=0, description="Temperature of those soft targets.")
    finetune: Literal["all", "head", "last_n"] = Field(
        "all", description="What trains: everything, the head only, or the last_n blocks + head."
    )
    last_n: int = Field(1, ge=1, description="Trailing trunk blocks that train when finetune=last_n.")
    reinit_blocks: int = Field(
        0, ge=0, description="Trailing trunk blocks (with the head and the dustbin's rows) each specialist "
        "starts afresh, seeded per specialist, instead of from the generalist: its errors then differ from "
        "the generalist's, as an ensemble member's do; 0 = every block from the generalist.",
    )
    patience: int = Field(2, ge=1, description="Early stopping patience on the specialist's holdout loss.")
    cpus_per_specialist: float = Field(1.0, gt=0, description="Ray CPUs per specialist (also its torch threads).")
    gpus_per_specialist: float = Field(0.0, ge=0, description="Ray GPUs per specialist (fractions share a GPU); 0 on CPU machines.")
    max_concurrency: int | None = Field(
        None, ge=1, description="Specialists training at once; None = as many as the cluster fits."
    )
    max_retries: int = Field(3, ge=0, description="Retries of a specialist whose worker or node died (resumes from its checkpoint).")
    same_compute: bool = Field(
        True, description="Also train the generalist on for as many examples as all specialists saw: the "
        "baseline that tells specialisation from extra training.",
    )
    same_compute_recipe: Literal["generalist", "specialists"] = Field(
        "generalist", description="How the same-compute baseline spends those examples: the generalist's own "
        "optimizer, batch size and augmentation with a cosine schedule over the budget, or the specialists' "
        "recipe. It keeps its epoch with the best holdout top-1. On glyphs (seed 0) the specialists' recipe "
        "never beat the generalist; the generalist's reached the ensemble.",
    )

    @model_validator(mode="after")
    def _fresh_blocks_train(self) -> SpecialistsConfig:
        frozen = self.finetune == "head" or (self.finetune == "last_n" and self.last_n < self.reinit_blocks)
        if self.reinit_blocks and frozen:
            raise ValueError(f"specialists.reinit_blocks={self.reinit_blocks} would leave freshly initialised "
                             f"blocks frozen under finetune={self.finetune}; set specialists.finetune=all, "
                             f"or last_n >= reinit_blocks")
        return self


class CacheConfig(Section):
    """The soft-target cache: the ensemble's q over one split, written with Ray Data."""

    enabled: bool = Field(True, description="Write the soft-target cache (the distill stage reads it).")
    split: Literal["train", "holdout", "test"] = Field("train", description="Split the cache covers.")
    top_k: int = Field(32, ge=1, description="Probabilities kept per example (float16 log q + int32 ids + residual).")
    dense_max_classes: int = Field(
        1024, ge=0, description="Store q densely (float16 log q) when K is at most this; 0 = always top-k."
    )
    shard_size: int = Field(8192, ge=1, description="Examples per cache shard.")
    actors: int = Field(2, ge=1, description="Ray Data actors computing the cache (and evaluating the ensemble on streamed data).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per cache or evaluation actor (0 on CPU machines).")


class EnsembleConfig(Section):
    """Stage 4: generalist + relevant specialists combined per input (eq. 5), evaluated, cached."""

    top_n: int = Field(2, ge=1, description="A specialist is active when its group holds one of the generalist's top_n classes (paper: 1).")
    tol: float = Field(1e-10, gt=0, description="Fixed-point solver stops a row once no probability moves by more than this.")
    max_iter: int = Field(1000, ge=1, description="Most fixed-point (SQUAREM) iterations per batch.")
    batch_size: int = Field(512, ge=1, description="Test examples per ensemble batch.")
    specialist_temperature: float | None = Field(
        None, gt=0, description="Specialists' logits are divided by this before combining (> 1 softens "
        "over-confident specialists); None = chosen on the holdout split by the ensemble's log-likelihood.",
    )
    cache: CacheConfig = Field(default_factory=CacheConfig, description="The soft-target cache.")


class DataFreeConfig(Section):
    """The data-free (DAFL) student: a generator trained against the frozen teacher supplies the
    transfer set; its budget."""

    enabled: bool = Field(True, description="Also distill a student from generator samples only (DAFL).")
    generator_steps: int = Field(150, ge=1, description="Generator training steps.")
    steps_per_epoch: int = Field(60, ge=1, description="Student steps per epoch on generated samples.")
    batch_size: int = Field(64, ge=2, description="Generated images per step (generator and student).")
    lr: float = Field(0.01, gt=0, description="Student learning rate on generated images (AdamW, cosine).")
    latent_dim: int = Field(64, ge=1, description="Generator noise dimension.")


class SchemesConfig(Section):
    """Settings of the training schemes ``distill.scheme`` chooses (each adds its models as rows
    of the results table; the main student is trained as usual)."""

    group_size: int = Field(2, description="mutual: students trained together, each learning from the others (>= 2).")
    mutual_temperature: float = Field(1.0, gt=0, description="mutual: temperature of the KL terms between the students (paper: 1).")
    generations: int = Field(2, ge=1, description="born_again: generations of the generalist's architecture, the first taught by the generalist, each later one by the one before.")
    assistant_width: float | None = Field(
        None, gt=0, description="teacher_assistant: width of the assistant (the student's model); None = midway between distill.width and generalist.width."
    )

    @field_validator("group_size")
    @classmethod
    def _a_group(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"mutual learning trains a group of students that learn from each other; "
                             f"a group of {value} has no peer: set distill.schemes.group_size to 2 or more")
        return value


class DistillConfig(Section):
    """Stage 5: the compact student on the ensemble's soft targets, its baselines, registration."""

    student: str = Field("cnn_fast", description="Student model in the registry (cnn, cnn_fast, resnet, tv.<name>).")
    width: float = Field(0.45, gt=0, description="Student channel-width multiplier (0.45 of cnn_fast: under a "
                         "quarter of the generalist's parameters).")
    depth: float = Field(1.0, gt=0, description="Student depth multiplier.")
    teacher: Literal["ensemble", "generalist"] = Field("ensemble", description="Whose soft targets the student learns.")
    targets: Literal["cache", "online"] = Field(
        "cache", description="cache = the ensemble stage's soft-target cache (fixed views); online = routed ensemble per batch."
    )
    temperature: float = Field(8.0, gt=0, description="Softening temperature T of teacher and student.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of T^2 * KL(teacher_T || student_T); 1 - alpha on hard labels.")
    losses: dict[str, float] = Field(
        default_factory=dict, description="Extra losses by name with weights, e.g. {hint: 1.0, rkd: 0.5}."
    )
    hint_layers: list[str] = Field(
        default_factory=list, description="[student module path, teacher module path] for every feature loss without its own distill.layers entry."
    )
    layers: dict[str, list[list[str]] | list[str]] = Field(
        default_factory=dict, description="Layers per term: {term: [student path, teacher path]}, or a list of pairs (fsp), e.g. {fsp: [[blocks.1, blocks.0], [blocks.2, blocks.1]]}."
    )
    loss_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Constructor arguments per term, e.g. {dkd: {beta: 8.0}, crd: {memory_size: 4096}} (see README)."
    )
    scheme: Literal["standard", "mutual", "born_again", "teacher_assistant"] = Field(
        "standard", description="Training scheme whose models join the table: mutual learning, born-again generations, a teacher assistant; standard = none."
    )
    schemes: SchemesConfig = Field(default_factory=SchemesConfig, description="Settings of the schemes.")
    epochs: int = Field(8, ge=1, description="Training epochs of every student.")
    augment: bool = Field(True, description="Augment training batches as data.augment says (an online "
                                            "teacher scores the same augmented view).")
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    eval_batch_size: int = Field(512, ge=1, description="Batch size for test evaluation.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=0.003, warmup_epochs=0.5),
        description="Optimiser and schedule of every student.",
    )
    baselines: bool = Field(True, description="Also train the hard-label and generalist-teacher students (same budget).")
    data_free: DataFreeConfig = Field(default_factory=DataFreeConfig, description="The data-free (DAFL) student.")
    register_model: bool = Field(True, description="Log the student with mlflow.pytorch and register it (alias candidate).")
    model_name: str = Field("specdistill-student", description="Registered model name.")
