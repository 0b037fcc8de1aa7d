"""The StreamVLN agent: one frame per turn, a KV cache kept within a window, slow memory at each window opening.

Per environment the agent keeps the episode's frames, a bounded cache of their visual tokens, the
window's KV cache and the queue of parsed actions. `act` takes one observation per environment and
returns one action each; the environments whose queue is empty are decided together: their new
frames go through the vision tower in one call, and their language-model prefill and decoding
(greedy, or sampled from each environment's own seeded generator) run as one batch over padded KV
caches (each environment's own positions continue, pads are masked). Each decision keeps its
context as pieces (turn ids with their frames, answers fed back), from which RL recomputes its
probability exactly. A window ends every `num_frames` steps (KV dropped, frames and queue kept, as the
reference); the next query opens a new window, and whenever that happens after step 0 the memory
frames are attached, so the reference's crash (issue #80: `<memory>` with no frames) cannot occur.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from transformers import DynamicCache, Qwen2Model

from pipeline.dialogue import CONJUNCTIONS
from pipeline.frames import history_indices
from pipeline.tokens import IMAGE_PLACEHOLDER, MEMORY_PLACEHOLDER

from .turns import TurnBuilder, parse_actions

# transformers 5.x renamed the decoder's `past_key_values` argument to `cache` (the old name warns on every
# call, then goes in 5.40); the installed version's name is used
CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


@dataclass
class AgentConfig:
    num_frames: int = 32  # window length in steps
    num_history: int = 8  # memory frames at a window opening
    image_size: int = 384  # the vision tower's input (tiny demo model: 112)
    max_new_tokens: int = 24  # 4 symbols, the header the model may repeat, <|im_end|>: plenty (a describing model: 48)
    history_mode: str = "exact"  # memory frame choice, as the shards ("reference" = its arange)
    reference_memory_text: bool = False  # the reference eval's memory sentence (no colon)
    seed: int = 0  # conjunction choice per (episode, window)
    feature_cache: int = 64  # visual tokens kept per environment (frames beyond are re-encoded)
    use_cache: bool = True  # False: recompute the whole window at every decision (benchmark, tests)


@dataclass
class EnvState:
    episode_id: str = ""
    instruction: str = ""
    frames: list = field(default_factory=list)  # uint8 CHW tensors, image_size square
    features: OrderedDict = field(default_factory=OrderedDict)  # frame index -> visual tokens
    cache: DynamicCache | None = None
    window_embeds: list = field(default_factory=list)  # the window's embeddings (recompute mode, checks)
    last_logits: torch.Tensor | None = None  # at the first answer position of the last decision
    pending: list = field(default_factory=list)  # ids fed before the next turn (the last <|im_end|>)
    queue: list = field(default_factory=list)
    step: int = 0
    window_open: bool = False
    rng: random.Random | None = None
    turns: int = 0
    last_text: str = ""
    # sampling and what RL needs to recompute a decision's probability under its exact context (B4):
    # the window's pieces ("turn", ids, frame indices, memory count) and ("gen", fed tokens)
    temperature: float | None = None  # None: greedy
    generator: torch.Generator | None = None
    pieces: list = field(default_factory=list)
    last_context: list = field(default_factory=list)  # the pieces the last decision was made on
    last_tokens: list = field(default_factory=list)  # the tokens it generated (the last one not fed)
    last_logp: float = 0.0  # their log-probability at score_temperature (when set)
    builder: TurnBuilder | None = None  # this episode's own memory sentence (a served session's option)


def preprocess(rgb: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 3xSxS uint8, squashed to a square with bicubic resampling (SigLIP's processor)."""
    img = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class StreamingAgent:
    def __init__(self, model, tok, cfg: AgentConfig, num_envs: int = 1):
        self.model, self.tok, self.cfg = model.eval(), tok, cfg
        # the network itself: a LoRA-wrapped model (RL) carries its adapters inside the base modules
        self.net = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.turns = TurnBuilder(tok, cfg.reference_memory_text)
        self.device = next(model.parameters()).device
        self.envs = [EnvState() for _ in range(num_envs)]
        self.decisions = 0  # model calls per environment, over all episodes (benchmarks)
        self.score_temperature: float | None = None  # RL: log-probabilities of the chosen tokens at this T

    # ---- episode bookkeeping ------------------------------------------------------------------
    def reset(self, i: int, episode_id, instruction: str, temperature: float | None = None,
              sample_seed: int | None = None, reference_memory_text: bool | None = None) -> None:
        """A new episode in environment i; with a temperature its decisions are sampled (seeded); a memory
        sentence choice other than the agent's own applies to this episode only."""
        digest = hashlib.sha256(f"{self.cfg.seed}|{episode_id}".encode()).digest()
        generator = None
        if temperature is not None:
            if not self.cfg.use_cache:
                raise ValueError("sampling needs use_cache (the recompute mode is greedy only)")
            generator = torch.Generator(device=self.device).manual_seed(int(sample_seed or 0))
        builder = None
        if reference_memory_text is not None and reference_memory_text != self.cfg.reference_memory_text:
            builder = TurnBuilder(self.tok, reference_memory_text)
        self.envs[i] = EnvState(episode_id=str(episode_id), instruction=instruction,
                                rng=random.Random(int.from_bytes(digest[:8], "little")),
                                temperature=temperature, generator=generator, builder=builder)

    def _close_window(self, env: EnvState) -> None:
        env.cache, env.window_embeds, env.pending, env.window_open, env.pieces = None, [], [], False, []

    # ---- acting -------------------------------------------------------------------------------
    def clear_queue(self, i: int) -> None:
        """Drop environment i's remaining parsed actions (an expert took over): the next query decides anew."""
        self.envs[i].queue = []

    def queued(self, i: int) -> int:
        return len(self.envs[i].queue)

    def snapshot_turn(self, i: int, conjunction: str) -> list:
        """The context pieces of a decision at environment i's current frame, without making it: what
        the model would be asked here (RL's expert-driven steps are trained on it). Changes nothing."""
        env = self.envs[i]
        now = len(env.frames) - 1
        if not env.window_open:
            memory = history_indices(now, 0, self.cfg.num_history, self.cfg.history_mode) if now > 0 else []
            return [("turn", (env.builder or self.turns).open_window(env.instruction, bool(memory), conjunction),
                     memory + [now], len(memory))]
        ids = np.concatenate([np.asarray(env.pending, np.int64), (env.builder or self.turns).next_turn(conjunction)])
        return list(env.pieces) + [("turn", ids, [now], 0)]

    @torch.no_grad()
    def act(self, observations: list, active: list[int] | None = None,
            decide: list[int] | None = None) -> dict[int, int]:
        """observations[k] is the rgb of environment active[k] (default all); returns {env: action}.

        `decide` (default: all of `active`) are the environments the model acts for in this step. The
        others only record their frame (it counts as a step and may become a memory frame later):
        their action comes from elsewhere, as DAgger's expert chunks, and their queue is left alone.
        """
        active = list(range(len(self.envs))) if active is None else active
        decide = set(active if decide is None else decide)
        need = []
        for i, rgb in zip(active, observations):
            env = self.envs[i]
            if env.step > 0 and env.step % self.cfg.num_frames == 0 and env.window_open:
                self._close_window(env)  # window boundary: KV dropped, frames and queue kept
            env.frames.append(preprocess(rgb, self.cfg.image_size))
            if i in decide and not env.queue:
                need.append(i)
        if need:
            self._decide(need)
        out = {}
        for i in active:
            env = self.envs[i]
            if i in decide:
                out[i] = env.queue.pop(0)
            env.step += 1
        return out

    def _turn_ids(self, env: EnvState) -> tuple[np.ndarray, list[int]]:
        """This decision's new ids and the frame indices its placeholders stand for, in order."""
        conj = env.rng.choice(CONJUNCTIONS)
        now = len(env.frames) - 1
        if not env.window_open:
            memory = history_indices(now, 0, self.cfg.num_history, self.cfg.history_mode) if now > 0 else []
            ids = (env.builder or self.turns).open_window(env.instruction, bool(memory), conj)
            env.window_open = True
            env.pieces.append(("turn", ids, memory + [now], len(memory)))
            return ids, memory + [now]
        ids = np.concatenate([np.asarray(env.pending, np.int64), (env.builder or self.turns).next_turn(conj)])
        env.pieces.append(("turn", ids, [now], 0))
        return ids, [now]

    def _visual(self, env_frames: list[tuple[EnvState, list[int]]]) -> list[list[torch.Tensor]]:
        """Visual tokens per (env, frame indices): cached ones reused, the rest encoded in one call."""
        todo = [(env, f) for env, frames in env_frames for f in frames if f not in env.features]
        todo = list(OrderedDict.fromkeys((id(env), f) for env, f in todo).keys())
        by_id = {id(env): env for env, _ in env_frames}
        if todo:
            pixels = torch.stack([by_id[e].frames[f] for e, f in todo])[None].to(self.device)
            feats = self.net.encode_frames(pixels, torch.tensor([len(todo)]))[0]
            for (e, f), feat in zip(todo, feats):
                cache = by_id[e].features
                cache[f] = feat
                while len(cache) > self.cfg.feature_cache:
                    cache.popitem(last=False)
        out = []
        for env, frames in env_frames:
            got = []
            for f in frames:
                if f not in env.features:  # evicted in this very call: encode it alone
                    px = env.frames[f][None, None].to(self.device)
                    env.features[f] = self.net.encode_frames(px, torch.tensor([1]))[0][0]
                got.append(env.features[f])
            out.append(got)
        return out

    def embed_pieces(self, frames: list, pieces: list) -> torch.Tensor:
        """A decision context's embeddings, rebuilt from its pieces (RL recomputes log-probabilities on it
        with gradients through the language model; the vision tower runs without them)."""
        return torch.cat(self.embed_each_piece(frames, pieces))

    def embed_each_piece(self, frames: list, pieces: list) -> list[torch.Tensor]:
        out = []
        for piece in pieces:
            if piece[0] == "gen":
                out.append(self.net.model.embed_tokens(torch.tensor(piece[1], device=self.device)))
                continue
            _, ids, frame_ids, n_memory = piece
            with torch.no_grad():
                pixels = torch.stack([frames[f] for f in frame_ids])[None].to(self.device)
                visual = list(self.net.encode_frames(pixels, torch.tensor([len(frame_ids)]))[0])
            out.append(self._embed(ids, visual, n_memory))
        return out

    def _embed(self, ids: np.ndarray, visual: list[torch.Tensor], n_memory: int) -> torch.Tensor:
        """Text embeddings with <memory> replaced by all memory frames' tokens and each <image> by one frame's."""
        ids_t = torch.as_tensor(ids, device=self.device)
        text = self.net.model.embed_tokens(ids_t.clamp(min=0))
        memory = torch.cat(visual[:n_memory]) if n_memory else None
        current = list(visual[n_memory:])
        pieces, start = [], 0
        for pos in torch.nonzero(ids_t < 0).flatten().tolist():
            pieces.append(text[start:pos])
            if int(ids_t[pos]) == MEMORY_PLACEHOLDER:
                if memory is None:
                    raise RuntimeError("<memory> without memory frames")  # cannot happen: see _turn_ids
                pieces.append(memory.to(text.dtype))
            elif int(ids_t[pos]) == IMAGE_PLACEHOLDER:
                pieces.append(current.pop(0).to(text.dtype))
            start = pos + 1
        pieces.append(text[start:])
        if current:
            raise RuntimeError(f"{len(current)} frames left over for the placeholders")
        return torch.cat(pieces)

    def _decide(self, need: list[int]) -> None:
        envs = [self.envs[i] for i in need]
        turn = [self._turn_ids(env) for env in envs]
        visual = self._visual([(env, frames) for env, (_, frames) in zip(envs, turn)])
        embeds = [self._embed(ids, vis, len(frames) - 1) for (ids, frames), vis in zip(turn, visual)]
        for env, e in zip(envs, embeds):
            env.window_embeds.append(e)
        generated = self._generate(envs, embeds)
        self.decisions += len(envs)
        for env, gen in zip(envs, generated):
            env.last_context, env.last_tokens = list(env.pieces), list(gen)  # (env.frames holds the frames)
            if gen[:-1]:
                env.pieces.append(("gen", list(gen[:-1])))
            text = self.tok.decode(gen, skip_special_tokens=False)
            env.last_text = text
            env.queue = parse_actions(text)
            env.turns += 1
            # The last generated token (normally <|im_end|>) was never fed: it opens the next turn's
            # prefill, as in the reference. The window holds the rest of the answer.
            env.pending = gen[-1:]
            fed = gen[:-1]
            if fed:
                env.window_embeds.append(self.net.model.embed_tokens(torch.tensor(fed, device=self.device)))

    # ---- the language model over padded per-environment caches --------------------------------
    def _generate(self, envs: list[EnvState], embeds: list[torch.Tensor]) -> list[list[int]]:
        if not self.cfg.use_cache:
            return [self._generate_recompute(env, e) for env, e in zip(envs, embeds)]
        b = len(envs)
        past = [env.cache.get_seq_length() if env.cache is not None else 0 for env in envs]
        lmax = max(past)
        cache, mask = self._stack(envs, past, lmax)
        n = [e.shape[0] for e in embeds]
        nmax = max(n)
        dim = embeds[0].shape[-1]
        x = embeds[0].new_zeros((b, nmax, dim))
        new_mask = torch.zeros((b, nmax), dtype=torch.long, device=self.device)
        pos = torch.zeros((b, nmax), dtype=torch.long, device=self.device)
        for k, e in enumerate(embeds):
            x[k, : n[k]] = e
            new_mask[k, : n[k]] = 1
            pos[k] = past[k] + torch.arange(nmax, device=self.device)
        mask = torch.cat([mask, new_mask], 1)
        hidden = self.net.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, **{CACHE_ARG: cache},
                                  use_cache=True).last_hidden_state
        last = hidden[torch.arange(b), torch.tensor(n) - 1]
        logits = self.net.lm_head(last)
        for env, row in zip(envs, logits):
            env.last_logits = row.float()
            env.last_logp = 0.0
        token = self._choose(envs, logits, torch.zeros(b, dtype=torch.bool))
        out = [[int(t)] for t in token]
        done = torch.tensor([t == self.turns.im_end for t in token.tolist()])
        next_pos = torch.tensor([past[k] + n[k] for k in range(b)], device=self.device)
        for _ in range(self.cfg.max_new_tokens - 1):
            if bool(done.all()):
                break
            live = (~done).long().to(self.device)
            mask = torch.cat([mask, live[:, None]], 1)
            emb = self.net.model.embed_tokens(token)[:, None]
            hidden = self.net.model(inputs_embeds=emb, attention_mask=mask, position_ids=next_pos[:, None],
                                      **{CACHE_ARG: cache}, use_cache=True).last_hidden_state
            token = self._choose(envs, self.net.lm_head(hidden[:, -1]), done)
            next_pos = next_pos + live
            for k in range(b):
                if not done[k]:
                    out[k].append(int(token[k]))
                    done[k] = int(token[k]) == self.turns.im_end
        self._split(envs, cache, mask)
        return out

    def _choose(self, envs: list[EnvState], logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Each environment's next token: greedy, or sampled at its temperature with its own generator;
        with score_temperature set, adds the token's log-probability at it to env.last_logp."""
        token = logits.argmax(-1)
        for k, env in enumerate(envs):
            if done[k]:
                continue
            if env.temperature is not None:
                probs = torch.softmax(logits[k].float() / env.temperature, -1)
                token[k] = torch.multinomial(probs, 1, generator=env.generator)[0]
            if self.score_temperature is not None:
                env.last_logp += float(torch.log_softmax(logits[k].float() / self.score_temperature, -1)[token[k]])
        return token

    def _stack(self, envs, past, lmax):
        """One batched cache: each env's keys/values left-padded to the longest; the mask marks real slots."""
        b = len(envs)
        mask = torch.zeros((b, lmax), dtype=torch.long, device=self.device)
        for k, p in enumerate(past):
            mask[k, lmax - p:] = 1
        cache = DynamicCache()
        if lmax == 0:
            return cache, mask
        ref = next(env.cache for env in envs if env.cache is not None and env.cache.get_seq_length())
        for layer, ref_layer in enumerate(ref.layers):
            shape = list(ref_layer.keys.shape)
            keys, values = [], []
            for env, p in zip(envs, past):
                shape[0], shape[2] = 1, lmax - p
                pad = ref_layer.keys.new_zeros(shape)
                if p:
                    keys.append(torch.cat([pad, env.cache.layers[layer].keys], 2))
                    values.append(torch.cat([pad, env.cache.layers[layer].values], 2))
                else:
                    keys.append(pad)
                    values.append(pad.clone())
            cache.update(torch.cat(keys), torch.cat(values), layer)
        return cache, mask

    def _split(self, envs, cache, mask) -> None:
        """Each env's real slots back into a cache of its own (pads dropped, order kept)."""
        for k, env in enumerate(envs):
            keep = torch.nonzero(mask[k]).flatten()
            own = DynamicCache()
            for layer, lay in enumerate(cache.layers):
                own.update(lay.keys[k:k + 1, :, keep].contiguous(), lay.values[k:k + 1, :, keep].contiguous(), layer)
            env.cache = own

    def _generate_recompute(self, env: EnvState, embeds: torch.Tensor) -> list[int]:
        """No KV cache: the whole window so far goes through the model at every token."""
        seq = torch.cat(env.window_embeds)
        out = []
        for _ in range(self.cfg.max_new_tokens):
            hidden = self.net.model(inputs_embeds=seq[None], use_cache=False).last_hidden_state
            logits = self.net.lm_head(hidden[0, -1])
            if not out:
                env.last_logits = logits.float()
            token = int(logits.argmax())
            out.append(token)
            if token == self.turns.im_end:
                break
            seq = torch.cat([seq, self.net.model.embed_tokens(torch.tensor([token], device=self.device))])
        return out


def load_agent(checkpoint: str, num_envs: int, seed: int = 0, overrides: dict | None = None) -> StreamingAgent:
    """The agent over a checkpoint directory: bf16 on a GPU, fp32 on CPU; None overrides keep the defaults."""
    from pipeline.qwen_tokenizer import load_tokenizer
    from streamvln.model.build import build_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(None, checkpoint, dtype=dtype).to(device).requires_grad_(False)
    size = model.config.vision_tower_config().image_size
    cfg = AgentConfig(image_size=size, seed=seed, **{k: v for k, v in (overrides or {}).items() if v is not None})
    return StreamingAgent(model, load_tokenizer(checkpoint), cfg, num_envs=num_envs)
