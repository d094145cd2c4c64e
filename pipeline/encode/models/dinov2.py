"""DINOv2: the layer-normed CLS token; image only."""

from __future__ import annotations

import torch

from pipeline.encode.models.base import HFSingleVectorEncoder


class Dinov2Encoder(HFSingleVectorEncoder):
    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output
