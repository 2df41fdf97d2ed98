"""The report's plots: no label stacks on another, no title leaves the figure."""

from __future__ import annotations

from orchestration.report import plot_accuracy_vs_params, plot_group_gains

# A student and its two baselines share one size; two of them share the score too.
REPORT = {
    "models": [
        {"name": "generalist", "params": 19_041, "top1": 0.5},
        {"name": "student", "params": 4_917, "top1": 0.4},
        {"name": "hard_labels", "params": 4_917, "top1": 0.4},
        {"name": "generalist_kd", "params": 4_917, "top1": 0.38},
    ],
    "groups": {"names": [["a", "b"], ["c", "d"]]},
    "per_group": [{"group": 0, "n_examples": 8, "ensemble_top1": 0.5, "generalist_top1": 0.25},
                  {"group": 1, "n_examples": 8, "ensemble_top1": 0.25, "generalist_top1": 0.5}],
}


def _inside(fig, artist) -> bool:
    fig.canvas.draw()
    box, frame = artist.get_window_extent(), fig.bbox
    return box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1


def test_models_of_one_size_are_named_in_a_legend_not_stacked_on_the_point():
    fig = plot_accuracy_vs_params(REPORT)
    ax = fig.axes[0]
    assert len(ax.texts) == 0, "no label is drawn at a point"
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [
        "generalist (0.500)", "student (0.400)", "hard_labels (0.400)", "generalist_kd (0.380)"]
    assert _inside(fig, legend) and _inside(fig, ax.title)


def test_group_gain_title_fits_the_figure():
    fig = plot_group_gains(REPORT)
    assert _inside(fig, fig.axes[0].title)
    assert [round(p.get_height(), 2) for p in fig.axes[0].patches] == [0.25, -0.25]
