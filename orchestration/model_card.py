"""The model card of a registered student: the description of its MLflow model version.

It says what the student scores beside the baselines (the distill stage's result rows), which
classes it predicts, who taught it and on which data (the data's identity: sizes and sha256 per
split), and how its ONNX export compares with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SHOWN_CLASSES = 50


def model_card(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], teacher: str,
               data: Mapping[str, Any], onnx: Mapping[str, Any] | None = None) -> str:
    """Markdown: metrics beside the baselines, classes, teacher, data identity."""
    lines = ["# specdistill student", "",
             f"Teacher: {teacher}. Inputs: images {' x '.join(map(str, data['image_shape']))} (C x H x W), "
             "float in [0, 1]; outputs: logits over the classes below (softmax at T = 1).", "",
             "| model | teacher | test top-1 | test top-5 | parameters | latency ms/example |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r.get('teacher', '')} | {r['top1']:.4f} | {r['top5']:.4f} | {int(r['params']):,} "
              f"| {r['latency_ms']:.3f} |" for r in rows]
    if onnx:
        lines += ["", f"ONNX export (student.onnx in the run directory): top-1 agreement with the torch model "
                      f"{onnx['top1_agreement']:.4f} on the test split, max |logit difference| "
                      f"{onnx['max_abs_logit_diff']:.2e}."]
    more = len(class_names) - SHOWN_CLASSES
    lines += ["", f"Classes ({len(class_names)}): " + ", ".join(class_names[:SHOWN_CLASSES])
              + (f", ... ({more} more; the model's metadata lists all)" if more > 0 else ""), "",
              f"Data: {data['name']}, class names sha256 {data['class_names_sha256'][:16]}"]
    lines += [f"- {split}: {info['size']:,} examples, sha256 {info['sha256'][:16]}"
              for split, info in data["splits"].items()]
    return "\n".join([*lines, ""])
