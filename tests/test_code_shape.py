"""tools/code_shape.py: the repository has the shape the style guide asks for, and the checker
finds each kind of violation (on small made-up trees, run the way a user runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check(root: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--root", str(root)] if root else []
    return subprocess.run([sys.executable, "-m", "tools.code_shape", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for package in ("generalist", "clustering", "specialists", "distill", "orchestration", "benchmarks"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_code_has_no_cycles_stage_imports_path_edits_or_oversized_functions_and_files():
    done = _check()
    assert done.returncode == 0, "code shape violations:\n" + done.stdout + done.stderr[-2000:]


def test_cycles_count_function_body_imports_but_not_type_checking_ones(tmp_path):
    _tree(tmp_path, {
        "generalist/a.py": ("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                            "    from generalist.c import C\n\n\ndef f():\n    from generalist import b\n"),
        "generalist/b.py": "import generalist.a\n",
        "generalist/c.py": "from generalist.a import f\n",  # a -> c only under TYPE_CHECKING
        "clustering/x.py": "from . import y\n",
        "clustering/y.py": "from .z import thing\n",
        "clustering/z.py": "from clustering.x import other\n",
    })
    done = _check(tmp_path)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "clustering/x.py:1: import cycle: clustering.x -> clustering.y (clustering/x.py:1) -> "
        "clustering.z (clustering/y.py:1) -> clustering.x (clustering/z.py:1)",
        "generalist/a.py:8: import cycle: generalist.a -> generalist.b (generalist/a.py:8) -> "
        "generalist.a (generalist/b.py:1)",
    ]


def test_only_the_stage_list_the_pipeline_and_the_cli_import_stage_modules(tmp_path):
    _tree(tmp_path, {
        "orchestration/stages/__init__.py": "from orchestration.stages import clustering, ensemble\n",
        "orchestration/stages/clustering.py": "",
        "orchestration/stages/ensemble.py": "from . import clustering\n",
        "orchestration/cli.py": "from orchestration.stages import STAGES\nfrom orchestration.stages.ensemble import x\n",
        "orchestration/pipeline.py": "import orchestration.stages.clustering\n",
        "orchestration/report.py": "from orchestration.stages import STAGES\n\n\ndef table():\n"
                                   "    from orchestration.stages.ensemble import table4\n",
    })
    done = _check(tmp_path)
    allowed = "(only orchestration/stages/__init__.py, orchestration/pipeline.py, orchestration/cli.py may)"
    assert done.stdout.splitlines() == [
        f"orchestration/report.py:5: imports stage module orchestration.stages.ensemble {allowed}",
        f"orchestration/stages/ensemble.py:1: imports stage module orchestration.stages.clustering {allowed}",
    ]


def test_every_kind_of_sys_path_edit_is_found_and_reading_it_is_not(tmp_path):
    _tree(tmp_path, {"benchmarks/paths.py": (
        "import sys\nimport sys as _sys\nfrom sys import path\n\n"
        "sys.path.insert(0, 'x')\n_sys.path[:] = []\npath.append('y')\nsys.path += ['z']\n"
        "del sys.path[0]\nsys.path = []\n\n"
        "seen = list(sys.path)\nhere = sys.path[0]\nplaces = {}\nplaces.pop('a', None)\n")})
    done = _check(tmp_path)
    what = "edits sys.path (install the package, or run `python -m` from the repository root)"
    assert done.stdout.splitlines() == [f"benchmarks/paths.py:{n}: {what}" for n in (5, 6, 7, 8, 9, 10)]


def test_functions_over_80_lines_and_files_over_500_lines(tmp_path):
    def function(name: str, lines: int) -> str:  # `def` + body: `lines` lines in all
        return f"def {name}():\n" + "    x = 1\n" * (lines - 1)

    long_file = "\n".join(f"# {i}" for i in range(501)) + "\n"
    _tree(tmp_path, {
        "distill/fits.py": function("at_limit", 80) + "\n\nclass K:\n    " + function("method", 81).replace("\n    ", "\n        "),
        "distill/big.py": long_file,
        "distill/not_big.py": long_file.split("\n", 1)[1],  # 500 lines
    })
    done = _check(tmp_path)
    assert done.stdout.splitlines() == [
        "distill/big.py:1: file is 501 lines (limit 500)",
        "distill/fits.py:84: function K.method is 81 lines (limit 80)",
    ]
    assert "2 violation(s)" in done.stderr
