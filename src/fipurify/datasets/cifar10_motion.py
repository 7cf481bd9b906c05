"""CIFAR-10 motion clips: a video-classification STAND-IN for action recognition (UCF-101, HMDB-51).

The FIP paper's Table 3 purifies action-recognition models trained on UCF-101 / HMDB-51 /
Kinetics; none is available offline here. ``cifar10-motion`` builds short clips from real
CIFAR-10 images instead: a 16 x 16 thumbnail of one image (the "actor") moves over a
dimmed 32 x 32 copy of another image (the static "scene"), and the class is the MOTION
pattern, not the content. Like an action, a class can only be told from several frames:
any single frame of "left" also occurs in "right".

Classes (:data:`MOTIONS`): eight translations (right, left, down, up and the four
diagonals) at ``speed`` pixels per frame, and zoom-in / zoom-out (the actor grows from 8 to
24 pixels, or shrinks, about a fixed centre). With ``frames = T``, the actor's top-left
corner in frame :math:`t` of a translation clip is

.. math::  (r_t, c_t) = (r_0, c_0) + t \\cdot \\mathrm{speed} \\cdot (d_r, d_c), \\quad t = 0 \\dots T-1,

with :math:`(d_r, d_c) \\in \\{-1, 0, 1\\}^2` the class direction and the start drawn so the
actor stays inside the canvas. The translated actor is the area-downsampled (2 x 2 mean)
image, pasted unchanged in every frame; a zoom frame resamples the 32 x 32 image to the
frame's size by nearest neighbour.

An item is ``(T x C x H x W float tensor in [0, 1], int class)``; ``boxes`` (N x T x 4:
top, left, height, width of the actor per frame) and ``source_index`` (N x 2: actor and
scene indices in the base split) record how every clip was made. Clips are fixed by
``(split, size, seed)``: all draws come from ``numpy.random.default_rng([seed, crc32(split)])``;
the classes are balanced (``size`` rounded robin over the classes, then shuffled).
"""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .base import DATASETS, ArrayDataset, DatasetInfo, check_options
from .cifar10 import load_cifar10
from .cifar10_mosaic import downsample

MOTIONS = ("right", "left", "down", "up", "down-right", "up-left", "down-left", "up-right", "zoom-in", "zoom-out")
#: (row, column) direction of each translation class, in pixels per unit of speed.
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0),
              "down-right": (1, 1), "up-left": (-1, -1), "down-left": (1, -1), "up-right": (-1, 1)}
#: Actor side at the first and last frame of zoom-in (zoom-out runs backwards).
ZOOM_SIDES = (8, 24)


class VideoArrayDataset(ArrayDataset):
    """Clips held as one uint8 array N x T x H x W x C and integer labels.

    ``dataset[i]`` is ``(clip, label)``: a float32 T x C x H x W tensor in [0, 1] and an int.
    ``task`` names video classification, so defenses use its loss and augmentation.
    Items live in ``clips`` (there is no ``images`` array and no ``image_shape``).
    """

    task = "video-classification"
    _items_attr = "clips"
    _item_axes = (0, 3, 1, 2)  # T x H x W x C -> T x C x H x W

    def __init__(self, clips: np.ndarray, labels: Sequence[int] | np.ndarray, classes: Sequence[str],
                 name: str = "video"):
        clips = np.asarray(clips)
        labels = np.asarray(labels, dtype=np.int64)
        if clips.ndim != 5 or clips.dtype != np.uint8:
            raise DataError(f"{name}: clips must be uint8 N x T x H x W x C, got {clips.dtype} {clips.shape}")
        self._check_labels(name, len(clips), labels, classes, "clips")
        self.clips = clips
        self.labels = labels
        self.classes = list(classes)
        self.name = name

    @property
    def image_shape(self):
        raise AttributeError("a video dataset has clip_shape, not image_shape")

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """Shape of one returned clip, T x C x H x W."""
        n, t, h, w, c = self.clips.shape
        return (t, c, h, w)

    def _subset_class(self) -> type:
        return VideoArrayDataset

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape={self.clip_shape})"


def _nearest(image: np.ndarray, side: int) -> np.ndarray:
    """Nearest-neighbour resize of an H x W x C image to side x side (pixel centres)."""
    h, w = image.shape[:2]
    rows = ((np.arange(side) + 0.5) * h / side).astype(np.int64)
    cols = ((np.arange(side) + 0.5) * w / side).astype(np.int64)
    return image[rows[:, None], cols[None, :]]


def motion_clips(base: ArrayDataset, size: int, seed: int = 0, frames: int = 8, speed: int = 2,
                 background: float = 0.5, split: str = "train", name: str | None = None) -> VideoArrayDataset:
    """``size`` clips from the 32 x 32 (or any even side) images of ``base``; see the module docstring.

    ``background`` scales the scene image (0: black scene, 1: full brightness).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"clip count size must be a positive integer, got {size!r}")
    if frames < 2:
        raise ConfigError(f"a clip needs at least 2 frames, got {frames}")
    if len(base) == 0:
        raise DataError("the base dataset of the clips is empty")
    if not 0.0 <= background <= 1.0:
        raise ConfigError(f"background must be in [0, 1], got {background}")
    side = base.images.shape[1]
    actor = side // 2
    travel = speed * (frames - 1)
    if travel > side - actor:
        raise ConfigError(f"{frames} frames at speed {speed} move the actor {travel} px, more than the "
                          f"{side - actor} px the canvas allows")
    rng = np.random.default_rng([int(seed), zlib.crc32(split.encode())])
    labels = np.arange(int(size)) % len(MOTIONS)
    rng.shuffle(labels)
    src = rng.integers(0, len(base), size=(int(size), 2))
    small = downsample(base.images[src[:, 0]], 2)
    scenes = np.round(base.images[src[:, 1]].astype(np.float32) * background).astype(np.uint8)
    clips = np.repeat(scenes[:, None], frames, axis=1)  # N x T x H x W x C
    boxes = np.zeros((int(size), frames, 4), dtype=np.int64)
    t = np.arange(frames)
    for i, label in enumerate(labels):
        motion = MOTIONS[label]
        if motion in DIRECTIONS:
            dr, dc = DIRECTIONS[motion]
            # Along a moving axis the start leaves room for the travel; a still axis is free.
            start = [rng.integers(0, side - actor - travel + 1) + (travel if d < 0 else 0) if d
                     else rng.integers(0, side - actor + 1) for d in (dr, dc)]
            for k in t:
                r, c = start[0] + k * speed * dr, start[1] + k * speed * dc
                clips[i, k, r:r + actor, c:c + actor] = small[i]
                boxes[i, k] = (r, c, actor, actor)
        else:
            lo, hi = ZOOM_SIDES
            sides = np.round(np.linspace(lo, hi, frames)).astype(np.int64)
            if motion == "zoom-out":
                sides = sides[::-1]
            centre = rng.integers(hi // 2, side - hi // 2 + 1, size=2)
            for k in t:
                s = int(sides[k])
                r, c = int(centre[0] - s // 2), int(centre[1] - s // 2)
                clips[i, k, r:r + s, c:c + s] = _nearest(base.images[src[i, 0]], s)
                boxes[i, k] = (r, c, s, s)
    ds = VideoArrayDataset(clips, labels, MOTIONS, name=name or f"motion-{base.name}")
    ds.boxes = boxes
    ds.source_index = src
    return ds


def load_cifar10_motion(root: Any = None, split: str = "train", size: int = 2000, seed: int = 0,
                        frames: int = 8, speed: int = 2, background: float = 0.5,
                        cache: bool = True) -> VideoArrayDataset:
    """``size`` motion clips built from the CIFAR-10 ``split``; see the module docstring."""
    base = load_cifar10(root, split, cache=cache)
    return motion_clips(base, size, seed, frames, speed, background, split, name=f"cifar10-motion-{split}")


def _load(root: Any, split: str | None, **options: Any) -> VideoArrayDataset:
    check_options("cifar10-motion", load_cifar10_motion, options)
    return load_cifar10_motion(root, split or "train", **options)


DATASETS.register("cifar10-motion", _load, info=DatasetInfo("cifar10-motion", len(MOTIONS), 32, 3))

__all__ = ["VideoArrayDataset", "motion_clips", "load_cifar10_motion", "MOTIONS", "DIRECTIONS", "ZOOM_SIDES"]
