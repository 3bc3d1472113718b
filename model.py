"""model.py: Qwen2.5-VL for reinforcement learning: the text decoder we own, Hugging Face's vision tower.

    image --HF processor--> patches --HF vision tower--> image tokens --.
    prompt --chat template--> token ids --embed--> [text | image | text] --> our decoder --> hidden states

The decoder (gpt-fast style) is written out below: RMSNorm, multimodal RoPE, grouped-query attention
through scaled_dot_product_attention, SwiGLU, and a static KV cache for sampling. It loads a Hugging
Face checkpoint's weights unchanged (same parameter names), and the tests hold it to transformers'
Qwen2_5_VLForConditionalGeneration logit for logit. The decoder returns hidden states; the lm_head is
applied by whoever needs it: fused_logprob (kernels.py) in training, the last position in sampling.

Multimodal RoPE (M-RoPE): every token has 3 positions (temporal, height, width). Text tokens carry the
same number three times; the image's tokens carry (start, start + row, start + col), and the text after
the image resumes at start + max(rows, cols). The head dimension's frequencies are split into three
sections (16, 24, 24 of 64 for the 7B) rotated by the temporal, height and width positions.

    model, processor = load("tiny")                                  # random weights, runs on a CPU
    model, processor = load("Qwen/Qwen2.5-VL-7B-Instruct", torch.bfloat16, "cuda")
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def import_beside_our_kernels(name):
    """Import transformers' module `name` while this repository's folder is off sys.path.

    transformers >= 5.25 depends on Hugging Face's `kernels` package (hub kernels) and imports it with its
    modeling code; this repository's kernels.py has the same top-level name and, its folder being first on
    sys.path, would be found instead (ImportError: cannot import name 'CUDAProperties' from 'kernels').
    So transformers binds its `kernels` here, and `import kernels` goes on meaning kernels.py. Hub kernels
    stay off (USE_HUB_KERNELS=NO unless set): from_pretrained would otherwise swap transformers' layers for
    kernels fetched from the hub, which the equivalence tests do not want as their reference (and which
    would import `kernels` again, lazily, finding ours)."""
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    here = Path(__file__).resolve().parent
    ours, path = sys.modules.pop("kernels", None), sys.path[:]
    sys.path[:] = [p for p in path if Path(p or ".").resolve() != here]
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = path
        sys.modules.pop("kernels", None)                # Hugging Face's, now held by transformers
        if ours is not None:
            sys.modules["kernels"] = ours


Qwen2_5_VisionTransformerPretrainedModel = import_beside_our_kernels(
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl").Qwen2_5_VisionTransformerPretrainedModel
from transformers import Qwen2_5_VLConfig  # noqa: E402  (after the import above has loaded transformers' modeling)

from kernels import fused_logprob  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# The decoder we own
# ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):                              # normalise in fp32, scale in the input dtype
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def mrope(positions, inv_freq, section, dtype):
    """positions (3, B, T) -> cos, sin (B, T, head_dim). Frequency j turns with positions[section[j]]."""
    pos = positions.float()[section]                    # (head_dim/2, B, T): each frequency's own position
    angles = pos.permute(1, 2, 0) * inv_freq             # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):                              # x (B, heads, T, d); rotate pairs (i, i + d/2)
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past=None, cache=None, slots=None):
        """x (B, T, H); mask (B, 1, g*T, S) additive (0 may attend, -inf may not), folded for the g query
        heads of a key head (fold_mask). Keys are `past` + these tokens (training), or the whole static
        `cache` after writing these tokens at `slots` (sampling). -> out, (k, v) new."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        new = (k, v)
        if cache is not None:
            cache[0].index_copy_(2, slots, k)
            cache[1].index_copy_(2, slots, v)
            k, v = cache[0][:, :, :mask.shape[-1]], cache[1][:, :, :mask.shape[-1]]
        elif past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        # Grouped-query attention without copying keys: the g query heads that share a key head are
        # folded into the query axis, (B, n_kv, g*T, d), and attend like ordinary heads.
        g = self.n_heads // self.n_kv
        q = q.reshape(B, self.n_kv, g * T, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)       # (B, n_kv, g*T, d)
        out = out.view(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), new


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past=None, cache=None, slots=None):
        a, new = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, cache, slots)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new


class TextDecoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def fold_mask(mask, g, dtype):
    """(B, T, S) bool -> (B, 1, g*T, S) additive (0 or -inf, in the compute dtype): the mask of the g query
    heads folded onto one key head, made once per forward and shared by every layer. Handed a bool mask,
    scaled_dot_product_attention converts it in every layer, a fresh copy that each layer also keeps for
    its backward (measured, 28 layers, fp32 CPU: 3.4 GB peak instead of 1.1). Rows are stored 16 elements
    apart, the alignment CUDA's memory-efficient kernel needs (else it pads a copy per layer)."""
    B, T, S = mask.shape
    bias = torch.zeros(B, 1, g, T, -(-S // 16) * 16, dtype=dtype, device=mask.device)
    bias[..., :S].masked_fill_(~mask[:, None, None], float("-inf"))
    return bias.view(B, 1, g * T, -1)[..., :S]


def attention_mask(key_valid, query_slots):
    """key_valid (B, S) bool, query_slots (T,) -> (B, T, S): valid keys at or before each query's slot.
    A query also sees its own slot, so that left-padding rows attend to something (their output is unused)."""
    S = key_valid.shape[1]
    keys = torch.arange(S, device=key_valid.device)
    causal = keys[None, :] <= query_slots[:, None]
    return (key_valid[:, None, :] & causal[None]) | (keys[None, :] == query_slots[:, None])[None]


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no initialisation) and
    their buffers real: buffers such as the vision tower's rotary frequencies are computed at construction
    and are not in a checkpoint. Only one layer's uninitialised parameter ever exists on the host."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Qwen2_5_VL(nn.Module):
    """Qwen2.5-VL with the parameter names of transformers' Qwen2_5_VLForConditionalGeneration."""

    def __init__(self, config: Qwen2_5_VLConfig, empty=False):
        """empty: parameters on the meta device (no memory, no init; `materialize` and weights come next)."""
        super().__init__()
        self.config, self.text = config, config.text_config
        config.vision_config._attn_implementation = "sdpa"
        with parameters_on_meta() if empty else contextlib.nullcontext():
            self.model = nn.Module()
            self.model.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
            self.model.language_model = TextDecoder(self.text)
            self.lm_head = nn.Linear(self.text.hidden_size, self.text.vocab_size, bias=False)
        self._tie()
        rope = getattr(self.text, "rope_parameters", None) or getattr(self.text, "rope_scaling", None) or {}
        self.rope_theta = rope.get("rope_theta", getattr(self.text, "rope_theta", 1e6))
        self.mrope_section = rope.get("mrope_section", [16, 24, 24])
        self._rope = {}

    def _tie(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def materialize(self, device):
        """Storage on `device` for parameters built empty (uninitialised: weights come next); buffers, which
        construction computed (the vision tower's rotary frequencies), keep their values."""
        buffers = dict(self.named_buffers())
        self.to_empty(device=device)
        with torch.no_grad():
            for name, b in self.named_buffers():
                b.copy_(buffers[name])
        self._tie()                                     # to_empty makes new parameters: tie them again
        return self

    def rope_tables(self, device):
        """Inverse frequencies and each frequency's section (0 t, 1 h, 2 w), made once per device (a
        CUDA graph capture may not copy from the host)."""
        if device not in self._rope:
            d = self.text.hidden_size // self.text.num_attention_heads
            inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)
            section = torch.cat([torch.full((n,), i) for i, n in enumerate(self.mrope_section)])
            self._rope[device] = (inv_freq.to(device), section.to(device))
        return self._rope[device]

    # --- the pieces ---------------------------------------------------------------------------------
    def image_features(self, pixel_values, image_grid_thw):
        """Patches of all images (HF processor output) -> image tokens (n_image_tokens, H), in order."""
        visual = self.model.visual
        out = visual(pixel_values.to(visual.patch_embed.proj.weight.dtype), grid_thw=image_grid_thw)
        return getattr(out, "pooler_output", out)      # transformers 5 returns a ModelOutput

    def blank_image(self, device):
        """The smallest image the vision tower takes: one frame of merge x merge patches, all zero.
        -> (pixel_values (patches, channels * temporal * patch^2), image_grid_thw (1, 3))."""
        v = self.config.vision_config
        n = v.spatial_merge_size
        pixels = torch.zeros(n * n, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, device=device)
        return pixels, torch.tensor([[1, n, n]], device=device)

    def forward(self, input_ids, positions, mask_valid, image_features=None, past=None, past_valid=None,
                cache=None, slot=None):
        """Hidden states after the final norm, and each layer's (k, v) for these tokens.

        input_ids (B, T) and M-RoPE positions (3, B, T); mask_valid (B, T): 1 = real token, 0 = padding.
        image_features replace the image-pad tokens' embeddings, in order. Attention reaches:
        - no past, no cache: these T tokens, causally (a full sequence);
        - past [(k, v) per layer], past_valid (B, S): a prefix computed before (training);
        - cache (KVCache) with slot: writes these tokens at slots slot..slot+T-1 of the static cache.
        """
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids)
        if image_features is not None:
            is_image = (input_ids == self.config.image_token_id)[..., None]
            x = x.masked_scatter(is_image, image_features.to(x.dtype))
        T = input_ids.shape[1]
        cos, sin = mrope(positions, *self.rope_tables(x.device), x.dtype)
        valid = mask_valid.bool()
        if cache is not None:
            slots = slot + torch.arange(T, device=x.device)
            cache.valid.index_copy_(1, slots, valid)
            mask = attention_mask(cache.valid[:, :cache.attend_len], slots)
        elif past is not None:
            slots = past_valid.shape[1] + torch.arange(T, device=x.device)
            mask = attention_mask(torch.cat([past_valid, valid], 1), slots)
        else:
            mask = attention_mask(valid, torch.arange(T, device=x.device))
        mask = fold_mask(mask, self.text.num_attention_heads // self.text.num_key_value_heads, x.dtype)
        kvs = []
        for i, layer in enumerate(lm.layers):
            x, kv = layer(x, cos, sin, mask, past[i] if past is not None else None,
                          cache.layer(i) if cache is not None else None, slots if cache is not None else None)
            kvs.append(kv)
        return lm.norm(x), kvs

    def next_token_logits(self, input_ids, positions, mask_valid, image_features=None, cache=None, slot=None):
        """fp32 logits (B, V) of the token after the last position (sampling)."""
        hidden, _ = self.forward(input_ids, positions, mask_valid, image_features, cache=cache, slot=slot)
        return F.linear(hidden[:, -1], self.lm_head.weight).float()

    def completion_logprobs(self, batch, completions, completion_mask, temperature=1.0, return_entropy=False):
        """log p(completion token) (R, T) fp32 for R = B * G completions of the B prompts in `batch`.

        The prompt runs once per group: its keys and values are repeated G times and the completions
        attend to them, so the prompt (and the image) costs 1/G of what recomputing full sequences
        would. Prompt positions are never scored, and the [tokens, vocab] logits never exist:
        the selected hidden states go straight into fused_logprob with the lm_head weight.
        """
        R, T = completions.shape
        G = R // batch.input_ids.shape[0]
        if batch.pixel_values is not None:
            feats, anchor = self.image_features(batch.pixel_values, batch.image_grid_thw), 0.0
        else:
            # No image in this batch: the vision tower runs all the same, on a blank 28x28 image whose
            # tokens enter with weight 0. Under FSDP its blocks gather their shards together with the
            # other ranks in the forward and reduce gradients in the backward: a rank that skipped
            # them would leave every other rank waiting.
            feats, anchor = None, 0.0 * self.image_features(*self.blank_image(completions.device)).sum()
        h_prompt, kv = self.forward(batch.input_ids, batch.positions, batch.attention_mask, feats)
        h_prompt = h_prompt + anchor
        past = [(k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)) for k, v in kv]
        pos = batch.next_position.repeat_interleave(G)[:, None] + torch.arange(T, device=completions.device)
        h_comp, _ = self.forward(completions, pos.expand(3, R, T), completion_mask, past=past,
                                 past_valid=batch.attention_mask.bool().repeat_interleave(G, 0))
        # token j is predicted from the position before it: the prompt's last for j = 0
        h = torch.cat([h_prompt[:, -1:].repeat_interleave(G, 0), h_comp[:, :-1]], 1)       # (R, T, H)
        sel = completion_mask.bool()
        logp, ent = fused_logprob(h[sel], self.lm_head.weight, completions[sel], temperature, return_entropy=True)
        out = torch.zeros(R, T, device=h.device, dtype=torch.float32).masked_scatter(sel, logp)
        if not return_entropy:
            return out
        return out, torch.zeros_like(out).masked_scatter(sel, ent)


class KVCache:
    """Static key/value buffers per layer, (rows, n_kv, max_len, head_dim), and which slots hold tokens.
    `attend_len` bounds the slots attention reads (the sampler raises it as the sequence grows)."""

    def __init__(self, model, rows, max_len, dtype=None, device=None):
        c = model.text
        head_dim = c.hidden_size // c.num_attention_heads
        w = model.model.language_model.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        shape = (rows, c.num_key_value_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        self.max_len = self.attend_len = max_len

    def layer(self, i):
        return self.k[i], self.v[i]

    def load_prefix(self, src, n):
        """Row b of `src` (a prefill cache, B rows x S slots) into rows b*n .. b*n+n-1, slots [0, S); the
        later slots emptied (zeros, never attended: a stale Inf there would still poison 0 x Inf = NaN)."""
        B, S = src.valid.shape
        for dst, part in zip(self.k + self.v, src.k + src.v):           # (B*n, kv, L, d) <- (B, kv, S, d)
            dst.view(B, n, *dst.shape[1:])[:, :, :, :S].copy_(part[:, None])
            dst[:, :, S:].zero_()
        self.valid.zero_()
        self.valid.view(B, n, -1)[:, :, :S].copy_(src.valid[:, None])


# ----------------------------------------------------------------------------------------------------
# Processor: samples -> left-padded token batches with images and M-RoPE positions
# ----------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor           # (B, P) prompt tokens, left-padded
    attention_mask: torch.Tensor      # (B, P) 1 = real token
    positions: torch.Tensor           # (3, B, P) M-RoPE positions (0 on padding)
    next_position: torch.Tensor       # (B,) position of the first generated token
    pixel_values: torch.Tensor | None   # (patches of all images, channels * 2 * 14 * 14)
    image_grid_thw: torch.Tensor | None  # (images, 3) patch grid of each image

    def to(self, device):
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                        for f in fields(self)})


def mrope_positions(ids, grids, image_token_id, merge):
    """One prompt's M-RoPE positions (3, L) and the position where generation continues.

    Text: t = h = w = running position. An image of (t, h, w) merged tokens starting at position s:
    (s + frame, s + row, s + col); text after it resumes at s + max(t, h, w).
    """
    pos, cur, i, grid = [], 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] == image_token_id:
            t, h, w = (int(v) for v in next(grid))
            h, w = h // merge, w // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pos.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
            i, cur = i + t * h * w, cur + max(t, h, w)
        else:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            pos.append(torch.arange(cur, cur + j - i).expand(3, -1))
            i, cur = j, cur + j - i
    return torch.cat(pos, 1), cur


class Processor:
    """Tokenizer + Hugging Face's image processor, and the prompt encoding the model expects."""

    def __init__(self, tokenizer, image_processor, config):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id, self.merge = config.image_token_id, config.vision_config.spatial_merge_size
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None})

    def chat_text(self, prompt):
        """Our prompts mark the image with '<image>' (as the paper's prompt does); the chat template places it there."""
        before, found, after = prompt.partition("<image>")
        content = [{"type": "text", "text": before}] + ([{"type": "image"}, {"type": "text", "text": after}] if found else [])
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, samples, max_prompt_len=None):
        """Samples -> Batch. A prompt over max_prompt_len tokens is an error, never truncated."""
        texts = [self.chat_text(s.prompt) for s in samples]
        images = [s.load_image() for s, t in zip(samples, texts) if self.image_token in t]
        pixel_values = grid = None
        if images:
            out = self.image_processor(images=images, return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        rows, k = [], 0
        for s, text in zip(samples, texts):
            n_img = text.count(self.image_token)
            sizes = [int(g.prod()) // self.merge ** 2 for g in grid[k:k + n_img]] if n_img else []
            parts = text.split(self.image_token)
            text = parts[0] + "".join(self.image_token * n + p for n, p in zip(sizes, parts[1:]))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if max_prompt_len and len(ids) > max_prompt_len:
                raise ValueError(f"sample {s.id}: prompt is {len(ids)} tokens, over the limit of {max_prompt_len} "
                                 f"(raise --max_prompt_len, or lower --max_pixels to shrink its image tokens)")
            rows.append((ids, mrope_positions(ids, grid[k:k + n_img] if n_img else [], self.image_token_id, self.merge)))
            k += n_img
        P = max(len(ids) for ids, _ in rows)
        B = len(rows)
        input_ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, P, dtype=torch.long)
        positions = torch.zeros(3, B, P, dtype=torch.long)
        for b, (ids, (pos, _)) in enumerate(rows):
            input_ids[b, P - len(ids):] = torch.tensor(ids)
            mask[b, P - len(ids):] = 1
            positions[:, b, P - len(ids):] = pos
        nxt = torch.tensor([n for _, (_, n) in rows])
        return Batch(input_ids, mask, positions, nxt, pixel_values, grid)

    def decode(self, tokens, mask):
        return [self.tokenizer.decode(t[m.bool()].tolist(), skip_special_tokens=True) for t, m in zip(tokens, mask)]

    def save_pretrained(self, folder):
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def _image_processor_class():
    import transformers
    # transformers 5 without torchvision: the PIL backend (the default class would need torchvision)
    return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


# ----------------------------------------------------------------------------------------------------
# Presets and loading
# ----------------------------------------------------------------------------------------------------
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (  # Qwen2.5-VL's chat format: a default system turn, images as vision_start/pad/end
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

PRESETS = {  # random-weight models in Qwen2.5-VL's architecture
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, rope_theta=10000.0, mrope_section=[4, 6, 6]),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1]),
                 min_pixels=112 * 112, max_pixels=112 * 112),
    # eval.py's experiment: the base pre-trained on scene questions (3.6M parameters; 36 image tokens).
    # M-RoPE over head_dim 32 (16 rotary pairs, pair i turning 1000^(-i/16) rad per step): an image's rows
    # turn pairs 1-2 (0.65, 0.42 rad per row), its columns pairs 3-15 (0.27 rad per column, then slower);
    # at rope_theta 1e4 and 4/6/6 a column turns by 0.003 rad and a base cannot tell where things are
    # (tests/test_model.py's square). Text turns every pair, the slowest by 0.0015 rad per token, so that a
    # thought still matches its option line 100+ tokens back (the README's "GRPO against SFT, in miniature")
    "small": dict(text=dict(hidden_size=192, intermediate_size=576, num_hidden_layers=6, num_attention_heads=6,
                            num_key_value_heads=2, rope_theta=1000.0, mrope_section=[1, 2, 13]),
                  vision=dict(depth=3, hidden_size=96, intermediate_size=192, num_heads=4, fullatt_block_indexes=[2]),
                  min_pixels=168 * 168, max_pixels=168 * 168),
}


def bpe_tokenizer(vocab_size=1024):
    """A byte-level BPE tokenizer, like Qwen's, trained here on Robot-R1's prompt templates (data.py's
    template_corpus: fixed text, no answers), with Qwen's special tokens and chat template. Digits,
    newlines, option labels [[A]]..[[D]] and the think/answer tags stay separate tokens.
    Deterministic: the same corpus gives the same vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from data import template_corpus               # the prompts' fixed text: what this tokenizer must compress
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\[\[[A-D]\]\]|</?think>|</?answer>|\d|\n"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(template_corpus() * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        max_token_length=48))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIAL)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def preset_config(name, vocab_size, special_ids):
    p = PRESETS[name]
    t = dict(p["text"])
    rope = {"rope_type": "default", "rope_theta": t.pop("rope_theta"), "mrope_section": t.pop("mrope_section")}
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         rope_parameters=rope, bos_token_id=special_ids["<|endoftext|>"],
                         eos_token_id=special_ids["<|im_end|>"], pad_token_id=special_ids["<|endoftext|>"], **t),
        vision_config=dict(out_hidden_size=t["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, **p["vision"]),
        image_token_id=special_ids["<|image_pad|>"], video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"], vision_end_token_id=special_ids["<|vision_end|>"],
        tie_word_embeddings=False)


def init_weights(model, seed, std=0.02):
    """Deterministic random weights: normal(0, std) matrices, zero biases, unit norms."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        with torch.no_grad():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def _hf_to_ours(key):
    """Checkpoint names (hub: 'model.layers.0...', 'visual...'; transformers 5: 'model.language_model...')."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


def _ours_to_hf(key):  # the hub's layout, which every transformers version loads
    return key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)


def _resolve(name):
    folder = Path(name)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]))
    except Exception as e:
        raise FileNotFoundError(f"{name!r} is neither a preset ({', '.join(PRESETS)}), nor a local folder, nor a "
                                f"downloadable hub model ({type(e).__name__}: {e})") from None


def check_source(name, flag="--model"):
    """Fail before any work unless `name` is a preset or a complete checkpoint folder (a hub id is
    downloaded first): its config, tokenizer, image-processor settings and weights present and readable.
    -> the folder, or None for a preset."""
    from data import UserError
    if name in PRESETS:
        return None
    try:
        folder = _resolve(name)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{flag} {e}") from None
    wanted = {"config.json": ["config.json"], "the image processor's preprocessor_config.json": ["preprocessor_config.json"],
              "a tokenizer (tokenizer.json, or vocab.json with merges.txt)": ["tokenizer.json"] if (
                  folder / "tokenizer.json").exists() or not (folder / "vocab.json").exists() else ["vocab.json", "merges.txt"],
              "weights (*.safetensors)": [p.name for p in sorted(folder.glob("*.safetensors"))] or ["*.safetensors"]}
    missing = [what for what, names in wanted.items() if not all((folder / n).is_file() for n in names)]
    if missing:
        raise UserError(f"{flag} {name}: the folder {folder} lacks {', '.join(missing)}")
    for n in (n for names in wanted.values() for n in names):
        try:
            with open(folder / n, "rb") as f:
                f.read(1)
        except OSError as e:
            raise UserError(f"{flag} {name}: cannot read {folder / n} ({e.strerror or e})") from None
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except ValueError as e:
        raise UserError(f"{flag} {name}: {folder / 'config.json'} is not valid JSON ({e})") from None
    if kind not in ("qwen2_5_vl", "qwen2_5_vl_text"):
        raise UserError(f"{flag} {name}: {folder / 'config.json'} describes a {kind!r} model, not Qwen2.5-VL")
    return folder


def load(name="tiny", dtype=torch.float32, device="cpu", seed=0, min_pixels=None, max_pixels=None):
    """(model, processor) from a preset name ('tiny'), a local folder, or a hub id like
    'Qwen/Qwen2.5-VL-7B-Instruct'. min/max_pixels bound the image size the processor resizes to."""
    if name in PRESETS:
        tokenizer = bpe_tokenizer()
        config = preset_config(name, len(tokenizer), {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL})
        image_processor = _image_processor_class()(min_pixels=PRESETS[name]["min_pixels"],
                                                   max_pixels=PRESETS[name]["max_pixels"])
        model = Qwen2_5_VL(config)
        init_weights(model, seed)
        processor = Processor(tokenizer, image_processor, config)
    else:
        from safetensors.torch import load_file
        folder = check_source(name)
        config = Qwen2_5_VLConfig.from_pretrained(folder)
        processor = _folder_processor(folder, config)
        model = cast_parameters(Qwen2_5_VL(config, empty=True), dtype).materialize("cpu")
        files = sorted(folder.glob("*.safetensors"))
        state = {_hf_to_ours(k): v for f in files for k, v in load_file(f).items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not fit Qwen2.5-VL: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return cast_parameters(model.to(device), dtype), with_pixels(processor, min_pixels, max_pixels)


def _folder_processor(folder, config):
    """A checkpoint folder's tokenizer and image processor, with the prompt encoding the model expects."""
    from transformers import AutoTokenizer
    return Processor(AutoTokenizer.from_pretrained(folder), _image_processor_class().from_pretrained(folder), config)


def with_pixels(processor, min_pixels=None, max_pixels=None):
    """The processor with new bounds on the number of pixels images are resized to (None: keep)."""
    if min_pixels or max_pixels:
        processor.image_processor = _image_processor_class()(**{**processor.image_processor.to_dict(), **{
            k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}})
    return processor


READ_BYTES = 64 * 2 ** 20     # load_sharded reads a tensor's rows in blocks of about this many bytes


def load_sharded(name, mesh, dtype=torch.float32, checkpointing=False, **fsdp):
    """Lean loading for FSDP: (model with sharded parameters, processor), no rank ever holding the
    whole model. The model is built with its parameters on the meta device, sharded (apply_fsdp), given
    storage for its shards only, and each rank reads from the safetensors files only the rows of each
    tensor that it owns (FSDP2 shards dim 0 in chunks of ceil(rows / ranks)): file pages of other ranks'
    rows are never touched. `python model.py --bench-load` measures the host memory this takes.
    dtype: of the stored shards (fp32 for a policy that trains, bf16 for a frozen reference)."""
    from safetensors import safe_open
    folder = check_source(name)
    config = Qwen2_5_VLConfig.from_pretrained(folder)
    model = cast_parameters(Qwen2_5_VL(config, empty=True), dtype)
    if checkpointing:
        apply_checkpointing(model)
    apply_fsdp(model, mesh, **fsdp)
    device = mesh.device_type if mesh.device_type != "cuda" else torch.device("cuda", torch.cuda.current_device())
    model.materialize(device)
    where = {}                                          # our parameter name -> (file, the file's name for it)
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            where.update({_hf_to_ours(k): (f, k) for k in sf.keys()})
    rank, world = mesh.get_local_rank(), mesh.size()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname not in where:
                raise ValueError(f"{folder}: no weights for {pname}")
            file, key = where[pname]
            local = p.to_local()
            start = rank * -(-p.shape[0] // world)
            # in blocks of rows, the file reopened for each: the host holds at most one block twice (its
            # mapped file pages and the tensor read from them), however large the tensor
            rows = max(1, READ_BYTES // max(local[:1].nbytes, 1))
            for a in range(0, local.shape[0], rows):
                with safe_open(file, "pt") as sf:
                    local[a:a + rows].copy_(sf.get_slice(key)[start + a:start + min(a + rows, local.shape[0])])
    return model, _folder_processor(folder, config)


def plain_copy(model, dtype):
    """An inference copy of a model, FSDP-sharded or not: plain modules (no hooks, so its decode step
    can be a CUDA graph), parameters in `dtype` on the model's device. Fill it with copy_weights."""
    twin = cast_parameters(Qwen2_5_VL(model.config, empty=True), dtype).materialize(next(model.parameters()).device)
    copy_weights(twin, model)
    return twin.eval().requires_grad_(False)


def copy_weights(dst, src):
    """dst's parameters and buffers := src's, one tensor at a time. A sharded parameter is cast to
    dst's dtype on its shard and then all-gathered (bf16 on the wire: half the bytes of fp32)."""
    params, buffers = dict(src.named_parameters()), dict(src.named_buffers())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            s = params[name]
            p.copy_(s.to(p.dtype).full_tensor() if hasattr(s, "full_tensor") else s)
        for name, b in dst.named_buffers():
            b.copy_(buffers[name])


def cast_parameters(model, dtype):
    """Parameters to `dtype`; buffers keep theirs. The vision tower's rotary inv_freq stays fp32, as
    transformers keeps it: cast to bf16, its angles (and so every image token) would drift from the
    reference's by ~1e-2 relative."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def save_hf(state_dict, config, processor, folder):
    """Write a folder that transformers' Qwen2_5_VLForConditionalGeneration.from_pretrained loads."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {_ours_to_hf(k): v.detach().contiguous() for k, v in state_dict.items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    processor.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------
# Scaling helpers: activation checkpointing, FSDP2, sizes
# ----------------------------------------------------------------------------------------------------
def blocks(model):
    return list(model.model.language_model.layers) + list(model.model.visual.blocks)


def apply_checkpointing(model):
    """Recompute each decoder and vision block in the backward instead of storing its activations
    (non-reentrant torch.utils.checkpoint; the same numbers, ~1/3 more compute, far less memory)."""
    for block in blocks(model):
        block.forward = _checkpointed(block.forward)
    return model


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def setup_distributed(group_on_one_gpu=True):
    """torchrun gives RANK/WORLD_SIZE: one process per GPU (NCCL), or CPU processes (gloo, for tests).
    Without torchrun a single GPU also runs as a 1-rank group when `group_on_one_gpu` (training: so that
    FSDP's bf16/fp32 mixed precision applies). -> (rank, world size, device)"""
    import os
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ and not (cuda and group_on_one_gpu):
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


FSDP_METHODS = ("image_features", "next_token_logits", "completion_logprobs")


def apply_fsdp(model, mesh=None, param_dtype=torch.bfloat16, reduce_dtype=torch.float32):
    """FSDP2: shard every decoder block and vision block across the mesh, then the rest at the root.

    Parameters stay sharded (fp32 master copies) between uses; a block's forward all-gathers it in
    param_dtype and frees it after, gradients reduce-scatter in reduce_dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for name in FSDP_METHODS:  # FSDP hooks wrap forward(); these entry points need them too
        register_fsdp_forward_method(model, name)
    return model


@contextlib.contextmanager
def gathered(model):
    """Unshard FSDP parameters once for a whole rollout instead of once per generated token."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


# ----------------------------------------------------------------------------------------------------
# Benchmark: the host memory of lean loading
# ----------------------------------------------------------------------------------------------------
def _host_gb(field):
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in GB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9


def _load_on_rank(rank, world, folder, port):
    import os
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    base = _host_gb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:      # VmHWM := VmRSS: the peak counts from here
        f.write("5")
    policy, _ = load_sharded(folder, mesh, torch.float32)          # as grpo.py starts: the policy in fp32 shards,
    ref, _ = load_sharded(folder, mesh, torch.bfloat16)            # the reference in bf16 shards
    peak = _host_gb("VmHWM") - base
    kept = sum(p.to_local().nbytes for m in (policy, ref) for p in m.parameters()) / 1e9
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(dict(base=base, peak=peak, kept=kept)))
    dist.destroy_process_group()


def bench_load(layers=1, world=2, port=29551):
    """Host memory of grpo.py's start-up (policy and reference through load_sharded) on `world` gloo ranks,
    from a stand-in checkpoint with Qwen2.5-VL-7B's widths and vocabulary and `layers` blocks (random bf16).
    Per rank: the peak above the baseline, minus the shards it keeps (on a GPU those live on the device, so
    the rest is the host's whole cost), against the target of 0.25 x the checkpoint's bytes."""
    import tempfile
    import torch.multiprocessing as mp
    from sample import qwen7b_config
    config = qwen7b_config(layers, layers)
    _, processor = load("tiny")
    with tempfile.TemporaryDirectory() as folder:
        gen = torch.Generator().manual_seed(0)
        state = {name: (torch.randn(p.shape, generator=gen) * 0.02).bfloat16()
                 for name, p in Qwen2_5_VL(config, empty=True).named_parameters()}
        save_hf(state, config, processor, folder)
        ckpt = sum(t.nbytes for t in state.values()) / 1e9
        del state
        mp.spawn(_load_on_rank, (world, folder, port), nprocs=world)
        ranks = [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(world)]
    print(f"lean loading on {world} gloo ranks, stand-in checkpoint {ckpt:.2f} GB (7B widths, {layers} blocks, bf16)")
    print(f"{'rank':>4s} {'baseline GB':>11s} {'peak above':>10s} {'kept shards':>11s} {'excess GB':>9s} {'x ckpt':>7s}")
    for r, m in enumerate(ranks):
        excess = m["peak"] - m["kept"]
        print(f"{r:4d} {m['base']:11.2f} {m['peak']:10.2f} {m['kept']:11.2f} {excess:9.2f} {excess / ckpt:7.3f}"
              f"  {'within' if excess <= 0.25 * ckpt else 'OVER'} the 0.25x target")
    block = 2 * READ_BYTES / 1e9
    print(f"7B on 8 ranks, by calculation: besides a fixed overhead like the one above, a rank holds one block of "
          f"rows twice (mapped file pages + the tensor read from them: <= {block:.2f} GB) whatever a tensor's size: "
          f"<= {block / 16.58:.3f} x the 16.58 GB checkpoint")
    return ranks


if __name__ == "__main__":
    if "--bench-load" in sys.argv:
        bench_load()
    else:
        print(__doc__)
