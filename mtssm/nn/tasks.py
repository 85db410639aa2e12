"""The task table as the model reads it: output channels ``C_t`` of each task on each dataset.

The table itself lives in :mod:`mtssm.tasks` (one copy for the whole package); these names are
re-exported here for code that imports them from :mod:`mtssm.nn`.
"""

from mtssm.tasks import DATASET_TASKS, SEMSEG_CLASSES, TASK_CHANNELS, dataset_tasks, resolve_tasks, task_channels

__all__ = ["DATASET_TASKS", "SEMSEG_CLASSES", "TASK_CHANNELS", "dataset_tasks", "resolve_tasks", "task_channels"]
