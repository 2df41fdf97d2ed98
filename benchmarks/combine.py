"""Benchmark: batched fixed-point combination vs per-example gradient descent (the paper's way).

    python -m benchmarks.combine [--quick] [--out PATH] [--threads N] [--tol TOL]

Both solvers run on the CPU with one torch thread by default (``--threads``): on a small shared
machine OpenMP barriers stall whenever another process holds a core, which distorts timings.

Random but realistic problems: classes fall into "superclass" blocks; each group is one block
plus confusable classes from the neighbouring blocks (so groups overlap); the generalist is peaky
(top-1 mostly the true class, sometimes an ambiguous example); each specialist agrees with the
generalist up to logit noise. Active specialists come from the generalist's top-1 class.

Both solvers are driven to the same tolerance on the fixed-point residual
``max_j |q_j - T(q)_j|`` (for the reference: ``max_j |dF/dz_j| / (1 + a)``). The production
solver runs on the whole batch (median of several timed runs after a warm-up), the reference
on the first ``--ref-sample`` examples. ``objective_gap`` is the maximum over those examples of
``|F_prod - F_ref| / max(|F_ref|, 1e-300)``; ``speedup`` is the throughput ratio of the first
case (K = 1,000). ``residual`` is each answer's ``max |dF/dz| / (1 + a)`` measured afterwards by
autograd through the public objective. ``--quick`` runs only that case, with a 12-example
reference sample (20 otherwise). The full run adds solver variants and the paper's JFT shape
(K = 15,000, 61 groups of 300; reference on 2 examples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from specialists.ensemble import (
    GroupMembership,
    active_specialists,
    combine_objective,
    solve_fixed_point,
    solve_reference,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "combine.json"


def make_membership(num_classes: int, num_groups: int, size: int, gen: torch.Generator) -> tuple[GroupMembership, torch.Tensor]:
    """Groups = a block of ~K/S classes + confusable classes from the two neighbouring blocks.
    Returns the membership and the ``(K,)`` block id of every class."""
    perm = torch.randperm(num_classes, generator=gen)
    blocks = list(torch.tensor_split(perm, num_groups))
    block_of = torch.empty(num_classes, dtype=torch.long)
    for m, block in enumerate(blocks):
        block_of[block] = m
    groups = []
    for m, block in enumerate(blocks):
        neighbours = torch.cat([blocks[(m - 1) % num_groups], blocks[(m + 1) % num_groups]])
        extra = max(0, size - block.numel())
        pick = neighbours[torch.randperm(neighbours.numel(), generator=gen)[:extra]]
        groups.append(torch.cat([block, pick]).tolist())
    return GroupMembership.from_groups(groups, num_classes), block_of


def make_problem(
    batch: int, membership: GroupMembership, block_of: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """``p_general (B, K)``, routed specialist outputs and the ``(B, S)`` active mask."""
    num_classes = membership.num_classes
    label = torch.randint(num_classes, (batch,), generator=gen)
    logits = torch.randn(batch, num_classes, generator=gen, dtype=torch.float64)
    same_block = block_of.unsqueeze(0) == block_of[label].unsqueeze(1)
    logits += same_block * 4.0 * torch.rand(batch, num_classes, generator=gen, dtype=torch.float64)
    hard = torch.rand(batch, generator=gen) < 0.25  # ambiguous examples: a weaker peak
    peak = math.log(num_classes) + torch.where(hard, -1.0, 2.0) + 4.0 * torch.rand(batch, generator=gen)
    logits[torch.arange(batch), label] += peak.to(torch.float64)
    p_general = logits.softmax(dim=1)
    active = active_specialists(p_general, membership, top_n=1)
    outputs = []
    for m, group in enumerate(membership.groups):
        index = active[:, m].nonzero().squeeze(1)
        cls = torch.tensor(group)
        rows = logits[index]
        inside = rows[:, cls] + 0.7 * torch.randn(index.numel(), cls.numel(), generator=gen, dtype=torch.float64)
        outside_mask = torch.ones(num_classes, dtype=torch.bool)
        outside_mask[cls] = False
        dust = rows[:, outside_mask].logsumexp(dim=1, keepdim=True)
        dust += 0.7 * torch.randn(index.numel(), 1, generator=gen, dtype=torch.float64)
        outputs.append((index, torch.cat([inside, dust], dim=1).softmax(dim=1)))
    return p_general, outputs, active


def subset(outputs: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Routed outputs restricted to examples ``0 .. count - 1``."""
    return [(index[index < count], probs[index < count]) for index, probs in outputs]


def time_production(p_general, outputs, active, membership, repeats: int, **kwargs: Any) -> tuple[float, torch.Tensor, dict]:
    solve_fixed_point(p_general, outputs, active, membership, **kwargs)  # warm-up
    times, q, info = [], None, {}
    for _ in range(repeats):
        start = time.perf_counter()
        q, info = solve_fixed_point(p_general, outputs, active, membership, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), q, info


def objective_gap(q_prod, q_ref, p_general, outputs, active, membership) -> tuple[float, float]:
    """Max relative ``|F_prod - F_ref|`` and max signed ``F_prod - F_ref`` over the sample."""
    f_prod = combine_objective(q_prod, p_general, outputs, active, membership)
    f_ref = combine_objective(q_ref, p_general, outputs, active, membership)
    return float(((f_prod - f_ref).abs() / f_ref.abs().clamp_min(1e-300)).max()), float((f_prod - f_ref).max())


def logit_residual(q, p_general, outputs, active, membership) -> torch.Tensor:
    """``(B,)`` ``max_j |dF/dz_j| / (1 + a)`` at ``z = log q`` by autograd through the public
    objective: the fixed-point residual ``max_j |q_j - T(q)_j|``, for either solver's answer."""
    z = q.log().requires_grad_(True)
    value = combine_objective(torch.softmax(z, dim=1), p_general, outputs, active, membership).sum()
    (grad,) = torch.autograd.grad(value, z)
    return grad.abs().amax(dim=1) / (1 + active.sum(dim=1))


def run_case(
    name: str, num_classes: int, num_groups: int, size: int, batch: int, ref_sample: int,
    tol: float, repeats: int, variants: bool, seed: int,
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    membership, block_of = make_membership(num_classes, num_groups, size, gen)
    p_general, outputs, active = make_problem(batch, membership, block_of, gen)
    counts = active.sum(dim=1).double()
    case: dict[str, Any] = {
        "name": name, "num_classes": num_classes, "num_groups": num_groups,
        "group_sizes": [min(membership.sizes), max(membership.sizes)], "batch": batch,
        "mean_active": float(counts.mean()), "max_active": int(counts.max()),
        "mean_top1_prob": float(p_general.max(dim=1).values.mean()), "tol": tol, "rows": [],
    }
    sample_p, sample_out, sample_active = p_general[:ref_sample], subset(outputs, ref_sample), active[:ref_sample]
    start = time.perf_counter()
    q_ref = solve_reference(sample_p, sample_out, sample_active, membership, tol=tol, max_steps=200_000)
    ref_seconds = time.perf_counter() - start
    ref_rate = ref_sample / ref_seconds
    ref_residual = float(logit_residual(q_ref, sample_p, sample_out, sample_active, membership).max())
    case["rows"].append({"solver": "reference: GD on logits (ABB, line search)", "examples": ref_sample,
                         "seconds": ref_seconds, "examples_per_s": ref_rate, "iterations": None,
                         "max_change": None, "residual": ref_residual, "objective_gap": 0.0})
    settings = [("fixed point, sparse, SQUAREM", {})]
    if variants:
        settings += [
            ("fixed point, dense, SQUAREM", {"sparse": False}),
            ("fixed point, sparse, plain EM", {"accelerate": False}),
            ("fixed point, sparse, SQUAREM, float32", {"dtype": torch.float32}),
        ]
    for label, kwargs in settings:
        kw = {"tol": tol, **kwargs}
        seconds, q, info = time_production(p_general, outputs, active, membership, repeats, **kw)
        gap, worse_by = objective_gap(q[:ref_sample], q_ref, sample_p, sample_out, sample_active, membership)
        residual = float(logit_residual(q[:ref_sample].double(), sample_p, sample_out, sample_active, membership).max())
        case["rows"].append({"solver": label, "examples": batch, "seconds": seconds,
                             "examples_per_s": batch / seconds, "iterations": info["iterations"],
                             "max_change": info["max_change"], "converged": info["converged"],
                             "residual": residual, "objective_gap": gap, "max_f_prod_minus_f_ref": worse_by})
    headline = case["rows"][1]
    case["speedup"] = headline["examples_per_s"] / ref_rate
    case["objective_gap"] = headline["objective_gap"]
    return case


def print_table(cases: list[dict[str, Any]]) -> None:
    header = (f"{'case':<22} {'solver':<40} {'examples':>8} {'seconds':>9} {'ex/s':>11} {'iters':>6} "
              f"{'max_change':>11} {'residual':>9} {'obj_gap':>9}")
    print(header)
    print("-" * len(header))
    for case in cases:
        for row in case["rows"]:
            iters = "-" if row["iterations"] is None else str(row["iterations"])
            change = "-" if row["max_change"] is None else f"{row['max_change']:.1e}"
            print(f"{case['name']:<22} {row['solver']:<40} {row['examples']:>8} {row['seconds']:>9.3f} "
                  f"{row['examples_per_s']:>11.1f} {iters:>6} {change:>11} {row['residual']:>9.1e} "
                  f"{row['objective_gap']:>9.1e}")
        print(f"{'':<22} mean active specialists {case['mean_active']:.2f} (max {case['max_active']}), "
              f"mean top-1 prob {case['mean_top1_prob']:.3f}, speedup {case['speedup']:.0f}x")


def routed_throughput(num_classes: int = 320, num_groups: int = 32, batch: int = 512,
                      repeats: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Examples/s of the generalist alone vs the routed ensemble (glyph-sized models: cnn_fast on
    1x32x32, ``num_groups`` disjoint groups, n = 1), with full specialists and with a shared trunk.

    Throughput does not depend on the weights, so the models are freshly initialised; the
    generalist's head is sharpened so that routing sends each example to one specialist.
    """
    from generalist.models import create_model
    from specialists.ensemble import build_ensemble, ensemble_forward
    from specialists.model import build_specialist

    torch.manual_seed(seed)
    generalist = create_model("cnn_fast", num_classes=num_classes, in_channels=1, image_size=32).eval()
    groups = [list(range(g, num_classes, num_groups)) for g in range(num_groups)]
    x = torch.rand(batch, 1, 32, 32)

    def rate(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return batch / statistics.median(times)

    with torch.no_grad():
        general = rate(lambda: torch.softmax(generalist(x).double(), dim=1))
        rows = [{"model": "generalist", "examples_per_s": general, "relative": 1.0}]
        for finetune in ("last_n", "head"):
            specialists = [build_specialist(generalist, g, finetune=finetune) for g in groups]
            ensemble = build_ensemble(generalist, specialists)
            routed = rate(lambda ens=ensemble: ensemble_forward(ens, x))
            rows.append({"model": f"routed ensemble ({'shared trunk' if ensemble.shared_trunk else 'full specialists'})",
                         "examples_per_s": routed, "relative": routed / general})
    for row in rows:
        print(f"  {row['model']:<40} {row['examples_per_s']:>10,.0f} examples/s  {row['relative']:.2f}x")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K = 1,000 only, no variants (< 60 s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both solvers (0: torch default)")
    parser.add_argument("--tol", type=float, default=1e-12, help="fixed-point residual for both solvers")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--ref-sample", type=int, default=None,
                        help="examples solved by the reference at K = 1,000 (default 12 with --quick, else 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ref_sample = args.ref_sample or (12 if args.quick else 20)
    started = time.perf_counter()
    cases = [run_case("K=1000 S=50 |S|~40", 1000, 50, 40, args.batch, ref_sample, args.tol,
                      repeats=3, variants=not args.quick, seed=args.seed)]
    if not args.quick:
        cases.append(run_case("K=15000 S=61 |S|=300", 15000, 61, 300, args.batch, 2, args.tol,
                              repeats=2, variants=False, seed=args.seed + 1))
    routed = []
    if not args.quick:
        print("routed inference, K=320, 32 groups, batch 512 (cnn_fast, 1x32x32):")
        routed = routed_throughput()
    result = {
        "routed_throughput": routed,
        "quick": args.quick, "seed": args.seed, "tol": args.tol,
        "speedup": cases[0]["speedup"],
        "objective_gap": max(case["objective_gap"] for case in cases),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                        "machine": platform.machine(), "device": "cpu"},
        "wall_seconds": time.perf_counter() - started,
        "cases": cases,
    }
    print_table(cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['wall_seconds']:.1f} s "
          f"(threads {result['environment']['threads']}, load {result['environment']['load_average'][0]:.1f})")
    print(f"speedup={result['speedup']:.1f} objective_gap={result['objective_gap']:.3e}")


if __name__ == "__main__":
    main()
