"""The student as ONNX, checked against onnxruntime on the test split.

    RUN/distill/student.onnx        input ``images (B, C, H, W)`` float in [0, 1], output
                                    ``logits (B, K)``; the batch dimension is dynamic
    RUN/distill/onnx_check.json     examples, top-1 agreement with the torch student, the largest
                                    absolute logit difference, the onnxruntime version

The export uses PyTorch's TorchScript-based exporter (the torch.export-based one needs
onnxscript); its deprecation notices are not the user's to act on and are not printed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestration.artifacts import STUDENT
from orchestration.checkpoints import load_model
from orchestration.files import write_json

ONNX_FILE, ONNX_CHECK = f"{STUDENT}.onnx", "onnx_check.json"
CHECK_BATCH = 256


def export_onnx(model: torch.nn.Module, image_shape: tuple[int, int, int], path: Path) -> None:
    """Write ``model`` (eval mode, CPU) to ``path`` atomically."""
    example = torch.rand(2, *image_shape)  # (2, C, H, W): B >= 2 keeps the batch dimension dynamic
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        torch.onnx.export(model.cpu().eval(), (example,), str(tmp), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    os.replace(tmp, path)


@torch.no_grad()
def check_onnx(path: Path, model: torch.nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Run ``images (N, C, H, W) uint8`` through onnxruntime and the torch ``model``; compare."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    agree, max_diff = 0, 0.0
    for start in range(0, len(images), CHECK_BATCH):
        x = images[start:start + CHECK_BATCH].float() / 255.0              # (B, C, H, W)
        reference = model(x).numpy()                                       # (B, K)
        logits = session.run(["logits"], {"images": x.numpy()})[0]        # (B, K)
        agree += int((reference.argmax(1) == logits.argmax(1)).sum())
        max_diff = max(max_diff, float(np.abs(reference - logits).max()))
    n = len(images)
    return {"examples": n, "top1_agreement": agree / n if n else float("nan"), "same_top1": agree == n,
            "max_abs_logit_diff": max_diff, "onnxruntime": onnxruntime.__version__}


def export_student(stage_dir: Path, test_images: torch.Tensor, console) -> tuple[list[str], dict[str, float]]:
    """Export the stage's student to ONNX and check it on the test images; returns the files
    written (relative to ``stage_dir``) and the check's metrics."""
    model, meta = load_model(stage_dir / STUDENT)
    spec = meta["model"]
    export_onnx(model, (spec["in_channels"], spec["image_size"], spec["image_size"]), stage_dir / ONNX_FILE)
    check = check_onnx(stage_dir / ONNX_FILE, model, test_images)
    write_json(stage_dir / ONNX_CHECK, check)
    console.print(f"  ONNX: {stage_dir / ONNX_FILE}, onnxruntime {check['onnxruntime']} on {check['examples']} test "
                  f"images: top-1 agreement {check['top1_agreement']:.4f}, max |logit difference| "
                  f"{check['max_abs_logit_diff']:.2e}")
    return [ONNX_FILE, ONNX_CHECK], {"onnx_top1_agreement": check["top1_agreement"],
                                     "onnx_max_abs_logit_diff": check["max_abs_logit_diff"]}
