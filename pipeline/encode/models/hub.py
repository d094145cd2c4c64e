"""Where a model's files are (the Hub or a folder), a cheap identity of its weights, load errors that say what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError


def load_error(model: str, exc: BaseException) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if os.path.isdir(model):
        return ModelLoadError(
            f"could not load the model in {model} ({reason}). encoder.model must name a folder saved by "
            "Hugging Face `save_pretrained` or `hf download`: config.json, the weights and the processor files."
        )
    return ModelLoadError(
        f"could not load model {model!r} ({reason}). If this machine cannot reach the Hugging Face Hub, "
        f"download the model where it can (e.g. `hf download {model} --local-dir ./models/NAME`), copy the "
        "folder here and set `encoder.model: ./models/NAME` (a path is read relative to the config file). "
        "For an offline smoke test, `python scripts/make_tiny_models.py ./tiny-models` writes tiny random "
        "models to point at (their embeddings are meaningless)."
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine fails in seconds instead of after the Hub
    client's retries with backoff (~25 s of warnings)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def model_file(source: str, filename: str, revision: str | None, offline: bool) -> str | None:
    """The local path of one of a model's files (a folder's, or the hub cache's, fetched if need be), None when
    the model has no such file. Other failures (no network, no such repo) raise: the caller asks transformers,
    whose errors say what to do."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(source, filename, revision=revision, local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:  # not in the cache: absent from the repo, or never fetched (transformers reads it as absent)
            return None
        raise
    except EntryNotFoundError:  # the repo has no such file
        return None


def snapshot_commit(path: str) -> str | None:
    """The commit of a file in the hub cache (.../snapshots/<commit>/file), as transformers' `_commit_hash`."""
    match = re.search(r"snapshots/([^/]+)/", Path(path).as_posix())
    return match.group(1) if match and re.fullmatch(r"[0-9a-f]{40}", match.group(1)) else None


def weights_digest(folder: str) -> str:
    """A cheap identity of a local model's weights: names, sizes, and the first and last MiB of each
    weight file (a full hash of a 15 GB checkpoint would cost a minute every night)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(os.listdir(folder)):
        if not name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            continue
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return "weights:" + digest.hexdigest()


def base_load_error(adapter: Any, exc: BaseException) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(
        f"encoder.base_model: could not load {adapter.base!r}, the base model of the adapter {adapter.source} "
        f"({reason}). Download the base where the Hub can be reached (e.g. `hf download {adapter.base} --local-dir "
        "./models/base`), copy it here and set encoder.base_model to that folder."
    )
