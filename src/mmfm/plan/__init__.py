"""``mmfm plan``: the jobs, bytes, memory, FLOPs and GPU-hours of a config's DAG, before anything runs.

:func:`build_plan` returns a :class:`Plan` (``as_dict()`` is the JSON ``mmfm plan --json`` prints, ``render``
the text); docs/plan.md says what is counted and how.
"""

from mmfm.plan.core import (
    DEFAULT_MFU,
    Plan,
    RulePlan,
    build_plan,
    mfu_from,
    parse_size,
    render,
)
from mmfm.plan.gpus import DEFAULT_GPU, GPUS, gpu
from mmfm.plan.load import PlanError

__all__ = ["DEFAULT_GPU", "DEFAULT_MFU", "GPUS", "Plan", "PlanError", "RulePlan", "build_plan", "gpu", "mfu_from",
           "parse_size", "render"]
