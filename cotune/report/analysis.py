"""Numbers about a front: dominance, hypervolume, the knee. Pure numpy, every objective minimised.

Callers turn a maximised objective into a minimised one by negating it
(``as_minimised``), so one convention holds everywhere below.
"""

from __future__ import annotations

import numpy as np


def as_minimised(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """(n, d) objective values with every "maximize" column negated."""
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return np.asarray(values, dtype=float) * signs


def nondominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows no other row dominates (<= everywhere, < somewhere)."""
    points = np.asarray(points, dtype=float)
    n = len(points)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        dominates_i = np.all(points <= points[i], axis=1) & np.any(points < points[i], axis=1)
        mask[i] = not dominates_i.any()
    return mask


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``points`` and bounded by ``reference`` (exact; slicing in d >= 3)."""
    points = np.asarray(points, dtype=float)
    reference = np.asarray(reference, dtype=float)
    if len(points) == 0:
        return 0.0
    points = points[np.all(points < reference, axis=1)]
    if len(points) == 0:
        return 0.0
    points = points[nondominated(points)]
    d = points.shape[1]
    if d == 1:
        return float(reference[0] - points[:, 0].min())
    if d == 2:
        # Sweep along x: each point adds the strip between it and the best y so far.
        order = np.argsort(points[:, 0], kind="stable")
        volume, best_y = 0.0, reference[1]
        xs = np.append(points[order, 0], reference[0])
        for k, i in enumerate(order):
            best_y = min(best_y, points[i, 1])
            volume += (xs[k + 1] - xs[k]) * (reference[1] - best_y)
        return float(volume)
    # Slice along the last axis: between consecutive levels the section is a (d-1)-dim front.
    levels = np.unique(points[:, -1])
    bounds = np.append(levels, reference[-1])
    volume = 0.0
    for k, level in enumerate(levels):
        section = points[points[:, -1] <= level, :-1]
        volume += hypervolume(section, reference[:-1]) * (bounds[k + 1] - level)
    return float(volume)


def reference_box(points: np.ndarray, margin: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(ideal, reference): the best value of each objective, and the worst pushed out by ``margin``.

    The margin (a share of each objective's range) lets the extremes of the front
    count; without it a point at the worst value of any objective adds nothing.
    """
    points = np.asarray(points, dtype=float)
    ideal, worst = _finite_bounds(points)  # a time_to_loss never reached (inf) sets no bound
    span = worst - ideal
    # A flat objective (one point, or all equal) gets a margin from its magnitude instead.
    span = np.where(span > 0, span, np.maximum(np.abs(worst), 1.0))
    return ideal, worst + margin * span


def hypervolume_history(points: np.ndarray, reference: np.ndarray, ideal: np.ndarray) -> np.ndarray:
    """Normalised hypervolume of the first k points, for k = 1..n.

    Normalised by the box between ``ideal`` and ``reference``, so 1.0 would be one
    config at the best value of every objective at once.
    """
    points = np.asarray(points, dtype=float)
    box = float(np.prod(reference - ideal))
    out = np.zeros(len(points))
    front = np.empty((0, points.shape[1]))
    value = 0.0
    for k, p in enumerate(points):
        if not np.any(np.all(front <= p, axis=1)):  # only a new non-dominated point changes the volume
            front = np.vstack([front[~np.all(p <= front, axis=1)], p])
            value = hypervolume(front, reference) / box if box > 0 else 0.0
        out[k] = value
    return out


def _finite_bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's least and greatest finite value (0 and 0 for a column with none)."""
    finite = np.isfinite(points)
    low = np.where(finite, points, np.inf).min(axis=0)
    high = np.where(finite, points, -np.inf).max(axis=0)
    none = ~finite.any(axis=0)
    return np.where(none, 0.0, low), np.where(none, 0.0, high)


def normalised(points: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] over these points (0 = best); a flat column is all 0.
    An infinite value (a target never reached) scales to 1, the worst, as the worst finite one does."""
    points = np.asarray(points, dtype=float)
    low, high = _finite_bounds(points)
    span = np.where(high > low, high - low, 1.0)
    return np.clip(np.nan_to_num((points - low) / span, nan=1.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def knee(points: np.ndarray) -> int:
    """Index of the knee of a front: the best trade-off, in objectives scaled to [0, 1].

    Two objectives and three or more points: the point farthest below the line
    joining the two extremes (where giving up a little of one objective buys the
    most of the other). Otherwise: the point closest to the ideal point.
    """
    z = normalised(points)
    if z.shape[1] == 2 and len(z) >= 3:
        a, b = z[np.argmin(z[:, 0])], z[np.argmin(z[:, 1])]
        chord = b - a
        length = float(np.hypot(*chord))
        if length > 0:
            # Signed distance from the chord; negative on the side of the ideal corner (0, 0).
            distance = (chord[0] * (z[:, 1] - a[1]) - chord[1] * (z[:, 0] - a[0])) / length
            return int(np.argmin(distance)) if np.min(distance) < 0 else int(np.argmin(np.linalg.norm(z, axis=1)))
    return int(np.argmin(np.linalg.norm(z, axis=1)))


def best_so_far(values: np.ndarray, direction: str) -> np.ndarray:
    """Running best of one objective (NaN, a failed trial, keeps the best before it)."""
    values = np.asarray(values, dtype=float)
    signed = values if direction == "minimize" else -values
    filled = np.where(np.isnan(signed), np.inf, signed)
    running = np.minimum.accumulate(filled)
    running = np.where(np.isinf(running), np.nan, running)
    return running if direction == "minimize" else -running
