"""Model config: a Qwen2 config plus the LLaVA-Video multimodal keys (model_type "llava_qwen")."""

from __future__ import annotations

from transformers import AutoConfig, Qwen2Config, SiglipVisionConfig

# Vision towers a checkpoint may name by hub id: resolved here, never fetched.
KNOWN_VISION_TOWERS = {
    "google/siglip-so400m-patch14-384": {
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
        "image_size": 384, "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
    },
}
POOL_MODES = ("bilinear", "average", "max")
TUNABLE_PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model")


class StreamVLNConfig(Qwen2Config):
    """config.json of LLaVA-Video-7B-Qwen2 / StreamVLN loads as is; `vision_config` may be given inline."""

    model_type = "llava_qwen"

    def __init__(self, mm_vision_tower: str = "google/siglip-so400m-patch14-384", mm_projector_type: str = "mlp2x_gelu",
                 mm_hidden_size: int | None = None, mm_vision_select_layer: int = -2,
                 mm_spatial_pool_mode: str = "bilinear", mm_spatial_pool_stride: int = 2,
                 mm_tunable_parts: str = ",".join(TUNABLE_PARTS), vision_config: dict | None = None, **kwargs):
        self.mm_vision_tower = mm_vision_tower
        self.mm_projector_type = mm_projector_type
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_spatial_pool_mode = mm_spatial_pool_mode
        self.mm_spatial_pool_stride = mm_spatial_pool_stride
        self.mm_tunable_parts = mm_tunable_parts
        self.vision_config = dict(vision_config) if vision_config else None
        self.mm_hidden_size = mm_hidden_size
        super().__init__(**kwargs)
        if self.mm_hidden_size is None:
            self.mm_hidden_size = self.vision_tower_config().hidden_size

    def vision_tower_config(self) -> SiglipVisionConfig:
        """The SigLIP config, truncated after the selected layer (the reference drops the last layer)."""
        spec = self.vision_config or KNOWN_VISION_TOWERS.get(self.mm_vision_tower)
        if spec is None:
            raise ValueError(f"unknown vision tower {self.mm_vision_tower!r}: no network access here, so put its "
                             f"SigLIP settings under 'vision_config' in config.json (known: "
                             f"{', '.join(KNOWN_VISION_TOWERS)})")
        if self.mm_projector_type != "mlp2x_gelu":
            raise ValueError(f"mm_projector_type {self.mm_projector_type!r} is not supported (only mlp2x_gelu)")
        if self.mm_spatial_pool_mode not in POOL_MODES:
            raise ValueError(f"mm_spatial_pool_mode must be one of {POOL_MODES}, got {self.mm_spatial_pool_mode!r}")
        spec = {k: v for k, v in spec.items() if k not in ("model_type", "architectures", "transformers_version")}
        total = spec["num_hidden_layers"]
        select = self.mm_vision_select_layer
        spec["num_hidden_layers"] = total + 1 + select if select < 0 else select
        return SiglipVisionConfig(**spec, vision_use_head=False, attn_implementation="sdpa")


AutoConfig.register("llava_qwen", StreamVLNConfig, exist_ok=True)
