"""Vision-language encoders (ColQwen2.5/ColNomic, BiQwen2.5/Nomic, ColQwen2, ColPali) against reference paths
built from the published recipes on the same tiny weights, plus adapter loading, detection and pixel budgets."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLModel

from pipeline.config import EncoderConfig
from pipeline.decode.image import decode_file
from pipeline.decode.spec import smart_resize
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.source import describe_model
from pipeline.errors import ConfigError, ModelLoadError
from tests.conftest import IMAGES


def _mixed_photos(count: int) -> list[Path]:
    """Photos whose smart-resized grids (at the tiny processors' 4..64 tokens) all differ: mixed sizes."""
    chosen: dict[tuple[int, int], Path] = {}
    for path in sorted(IMAGES.iterdir()):
        with Image.open(path) as image:
            width, height = ImageOps.exif_transpose(image).size
        chosen.setdefault(smart_resize(height, width, 28, 4 * 784, 64 * 784), path)
        if len(chosen) == count:
            break
    return list(chosen.values())


PHOTOS = _mixed_photos(8)
COLPALI_IMAGE_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|><|endoftext|>"
)
QUERIES = ["a photo of a dog", "where is the red car parked?"]


def _cpu(folder: Path, **options: object) -> EncoderConfig:
    return EncoderConfig(model=str(folder), device="cpu", **options)


def _pil(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def _pipeline_pixels(encoder: object, paths: list[Path]) -> list[torch.Tensor]:
    """What the decode workers hand the encoder: uint8 (H, W, 3) at each image's own smart-resized size."""
    spec = encoder.input_spec()  # type: ignore[attr-defined]
    return [torch.from_numpy(decode_file(str(p), spec, 100_000_000).pixels.copy()) for p in paths]


def _assert_same_vectors(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(ours) == len(reference)
    for index, (mine, theirs) in enumerate(zip(ours, reference)):
        assert mine.shape == theirs.shape, f"image {index}: {tuple(mine.shape)} vs {tuple(theirs.shape)}"
        cosine = torch.nn.functional.cosine_similarity(mine.float(), theirs.float(), dim=-1)
        assert cosine.min() >= 0.999, f"image {index}: worst cosine {cosine.min():.5f}"
        # fp32 on CPU is the same arithmetic up to summation order (max 2e-7 here, 2e-4 on another CPU).
        # Tiny random models barely react to some mistakes (1-D instead of 2-D image positions still gives
        # cosine 0.9995, elements off by ~1e-2): compare elements too.
        assert (mine.float() - theirs.float()).abs().max() <= 1e-3, f"image {index}"
        assert torch.allclose(mine.norm(dim=-1), torch.ones(len(mine)), atol=1e-4)


# --- The colpali-engine recipe, written out here (colpali-engine itself needs torchvision) ---------------------

class ReferenceColQwen2_5(Qwen2_5_VLModel):
    """colpali-engine's ColQwen2_5: Qwen2_5_VLModel + custom_text_proj (hidden -> 128)."""

    def __init__(self, config: object) -> None:
        super().__init__(config)
        self.custom_text_proj = nn.Linear(config.text_config.hidden_size, 128)  # type: ignore[attr-defined]


def _qwen_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """colpali-engine / Qwen2.5-VL-Instruct key names (model.layers.*, visual.*) -> Qwen2_5_VLModel's."""
    return {("language_model." + key[len("model."):] if key.startswith("model.") else key): value
            for key, value in state.items() if not key.startswith("lm_head.")}


def _reference_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Merged weights: a full checkpoint as is, or base + adapter with each LoRA pair merged by hand,
    W + (alpha / r) * B @ A, and the modules the adapter saves whole."""
    config_path = folder / "adapter_config.json"
    if not config_path.exists():
        return _qwen_names(load_file(folder / "model.safetensors")), folder
    adapter_config = json.loads(config_path.read_text())
    base = Path(adapter_config["base_model_name_or_path"])
    state = _qwen_names(load_file(base / "model.safetensors"))
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    adapter = {key.removeprefix("base_model.model."): value
               for key, value in load_file(folder / "adapter_model.safetensors").items()}
    for key, value in adapter.items():
        if ".lora_A." in key:
            target = _qwen_names({key.replace(".lora_A.weight", ".weight"): value})
            name = next(iter(target))
            state[name] = state[name] + scale * adapter[key.replace("lora_A", "lora_B")] @ value
        elif ".lora_B." not in key:
            state[key] = value
    return state, base


@functools.lru_cache(maxsize=4)
def _reference_model(folder: Path, with_projection: bool) -> Qwen2_5_VLModel:
    state, config_folder = _reference_weights(folder)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_folder)
    model = (ReferenceColQwen2_5 if with_projection else Qwen2_5_VLModel)(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _reference_qwen_forward(folder: Path, paths: list[Path], with_projection: bool) -> list[torch.Tensor]:
    """The colpali recipe in one batch: the HF image processor's pixel_values (PIL backend) for the original
    images, the image prompt with <|image_pad|> repeated per image token, left padding, and the image-token
    mask so image tokens get 2-D positions. Col: custom_text_proj, L2, x mask; Bi: last token, L2."""
    model = _reference_model(folder, with_projection)
    processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = processor(images=[_pil(p) for p in paths], return_tensors="pt")
    counts = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    texts = [COLPALI_IMAGE_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * n) for n in counts]
    tokens = tokenizer(texts, padding="longest", padding_side="left", return_tensors="pt")
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.inference_mode():
        hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=(tokens["input_ids"] == image_token).int()).last_hidden_state
        if not with_projection:
            last = hidden[:, -1]
            return list((last / last.norm(dim=-1, keepdim=True))[:, None, :])
        proj = model.custom_text_proj(hidden)
        proj = proj / proj.norm(dim=-1, keepdim=True) * tokens["attention_mask"].unsqueeze(-1)
    return [rows[mask.bool()] for rows, mask in zip(proj, tokens["attention_mask"])]


def _reference_qwen_query(folder: Path, text: str, with_projection: bool) -> torch.Tensor:
    model = _reference_model(folder, with_projection)
    tokens = AutoTokenizer.from_pretrained(folder)([text + "<|endoftext|>" * 10], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**tokens).last_hidden_state[0]
        rows = model.custom_text_proj(hidden) if with_projection else hidden[-1:]
    return rows / rows.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("family", ["colqwen2_5", "colqwen2_5_adapter"])
def test_colqwen2_5_matches_colpali_recipe(tiny_models: Path, family: str) -> None:
    """Mixed sizes, split and ordered differently from the reference batch: not a vector may change."""
    folder = tiny_models / family
    encoder = load_encoder(_cpu(folder))
    assert encoder.kind == "colqwen2_5" and encoder.multivector and encoder.dim == 128
    pixels = _pipeline_pixels(encoder, PHOTOS)
    assert len({tuple(p.shape) for p in pixels}) == len(PHOTOS)  # every image a grid of its own
    order = [3, 0, 6, 1, 7, 2, 5, 4]
    first, second = encoder.encode_image_list([pixels[i] for i in order[:5]]), \
        encoder.encode_image_list([pixels[i] for i in order[5:]])
    ours = [None] * len(PHOTOS)
    for index, vectors in zip(order, first + second):
        ours[index] = vectors
    reference = _reference_qwen_forward(folder, PHOTOS, with_projection=True)
    _assert_same_vectors(ours, reference)
    for vectors, image in zip(ours, pixels):  # every real token, no padding rows
        assert len(vectors) == encoder.tokens_for(image.shape[0], image.shape[1])


@pytest.mark.parametrize("family", ["colqwen2_5", "colqwen2_5_adapter"])
def test_colqwen2_5_queries_match_colpali_recipe(tiny_models: Path, family: str) -> None:
    encoder = load_encoder(_cpu(tiny_models / family))
    ours = encoder.encode_texts(QUERIES)
    for text, vectors in zip(QUERIES, ours):
        reference = _reference_qwen_query(tiny_models / family, text, with_projection=True)
        _assert_same_vectors([torch.from_numpy(vectors)], [reference])


def test_biqwen2_5_matches_colpali_recipe(tiny_models: Path) -> None:
    folder = tiny_models / "biqwen2_5"
    encoder = load_encoder(_cpu(folder))
    assert encoder.kind == "biqwen2_5" and not encoder.multivector and encoder.dim == 64
    pixels = _pipeline_pixels(encoder, PHOTOS)
    ours = encoder.encode_image_list(pixels[::-1])[::-1]
    assert all(vectors.shape == (1, 64) for vectors in ours)
    _assert_same_vectors(ours, _reference_qwen_forward(folder, PHOTOS, with_projection=False))
    texts = encoder.encode_texts(QUERIES)
    assert texts.shape == (2, 64)
    for text, vector in zip(QUERIES, texts):
        _assert_same_vectors([torch.from_numpy(vector[None])], [_reference_qwen_query(folder, text, False)])


def test_an_image_gets_the_same_vectors_alone_and_in_any_batch(tiny_models: Path) -> None:
    encoder = load_encoder(_cpu(tiny_models / "colqwen2_5"))
    pixels = _pipeline_pixels(encoder, PHOTOS[:4])
    together = encoder.encode_image_list(pixels)
    for image, batched in zip(pixels, together):
        alone = encoder.encode_image_list([image])[0]
        assert torch.allclose(alone, batched, atol=1e-5)


# --- Adapters ------------------------------------------------------------------------------------------------

def _adapter_copy(tmp_path: Path, tiny_models: Path, base: str) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_models / "colqwen2_5_adapter", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_unreachable_adapter_base_names_encoder_base_model(tmp_path: Path, tiny_models: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: the base is nowhere
    folder = _adapter_copy(tmp_path, tiny_models, "Qwen/Qwen2.5-VL-3B-Instruct")
    with pytest.raises(ModelLoadError, match=r"encoder\.base_model: could not load 'Qwen/Qwen2\.5-VL-3B-Instruct'"):
        describe_model(_cpu(folder))
    # Pointing encoder.base_model at a local copy of the base gives the original adapter's vectors.
    encoder = load_encoder(_cpu(folder, base_model=str(tiny_models / "qwen_vl")))
    original = load_encoder(_cpu(tiny_models / "colqwen2_5_adapter"))
    pixels = _pipeline_pixels(encoder, PHOTOS[:2])
    for ours, theirs in zip(encoder.encode_image_list(pixels), original.encode_image_list(pixels)):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_adapter_base_relative_to_the_adapter_folder(tmp_path: Path, tiny_models: Path) -> None:
    shutil.copytree(tiny_models / "qwen_vl", tmp_path / "qwen_vl")
    folder = _adapter_copy(tmp_path, tiny_models, "../qwen_vl")
    assert describe_model(_cpu(folder)).adapter.base == str(tmp_path / "qwen_vl")


def test_adapter_without_the_projection_weights_is_refused(tmp_path: Path, tiny_models: Path) -> None:
    """custom_text_proj only as a LoRA target on a base that lacks it: random weights, so a clear error."""
    folder = _adapter_copy(tmp_path, tiny_models, str(tiny_models / "qwen_vl"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    config["target_modules"] = config["target_modules"][:-2] + "|.*(custom_text_proj).*$)"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    weights = load_file(folder / "adapter_model.safetensors")
    kept = {key: value for key, value in weights.items() if "custom_text_proj" not in key}
    save_file(kept, str(folder / "adapter_model.safetensors"))
    assert describe_model(_cpu(folder)).kind == "colqwen2_5"  # the target names the projection
    with pytest.raises(ModelLoadError, match="custom_text_proj"):
        load_encoder(_cpu(folder))


# --- Detection, identity, pixel budget -----------------------------------------------------------------------

@pytest.mark.parametrize(("family", "kind"), [
    ("colqwen2_5", "colqwen2_5"), ("colqwen2_5_adapter", "colqwen2_5"), ("biqwen2_5", "biqwen2_5"),
    ("colqwen2", "colqwen2"), ("colpali", "colpali"),
])
def test_kind_is_detected(tiny_models: Path, family: str, kind: str) -> None:
    assert describe_model(_cpu(tiny_models / family)).kind == kind


def test_a_chat_model_needs_an_explicit_kind(tiny_models: Path) -> None:
    with pytest.raises(ConfigError, match="encoder.kind: .*qwen_vl_features"):
        describe_model(_cpu(tiny_models / "qwen_vl"))
    with pytest.raises(ConfigError, match="encoder.kind: colpali needs a model of type colpali"):
        describe_model(_cpu(tiny_models / "colqwen2_5", kind="colpali"))


def test_quality_presets_and_pixel_bounds(tiny_models: Path) -> None:
    folder = tiny_models / "colqwen2_5"
    spec = describe_model(_cpu(folder)).spec
    assert (spec.min_pixels, spec.max_pixels, spec.factor) == (4 * 784, 64 * 784, 28)  # the processor's own
    spec = describe_model(_cpu(folder, quality="high")).spec
    assert (spec.min_pixels, spec.max_pixels) == (256 * 784, 768 * 784)
    spec = describe_model(_cpu(folder, max_pixels=16 * 784)).spec
    assert (spec.min_pixels, spec.max_pixels) == (4 * 784, 16 * 784)
    with pytest.raises(ConfigError, match="encoder.min_pixels: min_pixels 200704 is more than max_pixels 50176"):
        describe_model(_cpu(folder, min_pixels=256 * 784))
    with pytest.raises(ConfigError, match="encoder.max_pixels: applies only to dynamic-resolution models"):
        describe_model(_cpu(tiny_models / "clip", max_pixels=16 * 784))
    encoder = load_encoder(_cpu(folder, quality="fast"))
    image = torch.zeros((28 * 16, 28 * 16, 3), dtype=torch.uint8)  # 256 tokens: the "fast" maximum
    assert len(encoder.encode_image_list([image])[0]) == encoder.tokens_for(448, 448) == 256 + 29


@pytest.mark.parametrize("family", ["colqwen2_5", "colqwen2_5_adapter", "biqwen2_5", "colqwen2", "colpali"])
def test_identity_before_loading_is_the_fingerprint(tiny_models: Path, family: str) -> None:
    """`embindex run` checks the index's identity before loading weights: it must equal the loaded encoder's."""
    described = describe_model(_cpu(tiny_models / family, quality="balanced") if family != "colpali"
                               else _cpu(tiny_models / family))
    encoder = load_encoder(EncoderConfig(model=str(tiny_models / family), device="cpu"), described)
    fingerprint = encoder.fingerprint()
    assert {k: v for k, v in fingerprint.items() if k != "dim"} == described.identity()
    assert fingerprint["kind"] == described.kind and fingerprint["dim"] == encoder.dim
    if family != "colpali":
        assert fingerprint["preprocess"]["max_pixels"] == 512 * 784


# --- transformers' ColQwen2 and ColPali, with their own processors -----------------------------------------

@functools.lru_cache(maxsize=2)
def _hf_model_and_processor(family: str, folder: Path) -> tuple:
    from transformers import AutoProcessor, ColPaliForRetrieval, ColQwen2ForRetrieval

    model = (ColQwen2ForRetrieval if family == "colqwen2" else ColPaliForRetrieval).from_pretrained(folder).eval()
    return model, AutoProcessor.from_pretrained(folder)


def _reference_hf(family: str, folder: Path, paths: list[Path] | None = None, text: str | None = None) -> list:
    """transformers' documented path: processor(images=...) or processor(text=...), then model(**batch)."""
    model, processor = _hf_model_and_processor(family, folder)
    batch = processor(images=[_pil(p) for p in paths]) if paths is not None else processor(text=[text])
    with torch.inference_mode():
        embeddings = model(**batch).embeddings
    return [rows[mask.bool()] for rows, mask in zip(embeddings, batch["attention_mask"])]


def test_colqwen2_matches_transformers(tiny_models: Path) -> None:
    """Each image alone through transformers (its 1-D positions make a left-padded batch differ from the
    images alone); the pipeline's mixed-size batch must give every image its own vectors."""
    folder = tiny_models / "colqwen2"
    encoder = load_encoder(_cpu(folder))
    assert encoder.kind == "colqwen2" and encoder.dim == 128 and encoder.input_spec().dynamic
    pixels = _pipeline_pixels(encoder, PHOTOS)
    ours = encoder.encode_image_list(pixels)
    _assert_same_vectors(ours, [_reference_hf("colqwen2", folder, [p])[0] for p in PHOTOS])
    for text, vectors in zip(QUERIES, encoder.encode_texts(QUERIES)):
        _assert_same_vectors([torch.from_numpy(vectors)], _reference_hf("colqwen2", folder, text=text))


def test_colpali_matches_transformers(tiny_models: Path) -> None:
    folder = tiny_models / "colpali"
    encoder = load_encoder(_cpu(folder))
    assert encoder.kind == "colpali" and encoder.dim == 128 and not encoder.input_spec().dynamic
    pixels = _pipeline_pixels(encoder, PHOTOS)
    ours = encoder.encode_image_list(pixels[:3]) + encoder.encode_image_list(pixels[3:])
    _assert_same_vectors(ours, _reference_hf("colpali", folder, PHOTOS))
    assert all(len(vectors) == encoder.tokens_for(32, 32) for vectors in ours)
    for text, vectors in zip(QUERIES, encoder.encode_texts(QUERIES)):
        _assert_same_vectors([torch.from_numpy(vectors)], _reference_hf("colpali", folder, text=text))


# --- Varlen attention for the vision tower -------------------------------------------------------------------

def test_varlen_interface_gives_the_sdpa_vectors(tiny_models: Path) -> None:
    """The registered interface gets each image's (or window's) bounds right: on CPU it runs its per-sequence
    sdpa fallback, so the vectors must not move. (CUDA runs torch's varlen kernel: the GPU test below.)"""
    from pipeline.encode.models.varlen import ATTENTION_NAME, register, set_vision_attention

    encoder = load_encoder(_cpu(tiny_models / "colqwen2_5"))
    assert encoder.model.visual.config._attn_implementation == "sdpa"  # CPU keeps sdpa
    pixels = _pipeline_pixels(encoder, PHOTOS[:4])
    with_sdpa = encoder.encode_image_list(pixels)
    set_vision_attention(encoder.model.visual, register())
    assert encoder.model.visual.config._attn_implementation == ATTENTION_NAME
    assert encoder.model.language_model.config._attn_implementation == "sdpa"  # the language model keeps sdpa
    for ours, theirs in zip(encoder.encode_image_list(pixels), with_sdpa):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention runs on CUDA only")
@pytest.mark.parametrize(("family", "kind"), [("colqwen2_5", "auto"), ("colqwen2", "auto"),
                                              ("qwen_vl", "qwen_vl_features"), ("qwen3_vl", "qwen_vl_features")])
def test_varlen_attention_matches_sdpa_on_cuda(tiny_models: Path, family: str, kind: str) -> None:
    """On CUDA in bfloat16 the vision tower uses torch's varlen kernel: the same vectors as sdpa."""
    from pipeline.encode.models.varlen import ATTENTION_NAME, set_vision_attention

    encoder = load_encoder(EncoderConfig(model=str(tiny_models / family), kind=kind, device="cuda",
                                         dtype="bfloat16"))
    visual = encoder.model.vlm.visual if family == "colqwen2" else getattr(encoder.model, "visual", encoder.model)
    assert visual.config._attn_implementation == ATTENTION_NAME
    pixels = _pipeline_pixels(encoder, PHOTOS)
    with_varlen = encoder.encode_image_list(pixels)
    set_vision_attention(visual, "sdpa")
    with_sdpa = encoder.encode_image_list(pixels)
    for ours, theirs in zip(with_varlen, with_sdpa):
        cosine = torch.nn.functional.cosine_similarity(ours.float(), theirs.float(), dim=-1)
        assert cosine.min() >= 0.99, f"worst cosine {cosine.min():.4f}"  # bfloat16: both round differently


# --- Through the pipeline: embindex run, then query ----------------------------------------------------------

# colqwen2 stores rows exactly as colqwen2_5 does; colpali is the fixed-size multi-vector case.
@pytest.mark.parametrize("family", ["colqwen2_5_adapter", "biqwen2_5", "colpali"])
def test_indexed_rows_and_query_by_image(tmp_path: Path, tiny_models: Path, family: str) -> None:
    """`embindex run` stores each image's real token rows (float16, unit length) or its one vector; an image,
    encoded again at query time, finds its own row first (MaxSim for multi-vector rows)."""
    import lancedb

    from pipeline.config import load_config
    from pipeline.runners.local import run_index
    from pipeline.search.query import Index
    from tests.conftest import write_config

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in PHOTOS:
        shutil.copy(path, photos / path.name)
    config_path = write_config(tmp_path, str(photos), str(tiny_models / family),
                               output={"parquet": None}, encoder={"device": "cpu"})
    assert run_index(load_config(config_path), progress=False).exit_code == 0
    table = lancedb.connect(str(tmp_path / "index")).open_table("images").to_arrow()
    assert table.num_rows == len(PHOTOS)
    encoder = load_encoder(_cpu(tiny_models / family))
    spec = encoder.input_spec()
    for row in table.to_pylist():
        vectors = np.asarray(row["embedding"], dtype=np.float32)
        if encoder.multivector:
            pixels = decode_file(str(photos / row["path"]), spec, 10**8).pixels
            assert vectors.shape == (encoder.tokens_for(*pixels.shape[:2]), 128)
        else:
            assert vectors.shape == (encoder.dim,)
        assert np.isfinite(vectors).all()
        assert np.allclose(np.linalg.norm(np.atleast_2d(vectors), axis=-1), 1.0, atol=2e-3)  # float16 rows
    index = Index.open(config_path)
    for path in PHOTOS[:3]:
        vector = index.image_vector(_pil(path))  # a PIL image: encoded again, not read back from the table
        hits = index.search_vector(vector, k=3)
        assert hits["path"][0].as_py() == path.name
    assert index.search_text("a photo of a dog", k=3).num_rows == 3
