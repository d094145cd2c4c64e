"""Forward FLOPs per image (2 x multiply-adds) of each encoder family, counted from its config and token counts."""

# Counted: every matrix product (Linear, patch-embedding convolution, attention scores and weighted sums).
# Not counted: norms, softmax, activations, rotary and residual adds (elementwise: under 1 % of a ViT's count).
# The checks (tests/encode/test_flops.py): CLIP ViT-B/16 at 224 px = 35.1 GFLOP (the "17.6 GFLOPs" often quoted is
# multiply-adds); ColQwen2.5-3B at 768 image tokens = 8.66 TFLOP (vision 4.16, LM 4.50) against MODELS.md's measured
# 8.3 (3.9 + 4.4): +4 %, about the attention scores (0.22 T vision, 0.18 T LM) that a fused kernel hides from a counter.

from __future__ import annotations

from typing import Any

Config = Any  # a transformers PretrainedConfig (or anything with its attributes)


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    """A Linear (or a patch convolution, which is one) over `tokens` rows: d_in x d_out multiply-adds per row."""
    return 2.0 * tokens * d_in * d_out


def attention_flops(span_squares: int, q_dim: int) -> float:
    """Scores (Q K^T) and the weighted sum (A V): per head n^2 x head_dim multiply-adds each, so 2 x n^2 x
    q_dim over all heads; `span_squares` = the sum of n^2 over the sequences (or windows) attended."""
    return 2.0 * 2.0 * span_squares * q_dim


def mlp_flops(tokens: int, hidden: int, intermediate: int, gated: bool) -> float:
    """fc1 + fc2 (2 matrices), or SwiGLU's gate, up and down projections (3)."""
    return linear_flops(tokens, hidden, intermediate) * (3 if gated else 2)


def self_attention_flops(tokens: int, span_squares: int, hidden: int, q_dim: int, kv_dim: int) -> float:
    """Q, K, V and output projections (K and V narrower under grouped-query attention) plus the quadratic term."""
    projections = linear_flops(tokens, hidden, q_dim + 2 * kv_dim) + linear_flops(tokens, q_dim, hidden)
    return projections + attention_flops(span_squares, q_dim)


# --- ViT image towers: CLIP, SigLIP, DINOv2 ------------------------------------------------------------------

def vit_flops(vision: Config, height: int, width: int, cls_tokens: int, projection_dim: int | None = None,
              pooling_head: bool = False) -> float:
    """A ViT at height x width: patch embedding, `num_hidden_layers` pre-norm blocks over patches + CLS (+ DINOv2
    registers), then CLIP's projection of the pooled token or SigLIP's attention-pooling head."""
    patch, hidden = int(vision.patch_size), int(vision.hidden_size)
    patches = (height // patch) * (width // patch)
    tokens = patches + cls_tokens
    total = linear_flops(patches, int(getattr(vision, "num_channels", 3)) * patch * patch, hidden)  # patch conv
    if getattr(vision, "use_swiglu_ffn", False):  # DINOv2-giant: HF's Dinov2SwiGLUFFN sizes, weights_in is 2 wide
        inner = (int(int(hidden * vision.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        mlp = mlp_flops(tokens, hidden, inner, gated=True)
    else:  # CLIP/SigLIP give intermediate_size, DINOv2 mlp_ratio
        inner = int(getattr(vision, "intermediate_size", None) or hidden * vision.mlp_ratio)
        mlp = mlp_flops(tokens, hidden, inner, gated=False)
    layer = self_attention_flops(tokens, tokens ** 2, hidden, hidden, hidden) + mlp
    total += int(vision.num_hidden_layers) * layer
    if projection_dim:  # CLIP's visual_projection of the pooled (CLS) token
        total += linear_flops(1, hidden, projection_dim)
    if pooling_head:  # SigLIP's MAP head: one probe query attends every patch, then an MLP on that one token
        inner = int(vision.intermediate_size)
        total += (linear_flops(1, hidden, hidden) + linear_flops(tokens, hidden, 2 * hidden)  # q; k, v
                  + attention_flops(tokens, hidden) + linear_flops(1, hidden, hidden)  # 1 x n scores; out
                  + mlp_flops(1, hidden, inner, gated=False))
    return total


# --- Qwen-VL vision towers -----------------------------------------------------------------------------------

def _window_spans(cells: int, window: int) -> list[int]:
    """Qwen2.5-VL cuts a side of `cells` merged tokens into windows of `window`, the last one partial."""
    return [window] * (cells // window) + ([cells % window] if cells % window else [])


def qwen_vision_flops(vision: Config, grid_h: int, grid_w: int) -> float:
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL vision tower over one image of grid_h x grid_w patches."""
    patches, merge = grid_h * grid_w, int(vision.spatial_merge_size)
    unit = merge * merge  # patches per merged (language-model) token
    pixels_per_patch = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
    qwen2 = hasattr(vision, "embed_dim")  # Qwen2-VL: embed_dim + mlp_ratio, GELU MLP; hidden_size = merger's output
    hidden = int(vision.embed_dim if qwen2 else vision.hidden_size)
    out_dim = int(vision.hidden_size if qwen2 else vision.out_hidden_size)
    total = linear_flops(patches, pixels_per_patch, hidden)  # Conv3d patch embedding
    full = patches ** 2  # one image attends to itself (cu_seqlens per image)
    windowed, fullatt = full, getattr(vision, "fullatt_block_indexes", None)
    if fullatt is not None:  # Qwen2.5-VL: window_size px windows (112 = 4 x 4 merged tokens) but in these layers
        window = int(vision.window_size) // merge // int(vision.patch_size)
        rows = sum(n * n for n in _window_spans(grid_h // merge, window))
        cols = sum(n * n for n in _window_spans(grid_w // merge, window))
        windowed = rows * cols * unit * unit  # sum over windows of (r x c x unit)^2
    for layer in range(int(vision.depth)):
        spans = full if fullatt is None or layer in fullatt else windowed
        if qwen2:
            mlp = mlp_flops(patches, hidden, int(hidden * vision.mlp_ratio), gated=False)
        else:  # Qwen2.5-VL: SwiGLU; Qwen3-VL: linear_fc1/fc2 with GELU
            mlp = mlp_flops(patches, hidden, int(vision.intermediate_size), gated=fullatt is not None)
        total += self_attention_flops(patches, spans, hidden, hidden, hidden) + mlp
    # The patch merger: 2 x 2 patches concatenated -> Linear(4h, 4h) -> GELU -> Linear(4h, out); Qwen3-VL runs one
    # more per DeepStack layer (deepstack_visual_indexes).
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ())
    merged, wide = patches // unit, hidden * unit
    total += mergers * (linear_flops(merged, wide, wide) + linear_flops(merged, wide, out_dim))
    return total


# --- Qwen-VL language models ---------------------------------------------------------------------------------

def language_model_flops(text: Config, tokens: int) -> float:
    """A decoder over one sequence of `tokens` (the image's tokens and the prompt's): GQA attention, SwiGLU MLP.
    The attention term is the full n^2: sdpa with a padding mask computes every score, the causal half included."""
    hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)  # Qwen3 sets head_dim; Qwen2/2.5 derive it
    q_dim, kv_dim = heads * head_dim, int(text.num_key_value_heads) * head_dim
    layer = (self_attention_flops(tokens, tokens ** 2, hidden, q_dim, kv_dim)
             + mlp_flops(tokens, hidden, int(text.intermediate_size), gated=True))
    return int(text.num_hidden_layers) * layer


# --- Encoders --------------------------------------------------------------------------------------------------

def _vision_language_flops(encoder: Any, height: int, width: int) -> float | None:
    kind, config = encoder.kind, encoder.model.config
    _, grid_h, grid_w = encoder.patchify.grid(height, width)
    if kind == "qwen_vl_features":  # the vision tower alone (its config is the vision config)
        return qwen_vision_flops(config, grid_h, grid_w)
    tokens = encoder.tokens_for(height, width)  # image tokens + the fixed prompt's
    projection = 0.0
    if kind == "colqwen2":  # ColQwen2ForRetrieval: the VLM's config inside, embedding_proj_layer on every token
        projection = linear_flops(tokens, int(config.vlm_config.text_config.hidden_size), int(config.embedding_dim))
        config = config.vlm_config
    elif kind == "colqwen2_5":  # custom_text_proj (hidden -> 128) on every token
        projection = linear_flops(tokens, int(config.text_config.hidden_size), int(encoder.dim))
    elif kind not in ("biqwen2_5", "qwen3_vl_embedding"):  # these take the last hidden state: no head
        return None
    return (qwen_vision_flops(config.vision_config, grid_h, grid_w)
            + language_model_flops(config.text_config, tokens) + projection)


def image_flops(encoder: Any, height: int, width: int) -> float | None:
    """Forward FLOPs for one image of height x width as the encoder is given it (smart-resized, or its fixed
    size); None for an encoder this module does not count (an HTTP endpoint, ColPali)."""
    base = getattr(encoder, "base", None)
    if base is not None:  # pyramid tiles: the base encoder once per tile, each tile height x width
        per_tile = image_flops(base, height, width)
        return None if per_tile is None else encoder.n_tiles * per_tile
    kind, model = getattr(encoder, "kind", None), getattr(encoder, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return None
    if kind == "clip":
        return vit_flops(config.vision_config, height, width, 1, projection_dim=int(config.projection_dim))
    if kind in ("siglip", "siglip2"):  # no CLS token
        vision = config.vision_config
        return vit_flops(vision, height, width, 0, pooling_head=bool(getattr(vision, "vision_use_head", True)))
    if kind == "dinov2":
        return vit_flops(config, height, width, 1 + int(getattr(config, "num_register_tokens", 0) or 0))
    if hasattr(encoder, "patchify"):
        return _vision_language_flops(encoder, height, width)
    return None


class ImageFlops:
    """image_flops for one encoder, cached by size: a run sees few distinct sizes (one, when fixed)."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self._by_size: dict[tuple[int, int], float | None] = {}

    def __call__(self, height: int, width: int) -> float | None:
        key = (height, width)
        if key not in self._by_size:
            try:
                self._by_size[key] = image_flops(self.encoder, height, width)
            except (AttributeError, TypeError, ValueError):  # a config missing a size: the report says null
                self._by_size[key] = None
        return self._by_size[key]
