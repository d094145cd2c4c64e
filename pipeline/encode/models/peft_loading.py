"""Models given as a PEFT LoRA adapter: find the adapter and its base, load the base, merge the adapter once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model in saved adapter weights


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter folder (or hub repo) and the base model it applies to."""

    source: str  # encoder.model: the adapter's folder or hub id
    folder: str  # the local folder holding adapter_config.json (a hub snapshot for a hub id)
    config: dict[str, Any]
    base: str  # encoder.base_model, else the base named in adapter_config.json
    revision_hash: str  # a digest of a local adapter's weights, or the hub snapshot's commit

    def weights_path(self) -> str:
        for name in ADAPTER_WEIGHTS:
            path = os.path.join(self.folder, name)
            if os.path.isfile(path):
                return path
        if not os.path.isdir(self.source):  # a hub snapshot holds only the files fetched so far
            from huggingface_hub import hf_hub_download

            for name in ADAPTER_WEIGHTS:
                with contextlib.suppress(OSError, ValueError):
                    return hf_hub_download(self.source, name, revision=os.path.basename(self.folder))
        raise FileNotFoundError(f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) in {self.source}")

    def has_file(self, name: str) -> bool:
        """Whether the adapter ships `name` (e.g. its own processor or tokenizer) beside its weights."""
        if os.path.isfile(os.path.join(self.folder, name)):
            return True
        if os.path.isdir(self.source):
            return False
        from huggingface_hub import hf_hub_download

        try:
            hf_hub_download(self.source, name, revision=os.path.basename(self.folder))
        except Exception:  # absent from the repo, or the Hub is not reachable: the base's file is used
            return False
        return True

    def targets(self, module: str) -> bool:
        """Whether the adapter changes or replaces `module` (a LoRA target or a module it saves whole)."""
        if module in (self.config.get("modules_to_save") or []):
            return True
        targets = self.config.get("target_modules") or []
        if isinstance(targets, str):  # PEFT: a string is a regex matched against the full module name
            return re.fullmatch(targets, module) is not None
        return any(module == target or module.endswith("." + target) for target in targets)


def _snapshot_commit(path: str) -> str:
    """The commit of a file in the hub cache (.../snapshots/<commit>/file)."""
    return os.path.basename(os.path.dirname(path))


def find_adapter(source: str, revision: str | None, offline: bool, base_override: str | None) -> Adapter | None:
    """The adapter at encoder.model, or None when it is a full model (no adapter_config.json)."""
    if os.path.isdir(source):
        path = os.path.join(source, ADAPTER_CONFIG)
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(source, ADAPTER_CONFIG, revision=revision, local_files_only=offline)
        except Exception:  # not an adapter, or not reachable: AutoConfig then reports the model itself
            return None
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    folder = os.path.dirname(path)
    base = base_override or config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"encoder.base_model: the adapter {source} names no base model in {ADAPTER_CONFIG}; "
                          "set encoder.base_model to the base model's hub id or folder")
    if base_override is None and not os.path.isabs(base) and os.path.isdir(os.path.join(folder, base)):
        base = os.path.normpath(os.path.join(folder, base))  # a base given relative to the adapter
    if os.path.isdir(source):
        from pipeline.encode.models.hub import weights_digest

        revision_hash = weights_digest(source)
    else:
        revision_hash = _snapshot_commit(path)
    return Adapter(source, folder, config, base, revision_hash)


def rename(key: str, key_mapping: dict[str, str]) -> str:
    """A checkpoint key in this project's module names (each pattern applied in turn, as transformers does)."""
    for pattern, replacement in key_mapping.items():
        key = re.sub(pattern, replacement, key)
    return key


def _adapter_state(adapter: Adapter, key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    path = adapter.weights_path()
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {PEFT_PREFIX + rename(key.removeprefix(PEFT_PREFIX), key_mapping): value for key, value in state.items()}


def merge_adapter(model: torch.nn.Module, adapter: Adapter, key_mapping: dict[str, str]) -> tuple[torch.nn.Module,
                                                                                                   set[str]]:
    """Apply the adapter to `model` and merge it into the weights (no LoRA cost per forward).
    Returns the merged model and the names of the parameters the adapter held whole (modules_to_save)."""
    try:
        from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    except ImportError:
        raise ValueError(f"{adapter.source} is a PEFT adapter: install peft (pip install 'embindex[peft]')") from None
    if adapter.config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters are supported, not {adapter.config.get('peft_type')}")
    state = _adapter_state(adapter, key_mapping)
    config = LoraConfig.from_pretrained(adapter.folder)
    config.inference_mode = True
    with quiet_transformers():
        peft_model = PeftModel(model, config)
        result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise ValueError(f"{len(result.unexpected_keys)} adapter weights match no module of the base model, e.g. "
                         f"{result.unexpected_keys[0]}")
    whole = {key.removeprefix(PEFT_PREFIX) for key in state if ".lora_" not in key}
    log.info("merging adapter %s (%d tensors) into %s", adapter.source, len(state), adapter.base)
    return peft_model.merge_and_unload(), whole


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load key report: missing keys are checked here, with a message that says
    what to do."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # PEFT calls a deprecated transformers method
            yield
    finally:
        hf_logging.set_verbosity(level)


def load_pretrained(model_class: Any, source: str, adapter: Adapter | None, key_mapping: dict[str, str] | None,
                    **options: Any) -> torch.nn.Module:
    """`model_class` from a full checkpoint, or from the adapter's base with the adapter merged in. Weights
    that neither provides are an error: they would otherwise be random and every vector meaningless."""
    mapping = key_mapping or {}
    with quiet_transformers():
        model, info = model_class.from_pretrained(adapter.base if adapter else source, key_mapping=key_mapping,
                                                  output_loading_info=True, **options)
    missing = set(info["missing_keys"])
    if adapter is not None:
        model, whole = merge_adapter(model, adapter, mapping)
        missing -= whole
    if missing:
        names = ", ".join(sorted(missing)[:3])
        where = f"{adapter.base} + adapter {adapter.source}" if adapter else source
        raise ValueError(f"{len(missing)} weights of {model_class.__name__} are not in {where} (e.g. {names}): "
                         "is encoder.kind right for this checkpoint?")
    return model
