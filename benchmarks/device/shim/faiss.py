"""Exact inner-product search standing in for faiss-cpu on the device machine (no faiss wheel is carried)."""

from __future__ import annotations

import numpy as np


class IndexFlatIP:
    """The part of ``faiss.IndexFlatIP`` the library uses: ``add``, ``ntotal`` and exact ``search``."""

    def __init__(self, d: int) -> None:
        self.d, self.x = d, np.zeros((0, d), np.float32)

    def add(self, x: np.ndarray) -> None:
        self.x = np.concatenate([self.x, np.asarray(x, np.float32)])

    @property
    def ntotal(self) -> int:
        return len(self.x)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = np.asarray(q, np.float32) @ self.x.T
        idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, idx, 1), idx.astype(np.int64)


def omp_set_num_threads(n: int) -> None:
    """No threads to set: the search above is one matrix product."""
