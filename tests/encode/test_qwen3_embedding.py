"""Qwen3-VL-Embedding (`encoder.kind: qwen3_vl_embedding`) against its official recipe written out on the same tiny
weights: images of mixed sizes, text queries, Matryoshka truncation, detection, and an index built and searched."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLPreTrainedModel

from pipeline.config import EncoderConfig
from pipeline.decode.image import decode_file
from pipeline.encode.models.load import load_encoder
from pipeline.encode.models.qwen3_embedding import DOCUMENT_INSTRUCTION, QUERY_INSTRUCTION, chat_prompt
from pipeline.encode.models.source import describe_model
from pipeline.errors import ConfigError
from tests.conftest import IMAGES

FAMILY = "qwen3_vl_embedding"
# The official Qwen3VLEmbedder's constants (QwenLM/Qwen3-VL-Embedding, src/models/qwen3_vl_embedding.py).
IMAGE_FACTOR = 16 * 2
MIN_PIXELS, MAX_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR, 1800 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_LENGTH = 8192
QUERIES = ["a photo of a dog", "where is the red car parked on the street at night?", "cat"]


def _cpu(folder: Path, **options: object) -> EncoderConfig:
    return EncoderConfig(model=str(folder), device="cpu", **options)


def _photos(count: int) -> list[Path]:
    """Photos whose official resize (multiples of 32) gives each a grid of its own: mixed sizes in one batch."""
    chosen: dict[tuple[int, int], Path] = {}
    for path in sorted(IMAGES.iterdir()):
        with Image.open(path) as image:
            chosen.setdefault(_smart_resize(image.height, image.width, IMAGE_FACTOR, MIN_PIXELS, MAX_PIXELS), path)
        if len(chosen) == count:
            break
    return list(chosen.values())


# --- The official recipe, written out (qwen_vl_utils, Qwen3VLProcessor and torchvision cannot be installed) -----

def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen_vl_utils.vision_process.smart_resize."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _fetch_image(path: Path, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """qwen_vl_utils.fetch_image: open, RGB (RGBA onto white), smart resize, PIL's default (bicubic) resize."""
    image = Image.open(path)
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        image = white
    else:
        image = image.convert("RGB")
    height, width = _smart_resize(image.height, image.width, IMAGE_FACTOR, min_pixels, max_pixels)
    return image.resize((width, height))


class Qwen3VLForEmbedding(Qwen3VLPreTrainedModel):
    """The official model class: Qwen3VLModel as `self.model`, its last hidden state returned."""

    _checkpoint_conversion_mapping: dict[str, str] = {}

    def __init__(self, config: object) -> None:
        super().__init__(config)
        self.model = Qwen3VLModel(config)
        self.post_init()

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).last_hidden_state


@functools.lru_cache(maxsize=1)
def _official(folder: Path) -> tuple[Qwen3VLForEmbedding, object, object]:
    model = Qwen3VLForEmbedding.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)


def _conversation(instruction: str, content: dict) -> list[dict]:
    """Qwen3VLEmbedder.format_model_input for one image or one text."""
    return [{"role": "system", "content": [{"type": "text", "text": instruction}]},
            {"role": "user", "content": [content]}]


def _official_process(folder: Path, texts: list[str], images: list[Image.Image] | None = None) -> torch.Tensor:
    """Qwen3VLEmbedder._preprocess_inputs + process: the chat template with the generation prompt, the processor's
    work (do_resize=False: one <|image_pad|> per image token, right padding, truncation, mm_token_type_ids),
    the forward, the last real token, L2."""
    model, tokenizer, image_processor = _official(folder)
    inputs: dict[str, torch.Tensor] = {}
    if images is not None:
        vision = image_processor(images=images, do_resize=False, return_tensors="pt")
        counts = iter((vision["image_grid_thw"].prod(-1) // 4).tolist())
        texts = [text.replace("<|image_pad|>", "<|placeholder|>" * next(counts)).replace("<|placeholder|>",
                                                                                          "<|image_pad|>")
                 for text in texts]
        inputs = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
    tokens = tokenizer(texts, padding=True, padding_side="right", truncation=True, max_length=MAX_LENGTH,
                       return_tensors="pt")
    image_token = model.config.image_token_id
    with torch.inference_mode():
        hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       mm_token_type_ids=(tokens["input_ids"] == image_token).int(), **inputs)
    mask = tokens["attention_mask"]
    last = mask.shape[1] - mask.flip(dims=[1]).argmax(dim=1) - 1
    return torch.nn.functional.normalize(hidden[torch.arange(len(hidden)), last], p=2, dim=-1)


def _official_images(folder: Path, images: list[Image.Image]) -> torch.Tensor:
    _, tokenizer, _ = _official(folder)
    conversations = [_conversation(DOCUMENT_INSTRUCTION, {"type": "image", "image": image}) for image in images]
    texts = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    return _official_process(folder, texts, images)


def _official_queries(folder: Path, queries: list[str]) -> torch.Tensor:
    _, tokenizer, _ = _official(folder)
    conversations = [_conversation(QUERY_INSTRUCTION, {"type": "text", "text": text}) for text in queries]
    return _official_process(folder, tokenizer.apply_chat_template(conversations, add_generation_prompt=True,
                                                                   tokenize=False))


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    cosine = torch.nn.functional.cosine_similarity(ours.float(), theirs.float(), dim=-1)
    assert cosine.min() >= 0.9999, f"worst cosine {cosine.min():.6f}"
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(ours)), atol=1e-5)


# --- Vectors ------------------------------------------------------------------------------------------------------

def test_the_prompts_are_what_the_chat_template_renders(tiny_models: Path) -> None:
    _, tokenizer, _ = _official(tiny_models / FAMILY)
    image = _conversation(DOCUMENT_INSTRUCTION, {"type": "image", "image": Image.new("RGB", (32, 32))})
    rendered = tokenizer.apply_chat_template(image, add_generation_prompt=True, tokenize=False)
    assert rendered == chat_prompt(DOCUMENT_INSTRUCTION, "<|vision_start|><|image_pad|><|vision_end|>") == (
        "<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    query = _conversation(QUERY_INSTRUCTION, {"type": "text", "text": "a dog"})
    assert tokenizer.apply_chat_template(query, add_generation_prompt=True, tokenize=False) == \
        chat_prompt(QUERY_INSTRUCTION, "a dog")


def test_images_of_mixed_sizes_match_the_official_recipe(tiny_models: Path) -> None:
    """The decode workers' pixels are the official resize's, and a mixed-size batch, split and ordered otherwise
    than the reference batch, gives every image the official vector."""
    folder = tiny_models / FAMILY
    encoder = load_encoder(_cpu(folder))
    assert encoder.kind == FAMILY and not encoder.multivector and encoder.dim == 64
    spec = encoder.input_spec()
    assert (spec.factor, spec.min_pixels, spec.max_pixels) == (IMAGE_FACTOR, MIN_PIXELS, MAX_PIXELS)
    photos = _photos(6)
    official_images = [_fetch_image(path) for path in photos]
    pixels = [torch.from_numpy(decode_file(str(path), spec, 10**8).pixels.copy()) for path in photos]
    assert len({tuple(p.shape) for p in pixels}) == len(photos)  # every image a grid of its own
    for image, mine in zip(official_images, pixels):
        assert np.array_equal(np.asarray(image), mine.numpy())  # same resize, same pixels
    order = [4, 0, 2, 5, 1, 3]
    first = encoder.encode_image_list([pixels[i] for i in order[:4]])
    second = encoder.encode_image_list([pixels[i] for i in order[4:]])
    ours = torch.zeros(len(photos), encoder.dim)
    for index, vector in zip(order, first + second):
        assert vector.shape == (1, encoder.dim)
        ours[index] = vector[0]
    _assert_close(ours, _official_images(folder, official_images))
    image_tokens = [int(np.prod(p.shape[:2])) // IMAGE_FACTOR ** 2 for p in pixels]
    assert [encoder.tokens_for(*p.shape[:2]) - n for p, n in zip(pixels, image_tokens)] == [len(encoder._before) +
                                                                                          len(encoder._after)] * 6


def test_text_queries_match_the_official_recipe(tiny_models: Path) -> None:
    folder = tiny_models / FAMILY
    encoder = load_encoder(_cpu(folder))
    ours = encoder.encode_texts(QUERIES)  # one right-padded batch of three lengths
    assert ours.shape == (len(QUERIES), 64) and ours.dtype == np.float32
    _assert_close(torch.from_numpy(ours), _official_queries(folder, QUERIES))
    alone = np.concatenate([encoder.encode_texts([text]) for text in QUERIES])
    assert np.allclose(ours, alone, atol=1e-5)  # a query's vector does not depend on its batch


def test_dim_truncates_then_renormalises(tiny_models: Path) -> None:
    folder = tiny_models / FAMILY
    full, short = load_encoder(_cpu(folder)), load_encoder(_cpu(folder, dim=16))
    assert short.dim == 16 and short.fingerprint()["dim"] == 16 and full.fingerprint()["dim"] == 64
    described = describe_model(_cpu(folder, dim=16))
    assert described.identity() == short.fingerprint()  # the index's identity states the dim before loading
    assert "dim" not in describe_model(_cpu(folder)).identity()
    pixels = [torch.from_numpy(decode_file(str(path), short.input_spec(), 10**8).pixels.copy())
              for path in _photos(3)]
    expected = torch.nn.functional.normalize(torch.cat(full.encode_image_list(pixels))[:, :16], dim=-1)
    assert torch.allclose(torch.cat(short.encode_image_list(pixels)), expected, atol=1e-6)
    texts = torch.nn.functional.normalize(torch.from_numpy(full.encode_texts(QUERIES))[:, :16], dim=-1)
    assert torch.allclose(torch.from_numpy(short.encode_texts(QUERIES)), texts, atol=1e-6)
    with pytest.raises(ConfigError, match="encoder.dim: 65 is not between 1 and the model's 64 dimensions"):
        load_encoder(_cpu(folder, dim=65))
    with pytest.raises(ConfigError, match="encoder.dim: applies only to Matryoshka models"):
        describe_model(_cpu(tiny_models / "clip", dim=16))
    with pytest.raises(ConfigError, match="encoder.dim: applies only to Matryoshka models"):
        describe_model(EncoderConfig(kind="http", url="http://127.0.0.1:9", model="m", dim=16))


def test_pixel_budget_keys(tiny_models: Path) -> None:
    """The recipe's bounds unless encoder.quality / min_pixels / max_pixels say otherwise (tokens of 32x32)."""
    folder = tiny_models / FAMILY
    spec = describe_model(_cpu(folder, quality="fast")).spec
    assert (spec.min_pixels, spec.max_pixels, spec.factor) == (128 * 1024, 256 * 1024, 32)
    spec = describe_model(_cpu(folder, max_pixels=64 * 1024)).spec
    assert (spec.min_pixels, spec.max_pixels) == (MIN_PIXELS, 64 * 1024)
    encoder = load_encoder(_cpu(folder, max_pixels=64 * 1024))
    photo = _photos(1)[0]
    pixels = torch.from_numpy(decode_file(str(photo), encoder.input_spec(), 10**8).pixels.copy())
    assert tuple(pixels.shape[:2]) == _fetch_image(photo, max_pixels=64 * 1024).size[::-1]
    _assert_close(encoder.encode_image_list([pixels])[0],
                  _official_images(folder, [_fetch_image(photo, max_pixels=64 * 1024)]))


def test_varlen_interface_gives_the_sdpa_vectors(tiny_models: Path) -> None:
    """On CUDA the vision tower gets varlen attention (one call per block for the whole batch); its CPU fallback
    runs each image through sdpa, so here the vectors must not move: Qwen3-VL passes it each image's bounds."""
    from pipeline.encode.models.varlen import ATTENTION_NAME, register, set_vision_attention

    encoder = load_encoder(_cpu(tiny_models / FAMILY))
    assert encoder.model.visual.config._attn_implementation == "sdpa"  # CPU keeps sdpa
    pixels = [torch.from_numpy(decode_file(str(path), encoder.input_spec(), 10**8).pixels.copy())
              for path in _photos(4)]
    with_sdpa = torch.cat(encoder.encode_image_list(pixels))
    set_vision_attention(encoder.model.visual, register())
    assert encoder.model.visual.config._attn_implementation == ATTENTION_NAME
    assert encoder.model.language_model.config._attn_implementation == "sdpa"
    assert torch.allclose(torch.cat(encoder.encode_image_list(pixels)), with_sdpa, atol=1e-5)


# --- Detection ------------------------------------------------------------------------------------------------------

def _copy_without(folder: Path, target: Path, *names: str) -> Path:
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(*names))
    return target


def test_kind_is_detected_from_the_sentence_transformers_files(tiny_models: Path, tmp_path: Path) -> None:
    folder = tiny_models / FAMILY
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert describe_model(_cpu(folder)).kind == FAMILY
    older_pooling = _copy_without(folder, tmp_path / "older")
    (older_pooling / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
         "pooling_mode_lasttoken": True, "include_prompt": True}))
    assert describe_model(_cpu(older_pooling)).kind == FAMILY
    bare = _copy_without(folder, tmp_path / "bare", "modules.json", "1_Pooling")  # a snapshot from before them
    with pytest.raises(ConfigError, match="chat model"):
        describe_model(_cpu(bare))
    assert describe_model(_cpu(bare, kind=FAMILY)).kind == FAMILY
    mean = _copy_without(folder, tmp_path / "mean")
    (mean / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    with pytest.raises(ConfigError, match="chat model"):
        describe_model(_cpu(mean))
    with pytest.raises(ConfigError, match="qwen3_vl_embedding needs a model of type qwen3_vl"):
        describe_model(_cpu(tiny_models / "colqwen2_5", kind=FAMILY))


# --- Through the pipeline: embindex run, then query ------------------------------------------------------------

@pytest.mark.parametrize("dim", [None, 16])
def test_an_index_answers_a_self_query_and_text(tmp_path: Path, tiny_models: Path, dim: int | None) -> None:
    import lancedb

    from pipeline.config import load_config
    from pipeline.runners.local import run_index
    from pipeline.search.query import Index
    from tests.conftest import write_config

    photos = tmp_path / "photos"
    photos.mkdir()
    chosen = _photos(5)
    for path in chosen:
        shutil.copy(path, photos / path.name)
    encoder_options = {"device": "cpu", "max_pixels": 64 * 1024, **({"dim": dim} if dim else {})}
    config_path = write_config(tmp_path, str(photos), str(tiny_models / FAMILY), output={"parquet": None},
                               encoder=encoder_options)
    assert run_index(load_config(config_path), progress=False).exit_code == 0
    rows = lancedb.connect(str(tmp_path / "index")).open_table("images").to_arrow().to_pylist()
    assert len(rows) == len(chosen)
    for row in rows:
        vector = np.asarray(row["embedding"], dtype=np.float32)
        assert vector.shape == (dim or 64,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    index = Index.open(config_path)
    for path in chosen[:3]:
        assert index.search_image(photos / path.name, k=3)["path"][0].as_py() == path.name
        again = index.image_vector(Image.open(path))  # a PIL image: encoded again, not read from the table
        hits = index.search_vector(again, k=3)
        assert hits["path"][0].as_py() == path.name and hits["score"][0].as_py() > 0.9999
    hits = index.search_text("a photo of a dog", k=3)
    assert hits.num_rows == 3 and hits["rank"].to_pylist() == [1, 2, 3]
