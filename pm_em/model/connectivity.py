"""Connected groups of linked items (union-find): which latents are enumerated
together, which observations share a covariance block."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["connected_labels"]


def connected_labels(size: int, links: Iterable[Iterable[int]]) -> np.ndarray:
    """The group of each of ``size`` items, where every item of a link is in one group.

    Parameters
    ----------
    size : int
        Number of items, ``0 .. size - 1``.
    links : iterable of iterable of int
        Items that belong together; negative entries are ignored.

    Returns
    -------
    np.ndarray
        ``(size,)`` int64: each item's group, numbered by the group's first item.

    Examples
    --------
    >>> connected_labels(4, [[2, 0], [3]]).tolist()
    [0, 1, 0, 2]
    """
    parent = list(range(size))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for link in links:
        link = [int(i) for i in link if i >= 0]
        for i in link[1:]:
            a, b = find(link[0]), find(i)
            if a != b:
                parent[b] = a
    roots: dict[int, int] = {}
    labels = np.empty(size, dtype=np.int64)
    for i in range(size):
        labels[i] = roots.setdefault(find(i), len(roots))
    return labels
