"""The `embindex` command line: parsing and exit codes only; the work happens in the stage modules."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

# Batches of many shapes (dynamic resolution, the last partial batch) fragment torch's CUDA cache:
# growable segments keep reserved memory near what is allocated (set before torch starts CUDA).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from pipeline.config import Config, load_config
from pipeline.errors import EXIT_FAILED, EXIT_LOCKED, EXIT_USAGE, ConfigError, ModelLoadError

log = logging.getLogger("embindex")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"embindex: {message}", err=True)
    sys.exit(code)


@contextmanager
def _exit_codes(config_prefix: str = "config error: ") -> Iterator[None]:
    """The failures every command can meet: one line on stderr and the SPEC's exit code (2 bad config,
    3 index locked, 1 model not loadable). Anything else is a bug and keeps its traceback."""
    from pipeline.index.lock import LockHeld

    try:
        yield
    except ConfigError as exc:
        _fail(f"{config_prefix}{exc}", EXIT_USAGE)
    except LockHeld as exc:
        _fail(str(exc), EXIT_LOCKED)
    except ModelLoadError as exc:
        _fail(str(exc), EXIT_FAILED)


def _load(config_path: str, overrides: tuple[str, ...]) -> Config:
    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        click.echo(f"embindex: config error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _lock_index(config: Config) -> Any:
    """The index lock, taken before anything slow: a cron run that overlaps another exits 3 in well under
    a second, instead of after the imports and the model's description (23.6 s measured on a GPU machine)."""
    from pipeline.index.lock import IndexLock

    lock = IndexLock(str(config.index_dir))
    lock.acquire()
    return lock


def _own_or_error(record: logging.LogRecord) -> bool:
    """--quiet: embindex's own warnings, and errors of anyone (a cron job mails whatever reaches stderr)."""
    return record.levelno >= logging.ERROR or record.name.split(".")[0] in ("embindex", "pipeline")


def _process_started() -> float | None:
    """When this process started (epoch seconds): the report counts the interpreter's start and the imports."""
    import psutil

    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return None


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Python warnings of this process (libraries' FutureWarnings, PIL's) become log records of "py.warnings",
    # so --quiet can hold them back; the decode processes capture their own (pipeline/decode/capture.py).
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        (handler.addFilter if quiet else handler.removeFilter)(_own_or_error)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embindex")
def main() -> None:
    """Index folders of images into a searchable embedding table."""


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (YAML value).")
@click.option("--rebuild", is_flag=True, help="Drop the index and re-embed everything (needed after a model change).")
@click.option("--retry-errors", is_flag=True, help="Try files recorded in images_errors again, even if unchanged.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no summary line; warnings and errors only.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
@click.option("--runner", type=click.Choice(["local", "ray"]), help="Override run.runner.")
@click.option("--address", help="Ray cluster to join (auto, HOST:PORT, ray://HOST:PORT); implies --runner ray.")
def run(config_path: str, overrides: tuple[str, ...], rebuild: bool, retry_errors: bool, quiet: bool,
        verbose: bool, runner: str | None, address: str | None) -> None:
    """Index the folder(s) in CONFIG; resumes and updates incrementally."""
    _setup_logging(quiet, verbose)
    config = _load(config_path, overrides)
    if address is not None:
        config.run.ray.address = address
    if runner is not None or address is not None:
        config.run.runner = runner or "ray"
    with _exit_codes():
        lock = _lock_index(config)
    try:
        from pipeline.runners.local import run_index  # torch and transformers: seconds, after the lock

        with _exit_codes():
            result = run_index(config, rebuild=rebuild, retry_errors=retry_errors,
                               progress=False if quiet else None, lock=lock, process_started=_process_started())
    except MemoryError:
        click.echo("embindex: out of host memory; lower decode.workers or encoder.batch_size", err=True)
        sys.exit(EXIT_FAILED)
    except OSError as exc:
        click.echo(f"embindex: run failed: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except RuntimeError as exc:  # CUDA out of memory arrives as a RuntimeError subclass
        click.echo(f"embindex: run failed: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        lock.release()
    report = result.report
    if report.get("smoke_test"):
        click.echo("embindex: SMOKE TEST with a random-weight model: the embeddings are meaningless", err=True)
    if not quiet:
        click.echo(
            f"embindex: {report['images_embedded']} embedded, {sum(report['errors'].values())} errors, "
            f"{report['files_unchanged']} unchanged, {report['files_deleted']} deleted in {report['wall_s']:.1f} s "
            f"({report['images_per_s']:.1f} images/s); {report['output_rows']} rows; report: {result.report_dir}"
        )
    if result.exit_code:
        click.echo(
            f"embindex: error rate {report['error_rate']:.1%} exceeds run.max_error_rate "
            f"{config.run.max_error_rate:.1%}", err=True,
        )
    sys.exit(result.exit_code)


@main.command()
@click.argument("config_path", metavar="[CONFIG]", required=False, type=click.Path(dir_okay=False))
@click.option("--text", help="Search by this text (CLIP and SigLIP families).")
@click.option("--image", "image_path", type=click.Path(dir_okay=False), help="Search by this image file.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="How many results.")
@click.option("--where", help="SQL filter on the table's columns, e.g. \"width > 1000\" or \"path LIKE 'cats/%'\".")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per result line.")
@click.option("--server", "server_url", metavar="URL",
              help="Send the query to this running `embindex serve` (no model or index opened here). Without it, "
                   "CONFIG's serve address is used when a server there searches CONFIG's index.")
@click.option("--local", "local_only", is_flag=True, help="Search here even when a server answers for CONFIG.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def query(config_path: str | None, text: str | None, image_path: str | None, k: int, where: str | None,
          as_json: bool, server_url: str | None, local_only: bool, overrides: tuple[str, ...]) -> None:
    """Top-k search of the built index by text or image, here or through a running `embindex serve`."""
    _setup_logging(quiet=True, verbose=False)
    if (text is None) == (image_path is None):
        _fail("give exactly one of --text or --image", EXIT_USAGE)
    if server_url is not None and local_only:
        _fail("give --server URL or --local, not both", EXIT_USAGE)
    if config_path is None and server_url is None:
        _fail("give CONFIG (the index's config), or --server URL of a running `embindex serve`", EXIT_USAGE)
    config = _load(config_path, overrides) if config_path is not None else None
    if server_url is None and config is not None and not local_only:
        server_url = _server_for(config)
    if server_url is not None:
        rows, tiles = _query_server(server_url, config, text, image_path, k, where)
    else:
        assert config is not None
        rows, tiles = _query_local(config, text, image_path, k, where)
    _print_hits(rows, tiles, as_json)


def _server_for(config: Config) -> str | None:
    """The URL of a server at CONFIG's serve address that searches CONFIG's index, else None (search here)."""
    from pipeline.serve.client import address_url, api_key, serves_index

    lance = config.output.lancedb
    if lance is None or config.serve.port == 0:
        return None
    url = address_url(config.serve.host, config.serve.port)
    return url if serves_index(url, lance.uri, lance.table, api_key(config.serve.api_key_env)) else None


def _query_server(url: str, config: Config | None, text: str | None, image_path: str | None, k: int,
                  where: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The hits from the server: exit 2 for what it refuses (4xx; 503, no index there), 1 when it fails or is not
    reached."""
    from pipeline.serve.client import ServerError, api_key, query_server

    try:
        rows, tiles, smoke_test = query_server(url, text, image_path, k, where,
                                               api_key(config.serve.api_key_env if config else None))
    except ServerError as exc:
        refused = exc.status is not None and (400 <= exc.status < 500 or exc.status == 503)
        _fail(str(exc), EXIT_USAGE if refused else EXIT_FAILED)
    if smoke_test:
        click.echo("embindex: SMOKE TEST: the server's model has random weights: the results are meaningless", err=True)
    return rows, tiles


def _query_local(config: Config, text: str | None, image_path: str | None, k: int,
                 where: str | None) -> tuple[list[dict[str, Any]], bool]:
    from pipeline.index.location import missing_table

    if config.output.lancedb is not None and (missing := missing_table(config.output.lancedb.uri,
                                                                       config.output.lancedb.table)):
        _fail(missing, EXIT_USAGE)  # at once: before torch and the model's description
    from pipeline.search.query import Index, QueryError

    try:
        with _exit_codes():
            index = Index(config)
            hits = index.search_text(text, k, where) if text is not None else index.search_image(image_path, k, where)
    except (QueryError, NotImplementedError) as exc:
        _fail(str(exc), EXIT_USAGE)
    return hits.to_pylist(), "tile_level" in hits.column_names  # pyramid-tile index: which tile matched


def _print_hits(rows: list[dict[str, Any]], tiles: bool, as_json: bool) -> None:
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str, ensure_ascii=False))
        return
    width = max([len(r["path"]) for r in rows] + [4])
    click.echo(f"{'rank':>4}  {'score':>7}  {'path':<{width}}  " + ("tile (level,row,col)  " if tiles else "") + "root")
    for row in rows:
        where_in = f"({row['tile_level']},{row['tile_row']},{row['tile_col']})" if tiles else ""
        tile = f"{where_in:<20}  " if tiles else ""
        click.echo(f"{row['rank']:>4}  {row['score']:>7.4f}  {row['path']:<{width}}  {tile}{row['root']}")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of report.md.")
def report(config_path: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the latest run's report."""
    from pipeline.report import latest_report

    config = _load(config_path, overrides)
    folder = latest_report(config.run.report_dir)
    if folder is None:  # nothing to report is a usage error, like a query of a missing index
        click.echo(f"embindex: no run report in {config.run.report_dir} yet", err=True)
        sys.exit(EXIT_USAGE)
    name = "report.json" if as_json else "report.md"
    click.echo(Path(folder, name).read_text().rstrip())


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--batch-sizes", default="1,4,8,16,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--limit", type=click.IntRange(min=1), help="Embed only the first N files per batch size.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where bench.json, bench.md and bench.png go [run.report_dir/bench].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def bench(config_path: str, batch_sizes: str, limit: int | None, out_dir: str | None,
          overrides: tuple[str, ...]) -> None:
    """Batch-size sweep of the real pipeline: peak memory, time and images/s per batch size."""
    _setup_logging(quiet=False, verbose=False)
    config = _load(config_path, overrides)
    try:
        sizes = [int(size) for size in batch_sizes.split(",") if size.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        click.echo(f"embindex: --batch-sizes: expected whole numbers >= 1 like 1,4,8 (got {batch_sizes!r})", err=True)
        sys.exit(EXIT_USAGE)
    from pipeline.tools.bench import format_table, sweep, write_outputs

    folder = Path(out_dir) if out_dir else Path(config.run.report_dir) / "bench"
    with _exit_codes():
        rows = sweep(config, sizes, limit, folder)
    write_outputs(rows, config, folder)
    click.echo(format_table(rows).rstrip())
    click.echo(f"embindex: wrote {folder / 'bench.md'}, bench.json and bench.png")


@main.command()
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--count", type=click.IntRange(min=1), required=True)
@click.option("--width-mean", type=click.FloatRange(min=1), default=640, show_default=True)
@click.option("--width-stddev", type=click.FloatRange(min=0), default=0, show_default=True)
@click.option("--height-mean", type=click.FloatRange(min=1), default=480, show_default=True)
@click.option("--height-stddev", type=click.FloatRange(min=0), default=0, show_default=True)
@click.option("--format", "image_format", type=click.Choice(["png", "jpeg", "random"]), default="jpeg",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), help="Writer processes [all cores].")
def synth(out_dir: str, count: int, width_mean: float, width_stddev: float, height_mean: float,
          height_stddev: float, image_format: str, seed: int, workers: int | None) -> None:
    """Write COUNT synthetic photo-like images of normally distributed sizes, for benchmarks."""
    import time

    from pipeline.tools.synth import SynthSpec, write_corpus

    started = time.perf_counter()
    spec = SynthSpec(count, width_mean, width_stddev, height_mean, height_stddev, image_format, seed)
    written = write_corpus(out_dir, spec, workers)
    click.echo(f"embindex: wrote {written} images to {out_dir} in {time.perf_counter() - started:.1f} s")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run.")
def history(config_path: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """List the runs that changed the index (oldest first)."""
    from pipeline.index.history import list_history

    config = _load(config_path, overrides)
    with _exit_codes(config_prefix=""):
        entries = list_history(config)
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry, default=str))
        return
    click.echo(f"{'run_id':<26} {'version':>7} {'committed_at':<26} {'new':>7} {'changed':>7} {'deleted':>7} "
               f"{'rows':>9}")
    for e in entries:
        click.echo(f"{e['run_id']:<26} {e['version']:>7} {str(e['committed_at'])[:26]:<26} "
                   f"{_dash(e['files_new']):>7} {_dash(e['files_changed']):>7} {_dash(e['files_deleted']):>7} "
                   f"{_dash(e['output_rows']):>9}")


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("run_id")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def rollback(config_path: str, run_id: str, overrides: tuple[str, ...]) -> None:
    """Restore the index to the end of RUN_ID (see `embindex history`)."""
    from pipeline.index.history import rollback as restore

    config = _load(config_path, overrides)
    with _exit_codes(config_prefix=""):
        counts = restore(config, run_id)
    click.echo(f"embindex: restored {run_id}: {counts['images']} rows, {counts['errors']} error rows")


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--host", help="Address to bind [serve.host: 127.0.0.1].")
@click.option("--port", type=click.IntRange(0, 65535), help="Port [serve.port: 8000].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (YAML value).")
@click.option("--quiet", "-q", is_flag=True, help="No access log; warnings and errors only.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def serve(config_path: str, host: str | None, port: int | None, overrides: tuple[str, ...], quiet: bool,
          verbose: bool) -> None:
    """Serve CONFIG's encoder as an NVIDIA-NIM-compatible POST /v1/embeddings, and search of CONFIG's index:
    POST /v1/search and the search page at / (needs the [serve] extra)."""
    _setup_logging(quiet, verbose)
    try:
        config = load_config(config_path, overrides, require_input=False)
    except ConfigError as exc:
        click.echo(f"embindex: config error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        from pipeline.serve.server import run_server
    except ImportError as exc:
        click.echo(f"embindex: serve needs the [serve] extra: pip install 'embindex[serve]' ({exc})", err=True)
        sys.exit(EXIT_USAGE)
    with _exit_codes():
        run_server(config, host, port, access_log=not quiet)


if __name__ == "__main__":
    main()
