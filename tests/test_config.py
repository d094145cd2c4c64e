"""Config loading: validation names the key, --set overrides, paths resolve against the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import IMAGES


def _write(folder: Path, config: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    config = load_config(_write(tmp_path, {"input": {"root": "photos"}}))
    assert config.input.root == [str(tmp_path / "photos")]
    assert config.output.lancedb.uri == str(tmp_path / "index")
    assert config.run.report_dir == str(tmp_path / "runs")
    assert config.encoder.batch_size == 64
    assert config.decode.max_image_pixels == 100_000_000
    assert "jpg" in config.input.extensions and "webp" in config.input.extensions


def test_set_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = _write(tmp_path, {"input": {"root": str(IMAGES)}})
    config = load_config(path, ["encoder.batch_size=32", "decode.workers=3", "output.parquet={dir: out}"])
    assert config.encoder.batch_size == 32
    assert config.decode.workers == 3
    assert config.output.parquet.dir == str(tmp_path / "out")


def test_root_may_be_a_list(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = load_config(_write(tmp_path, {"input": {"root": ["a", "b"]}}))
    assert config.input.root == [str(tmp_path / "a"), str(tmp_path / "b")]


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ({"input": {"root": str(IMAGES)}, "encoder": {"batch_sise": 4}}, [], "encoder.batch_sise: unknown key"),
        ({"input": {"root": str(IMAGES)}, "colour": 1}, [], "colour: unknown key"),
        ({"input": {"root": str(IMAGES)}, "encoder": {"batch_size": "many"}}, [], "encoder.batch_size"),
        ({"input": {"root": str(IMAGES)}, "run": {"max_error_rate": 2}}, [], "run.max_error_rate"),
        ({"input": {"root": str(IMAGES)}, "decode": {"workers": 0}}, [], "decode.workers"),
        ({"input": {"root": str(IMAGES)}, "encoder": {"dim": 0}}, [], "encoder.dim"),
        ({"input": {"root": "no/such/folder"}}, [], "input.root: folder does not exist"),
        ({"input": {"root": "config.yaml"}}, [], "input.root: is a file, not a folder"),
        ({"encoder": {"batch_size": 4}}, [], "input: required key is missing"),
        ({"input": {"root": str(IMAGES)}}, ["encoder.nope=1"], "encoder.nope: unknown key"),
        ({"input": {"root": str(IMAGES)}}, ["encoder.batch_size"], "expected KEY=VALUE"),
        ({"input": {"root": str(IMAGES)}, "output": {"lancedb": None}}, [], "at least one sink"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, config: dict, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(_write(tmp_path, config), overrides)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_example_configs_are_valid(tmp_path: Path) -> None:
    """Every shipped example validates once its root exists (roots are the user's to fill in)."""
    for example in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(example, [f"input.root={IMAGES}"])
