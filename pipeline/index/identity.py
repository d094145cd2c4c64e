"""The index's model identity: a fingerprint of everything that decides the vectors, kept beside the index."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import Config, EncoderConfig
from pipeline.errors import ConfigError


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """A short stable id of a fingerprint: a change means a new index."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def identity_path(config: Config) -> Path:
    table = config.output.lancedb.table if config.output.lancedb is not None else "images"
    return config.index_dir / f"{table}.embindex.json"


def stored_fingerprint(config: Config) -> dict[str, Any] | None:
    path = identity_path(config)
    return json.loads(path.read_text()).get("fingerprint") if path.exists() else None


def check_identity(config: Config, fingerprint: dict[str, Any], rebuild: bool) -> bool:
    """Refuse (exit 2) to mix vectors of another model or preprocessing into an existing index.
    Keys missing on one side (the dimension, before the weights are loaded) are not compared.
    Returns True when the index must be dropped and rebuilt (--rebuild)."""
    stored = stored_fingerprint(config)
    if stored is None:
        return False
    shared = sorted(set(stored) & set(fingerprint))
    if all(stored[key] == fingerprint[key] for key in shared):
        return False
    if rebuild:
        return True
    differences = "; ".join(f"{key}: index has {stored[key]!r}, config gives {fingerprint[key]!r}"
                            for key in shared if stored[key] != fingerprint[key])
    raise ConfigError(
        f"encoder.model: the index at {config.index_dir} was built with another model or preprocessing "
        f"({differences}). Vectors of different models must not mix: pass --rebuild to re-embed everything, "
        "or point output at a new index"
    )


def write_identity(config: Config, fingerprint: dict[str, Any]) -> None:
    path = identity_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"fingerprint_id": fingerprint_id(fingerprint), "fingerprint": fingerprint},
                                    indent=2))
    os.replace(temporary, path)


def index_identity(model_identity: dict[str, Any], encoder: EncoderConfig) -> dict[str, Any]:
    """The model's fingerprint plus the pipeline options that change what is stored (absent when unset,
    so indexes built before these options existed keep their identity)."""
    identity = dict(model_identity)
    if encoder.pyramid:
        identity["pyramid"] = [list(grid) for grid in encoder.pyramid]
    if encoder.pool_factor:
        identity["pool_factor"] = encoder.pool_factor
    return identity
