"""The one results-table builder and its two renderings."""

from rich.console import Console

from orchestration.tables import format_number, models_table, table4_table

ROWS = [
    {"name": "generalist", "teacher": "none", "top1": 0.93421, "top5": 0.9994, "params": 337440,
     "latency_ms": 1.3931},
    {"name": "ensemble", "teacher": "-", "top1": 0.95},
]


def test_models_table_markdown_has_every_figure_and_na_for_what_no_stage_wrote():
    md = models_table(ROWS).markdown()
    assert md.splitlines()[0] == ("| model | teacher | test top-1 | test top-5 | parameters | "
                                  "latency ms/example |")
    assert md.splitlines()[1] == "|---|---|---:|---:|---:|---:|"
    assert "| generalist | none | 0.9342 | 0.9994 | 337,440 | 1.393 |" in md
    assert "| ensemble | - | 0.9500 | n/a | n/a | n/a |" in md


def test_the_same_table_renders_in_the_terminal():
    console = Console(width=140, record=True)
    console.print(models_table(ROWS, "results").rich())
    text = console.export_text()
    assert "results" in text and "337,440" in text and "0.9342" in text


def test_aggregates_over_seeds_render_as_mean_plus_minus_std():
    assert format_number({"mean": 0.94331, "std": 0.00591}) == "0.9433 ± 0.0059"
    assert format_number({"mean": 0.9, "std": float("nan")}) == "0.9000"
    assert format_number(None) == "n/a" and format_number(float("inf")) == "n/a"
    row = {"name": "student", "top1": {"mean": 0.9, "std": 0.01}, "params": {"mean": 95152.0, "std": 0.0}}
    assert "| student | - | 0.9000 ± 0.0100 | n/a | 95,152 | n/a |" in models_table([row]).markdown()


def test_table4():
    rows = [{"specialists_covering": 0, "n_examples": 12, "delta_correct": 0, "relative_accuracy_change": None},
            {"specialists_covering": 1, "n_examples": 4800, "delta_correct": 69,
             "relative_accuracy_change": 0.0153}]
    md = table4_table(rows).markdown()
    assert "| 0 | 12 | +0 | n/a |" in md and "| 1 | 4,800 | +69 | +1.5% |" in md
