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
# how a vision tower built from scratch starts its position embedding (a loaded checkpoint keeps its own)
POSITION_INITS = ("normal", "sincos")
TUNABLE_PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model")
REFERENCE_POOL_STRIDE = 2  # the reference's get_2dPool pools with stride 2 whatever config.json says

# Every key beyond Qwen2's that a LLaVA-Video-7B-Qwen2 release or the reference's StreamVLN training
# (streamvln_train.py's overwrites, LLaVA's initialize_vision_modules) writes into config.json, and
# why this model ignores it. The keys it uses are the constructor's arguments; CHECKED_KEYS are
# ignored only at the values the reference's StreamVLN path itself ignores. docs/model.md lists them.
IGNORED_KEYS = {
    "image_aspect_ratio": "LLaVA's still-image tiling; StreamVLN squashes every frame to the tower's square input",
    "image_grid_pinpoints": "the same tiling",
    "image_crop_resolution": "the same tiling",
    "image_split_resolution": "the same tiling",
    "mm_newline_position": "newline tokens between grids or frames; StreamVLN's frame path adds none",
    "mm_patch_merge_type": "read only to decide whether the checkpoint has model.image_newline ('unpad' in it)",
    "tokenizer_padding_side": "batches are right-padded as the reference's collate does",
    "tokenizer_model_max_length": "the reference cuts spliced sequences to it; the loader leaves longer samples out",
    "faster_token_stride": "LLaVA-Video's 'faster' tokens, off (add_faster_video is checked)",
    "force_sample": "a data-time setting: the video QA shard options",
    "add_time_instruction": "a data-time setting: the video QA shard options",
    "mm_projector_lr": "a training setting: the train config's projector_lr",
    "mm_vision_tower_lr": "a training setting: the train config's vision_lr",
    "tune_mm_mlp_adapter": "a training switch: mm_tunable_parts decides",
    "tune_mm_vision_resampler": "a training switch: there is no resampler",
    "freeze_mm_mlp_adapter": "a training switch: mm_tunable_parts decides",
    "freeze_mm_vision_resampler": "a training switch: there is no resampler",
    "unfreeze_mm_vision_tower": "a training switch: mm_tunable_parts decides",
    "use_mm_proj": "the projector always exists",
    "mm_use_im_patch_token": "tokenizer setup (false in the reference): no patch tokens",
    "vision_tower_pretrained": "the tower's weights come from the checkpoint itself",
    "mm_spatial_pool_out_channels": "a resampler setting; there is no resampler",
    "pos_skipping_range": "used only with use_pos_skipping, which is checked",
}
CHECKED_KEYS = {  # key: (values this model reproduces, what another value would mean)
    "mm_vision_select_feature": (("patch", None), "'cls_patch' keeps a CLS token, which SigLIP does not have"),
    "mm_use_im_start_end": ((False, None), "each image wrapped in <im_start>/<im_end> tokens"),
    "mm_resampler_type": ((None, "spatial_pool"), "a learnt resampler between projector and language model"),
    "add_faster_video": ((False, None), "LLaVA-Video's extra 'faster' token stream"),
    "use_pos_skipping": ((False, None), "position-id skipping during training"),
}


class StreamVLNConfig(Qwen2Config):
    """config.json of LLaVA-Video-7B-Qwen2 / StreamVLN loads as is; `vision_config` may be given inline."""

    model_type = "llava_qwen"

    def __init__(self, mm_vision_tower: str = "google/siglip-so400m-patch14-384", mm_projector_type: str = "mlp2x_gelu",
                 mm_hidden_size: int | None = None, mm_vision_select_layer: int = -2,
                 mm_spatial_pool_mode: str = "bilinear", mm_spatial_pool_stride: int | None = REFERENCE_POOL_STRIDE,
                 mm_tunable_parts: str | None = ",".join(TUNABLE_PARTS), vision_config: dict | None = None,
                 mm_patch_merge_type: str = "spatial_unpad", output_vocab: list[int] | None = None,
                 vision_position_init: str = "normal", **kwargs):
        self.mm_vision_tower = mm_vision_tower
        # Token ids the LM head may predict (an option for tiny models, off by default: the reference predicts
        # the whole vocabulary). Set by training with `output_vocab: labels`; inference masks the rest out.
        self.output_vocab = sorted(int(t) for t in output_vocab) if output_vocab else None
        self.mm_projector_type = mm_projector_type
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_spatial_pool_mode = mm_spatial_pool_mode
        # The reference's training copies its run argument, None by default, into config.json; its
        # model never reads the key and pools with stride 2, so None means 2 here.
        self.mm_spatial_pool_stride = REFERENCE_POOL_STRIDE if mm_spatial_pool_stride is None else mm_spatial_pool_stride
        self.mm_tunable_parts = mm_tunable_parts or ",".join(TUNABLE_PARTS)
        self.vision_config = dict(vision_config) if vision_config else None
        self.mm_hidden_size = mm_hidden_size
        # LLaVA creates model.image_newline only when 'unpad' is in mm_patch_merge_type: the
        # LLaVA-Video release ("spatial_unpad") has the tensor, the reference's training ("flat") not.
        self.mm_patch_merge_type = mm_patch_merge_type
        # An option for towers trained from scratch, off by default (SigLIP's N(0, 1/sqrt(width)), as the reference
        # would get): "sincos" starts the patch positions as MAE's fixed 2D sin-cos table (still trained), so where
        # a patch lies is a smooth, large signal from the first step rather than a random code the size of a fifth
        # of the patch's content (docs/manip.md: what it changed on the tabletop).
        if vision_position_init not in POSITION_INITS:
            raise ValueError(f"vision_position_init must be one of {POSITION_INITS}, got {vision_position_init!r}")
        self.vision_position_init = vision_position_init
        for key, (allowed, meaning) in CHECKED_KEYS.items():
            if key in kwargs and kwargs[key] not in allowed:
                raise ValueError(f"config.json has {key}={kwargs[key]!r}: {meaning}, which this model does not "
                                 f"reproduce (supported: {', '.join(repr(a) for a in allowed)})")
        super().__init__(**kwargs)
        if self.mm_hidden_size is None:
            self.mm_hidden_size = self.vision_tower_config().hidden_size

    @classmethod
    def unrecognised_keys(cls, raw: dict) -> list[str]:
        """Keys of a config.json that are neither Qwen2's, nor used here, nor knowingly ignored."""
        known = set(Qwen2Config().to_dict()) | set(cls().to_dict()) | set(IGNORED_KEYS) | set(CHECKED_KEYS)
        return sorted(set(raw) - known - {"_name_or_path", "architectures", "transformers_version", "torch_dtype"})

    @property
    def has_image_newline(self) -> bool:
        return "unpad" in (self.mm_patch_merge_type or "")

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
        if not isinstance(self.mm_spatial_pool_stride, int) or self.mm_spatial_pool_stride < 1:
            raise ValueError(f"mm_spatial_pool_stride must be a positive integer, got {self.mm_spatial_pool_stride!r}")
        spec = {k: v for k, v in spec.items() if k not in ("model_type", "architectures", "transformers_version")}
        total = spec["num_hidden_layers"]
        select = self.mm_vision_select_layer
        spec["num_hidden_layers"] = total + 1 + select if select < 0 else select
        return SiglipVisionConfig(**spec, vision_use_head=False, attn_implementation="sdpa")


AutoConfig.register("llava_qwen", StreamVLNConfig, exist_ok=True)
