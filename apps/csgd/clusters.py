"""Clusters of channels (k-means on filters or even runs of indices) and the per-channel scores that turn a
MACs target into widths."""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["even_clusters", "kmeans_clusters", "merge_costs"]


def even_clusters(channels: int, clusters: int) -> list[list[int]]:
    """`clusters` runs of consecutive indices covering ``range(channels)``, sizes differing by at most 1
    (the first ``channels mod clusters`` get the extra one)."""
    _check(channels, clusters)
    base, extra = divmod(channels, clusters)
    out, start = [], 0
    for i in range(clusters):
        size = base + (i < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def kmeans_clusters(
    features: np.ndarray, clusters: int, seed: int = 0, weights: np.ndarray | None = None
) -> list[list[int]]:
    """k-means (scikit-learn, k-means++ init, `seed`, rows weighted by `weights` if given) of the rows of
    `features` (one per channel) into `clusters` non-empty clusters, each listed in increasing channel
    order, ordered by first member."""
    channels = features.shape[0]
    _check(channels, clusters)
    if clusters == channels:
        return [[i] for i in range(channels)]
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    rows = np.asarray(features, dtype=np.float64).reshape(channels, -1)
    with warnings.catch_warnings():  # fewer distinct rows than clusters: the empty ones are split below
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit_predict(rows, sample_weight=weights)
    found = [sorted(np.flatnonzero(labels == c).tolist()) for c in range(clusters)]
    found = [c for c in found if c]
    while len(found) < clusters:  # identical rows can leave clusters empty: split the largest
        largest = max(range(len(found)), key=lambda i: len(found[i]))
        members = found.pop(largest)
        found += [members[: len(members) // 2], members[len(members) // 2 :]]
    return sorted(found, key=lambda c: c[0])


def merge_costs(features: np.ndarray) -> np.ndarray:
    """Per channel of a group (one row of `features` each), ascending: the cost of the merge that removes one
    more channel. Agglomerating the rows by Ward's criterion (scipy) merges the two closest clusters at each
    step; the j-th removal costs the j-th merge height (the growth of the within-cluster deviation it
    causes), divided by the rows' RMS norm so that groups of any scale and fan-in compare. The last channel,
    which no merge removes, costs inf."""
    from scipy.cluster.hierarchy import linkage

    rows = np.asarray(features, dtype=np.float64).reshape(features.shape[0], -1)
    if rows.shape[0] < 2:
        return np.full(rows.shape[0], np.inf)
    scale = float(np.sqrt(np.mean(np.sum(rows * rows, axis=1)))) or 1.0
    heights = np.sort(linkage(rows, method="ward")[:, 2]) / scale
    return np.append(heights, np.inf)


def _check(channels: int, clusters: int) -> None:
    if not 1 <= clusters <= channels:
        raise ValueError(f"cannot make {clusters} clusters of {channels} channels: need 1 <= clusters <= channels")
