"""Point clouds from files: unit-sphere normalisation, ``.off`` meshes, the PointNet HDF5 layout.

* :func:`normalize_unit_sphere` centres each cloud on its centroid and scales it so that its
  farthest point lies on the unit sphere:
  :math:`p' = (p - \\bar p) / \\max_i \\lVert p_i - \\bar p \\rVert_2` (as the PointNet and
  PointNet++ loaders do);
* :func:`subsample` keeps the first ``k`` points of each cloud after a seeded permutation;
* :func:`read_off` parses an Object File Format mesh (vertices and polygon faces, including
  ModelNet's files whose first line runs into the counts, ``OFF490 3 0``);
* :func:`sample_surface` draws points uniformly on a triangle mesh: a triangle with
  probability proportional to its area
  :math:`A = \\tfrac12 \\lVert (b - a) \\times (c - a) \\rVert`, then a uniform point in it,
  :math:`p = a + u (b - a) + v (c - a)` with :math:`(u, v)` uniform in the unit square,
  reflected (:math:`u, v \\to 1 - u, 1 - v`) when :math:`u + v > 1`;
* :func:`read_h5_split` reads the ``modelnet40_ply_hdf5_2048`` layout (``ply_data_*.h5`` files
  with datasets ``data`` N x P x 3 and ``label`` N x 1, listed in ``train_files.txt`` /
  ``test_files.txt``) through h5py, which is optional.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError


def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Clouds ``M x N x 3`` (or one ``N x 3``) centred and scaled into the unit ball (float32)."""
    p = np.asarray(points, dtype=np.float64)
    single = p.ndim == 2
    if single:
        p = p[None]
    if p.ndim != 3 or p.shape[-1] != 3:
        raise DataError(f"point clouds must have shape M x N x 3 or N x 3, got {np.shape(points)}")
    if not np.isfinite(p).all():
        raise DataError("point clouds contain non-finite coordinates")
    p = p - p.mean(axis=1, keepdims=True)
    radius = np.linalg.norm(p, axis=2).max(axis=1)
    p = p / np.where(radius > 0, radius, 1.0)[:, None, None]  # a one-point cloud stays at 0
    out = p.astype(np.float32)
    return out[0] if single else out


def subsample(points: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The first ``k`` points of each cloud after a permutation drawn per cloud from ``seed``."""
    m, n = points.shape[:2]
    if not 1 <= k <= n:
        raise DataError(f"num_points must be in [1, {n}], got {k}")
    rng = np.random.default_rng(seed)
    order = rng.permuted(np.tile(np.arange(n), (m, 1)), axis=1)[:, :k]
    return np.take_along_axis(points, order[..., None], axis=1)


def read_off(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V x 3 float64) and triangles (T x 3 int64, polygons fan-triangulated) of an OFF file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read OFF file {path}: {exc}") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].startswith("OFF"):
        raise DataError(f"{path} is not an OFF file (no OFF header)")
    head = lines[0][3:].split()  # ModelNet writes "OFF490 3 0" on one line in some files
    body = lines[1:]
    if not head:
        if not body:
            raise DataError(f"{path}: OFF header without counts")
        head, body = body[0].split(), body[1:]
    try:
        nv, nf = int(head[0]), int(head[1])
        rows = [ln.split() for ln in body[:nv]]
        verts = np.array([r[:3] for r in rows], dtype=np.float64)
        face_rows = [ln.split() for ln in body[nv:nv + nf]]
        if face_rows and all(len(r) == 4 and r[0] == "3" for r in face_rows):  # all triangles: fast path
            tris = np.array(face_rows, dtype=np.int64)[:, 1:]
        else:  # polygons: fan triangulation (v0, vj, vj+1)
            tris = []
            for r in face_rows:
                idx = [int(t) for t in r[1:1 + int(r[0])]]
                tris += [(idx[0], idx[j], idx[j + 1]) for j in range(1, len(idx) - 1)]
    except (ValueError, IndexError):
        raise DataError(f"{path}: malformed OFF vertex or face line") from None
    faces = np.asarray(tris, dtype=np.int64).reshape(-1, 3)
    if len(verts) != nv or verts.shape[1:] != (3,) or len(faces) == 0:
        raise DataError(f"{path}: expected {nv} vertices and at least one triangle")
    if faces.min() < 0 or faces.max() >= nv:
        raise DataError(f"{path}: a face refers to a vertex outside [0, {nv - 1}]")
    return verts, faces


def sample_surface(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform on the mesh surface (area-weighted triangles), float32 ``n x 3``."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    total = area.sum()
    if not total > 0:
        raise DataError("cannot sample a mesh whose triangles all have zero area")
    tri = rng.choice(len(faces), size=n, p=area / total)
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    p = a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])
    return p.astype(np.float32)


def _h5_files(root: Path, split: str) -> list[Path]:
    listing = root / f"{split}_files.txt"
    if listing.is_file():
        # The lists hold paths relative to the original checkout (data/modelnet40_ply_hdf5_2048/...):
        # the file name is looked up beside the list.
        names = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
        files = [root / Path(name).name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{listing} lists files that are not in {root}: {', '.join(missing[:3])}")
        return files
    files = sorted(root.glob(f"ply_data_{split}*.h5"))
    if not files:
        raise DataError(f"no HDF5 point clouds for split {split!r} in {root} "
                        f"(looked for {split}_files.txt and ply_data_{split}*.h5)")
    return files


def read_h5_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All clouds (M x P x 3 float32) and labels (M int64) of ``split`` in the HDF5 layout."""
    try:
        import h5py
    except ImportError:
        raise DataError("reading HDF5 point clouds needs h5py: pip install h5py") from None
    points, labels = [], []
    for f in _h5_files(Path(root), split):
        with h5py.File(f, "r") as h5:
            if "data" not in h5 or "label" not in h5:
                raise DataError(f"{f} lacks the 'data' or 'label' dataset")
            points.append(np.asarray(h5["data"][:, :, :3], dtype=np.float32))
            labels.append(np.asarray(h5["label"][...], dtype=np.int64).reshape(-1))
        if len(points[-1]) != len(labels[-1]):
            raise DataError(f"{f}: {len(points[-1])} clouds but {len(labels[-1])} labels")
    return np.concatenate(points), np.concatenate(labels)


__all__ = ["normalize_unit_sphere", "subsample", "read_off", "sample_surface", "read_h5_split"]
