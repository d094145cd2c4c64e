"""Realistic test vectors for ANN benchmarks: clustered, low-intrinsic-dimension unit vectors and three query sets.

Uniformly random 512-d vectors have no near neighbours (all pairs at cosine ~0), so no partitioned index can
work on them (docs/benchmarks.md, issue 4). Image embeddings (CLIP photo embeddings) look different: every
vector shares a common direction (random pairs at cosine ~0.45), photos of one subject form a tight cluster
that varies along a few directions (pose, light, framing), and the nearest neighbour sits at cosine ~0.9.
This module draws such a set:

    x = unit(shared * g + centre_weight * c_k + spread * U_k z + noise * e)

with g one shared unit direction; c_k the unit centre of cluster k (of `clusters`, drawn around `topics`
topic directions so clusters have neighbours of their own); U_k a random orthonormal basis of `intrinsic_dim`
directions for cluster k and z ~ N(0, I / intrinsic_dim); e ~ N(0, I / dim). Cluster sizes follow a Zipf-like
law (a few big subjects, many small ones). The profile with the defaults at 1,000,000 x 512 (seed 0, medians,
measured by `profile` and printed by scripts/bench_ann.py): nearest neighbour (self excluded) at cosine 0.895,
random pairs 0.443; fresh queries' best match 0.895 and 10th 0.871; near queries' 0.958 and 0.837; text
queries' 0.329 and 0.305. At 100,000 rows the neighbours are farther (0.875; text 0.298 and 0.264).

Query sets (each a (n, dim) float32 array of unit vectors):
- fresh: new draws from the same mixture (a new photo of a known subject);
- near: stored rows plus noise of norm ~0.3 (a re-encoded, cropped or resized copy of an indexed image);
- text: text-like queries of a two-tower model. CLIP's text vectors live in a cone of their own (the
  "modality gap"): q = unit(text_shared * h + centre_weight * c_k + spread * U_k z + text_noise * e), its
  subject's semantic part without g, plus a text-only direction h (orthogonal to g) and text-only noise, so
  its best image matches sit at cosine ~0.3 and the 10th only ~0.02 lower: the hard case for quantised
  indexes, whose ranking error is then larger than the gaps between the true top-10 and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mixture:
    """Parameters of the mixture (see the module docstring); the defaults give CLIP-like profiles at 512-d."""

    dim: int = 512
    clusters: int = 4000
    topics: int = 200  # cluster centres are drawn around these, cosine ~0.7 to their topic
    intrinsic_dim: int = 12  # directions a cluster varies along
    shared: float = 0.95  # weight of the common direction g: sets the random-pair cosine (~0.45)
    centre_weight: float = 0.85
    spread: float = 0.5  # within-cluster variation along U_k
    noise: float = 0.4  # isotropic noise on every vector
    zipf: float = 0.7  # cluster size ~ rank ** -zipf
    text_shared: float = 1.5  # text-only direction h of text queries (the modality gap)
    text_noise: float = 1.0  # text-only noise: a caption names the subject, not the photo


class Generator:
    """Draws rows and queries of one mixture; the same seed gives the same vectors."""

    def __init__(self, mixture: Mixture = Mixture(), seed: int = 0) -> None:
        self.m = mixture
        rng = np.random.default_rng(seed)
        self.rng = rng
        directions = _unit(rng.normal(size=(2, mixture.dim)))
        self.shared = directions[0]
        # h orthogonal to g: text vectors share a direction that no image has
        self.text_direction = _unit(directions[1] - (directions[1] @ self.shared) * self.shared)
        topics = _unit(rng.normal(size=(mixture.topics, mixture.dim)))
        topic_of = rng.integers(0, mixture.topics, mixture.clusters)
        self.centres = _unit(topics[topic_of] + _unit(rng.normal(size=(mixture.clusters, mixture.dim))))
        weights = np.arange(1, mixture.clusters + 1, dtype=np.float64) ** -mixture.zipf
        self.weights = weights / weights.sum()
        self.bases = np.linalg.qr(rng.normal(size=(mixture.clusters, mixture.dim, mixture.intrinsic_dim)))[0].astype(
            np.float32)

    def semantic(self, clusters: np.ndarray) -> np.ndarray:
        """What a vector of each given cluster says about its subject: centre plus a within-cluster offset."""
        m = self.m
        z = self.rng.normal(size=(len(clusters), m.intrinsic_dim)) / np.sqrt(m.intrinsic_dim)
        offsets = np.einsum("ndr,nr->nd", self.bases[clusters], z)
        return m.centre_weight * self.centres[clusters] + m.spread * offsets

    def images(self, n: int) -> np.ndarray:
        """n image-like rows, float32 unit vectors."""
        m = self.m
        out = np.empty((n, m.dim), np.float32)
        for start in range(0, n, 20_000):  # chunks: the gathered bases of 20k rows take 0.3 GB
            count = min(20_000, n - start)
            clusters = self.rng.choice(m.clusters, size=count, p=self.weights)
            noise = self.rng.normal(size=(count, m.dim)) / np.sqrt(m.dim)
            out[start:start + count] = _unit(m.shared * self.shared + self.semantic(clusters) + m.noise * noise)
        return out

    def near(self, rows: np.ndarray, n: int) -> np.ndarray:
        """Stored rows moved by noise of norm 0.3 (cosine ~0.95 to their source)."""
        picked = rows[self.rng.integers(0, len(rows), n)]
        return _unit(picked + 0.3 * self.rng.normal(size=picked.shape) / np.sqrt(self.m.dim))

    def texts(self, n: int) -> np.ndarray:
        """Text-like queries: a cluster's semantic direction in the text cone (see the module docstring)."""
        m = self.m
        clusters = self.rng.choice(m.clusters, size=n, p=self.weights)
        noise = self.rng.normal(size=(n, m.dim)) / np.sqrt(m.dim)
        return _unit(m.text_shared * self.text_direction + self.semantic(clusters) + m.text_noise * noise)


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def exact_top(data: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k row numbers per query (cosine on unit vectors), best first, in blocks to bound memory."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(data), 200_000):
        scores = queries @ data[start:start + 200_000].T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.argsort(-merged_scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, 1)
        best_ids = np.take_along_axis(merged_ids, order, 1)
    return best_ids


def profile(data: np.ndarray, queries: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, float]:
    """Cosine profile: median nearest-neighbour cosine of 200 stored rows (themselves excluded), of random
    pairs, and per query set the median best and 10th-best cosine to the rows."""
    sample = rng.integers(0, len(data), 200)
    top = exact_top(data, data[sample], 2)
    out = {"nn_cosine_p50": float(np.median(np.einsum("nd,nd->n", data[sample], data[top[:, 1]]))),
           "random_pair_cosine_p50": float(np.median(np.einsum(
               "nd,nd->n", data[rng.integers(0, len(data), 2000)], data[rng.integers(0, len(data), 2000)])))}
    for name, vectors in queries.items():
        top = exact_top(data, vectors[:200], 10)
        scores = np.einsum("nd,nkd->nk", vectors[:200], data[top])
        out[f"{name}_best_cosine_p50"] = float(np.median(scores[:, 0]))
        out[f"{name}_10th_cosine_p50"] = float(np.median(scores[:, 9]))
    return {key: round(value, 3) for key, value in out.items()}
