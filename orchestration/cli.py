"""The ``specdistill`` command.

    specdistill run [CONFIG] [key=value ...] [--only STAGE] [--from STAGE] [--to STAGE]
    specdistill generalist [CONFIG] [key=value ...]      # one stage
    specdistill clustering [CONFIG] [key=value ...]      # one stage
    specdistill groups RUN                               # the confusable groups of a run
    specdistill report RUN                               # ensemble evaluation + Table 4 of a run
    specdistill query RUN IMAGE... [--top-k K] [--temperature T] [--json]
    specdistill config [CONFIG] [key=value ...]          # print the resolved config
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from orchestration.config import ConfigError, load_config
from orchestration.stages import STAGES, stage_names

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """CONFIG is the first argument without '='; the rest are dotted overrides."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args", nargs="*", metavar="[CONFIG] [key=value]",
        help="YAML config (default: built-in quickstart) and dotted overrides, e.g. generalist.epochs=3",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdistill",
        description="Specialist ensembles distilled into one compact student (Ray + MLflow + PyTorch).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline's stages in order, skipping finished ones")
    _add_config_args(run)
    group = run.add_mutually_exclusive_group()
    group.add_argument("--only", choices=stage_names(), help="run just this stage")
    group.add_argument("--from", dest="start", choices=stage_names(), help="re-run from this stage on")
    run.add_argument("--to", dest="stop", choices=stage_names(), help="stop after this stage")
    for name in stage_names():
        stage = sub.add_parser(name, help=f"run the {name} stage only")
        _add_config_args(stage)
    show = sub.add_parser("config", help="print the fully resolved config")
    _add_config_args(show)
    groups = sub.add_parser("groups", help="print the confusable groups of a run")
    groups.add_argument("run", metavar="RUN", help="run directory (or a run name under runs/)")
    report = sub.add_parser("report", help="print the ensemble evaluation and Table 4 of a run")
    report.add_argument("run", metavar="RUN", help="run directory (or a run name under runs/)")
    query = sub.add_parser("query", help="the ensemble's class probabilities for image files")
    query.add_argument("run", metavar="RUN", help="run directory (or a run name under runs/)")
    query.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, ...)")
    query.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    query.add_argument("--temperature", type=float, default=1.0, help="soft-target temperature T")
    query.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def resolve_run_dir(run: str) -> Path:
    """A run directory given as a path, or as a run name under ./runs."""
    for candidate in (Path(run), Path("runs") / run):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(
        f"no run directory at {run!r} (nor runs/{run}); pass the run.dir of a pipeline run"
    )


def _cmd_groups(ns: argparse.Namespace, console: Console) -> int:
    from orchestration.rundir import read_json
    from orchestration.stages.clustering import load_groups, print_groups_table

    stage_dir = resolve_run_dir(ns.run) / "clustering"
    record = load_groups(stage_dir)
    rows = read_json(stage_dir / "groups_table.json")
    m = record["metrics"]
    console.print(
        f"{len(record['groups'])} groups of {record['num_classes']} classes "
        f"({record['method']}, {record['normalize']}), {len(record['unassigned'])} unassigned, "
        f"stability ARI {m['stability_ari']:.3f}"
    )
    print_groups_table(console, rows)
    return 0


def _cmd_report(ns: argparse.Namespace, console: Console) -> int:
    from orchestration.stages.ensemble import load_report, print_report

    print_report(console, load_report(resolve_run_dir(ns.run)))
    return 0


def _cmd_query(ns: argparse.Namespace, console: Console) -> int:
    import json

    from orchestration.ensemble_api import Ensemble

    ensemble = Ensemble.load(resolve_run_dir(ns.run))
    top_k = min(ns.top_k, len(ensemble.class_names)) if ns.top_k >= 1 else ns.top_k
    results = ensemble.soft_targets(ns.inputs, temperature=ns.temperature, top_k=top_k)
    if ns.json:
        data = [{"input": path, "top_k": [{"class": name, "probability": p} for name, p in pairs]}
                for path, pairs in zip(ns.inputs, results, strict=True)]
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    for path, pairs in zip(ns.inputs, results, strict=True):
        console.print(path, markup=False, highlight=False)
        for name, p in pairs:
            console.print(f"  {p:.4f}  {name}", markup=False, highlight=False)
    return 0


def _load(args: Sequence[str]):
    path, overrides = _split_config_args(args)
    return load_config(Path(path) if path else None, overrides)


def _cmd_run(ns: argparse.Namespace, console: Console) -> int:
    from orchestration.pipeline import run_pipeline

    config = _load(ns.args)
    only = ns.command if ns.command in stage_names() else getattr(ns, "only", None)
    outcome = run_pipeline(config, STAGES, only=only, start=getattr(ns, "start", None),
                           stop=getattr(ns, "stop", None), console=console)
    _print_summary(outcome, console)
    return 0


# One summary line per finished stage, from the metrics in its manifest.
_SUMMARY_LINES = {
    "generalist": lambda m: (
        f"generalist: test top1 {m['test_top1']:.4f}  top5 {m['test_top5']:.4f}  "
        f"params {int(m['params']):,}"
    ),
    "clustering": lambda m: (
        f"clustering: {m['n_specialist_groups']} groups, {m['n_unassigned']} classes unassigned, "
        f"stability ARI {m['stability_ari']:.3f}"
    ),
    "specialists": lambda m: (
        f"specialists: {m['n_specialists']} trained, group top1 {m['mean_group_top1']:.3f} "
        f"(generalist {m['mean_init_group_top1']:.3f}), {m['n_resumed']} resumed from a checkpoint"
    ),
    "ensemble": lambda m: (
        f"ensemble: test top1 generalist {m['generalist_top1']:.4f} -> ensemble "
        f"{m['ensemble_top1']:.4f}  ({m['n_covered']:,} of {m['n_examples']:,} covered by a "
        "specialist; specdistill report RUN for Table 4)"
    ),
}


def _print_summary(outcome, console: Console) -> None:
    for stage, line in _SUMMARY_LINES.items():
        if stage in outcome.manifests:
            console.print(line(outcome.manifests[stage].metrics))
    console.print(f"run dir: {outcome.run_dir}")
    console.print(f"mlflow run id: {outcome.parent_run_id}")


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)          # log lines stay whole in files and job logs
    errors = Console(stderr=True, soft_wrap=True)
    try:
        if ns.command == "config":
            console.print(_load(ns.args).to_yaml(), end="", markup=False, highlight=False)
            return 0
        if ns.command == "groups":
            return _cmd_groups(ns, console)
        if ns.command == "report":
            return _cmd_report(ns, console)
        if ns.command == "query":
            return _cmd_query(ns, console)
        return _cmd_run(ns, console)
    except ConfigError as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        errors.print("interrupted; re-run the same command to resume", markup=False)
        return 130
    except _user_errors() as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_BAD_INPUT if isinstance(exc, ValueError) else EXIT_FAILED


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message already names the problem and the fix: no traceback for these."""
    from generalist.data import DataError
    from generalist.train import NonFiniteLossError
    from orchestration.checkpoints import CheckpointError
    from orchestration.ensemble_api import EnsembleInputError
    from orchestration.parallel import WorkerLostError
    from orchestration.rundir import RunDirError
    from orchestration.tracking import TrackingError

    return (
        DataError, CheckpointError, NonFiniteLossError, TrackingError, RunDirError, FileNotFoundError,
        WorkerLostError, EnsembleInputError,
    )


if __name__ == "__main__":
    sys.exit(main())
