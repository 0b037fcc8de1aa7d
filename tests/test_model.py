"""The model: placement of history and current frames, pooling, loss only where labelled, checkpoint layouts."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from pipeline.tokens import IGNORE_INDEX
from streamvln.model import StreamVLNConfig, StreamVLNForCausalLM
from streamvln.model.build import apply_lora, optimizer_groups, set_tunable_parts
from streamvln.model.modeling import pool_frames
from streamvln.config import LoraSettings

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
              patch_size=14)


def tiny_config(**overrides) -> StreamVLNConfig:
    return StreamVLNConfig(**{**dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                     mm_vision_tower="tiny", vision_config=VISION, attn_implementation="sdpa"),
                              **overrides})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StreamVLNForCausalLM(tiny_config()).eval()


def hand_batch(n_history=3, uint8=False):
    """Sample 0: memory + two images (history 3 frames); sample 1: one image, no history, shorter (padded)."""
    ids0 = [5, 6, -300, 7, -200, 8, 9, -200, 10, 11]
    lab0 = [-100, -100, -100, -100, -100, -100, 9, -100, 10, 11]
    ids1 = [5, -200, 12, 13]
    lab1 = [-100, -100, 12, 13]
    pad = 0
    input_ids = torch.tensor([ids0, ids1 + [pad] * 6])
    labels = torch.tensor([lab0, lab1 + [-100] * 6])
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, n_history + 2, 3, 56, 56), generator=g, dtype=torch.uint8)
    images[1, 1:] = 0
    if not uint8:
        images = images.float() / 127.5 - 1
        images[1, 1:] = 0
    return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids != pad, "images": images,
            "n_images": torch.tensor([n_history + 2, 1]), "n_history": torch.tensor([n_history, 0])}


def test_placement_of_memory_and_images(model):
    b = hand_batch(n_history=3)
    embeds, labels, mask = model.embed_multimodal(b["input_ids"], b["labels"], b["attention_mask"], b["images"],
                                                  b["n_images"], b["n_history"])
    tokens = 4  # 56 / 14 = 4x4 patches, bilinear to ceil(4 / 2) = 2 per side
    frames = model.encode_frames(b["images"], b["n_images"])
    assert [f.shape for f in frames] == [(5, tokens, 32), (1, tokens, 32)]
    # sample 0: 2 text, memory = 3 history frames, 1 text, image, 2 text, image, 2 text
    assert embeds.shape == (2, 2 + 3 * tokens + 1 + tokens + 2 + tokens + 2, 32)
    text = model.model.embed_tokens(b["input_ids"].clamp(min=0))
    e = embeds[0]
    assert torch.equal(e[:2], text[0, :2])
    assert torch.allclose(e[2 : 2 + 12], frames[0][:3].reshape(12, 32))  # the whole history replaces <memory>
    assert torch.equal(e[14], text[0, 3])
    assert torch.allclose(e[15:19], frames[0][3])  # first current frame
    assert torch.allclose(e[21:25], frames[0][4])
    assert labels[0].tolist() == [-100] * 19 + [-100, 9] + [-100] * 4 + [10, 11]
    # sample 1 is right-padded, its visual positions unlabelled
    assert mask[1].sum() == 1 + tokens + 2 and not mask[1, 7:].any()
    assert labels[1, : 7].tolist() == [-100] * 5 + [12, 13] and (labels[1, 7:] == IGNORE_INDEX).all()


def test_any_history_length_and_placeholder_mismatch(model):
    for h in (1, 8, 11):  # the model does not assume exactly H history frames
        b = hand_batch(n_history=h)
        embeds, _, mask = model.embed_multimodal(b["input_ids"], b["labels"], b["attention_mask"], b["images"],
                                                 b["n_images"], b["n_history"])
        assert mask[0].sum() == 7 + (h + 2) * 4  # 7 text tokens
    b = hand_batch()
    b["n_history"] = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="sample 0: 2 <image> and 1 <memory> placeholders for 5 current and 0 history"):
        model(**b)


def test_uint8_frames_are_normalised_on_the_device(model):
    with torch.no_grad():
        a = model(**hand_batch(uint8=True))["loss"]
        raw = hand_batch(uint8=True)
        b = model(**{**raw, "images": raw["images"].float() / 127.5 - 1})["loss"]
    assert torch.allclose(a, b, atol=1e-6)


def assert_same_loss_and_gradients(model) -> dict:
    """The labelled-only loss (the default) against full logits: equal loss, predictions and gradients."""
    model.zero_grad()
    full = model(**hand_batch(), full_logits=True)
    full["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = model(**hand_batch())
    fast["loss"].backward()
    assert torch.allclose(full["loss"], fast["loss"], atol=1e-6)
    assert torch.equal(full["predictions"], fast["predictions"])
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    model.zero_grad()
    return fast


def test_labelled_only_loss_equals_full_loss_and_gradients(model):
    fast = assert_same_loss_and_gradients(model)
    assert fast["sample_tokens"].tolist() == [3, 2]  # labelled targets after the shift, per sample


def test_restricted_output_vocab_is_the_full_softmax_masked_to_it(tmp_path):
    """output_vocab: the training loss and its gradients equal the full-vocabulary loss over logits with -inf
    outside the vocabulary, the head gives exactly those logits to inference, and a save keeps it."""
    torch.manual_seed(0)
    m = StreamVLNForCausalLM(tiny_config()).eval()
    vocab = [3, 9, 10, 11, 12, 13, 500]
    m.set_output_vocab(vocab)
    assert_same_loss_and_gradients(m)  # full logits: the head's, -inf outside the vocabulary
    h = torch.randn(5, 32)
    logits = m.lm_head(h)
    assert torch.isinf(logits).sum() == 5 * (1000 - len(vocab))
    assert set(logits.argmax(-1).tolist()) <= set(vocab)
    assert torch.allclose(logits[:, vocab], h @ m.lm_head.weight[vocab].T, atol=1e-6)
    assert m(**hand_batch(), predictions=False)["predictions"] is None
    m.save_pretrained(tmp_path)
    again = StreamVLNForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert again.config.output_vocab == vocab and torch.equal(again.lm_head(h), m.lm_head(h))
    m.set_output_vocab([3, 9])  # label 10 is outside: a clear error, not a wrong loss
    with pytest.raises(ValueError, match=r"label token ids \[10, 11, 12, 13\] are outside the model's output_vocab"):
        m(**hand_batch())


def test_pooling_modes():
    x = torch.randn(3, 27 * 27, 8)
    assert pool_frames(x, "bilinear", 2).shape == (3, 196, 8)  # ceil(27 / 2) = 14 per side
    assert pool_frames(x, "average", 2).shape == (3, 169, 8)
    assert pool_frames(x, "max", 2).shape == (3, 169, 8)
    grid = x.view(3, 27, 27, 8)
    assert torch.allclose(pool_frames(x, "max", 2)[0, 0], grid[0, :2, :2].reshape(4, 8).max(0).values)


def test_sincos_position_init_is_a_smooth_2d_table_and_a_checkpoint_keeps_its_own(tmp_path):
    from streamvln.model.modeling import sincos_2d

    def table(m):
        return m.model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight.detach()

    torch.manual_seed(0)
    default = StreamVLNForCausalLM(tiny_config())
    torch.manual_seed(0)
    sincos = StreamVLNForCausalLM(tiny_config(vision_position_init="sincos"))
    assert torch.equal(table(sincos), sincos_2d(4, 32)) and not torch.allclose(table(default), sincos_2d(4, 32))
    # every other weight starts as without the option
    same = {k: v for k, v in default.state_dict().items() if "position_embedding" not in k}
    assert all(torch.equal(v, sincos.state_dict()[k]) for k, v in same.items())
    # row-major like the patch grid: a patch is nearer its neighbours than the far corner, along rows and columns
    t = sincos_2d(8, 64).view(8, 8, 64)
    assert (t[0, 0] - t[0, 1]).norm() < (t[0, 0] - t[0, 7]).norm()
    assert (t[0, 0] - t[1, 0]).norm() < (t[0, 0] - t[7, 0]).norm()
    assert torch.equal(t[3, :, :32], t[3, 0, :32].expand(8, 32))  # the first half encodes the row only
    # a saved model loads its trained table, not the initial one
    with torch.no_grad():
        table(sincos).add_(1.0)
    sincos.save_pretrained(tmp_path)
    again = StreamVLNForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert again.config.vision_position_init == "sincos" and torch.equal(table(again), table(sincos))
    with pytest.raises(ValueError, match="vision_position_init"):
        tiny_config(vision_position_init="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 30)


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = StreamVLNForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_qwen"
    with torch.no_grad():
        assert torch.equal(model(**hand_batch())["loss"], again(**hand_batch())["loss"])


def reference_layout_names(config: StreamVLNConfig, vision_layers: int) -> set[str]:
    """Weight names of a LLaVA-Video-7B-Qwen2 / StreamVLN checkpoint (reference section 6), written out."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.image_newline",
             "model.mm_projector.0.weight", "model.mm_projector.0.bias",
             "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {p + s for s in ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                                  "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")}
    v = "model.vision_tower.vision_tower.vision_model."
    names |= {v + s for s in ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
                              "embeddings.position_embedding.weight", "post_layernorm.weight", "post_layernorm.bias")}
    for i in range(vision_layers):
        p = f"{v}encoder.layers.{i}."
        names |= {p + s for s in ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                                  "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                                  "self_attn.out_proj.weight", "self_attn.out_proj.bias", "layer_norm1.weight",
                                  "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias", "mlp.fc1.weight",
                                  "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    return names


def test_loads_a_checkpoint_in_the_llava_video_layout(tmp_path):
    # select layer -2 of 3: the checkpoint holds vision layers 0-1, the last one dropped as the reference does
    config = tiny_config(mm_vision_select_layer=-2, tie_word_embeddings=False)
    shapes = {k: v.shape for k, v in StreamVLNForCausalLM(config).state_dict().items()}
    names = reference_layout_names(config, vision_layers=2)
    assert set(shapes) == names
    g = torch.Generator().manual_seed(3)
    weights = {k: torch.randn(shapes[k], generator=g) for k in sorted(names)}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    raw = config.to_dict()
    raw.update(architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded, info = StreamVLNForCausalLM.from_pretrained(tmp_path, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = loaded.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in names)


def reference_training_config_json(config: StreamVLNConfig) -> dict:
    """config.json in the shape the reference's streamvln_train.py saves: its overwrites (stride None from its
    run arguments, merge type "flat"), LLaVA's initialize_vision_modules keys and the LLaVA-Video release's."""
    raw = config.to_dict()
    raw.update(
        architectures=["StreamVLNForCausalLM"], model_type="llava_qwen", mm_spatial_pool_stride=None,
        mm_patch_merge_type="flat", mm_spatial_pool_mode="bilinear", image_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[384, 384], [384, 768]], image_crop_resolution=None, image_split_resolution=None,
        tokenizer_padding_side="right", tokenizer_model_max_length=32768, mm_newline_position="grid",
        add_faster_video=False, faster_token_stride=10, force_sample=False,
        mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model", mm_use_im_start_end=False,
        mm_projector_lr=None, mm_vision_tower_lr=5e-6, mm_use_im_patch_token=False, use_mm_proj=True,
        mm_vision_select_feature="patch", mm_resampler_type=None, vision_tower_pretrained=None, use_cache=True,
        add_time_instruction=False, use_pos_skipping=False, pos_skipping_range=4096,
        tune_mm_mlp_adapter=False, unfreeze_mm_vision_tower=False, mm_spatial_pool_out_channels=None)
    return raw


def test_loads_a_checkpoint_as_the_reference_training_saves_it(tmp_path):
    """Stride null (the reference pools with 2 regardless), merge type flat and no image_newline tensor."""
    import warnings

    from streamvln.model.build import build_model
    config = tiny_config(mm_vision_select_layer=-2)
    raw = reference_training_config_json(config)
    assert StreamVLNConfig.unrecognised_keys(raw) == []  # every key is used or knowingly ignored
    names = reference_layout_names(config, vision_layers=2) - {"model.image_newline"}
    shapes = {k: v.shape for k, v in StreamVLNForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(4)
    save_file({k: torch.randn(shapes[k], generator=g) for k in sorted(names)}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded, info = StreamVLNForCausalLM.from_pretrained(tmp_path, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.mm_spatial_pool_stride == 2 and not hasattr(loaded.model, "image_newline")
    side = VISION["image_size"] // VISION["patch_size"]
    tokens = loaded.encode_frames(torch.rand(1, 2, 3, VISION["image_size"], VISION["image_size"]), torch.tensor([2]))
    assert tokens[0].shape[1] == math.ceil(side / 2) ** 2  # pooled with stride 2, no TypeError on None
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(**hand_batch())["loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unknown key" warning for the reference's own keys
        build_model(None, str(tmp_path))
    raw["mm_magic_option"] = 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="mm_magic_option"):
        build_model(None, str(tmp_path))


@pytest.mark.parametrize("key, value", [("mm_use_im_start_end", True), ("mm_vision_select_feature", "cls_patch"),
                                        ("add_faster_video", True), ("mm_resampler_type", "perceiver")])
def test_config_values_the_model_cannot_reproduce_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        tiny_config(**{key: value})


def test_known_vision_tower_resolves_locally_and_unknown_is_an_error():
    config = StreamVLNConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    vision = config.vision_tower_config()
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1152, 26, 384, 14)
    assert config.mm_hidden_size == 1152
    with pytest.raises(ValueError, match="unknown vision tower 'org/other-tower'.*vision_config"):
        StreamVLNConfig(mm_vision_tower="org/other-tower", hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)


def test_tunable_parts_and_optimizer_groups():
    model = StreamVLNForCausalLM(tiny_config())
    set_tunable_parts(model, "mm_mlp_adapter")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
                         "model.mm_projector.2.bias", "model.image_newline"}
    set_tunable_parts(model, "mm_vision_tower,mm_mlp_adapter,mm_language_model")
    groups = optimizer_groups(model, lr=1e-3, vision_lr=1e-4, projector_lr=None, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["mm_vision_tower/decay=0.1"]["lr"] == 1e-4 and by_name["mm_mlp_adapter/decay=0.1"]["lr"] == 1e-3
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in no_decay) == ("bias" in name or "norm" in name or "image_newline" in name), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lora_adapts_only_the_language_model():
    model = StreamVLNForCausalLM(tiny_config())
    set_tunable_parts(model, "mm_vision_tower,mm_mlp_adapter,mm_language_model")
    lora = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "layers.0.self_attn.q_proj" in n for n in trainable)
    assert not any("lora_" in n and "vision_tower" in n for n in trainable)  # SigLIP's q_proj untouched
    assert not any("embed_tokens" in n or ("layers.0.self_attn.q_proj.base_layer" in n) for n in trainable)
    assert any("vision_tower" in n for n in trainable) and any("mm_projector" in n for n in trainable)
    with torch.no_grad():
        assert torch.isfinite(lora(**hand_batch())["loss"])


def test_a_model_yaml_with_an_unknown_key_is_refused(tmp_path):
    import yaml

    from streamvln.model.build import build_model

    keys = yaml.safe_load(open("configs/model/demo_vla.yaml"))
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({**keys, "vision_position_init": "sincos"}))
    assert build_model(str(tmp_path / "ok.yaml"), None).config.vision_position_init == "sincos"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**keys, "vision_postion_init": "sincos"}))
    with pytest.raises(ValueError, match="unknown model config key.*vision_postion_init"):
        build_model(str(tmp_path / "typo.yaml"), None)
