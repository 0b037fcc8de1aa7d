"""Model: SigLIP frames -> mlp2x_gelu projector -> 2D pooling, placed into a Qwen2 language model.

Built from transformers' own Qwen2Model and SiglipVisionModel; module names follow the LLaVA-Video
checkpoint layout (model.vision_tower.vision_tower.vision_model.*, model.mm_projector.{0,2}.*,
model.image_newline, lm_head.*), so those checkpoints load with no renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Model, Qwen2PreTrainedModel, SiglipVisionModel

from pipeline.tokens import IGNORE_INDEX, IMAGE_PLACEHOLDER, MEMORY_PLACEHOLDER
from streamvln.data.decode import normalize_

from .config import StreamVLNConfig
from .packing import pack


class _SiglipHolder(nn.Module):
    """Gives the SigLIP weights the `vision_tower.vision_model.*` names LLaVA checkpoints use."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = SiglipVisionModel(config)


class VisionTower(nn.Module):
    """SigLIP without its head; features of the last kept layer, before post_layernorm (LLaVA's choice)."""

    def __init__(self, config):
        super().__init__()
        self.vision_tower = _SiglipHolder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.vision_tower.vision_model
        return vision.encoder(inputs_embeds=vision.embeddings(pixel_values)).last_hidden_state


class StreamVLNModel(Qwen2Model):
    """The Qwen2 decoder with the vision tower and projector beside it (the checkpoint's `model.*`)."""

    def __init__(self, config: StreamVLNConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(config.vision_tower_config())
        self.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(),
                                          nn.Linear(config.hidden_size, config.hidden_size))
        # Present in LLaVA-Video checkpoints (its image-grid path); StreamVLN's frame path does not use it,
        # and the reference's training ("flat" merge type) saves none: created as LLaVA does.
        if config.has_image_newline:
            self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))


def pool_frames(features: torch.Tensor, mode: str, stride: int) -> torch.Tensor:
    """[N, P*P, D] patch features -> [N, tokens, D]: bilinear to ceil(P/stride) per side, or avg/max pooling."""
    n, patches, dim = features.shape
    side = math.isqrt(patches)
    grid = features.view(n, side, side, dim).permute(0, 3, 1, 2)
    if mode == "bilinear":
        size = math.ceil(side / stride)
        grid = F.interpolate(grid, size=(size, size), mode="bilinear")
    elif mode == "average":
        grid = F.avg_pool2d(grid, stride)
    else:
        grid = F.max_pool2d(grid, stride)
    return grid.flatten(2).transpose(1, 2)


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """MAE's 2D sin-cos position table [side*side, dim], row-major like the patch grid: half the channels
    encode the row, half the column, each as sin and cos at dim/4 frequencies (1 / 10000^(i / (dim/4)))."""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class VocabHead(nn.Linear):
    """The LM head (tied to the input embedding as configured), optionally restricted to an output vocabulary.

    Unrestricted it is exactly nn.Linear. Restricted, `restricted(h)` gives logits over the allowed ids only
    (what training uses: no softmax, gradient or argmax over the other ~151K rows), and `forward` gives
    full-vocabulary logits with -inf at every other id, so greedy decoding, sampling and log-probabilities
    elsewhere (the agent, RL) see the same distribution training shaped.
    """

    def __init__(self, hidden: int, vocab: int, output_vocab: list[int] | None = None):
        super().__init__(hidden, vocab, bias=False)
        self.set_output_vocab(output_vocab)

    def set_output_vocab(self, ids: list[int] | None) -> None:
        ids = sorted(int(t) for t in ids) if ids else None
        if ids and (ids[0] < 0 or ids[-1] >= self.out_features):
            raise ValueError(f"output_vocab ids must lie in [0, {self.out_features})")
        # on the CPU even while from_pretrained builds the model on the meta device; moved per call
        self.output_ids = None if ids is None else torch.tensor(ids, dtype=torch.long, device="cpu")

    def restricted(self, hidden: torch.Tensor) -> torch.Tensor:
        ids = self.output_ids.to(hidden.device)
        return F.linear(hidden, self.weight[ids])

    def positions(self, targets: torch.Tensor) -> torch.Tensor:
        """Each target id's index in the output vocabulary; a clear error for an id outside it."""
        ids = self.output_ids.to(targets.device)
        pos = torch.searchsorted(ids, targets).clamp(max=len(ids) - 1)
        outside = ids[pos] != targets
        if bool(outside.any()):
            raise ValueError(f"label token ids {sorted(set(targets[outside].tolist()))[:10]} are outside the model's "
                             f"output_vocab ({len(ids)} ids): retrain with `output_vocab: labels` on this data")
        return pos

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_ids is None:
            return super().forward(hidden)
        ids = self.output_ids.to(hidden.device)
        out = hidden.new_full((*hidden.shape[:-1], self.out_features), float("-inf"))
        out[..., ids] = self.restricted(hidden)
        return out


class StreamVLNForCausalLM(Qwen2PreTrainedModel):
    config_class = StreamVLNConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]

    def __init__(self, config: StreamVLNConfig):
        super().__init__(config)
        self.model = StreamVLNModel(config)
        self.lm_head = VocabHead(config.hidden_size, config.vocab_size, getattr(config, "output_vocab", None))
        self.post_init()
        if getattr(config, "vision_position_init", "normal") == "sincos":  # a checkpoint's weights load over it
            table = self.model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight
            with torch.no_grad():
                table.copy_(sincos_2d(math.isqrt(table.shape[0]), table.shape[1]).to(table))

    def set_output_vocab(self, ids: list[int] | None) -> None:
        """Restrict (or, with None, free) what the head predicts; kept in the config, so exports carry it."""
        self.config.output_vocab = sorted(int(t) for t in ids) if ids else None
        self.lm_head.set_output_vocab(self.config.output_vocab)

    # ------------------------------------------------------------------ vision

    def encode_frames(self, images: torch.Tensor, n_images: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, its frames as pooled visual tokens [n_images_i, tokens, D]; padding frames skipped."""
        frames = torch.cat([images[i, :n] for i, n in enumerate(n_images.tolist())])
        if frames.dtype == torch.uint8:  # uint8 batches are normalised here, on the device
            frames = normalize_(frames)
        vision = self.model.vision_tower
        frames = frames.to(next(vision.parameters()).dtype)
        features = self.model.mm_projector(vision(frames))
        pooled = pool_frames(features, self.config.mm_spatial_pool_mode, self.config.mm_spatial_pool_stride)
        return list(pooled.split(n_images.tolist()))

    def embed_multimodal(self, input_ids, labels, attention_mask, images, n_images, n_history):
        """Replace <memory> by all history tokens and each <image> by one current frame's tokens.

        Returns right-padded inputs_embeds, labels (-100 at visual positions) and attention mask.
        The placement is driven by the batch's n_history/n_images, so any history length works.
        """
        embed = self.model.embed_tokens
        text = embed(input_ids.clamp(min=0))
        visual = self.encode_frames(images, n_images) if images is not None and int(n_images.sum()) else None
        rows, row_labels = [], []
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i]
            ids, lab, emb = input_ids[i][keep], labels[i][keep], text[i][keep]
            frames = visual[i] if visual is not None else text.new_zeros((0, 0, text.shape[-1]))
            h = int(n_history[i])
            history, current = frames[:h].reshape(-1, text.shape[-1]), list(frames[h:])
            n_img, n_mem = int((ids == IMAGE_PLACEHOLDER).sum()), int((ids == MEMORY_PLACEHOLDER).sum())
            if n_img != len(current) or n_mem != (1 if h else 0):
                raise ValueError(f"sample {i}: {n_img} <image> and {n_mem} <memory> placeholders for "
                                 f"{len(current)} current and {h} history frames")
            pieces, piece_labels, start = [], [], 0
            for pos in torch.nonzero(ids < 0).flatten().tolist():  # the placeholders, in order
                pieces.append(emb[start:pos])
                piece_labels.append(lab[start:pos])
                vis = history if ids[pos] == MEMORY_PLACEHOLDER else current.pop(0)
                pieces.append(vis.to(emb.dtype))
                piece_labels.append(lab.new_full((vis.shape[0],), IGNORE_INDEX))
                start = pos + 1
            pieces.append(emb[start:])
            piece_labels.append(lab[start:])
            rows.append(torch.cat(pieces))
            row_labels.append(torch.cat(piece_labels))
        length = max(r.shape[0] for r in rows)
        embeds = text.new_zeros((len(rows), length, text.shape[-1]))
        out_labels = labels.new_full((len(rows), length), IGNORE_INDEX)
        mask = torch.zeros((len(rows), length), dtype=torch.bool, device=text.device)
        for i, (r, lab) in enumerate(zip(rows, row_labels)):
            embeds[i, : r.shape[0]], out_labels[i, : r.shape[0]], mask[i, : r.shape[0]] = r, lab, True
        return embeds, out_labels, mask

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, labels, attention_mask, images=None, n_images=None, n_history=None,
                full_logits: bool = False, predictions: bool = True, pack_tokens: int = 0, **_batch_extras) -> dict:
        """Loss over labelled positions. The LM head runs only where a label exists (full_logits=True
        computes all logits, as the reference, for comparison): at 32K positions x 152K vocabulary the
        full logits are ~10 GB in bf16 per sample. predictions=False skips the argmax (training needs none).
        pack_tokens > 0 packs the samples into rows of that many tokens (packing.py): the same loss."""
        embeds, labels, mask = self.embed_multimodal(input_ids, labels, attention_mask, images, n_images, n_history)
        batch = len(labels)
        if pack_tokens > 0:
            packed = pack(embeds, labels, mask, pack_tokens)
            embeds, labels, owner = packed.embeds, packed.labels, packed.sample
            # no mask and no cache: transformers reads the position restarts as packed sequences
            hidden = self.model(inputs_embeds=embeds, position_ids=packed.position_ids,
                                use_cache=False).last_hidden_state
        else:
            owner = torch.arange(batch, device=labels.device)[:, None].expand_as(labels)
            hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        if full_logits:
            logits = self.lm_head(hidden[:, :-1]).float()
            token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
            labelled = targets != IGNORE_INDEX
            token_loss = token_loss[labelled]
            predictions = logits.argmax(-1)[labelled]
        elif self.lm_head.output_ids is not None:  # restricted: softmax over the output vocabulary only
            labelled = targets != IGNORE_INDEX
            logits = self.lm_head.restricted(hidden[:, :-1][labelled]).float()
            token_loss = F.cross_entropy(logits, self.lm_head.positions(targets[labelled]), reduction="none")
            predictions = self.lm_head.output_ids.to(logits.device)[logits.argmax(-1)] if predictions else None
        else:
            labelled = targets != IGNORE_INDEX
            logits = self.lm_head(hidden[:, :-1][labelled]).float()
            token_loss = F.cross_entropy(logits, targets[labelled], reduction="none")
            predictions = logits.argmax(-1) if predictions else None
        sample_of_token = owner[:, 1:][labelled]  # a labelled position's sample (its row, unpacked)
        per_sample = torch.zeros(batch, device=hidden.device).index_add(0, sample_of_token, token_loss.detach())
        counts = torch.bincount(sample_of_token, minlength=batch)
        return {"loss": token_loss.mean(), "loss_sum": token_loss.sum(), "sample_loss_sum": per_sample, "sample_tokens": counts,
                "predictions": predictions, "targets": targets[labelled], "sample_of_token": sample_of_token,
                "lm_rows": len(labels), "lm_positions": labels.numel(), "lm_tokens": int(mask.sum())}
