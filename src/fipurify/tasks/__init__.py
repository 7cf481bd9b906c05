"""Tasks: what a defense needs to know about the problem (loss, targets, augmentation, metric).

``task_of(dataset)`` is the task of a dataset (its ``task`` attribute, default image
classification); ``TASKS.create(name)`` builds one by name. A new task is one new module
here that registers itself.
"""
from __future__ import annotations

from ..registry import discover
from .base import TASKS, Task, task_of
from .image import Classification, ImageClassification

discover(__name__)  # any other task module registers itself too

__all__ = ["TASKS", "Task", "task_of", "Classification", "ImageClassification"]
