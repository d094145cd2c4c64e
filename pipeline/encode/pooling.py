"""Document-side token pooling for late-interaction rows: cluster similar token vectors and keep their means."""

from __future__ import annotations

import numpy as np


def pool_tokens(vectors: np.ndarray, pool_factor: int) -> np.ndarray:
    """(n, dim) unit vectors -> about n / pool_factor unit vectors.

    Tokens are clustered hierarchically (Ward linkage on their Euclidean distances, which for unit
    vectors orders pairs as cosine does) and each cluster is replaced by its renormalised mean, as
    ColPali's authors pool document tokens: MaxSim keeps ~97% of its quality at factor 3 for a third
    of the storage."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = len(vectors)
    clusters = max(1, n // pool_factor)
    if pool_factor <= 1 or n <= clusters:
        return vectors
    labels = fcluster(linkage(vectors.astype(np.float64), method="ward"), t=clusters, criterion="maxclust") - 1
    sums = np.zeros((labels.max() + 1, vectors.shape[1]), np.float64)
    np.add.at(sums, labels, vectors)
    pooled = sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(min=1e-12)
    return pooled.astype(vectors.dtype)
