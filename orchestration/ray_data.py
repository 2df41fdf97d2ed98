"""Ray Data as the pipeline's passes run it: quiet, with its outputs in input order.

    with quiet_ordered_data():
        for batch in dataset.map_batches(...).iter_batches(batch_size=None, batch_format="numpy"):
            ...

The passes print their own progress (one line per block or shard), so Ray Data's progress bars,
its per-dataset "Starting execution" lines and the notice that the bars are off stay silent;
blocks come back in the order they went in, so a pass merges or writes them the same way every
run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_ordered_data() -> Iterator[None]:
    """Ray Data without progress bars or per-dataset log lines, its outputs in input order;
    the previous settings are restored on exit."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.execution_options.preserve_order
    context.enable_progress_bars, context.execution_options.preserve_order = False, True
    loggers = [logging.getLogger("ray.data"), logging.getLogger("ray.data._internal.progress")]
    levels = [logger.level for logger in loggers]
    loggers[0].setLevel(logging.WARNING)   # no per-dataset "Starting execution" lines
    loggers[1].setLevel(logging.ERROR)     # nor the notice that the bars turned off are off
    try:
        yield
    finally:
        context.enable_progress_bars, context.execution_options.preserve_order = saved
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
