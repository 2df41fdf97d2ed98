"""The ``specdistill`` command.

    specdistill run [CONFIG] [key=value ...] [--only STAGE] [--from STAGE] [--to STAGE]
    specdistill generalist [CONFIG] [key=value ...]      # one stage
    specdistill clustering [CONFIG] [key=value ...]      # one stage
    specdistill groups RUN [--export FILE | --apply FILE | --approve]   # review, edit, approve the groups
    specdistill report RUN                               # results report: models, groups, Table 4 (+ report.md, plots)
    specdistill query RUN IMAGE... [--top-k K] [--temperature T] [--json]
    specdistill serve RUN [--host H] [--port P] [...]    # HTTP API on Ray Serve (docs/serve.md)
    specdistill predict MODEL IMAGE... [--top-k K] [--json]   # the student (RUN or models:/NAME@ALIAS)
    specdistill config [CONFIG] [key=value ...]          # print the resolved config
    specdistill data pack SRC OUT [--option K=V] [--shard-size N]   # packed shards (docs/data.md)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from orchestration import data_cli
from orchestration.artifacts import CONFIG
from orchestration.config import ConfigError, check_data_options, load_config
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
    data_cli.add_parser(sub)
    groups = sub.add_parser("groups", help="print, export, edit (apply) or approve the confusable groups of a run")
    groups.add_argument("run", metavar="RUN", help="run directory (or a run name under runs/)")
    action = groups.add_mutually_exclusive_group()
    action.add_argument("--export", metavar="FILE", type=Path, help="write the groups as YAML by class name")
    action.add_argument("--apply", metavar="FILE", type=Path,
                        help="check an edited groups file and record it as the run's grouping")
    action.add_argument("--approve", action="store_true",
                        help="approve the run's groups (clustering.require_approval waits for this)")
    report = sub.add_parser("report", help="print the results report of a run (models, groups, Table 4) and write report.md + plots")
    report.add_argument("run", metavar="RUN", help="run directory (or a run name under runs/)")
    query = sub.add_parser("query", help="the ensemble's class probabilities for image files")
    query.add_argument("run", metavar="RUN", help="run directory (or a run name under runs/)")
    query.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, ...)")
    query.add_argument("--top-k", type=int, default=None,
                       help="classes to print per image, 1..K (default 5, or K when fewer)")
    query.add_argument("--temperature", type=float, default=1.0, help="soft-target temperature T")
    query.add_argument("--json", action="store_true", help="print machine-readable JSON")
    predict = sub.add_parser("predict", help="the distilled student's top-k classes for image files")
    predict.add_argument("model", metavar="MODEL", help="run directory, or a registered model models:/NAME@ALIAS")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    predict.add_argument("--top-k", type=int, default=None, help="classes per image, 1..K (default 5, or K when fewer)")
    predict.add_argument("--json", action="store_true", help="print machine-readable JSON")
    predict.add_argument("--tracking-uri", default=None, help="MLflow store of models:/ URIs (default: $MLFLOW_TRACKING_URI)")
    serve_cmd = sub.add_parser("serve", help="serve the ensemble's soft targets over HTTP (Ray Serve)")
    serve_cmd.add_argument("run", metavar="RUN", help="run directory (or a run name under runs/)")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, default=8000,
                           help="HTTP port (default 8000; 0 = a free one, printed once serving)")
    serve_cmd.add_argument("--max-batch-size", type=int, default=64,
                           help="images computed together across requests (default 64)")
    serve_cmd.add_argument("--batch-wait-ms", type=float, default=5.0,
                           help="how long a batch waits for more requests (default 5)")
    serve_cmd.add_argument("--max-inputs", type=int, default=256, help="images per request (default 256)")
    serve_cmd.add_argument("--max-payload-mb", type=float, default=16.0,
                           help="request body limit in MiB (default 16)")
    serve_cmd.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    serve_cmd.add_argument("--replica-cpus", type=float, default=1.0,
                           help="CPUs reserved per replica (default 1; fractions share a core)")
    serve_cmd.add_argument("--address", default=None,
                           help="existing Ray cluster (auto, HOST:PORT, ray://...); default: a private local Ray")
    return parser


def resolve_run_dir(run: str) -> Path:
    """A run directory given as a path, or as a run name under ./runs."""
    for candidate in (Path(run), Path("runs") / run):
        if (candidate / CONFIG).exists():
            return candidate
    raise FileNotFoundError(
        f"no run directory at {run!r} (nor runs/{run}); pass the run.dir of a pipeline run"
    )


def _cmd_groups(ns: argparse.Namespace, console: Console) -> int:
    from orchestration.artifacts import GROUPS_TABLE, load_groups, stage_dir
    from orchestration.files import read_json
    from orchestration.tables import groups_table

    run = resolve_run_dir(ns.run)
    if ns.export or ns.apply or ns.approve:
        return _edit_groups(ns, run, console)
    record = load_groups(run)
    rows = read_json(stage_dir(run, "clustering") / GROUPS_TABLE)
    m = record["metrics"]
    console.print(
        f"{len(record['groups'])} groups of {record['num_classes']} classes "
        f"({record['method']}{', ' + record['normalize'] if record.get('normalize') else ''}), "
        f"{len(record['unassigned'])} unassigned{' (edited)' if record.get('source') == 'edited' else ''}, "
        f"stability ARI {m['stability_ari']:.3f}"
    )
    console.print(groups_table(rows).rich())
    return 0


def _edit_groups(ns: argparse.Namespace, run: Path, console: Console) -> int:
    from orchestration.groups_record import apply_groups, approve, export_groups

    if ns.export:
        n = export_groups(run, ns.export)
        console.print(f"wrote {n} groups to {ns.export}; edit it, then `specdistill groups {run} --apply {ns.export}`",
                      markup=False, highlight=False)
    elif ns.apply:
        console.print(f"checking {ns.apply} and recording it (the review pages are redrawn from the training "
                      "images, so the data is loaded) ...", markup=False, highlight=False)
        diff = apply_groups(run, ns.apply)
        moved = ", ".join(f"{m['class']} {m['from'] or 'generalist'} -> {m['to'] or 'generalist'}"
                          for m in diff["moved_classes"])
        console.print(f"applied {ns.apply} to {run}: {len(diff['moved_classes'])} classes moved"
                      f"{' (' + moved + ')' if moved else ''}; the next `specdistill run` retrains the "
                      "specialists whose classes changed (a changed clustering key recomputes the groups: "
                      "set clustering.groups_file to keep the edit then)", markup=False, highlight=False)
    else:
        approval = approve(run)
        console.print(f"approved the {approval['n_groups']} {approval['source']} groups of {run}; "
                      "run the same `specdistill run` command again to continue", markup=False, highlight=False)
    return 0


def _cmd_report(ns: argparse.Namespace, console: Console) -> int:
    from orchestration.report import build_report, print_report, write_report

    run = resolve_run_dir(ns.run)
    report = build_report(run)
    print_report(console, report)
    files = write_report(report, run)
    console.print(f"report: {files[0]}")
    return 0


def _final_report(outcome, console: Console, tracking_uri: str) -> None:
    """Report, report.md and plots at the end of a run that got as far as the ensemble; logged to
    the parent MLflow run. A failure here never loses the run: it is printed and skipped."""
    from mlflow.tracking import MlflowClient

    from orchestration.report import build_report, log_report, print_report, write_report

    if "ensemble" not in outcome.manifests:
        return
    try:
        report = build_report(outcome.run_dir)
        files = write_report(report, outcome.run_dir)
        print_report(console, report)
        log_report(MlflowClient(tracking_uri, registry_uri=tracking_uri), outcome.parent_run_id, files, report)
        console.print(f"report: {files[0]}")
    except Exception as exc:  # noqa: BLE001 - the stages' results are already safe on disk
        console.print(f"[yellow]warning[/] the results report failed ({type(exc).__name__}: {exc}); "
                      f"`specdistill report {outcome.run_dir}` retries it")


def _cmd_query(ns: argparse.Namespace, console: Console) -> int:

    from orchestration.ensemble_api import Ensemble
    from orchestration.serve_protocol import default_top_k

    ensemble = Ensemble.load(resolve_run_dir(ns.run))
    top_k = default_top_k(len(ensemble.class_names)) if ns.top_k is None else ns.top_k
    results = ensemble.soft_targets(ns.inputs, temperature=ns.temperature, top_k=top_k)
    _print_top_k(console, ns.inputs, results, ns.json)
    return 0


def _cmd_predict(ns: argparse.Namespace, console: Console) -> int:
    from orchestration.predict import load_student, predict
    from orchestration.serve_protocol import default_top_k
    from orchestration.tracking import resolve_tracking_uri

    source = ns.model if ns.model.startswith("models:/") else str(resolve_run_dir(ns.model))
    student = load_student(source, resolve_tracking_uri(ns.tracking_uri))
    top_k = default_top_k(len(student.class_names)) if ns.top_k is None else ns.top_k
    _print_top_k(console, ns.inputs, predict(student, ns.inputs, top_k), ns.json)
    return 0


def _print_top_k(console: Console, inputs: list[str], results, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps([{"input": path, "top_k": [{"class": name, "probability": p} for name, p in pairs]}
                          for path, pairs in zip(inputs, results, strict=True)], indent=2, ensure_ascii=False))
        return
    for path, pairs in zip(inputs, results, strict=True):
        console.print(path, markup=False, highlight=False)
        for name, p in pairs:
            console.print(f"  {p:.4f}  {name}", markup=False, highlight=False)


def _cmd_serve(ns: argparse.Namespace, console: Console) -> int:
    """Start the server, print how to query it, block until Ctrl-C / SIGTERM, stop it cleanly."""
    import signal
    import time

    run_dir = resolve_run_dir(ns.run)  # before importing Ray Serve or starting anything

    from orchestration.serve import ServeError, ServeOptions, example_commands, start

    def on_signal(signum: int, frame) -> None:
        raise KeyboardInterrupt

    try:
        options = ServeOptions(max_batch_size=ns.max_batch_size, batch_wait_ms=ns.batch_wait_ms,
                               max_inputs=ns.max_inputs, max_payload_mb=ns.max_payload_mb,
                               replicas=ns.replicas, replica_cpus=ns.replica_cpus)
        console.print(f"starting Ray Serve for {run_dir} ...", markup=False, highlight=False)
        server = start(run_dir, options, host=ns.host, port=ns.port, address=ns.address)
    except ServeError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # start() has taken down what it had started
        Console(stderr=True).print("interrupted while starting; nothing was left running", markup=False)
        return 130
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.print(f"serving {run_dir} at {server.url} on {server.ray}: {options.replicas} "
                      f"replica(s), batches of up to {options.max_batch_size} images, at most "
                      f"{options.max_inputs} images / {options.max_payload_mb:g} MiB per request",
                      markup=False, highlight=False)
        console.print("try:", markup=False)
        for line in example_commands(server.url, server.image_shape):
            console.print(f"  {line}", markup=False, highlight=False)
        console.print("API: docs/serve.md; Ctrl-C (or SIGTERM) stops the server", markup=False)
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        console.print("stopping ...", markup=False)
        server.stop()
    console.print("stopped", markup=False)
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
    from orchestration.tracking import resolve_tracking_uri

    _final_report(outcome, console, resolve_tracking_uri(config.tracking.uri))
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
        f"(generalist {m.get('mean_generalist_group_top1', m['mean_init_group_top1']):.3f}), {m['n_resumed']} resumed from a checkpoint"
    ),
    "ensemble": lambda m: (
        f"ensemble: test top1 generalist {m['generalist_top1']:.4f} -> ensemble "
        f"{m['ensemble_top1']:.4f}  ({m['n_covered']:,} of {m['n_examples']:,} covered by a "
        "specialist; specdistill report RUN for Table 4)"
    ),
    "distill": lambda m: (
        f"distill: student test top1 {m['student_top1']:.4f}  top5 {m['student_top5']:.4f}  "
        f"params {int(m['student_params']):,} ({m['compression']:.1f}x fewer than the generalist)  "
        f"{m['student_latency_ms']:.3f} ms/example"
        + "".join(f"; {label} {m[key]:.4f}" for key, label in (
            ("hard_labels_top1", "hard labels only"), ("generalist_kd_top1", "generalist-taught"),
            ("data_free_top1", "data-free")) if key in m)
        + (f"; registered version {m['registered_version']}" if "registered_version" in m else "")
        + " (RUN/distill/results.md)"
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
            config = _load(ns.args)
            check_data_options(config)
            console.print(config.to_yaml(), end="", markup=False, highlight=False)
            return 0
        if ns.command == "groups":
            return _cmd_groups(ns, console)
        if ns.command == "report":
            return _cmd_report(ns, console)
        if ns.command == "query":
            return _cmd_query(ns, console)
        if ns.command == "serve":
            return _cmd_serve(ns, console)
        if ns.command == "predict":
            return _cmd_predict(ns, console)
        if ns.command == "data":
            return data_cli.run(ns, console)
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
    from orchestration.files import RunDirError
    from orchestration.parallel import WorkerLostError
    from orchestration.predict import PredictError
    from orchestration.teachers import DistillError
    from orchestration.tracking import TrackingError

    return (
        DataError, CheckpointError, NonFiniteLossError, TrackingError, RunDirError, FileNotFoundError,
        WorkerLostError, EnsembleInputError, DistillError, PredictError,
    )


if __name__ == "__main__":
    sys.exit(main())
