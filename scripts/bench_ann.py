"""ANN benchmark through the project's API: build time, size, p50/p95 latency and recall@10 per query set.

    python scripts/bench_ann.py --realistic --rows 1000000 --queries 200 --work /tmp/ann \\
        --types ivf_sq,ivf_rq,ivf_flat,ivf_pq --defaults --nightly --memory

Writes ROWS vectors into a table of the project's schema, builds each index type in turn with the project's
own maintenance (`pipeline.index.ann.maintain`, as `embindex run` does), and for each search setting measures
every query set twice, one query at a time as `embindex query` runs them: through `Index.search_vector` (the
Python API the CLI and the server call) and as a plain LanceDB query of the same table with the same settings
and columns, opened once. Recall@10 is against the exact top-10 computed with NumPy.

Data. `--realistic`: clustered, low-intrinsic-dimension unit vectors like CLIP photo embeddings
(scripts/ann_vectors.py documents the generator's parameters; the run prints the neighbour-cosine profile it
produced) with three query sets: `fresh` (new draws of the mixture), `near` (stored rows plus noise of norm
0.3) and `text` (text-like queries from an offset cone, best matches at cosine ~0.3). Without it: uniformly
random unit vectors (issue 4's benchmark), query sets `fresh` (random) and `near`.

`--defaults` also measures the chosen defaults (SearchConfig with no overrides: text queries with search.text_*),
`--nightly` appends 1 % more rows as a run's upsert does and times the maintenance after it, with recall after,
`--memory` builds an in-memory FAISS HNSW graph of the same vectors (`pip install faiss-cpu`) and measures it
directly (the question of issue 21: would a graph held by the server be worth it).
Prints one JSON line per measurement and the whole result as JSON at the end (`--out` writes it too).
At 1M x 512 the work folder takes ~3 GB plus the index (0.1-2 GB); old versions are deleted between builds.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml
from ann_vectors import Generator, exact_top, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import SearchConfig, load_config  # noqa: E402
from pipeline.index.ann import INDEX_TYPES, maintain, vector_index_type  # noqa: E402
from pipeline.index.schema import images_schema  # noqa: E402
from pipeline.search.query import RESULT_COLUMNS, Index  # noqa: E402
from pipeline.search.settings import query_settings  # noqa: E402

# (nprobes, refine_factor) per index type; refine is ignored for IVF_FLAT (it holds the vectors themselves)
GRID = {
    "ivf_sq": [(10, None), (20, None), (10, 5), (20, 5)],
    "ivf_rq": [(20, 10), (20, 30)],
    "ivf_pq": [(20, 10), (20, 30)],
    "ivf_flat": [(10, None), (20, None)],
    "ivf_hnsw_sq": [(10, None), (20, None)],
}
WRITE_ROWS = 100_000  # rows per write: 200 MB of vectors at 512-d


def rows_table(vectors: np.ndarray, first_id: int) -> pa.Table:
    """Rows of the project's `images` schema with columns as a photo library has them: one root, paths in
    folders of 1,000, random sizes and times, a few image sizes, 32-hex-digit hashes. (Constant columns are
    stored run-length encoded, and fetching the 10 hits' values from such a 1M-row page cost ~4 ms a column
    here.) `path` carries the row number for recall."""
    n, dim = vectors.shape
    ids = range(first_id, first_id + n)
    rng = np.random.default_rng(first_id)
    schema = images_schema(dim)
    sizes = np.array([[640, 480], [1024, 768], [1920, 1080], [4032, 3024], [3024, 4032]], np.int32)
    size_of = sizes[rng.integers(0, len(sizes), n)]
    hashes = rng.bytes(16 * n)
    return pa.table({
        "path": [f"{i // 1000:04d}/IMG_{i:08d}.jpg" for i in ids], "root": pa.array(["/data/photos"] * n),
        "size_bytes": pa.array(rng.integers(50_000, 8_000_000, n), pa.int64()),
        "mtime_ns": pa.array(1_600_000_000_000_000_000 + rng.integers(0, 10**17, n), pa.int64()),
        "content_hash": [hashes[i * 16:(i + 1) * 16].hex() for i in range(n)],
        "width": pa.array(size_of[:, 0]), "height": pa.array(size_of[:, 1]), "model": pa.array(["bench"] * n),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        "indexed_at": pa.array([datetime.now(timezone.utc)] * n, schema.field("indexed_at").type),
    }, schema=schema)


def write_index(work: Path, data: np.ndarray) -> dict:
    """The table (written, then compacted as `embindex run` leaves it) and a config that points at it."""
    import lancedb

    tiny = work / "tiny-models"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), str(tiny)], check=True,
                   capture_output=True)  # the Index reads the model's config only: no query is encoded
    (work / "config.yaml").write_text(yaml.safe_dump({
        "input": {"root": str(work)}, "encoder": {"model": str(tiny / "clip")},
        "output": {"lancedb": {"uri": str(work / "index"), "table": "images"}, "parquet": None},
        "search": {"ann_min_rows": 1}}))
    started = time.perf_counter()
    table = lancedb.connect(str(work / "index")).create_table("images", schema=images_schema(data.shape[1]))
    for start in range(0, len(data), WRITE_ROWS):
        table.add(rows_table(data[start:start + WRITE_ROWS], start))
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    table.optimize()
    return {"write_s": round(write_s, 1), "compact_s": round(time.perf_counter() - started, 1)}


def ids_of(hits: pa.Table) -> list[int]:
    return [int(path[9:17]) for path in hits["path"].to_pylist()]  # "0123/IMG_00123456.jpg"


def plain_query(table, query: np.ndarray, index_type: str | None, nprobes: int, refine: int | None,
                ef: int) -> pa.Table:
    """The same search written straight against LanceDB (the handle opened once)."""
    search = table.search(query, vector_column_name="embedding").distance_type("cosine")
    search = search.select([*RESULT_COLUMNS, "_distance"]).limit(10)
    if index_type is not None:
        search = search.nprobes(nprobes)
        if index_type.startswith("IVF_HNSW"):
            search = search.ef(ef)
        if refine and index_type != "IVF_FLAT":
            search = search.refine_factor(refine)
    return search.to_arrow()


def summary(latencies: list[float], hits: int, n: int) -> dict:
    return {"p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p95_ms": round(float(np.percentile(latencies, 95)), 2), "recall_at_10": round(hits / (10 * n), 3)}


def measure(index: Index, plain, queries: np.ndarray, truth: np.ndarray, modality: str,
            settings: tuple[int, int | None] | None) -> dict:
    """API and plain LanceDB, query by query in alternating order (the machine's load drifts)."""
    index_type = vector_index_type(plain)
    if settings is not None:  # the grid: both modalities with the same settings
        index.config.search = index.config.search.model_copy(update={
            "nprobes": settings[0], "refine_factor": settings[1], "text_nprobes": None, "text_refine_factor": None})
    nprobes, refine = query_settings(index.config.search, modality).values()
    api_lat, raw_lat, api_hits, raw_hits = [], [], 0, 0
    for i, (query, expected) in enumerate(zip(queries, truth)):
        expected = set(expected.tolist())
        for which in ((0, 1) if i % 2 else (1, 0)):
            started = time.perf_counter()
            if which == 0:
                found = ids_of(index.search_vector(query, 10, modality=modality))
                api_lat.append((time.perf_counter() - started) * 1000)
                api_hits += len(expected & set(found))
            else:
                found = ids_of(plain_query(plain, query, index_type, nprobes, refine, index.config.search.ef))
                raw_lat.append((time.perf_counter() - started) * 1000)
                raw_hits += len(expected & set(found))
    out = {"nprobes": nprobes, "refine_factor": refine if index_type != "IVF_FLAT" else None,
           "api": summary(api_lat, api_hits, len(queries)), "plain": summary(raw_lat, raw_hits, len(queries))}
    out["api_speed_vs_plain"] = round(out["plain"]["p50_ms"] / out["api"]["p50_ms"], 3)
    return out


def modality_of(name: str) -> str:
    return "text" if name == "text" else "image"


def bench_types(args, index: Index, plain, queries: dict, truth: dict, results: dict) -> None:
    dim = queries["fresh"].shape[1]
    for spec in filter(None, args.types.split(",")):
        kind, _, partition_rows = spec.partition(":")  # ivf_sq:1024 = 1,024 rows per partition
        search = SearchConfig(ann_min_rows=1, ann_index=kind, ann_partition_rows=int(partition_rows or 0) or None)
        drop_vector_index(plain)
        started = time.perf_counter()
        done = maintain(plain, search, dim)
        entry = {"type": INDEX_TYPES[kind], "partition_rows": search.ann_partition_rows,
                 "build_s": round(time.perf_counter() - started, 1),
                 "maintenance": done["action"], "index_bytes": index_bytes(plain), "settings": []}
        for settings in GRID[kind]:
            for name in queries:
                measured = measure(index, plain, queries[name], truth[name], modality_of(name), settings)
                entry["settings"].append({"queries": name, **measured})
                print(json.dumps({"type": entry["type"], "partition_rows": search.ann_partition_rows,
                                  "queries": name, **measured}), flush=True)
        results["indexes"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "settings"}), flush=True)


def drop_vector_index(table) -> None:
    """Drop the vector index and delete the files of old versions (each 1M-row build leaves ~0.5-2 GB)."""
    for index in table.list_indices():
        if "embedding" in index.columns:
            table.drop_index(index.name)
    table.optimize(cleanup_older_than=timedelta(0))


def index_bytes(table) -> int | None:
    return next((int(i.size_bytes) for i in table.list_indices() if "embedding" in i.columns), None)


def bench_defaults(args, queries: dict, truth: dict, plain, label: str) -> list[dict]:
    """The chosen defaults (no overrides), the default index built by maintain if another is there."""
    index = Index.open(args.work / "config.yaml", ["search.ann_min_rows=1"])
    rows = []
    for name in queries:
        measured = measure(index, plain, queries[name], truth[name], modality_of(name), None)
        rows.append({"queries": name, "index": vector_index_type(plain), **measured})
        print(json.dumps({label: rows[-1]}), flush=True)
    return rows


def bench_nightly(args, generator, data: np.ndarray, queries: dict, plain) -> dict:
    """A nightly run that adds 1 % more rows: upsert them as the LanceDB sink does, then `maintain`."""
    added = generator.images(max(1, len(data) // 100))
    started = time.perf_counter()
    plain.merge_insert(["root", "path"]).when_matched_update_all().when_not_matched_insert_all().execute(
        rows_table(added, len(data)))
    upsert_s = time.perf_counter() - started
    search = load_config(args.work / "config.yaml", ["search.ann_min_rows=1"]).search
    done = maintain(plain, search, data.shape[1])
    grown = np.concatenate([data, added])
    sets = {**queries, "near_new": generator.near(added, len(queries["fresh"]))}  # found among the new rows?
    truth = {name: exact_top(grown, vectors) for name, vectors in sets.items()}
    out = {"added_rows": len(added), "upsert_s": round(upsert_s, 1), "maintain_s": round(done["seconds"], 1),
           "maintenance": done["action"], "index_after": plain.list_indices()[0].num_indexed_rows,
           "unindexed_after": plain.list_indices()[0].num_unindexed_rows}
    print(json.dumps({"nightly": out}), flush=True)
    out["after"] = bench_defaults(args, sets, truth, plain, "after_nightly")
    return out


def bench_memory(args, data: np.ndarray, queries: dict, truth: dict) -> dict:
    """An in-memory HNSW graph (FAISS IndexHNSWFlat, inner product on unit vectors) as a server would hold it:
    build time, memory, and p50/p95/recall@10 per query set over efSearch."""
    import faiss
    import psutil

    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    graph = faiss.IndexHNSWFlat(data.shape[1], args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = args.hnsw_ef_construction
    graph.add(data)
    out = {"m": args.hnsw_m, "ef_construction": args.hnsw_ef_construction,
           "build_s": round(time.perf_counter() - started, 1),
           "rss_added_mb": (process.memory_info().rss - rss_before) >> 20, "settings": []}
    print(json.dumps({"memory_index": out}), flush=True)
    faiss.omp_set_num_threads(1)  # one query at a time, as a server thread answers it
    for ef in args.hnsw_ef_search:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        for name in queries:
            latencies, hits = [], 0
            for query, expected in zip(queries[name], truth[name]):
                started = time.perf_counter()
                _, ids = graph.search(query[None], 10, params=params)
                latencies.append((time.perf_counter() - started) * 1000)
                hits += len(set(expected.tolist()) & set(ids[0].tolist()))
            row = {"ef_search": ef, "queries": name, **summary(latencies, hits, len(queries[name]))}
            out["settings"].append(row)
            print(json.dumps({"memory_index": row}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--realistic", action="store_true", help="clustered CLIP-like vectors (else uniform)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, required=True)
    # IVF_HNSW_SQ did not finish building in 15-35 minutes on 2 cores at 1M x 512: opt in.
    parser.add_argument("--types", default="ivf_sq,ivf_rq,ivf_flat,ivf_pq")
    parser.add_argument("--defaults", action="store_true", help="measure the chosen defaults")
    parser.add_argument("--nightly", action="store_true", help="+1 %% rows, maintain, recall after")
    parser.add_argument("--memory", action="store_true", help="an in-memory FAISS HNSW graph, for comparison")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--hnsw-ef-search", type=lambda text: [int(x) for x in text.split(",")],
                        default=[64, 128, 256, 512])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    started = time.perf_counter()
    generator = Generator(seed=args.seed) if args.realistic else None
    rng = np.random.default_rng(args.seed)
    if generator is not None:
        data = generator.images(args.rows)
        queries = {"fresh": generator.images(args.queries), "near": generator.near(data, args.queries),
                   "text": generator.texts(args.queries)}
    else:
        data = unit(rng.normal(size=(args.rows, args.dim)))
        near = unit(data[rng.integers(0, args.rows, args.queries)] + 0.3 * rng.normal(size=(args.queries, args.dim))
                    / np.sqrt(args.dim))
        queries = {"fresh": unit(rng.normal(size=(args.queries, args.dim))), "near": near}
    results = {"rows": args.rows, "dim": data.shape[1], "realistic": args.realistic,
               "generate_s": round(time.perf_counter() - started, 1),
               "profile": profile(data, queries, np.random.default_rng(1)), **write_index(args.work, data)}
    truth = {name: exact_top(data, vectors) for name, vectors in queries.items()}
    print(json.dumps(results), flush=True)

    import lancedb

    plain = lancedb.connect(str(args.work / "index")).open_table("images")
    index = Index.open(args.work / "config.yaml")
    results["indexes"] = []
    bench_types(args, index, plain, queries, truth, results)
    if args.defaults or args.nightly:
        drop_vector_index(plain)  # the default type, built as `embindex run` builds it
        done = maintain(plain, load_config(args.work / "config.yaml").search, data.shape[1])
        results["defaults_build"] = {"maintenance": done["action"], "build_s": round(done["seconds"], 1),
                                     "index_bytes": index_bytes(plain)}
        print(json.dumps(results["defaults_build"]), flush=True)
        results["defaults"] = bench_defaults(args, queries, truth, plain, "defaults")
    if args.memory:
        results["memory_index"] = bench_memory(args, data, queries, truth)
    if args.nightly:
        results["nightly"] = bench_nightly(args, generator or Generator(seed=args.seed), data, queries, plain)
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


if __name__ == "__main__":
    main()
