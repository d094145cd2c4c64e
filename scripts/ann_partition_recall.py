"""How much of a partitioned (IVF) index a query must scan to find its true top-10, by data distribution.

An IVF index answers a query from the partitions whose centroids are nearest to it; its recall can
never exceed the share of true neighbours that live in the probed partitions, whatever the
quantisation or refinement. This measures that ceiling (exact vectors, no quantisation) for
uniformly random unit vectors and for clustered ones (a mixture of Gaussians, as real image
embeddings are), at ~1,000 rows per partition as LanceDB sizes its IVF indexes.

    python scripts/ann_partition_recall.py --rows 200000 --dim 512 --queries 200
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def random_vectors(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return unit(torch.randn(rows, dim, generator=generator))


def clustered_vectors(rows: int, dim: int, generator: torch.Generator, clusters: int = 2000) -> torch.Tensor:
    """Points around random centres (cosine ~0.7 to their centre), the shape of real embedding sets."""
    centres = unit(torch.randn(clusters, dim, generator=generator))
    which = torch.randint(0, clusters, (rows,), generator=generator)
    return unit(centres[which] + 0.9 * unit(torch.randn(rows, dim, generator=generator)))


def kmeans(data: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Spherical k-means (cosine), the partitioning an IVF index trains."""
    centroids = data[torch.randperm(len(data), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cat([(chunk @ centroids.T).argmax(1) for chunk in data.split(65536)])
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        empty = sums.norm(dim=1) == 0
        centroids = torch.where(empty[:, None], centroids, unit(sums))
    return centroids


def partition_recall(data: torch.Tensor, queries: torch.Tensor, partitions: int, probes: list[int],
                     generator: torch.Generator) -> dict[int, float]:
    centroids = kmeans(data, partitions, 10, generator)
    assign = torch.cat([(chunk @ centroids.T).argmax(1) for chunk in data.split(65536)])
    truth = (queries @ data.T).topk(10, dim=1).indices  # exact top-10
    truth_partitions = assign[truth]  # (queries, 10)
    order = (queries @ centroids.T).argsort(dim=1, descending=True)  # partitions by centroid score
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(partitions).expand_as(order))
    needed = rank_of.gather(1, truth_partitions)  # how many partitions until each neighbour's is probed
    return {p: float((needed < p).float().mean()) for p in probes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rows-per-partition", type=int, default=1000)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    partitions = max(1, args.rows // args.rows_per_partition)
    probes = sorted({p for p in (1, 5, 10, 20, 50, 100, partitions // 5, partitions // 2, partitions) if 0 < p})
    results = {}
    for name, make in (("random", random_vectors), ("clustered", clustered_vectors)):
        started = time.perf_counter()
        data = make(args.rows + args.queries, args.dim, generator)
        data, queries = data[args.queries:], data[:args.queries]  # queries drawn like the data
        recall = partition_recall(data, queries, partitions, probes, generator)
        results[name] = recall
        print(f"{name}: {partitions} partitions, {time.perf_counter() - started:.0f} s")
        for probe, value in recall.items():
            print(f"  probe {probe:4d} partitions ({100 * probe / partitions:5.1f} % of rows): "
                  f"ceiling on recall@10 {value:.3f}")
    print(json.dumps({"rows": args.rows, "dim": args.dim, "partitions": partitions, "recall": results}))


if __name__ == "__main__":
    np.random.seed(0)
    main()
