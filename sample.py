"""sample.py: the KV-cached group sampler, GRPO's rollout engine.

GRPO asks for G completions of every prompt. The prompt, with its image, is the expensive shared part:
    prefill  each prompt once: vision tower + decoder over its P tokens, keys/values into a static cache
    share    copy each prompt's cache rows to its G samples
    decode   one token per row per step, all rows in lockstep, reading the cache, never recomputing
Rows that finish (EOS) keep stepping on padding until every row is done; "all done?" is asked of the
GPU only every `check_every` steps, so the loop never waits on the host. On a GPU the decode step is
a CUDA graph (one per 256-slot window of the cache, so early steps read only the filled part).

Randomness is counter-based: row r's token at step s is drawn from a uniform number that is a hash
of (r's seed, s). So a sample is a pure function of its seed: the same on any rank, in any batch,
after any resume, and nothing random lives inside the CUDA graph.

    python sample.py --bench     # 7B-shaped decode, batch 1 / 64 / 16x4, beside Hugging Face generate
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model import KVCache, gathered


@dataclass
class Rollout:
    tokens: torch.Tensor     # (R, T) completion tokens, R = prompts * samples; pad after the end
    mask: torch.Tensor       # (R, T) 1 on the completion's tokens, its EOS included
    lengths: torch.Tensor    # (R,) tokens per completion
    logprobs: torch.Tensor   # (R, T) log p(token) under softmax(logits / temperature), before top-p


# ----------------------------------------------------------------------------------------------------
# Counter-based randomness
# ----------------------------------------------------------------------------------------------------
M32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32) (products stay below 2^63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def row_seeds(prompt_seeds, num_samples):
    """Seed of sample j of prompt b, from the prompt's seed: (B,) -> (B * num_samples,)."""
    j = torch.arange(num_samples, device=prompt_seeds.device).repeat(len(prompt_seeds))
    return _mix(_mix(prompt_seeds.long() & M32).repeat_interleave(num_samples) ^ (j * 0x9E3779B1 & M32))


def uniform(seeds, step):
    """(R,) seeds, an int step -> (R,) float64 uniform in (0, 1), a pure function of (seed, step)."""
    return (_mix(_mix(seeds) ^ ((step * 0x2545F491 + 0x6A09E667) & M32)).double() + 0.5) / 2.0 ** 32


def choose(logits, temperature, top_p, seeds, step):
    """Sample one token per row from softmax(logits / temperature), restricted to the top-p nucleus.

    Inverse-CDF sampling with one uniform per row: sort (for top-p), cumulative sum, binary search.
    temperature 0 is greedy. Returns tokens (R,) and log p(token) under the full tempered softmax.
    """
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1)
    logp = torch.log_softmax(logits / temperature, -1)
    probs, order = logp.exp(), None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)       # keep until the mass reaches top_p
    cdf = probs.double().cumsum(-1)
    u = uniform(seeds, step) * cdf[:, -1]
    j = torch.searchsorted(cdf, u[:, None]).clamp_max(logits.shape[1] - 1)
    tok = (order.gather(1, j) if order is not None else j).squeeze(1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------
WINDOW = 256   # attention reads the cache up to the next multiple of this, not all of it


def generate(model, batch, num_samples=1, max_new_tokens=256, temperature=1.0, top_p=1.0, eos_ids=(),
             seeds=None, pad_id=0, check_every=16, cuda_graph=None, engine=None) -> Rollout:
    """G = num_samples completions of each prompt in `batch` (a model.Batch), as R = B * G rows
    ordered prompt by prompt (row b * G + j is sample j of prompt b).

    seeds: where randomness comes from: an int tensor of B prompt seeds (expanded by row_seeds), or of R
    row seeds (used as given; with G = 1 the two coincide); None draws prompt seeds from torch's default
    generator. temperature 0 decodes greedily.
    cuda_graph: capture the decode step (default: on CUDA, for a model without FSDP hooks: a graph may
    not hold the collectives that gather FSDP's shards).
    engine: an Engine kept between calls (its caches and graphs are reused); default: a fresh one.
    """
    dev = batch.input_ids.device
    B, P = batch.input_ids.shape
    R, G = B * num_samples, num_samples
    seeds = torch.randint(0, 2 ** 31 - 1, (B,)) if seeds is None else seeds
    seeds = seeds.to(dev).long()
    if len(seeds) not in (B, R):
        raise ValueError(f"seeds: {len(seeds)} seeds for {B} prompts x {G} samples")
    seeds = seeds if len(seeds) == R else row_seeds(seeds, G)
    engine = engine or Engine(model, cuda_graph)
    if engine.model is not model:
        raise ValueError("generate: the engine was made for another model")
    eos = torch.tensor(list(eos_ids) or [-1], device=dev)
    with gathered(model), torch.no_grad():
        # prefill: each prompt once, into a P-slot cache; then its keys/values to its G rows of the decode cache
        prefill = KVCache(model, B, P)
        feats = model.image_features(batch.pixel_values, batch.image_grid_thw) if batch.pixel_values is not None else None
        logits = model.next_token_logits(batch.input_ids, batch.positions, batch.attention_mask, feats, cache=prefill,
                                         slot=torch.tensor(0, device=dev))
        cache, step = engine.get(R, P + max_new_tokens, dev)
        end = cache.max_len if engine.cuda_graph else P + max_new_tokens
        cache.load_prefix(prefill, G)
        del prefill
        logits = logits.repeat_interleave(G, 0)
        pos0 = batch.next_position.repeat_interleave(G)
        tokens = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros(R, max_new_tokens, device=dev)
        lengths = torch.full((R,), max_new_tokens, device=dev)
        done = torch.zeros(R, dtype=torch.bool, device=dev)
        for s in range(max_new_tokens):
            tok, lp = choose(logits, temperature, top_p, seeds, s)
            tok = torch.where(done, pad_id, tok)
            tokens[:, s], logps[:, s] = tok, torch.where(done, 0.0, lp)
            ended = ~done & torch.isin(tok, eos)
            lengths = torch.where(ended, s + 1, lengths)
            done = done | ended
            if s + 1 == max_new_tokens or ((s + 1) % check_every == 0 and bool(done.all())):
                break
            # attention reads whole windows of the cache (a graph's cache holds whole windows: few distinct
            # lengths, so few graphs), never past this call's last slot when eager
            cache.attend_len = min(end, (P + s + 1 + WINDOW - 1) // WINDOW * WINDOW)
            logits = step(tok[:, None], (pos0 + s)[None, :, None].expand(3, R, 1), P + s)
    mask = (torch.arange(max_new_tokens, device=dev)[None] < lengths[:, None]).long()
    return Rollout(tokens, mask, lengths, logps * mask)


class Engine:
    """What a sampler keeps between calls: per number of rows, a static KV cache and its decode step.
    A CUDA graph replays fixed addresses, so keeping the cache keeps the graphs: captured in the first
    rollout, replayed in every later one. The cache only grows (with graphs, to a whole number of
    windows), so the lengths attention reads, and the graphs, are the same from one rollout to the next."""

    def __init__(self, model, cuda_graph=None):
        from torch.distributed.fsdp import FSDPModule
        dev = next(model.parameters()).device
        if cuda_graph is None:
            cuda_graph = dev.type == "cuda" and not any(isinstance(m, FSDPModule) for m in model.modules())
        self.model, self.cuda_graph, self.slots = model, cuda_graph, {}

    def get(self, rows, length, dev):
        """(cache with at least `length` slots, its decode step) for `rows` rows."""
        if rows not in self.slots or self.slots[rows][0].max_len < length:
            self.slots.pop(rows, None)                  # free the smaller cache (and its graphs) first
            cache = KVCache(self.model, rows, -(-length // WINDOW) * WINDOW if self.cuda_graph else length, device=dev)
            self.slots[rows] = (cache, (_GraphedStep if self.cuda_graph else _EagerStep)(self.model, cache, rows, dev))
        return self.slots[rows]

    def release(self):
        """Free the caches and their graphs (the next call allocates and captures again)."""
        self.slots.clear()


class _EagerStep:
    def __init__(self, model, cache, rows, dev):
        self.model, self.cache, self.ones = model, cache, torch.ones(rows, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros((), dtype=torch.long, device=dev)     # on the device: no host copy per token

    def __call__(self, tok, pos, slot):
        self.slot.fill_(slot)
        return self.model.next_token_logits(tok, pos, self.ones, cache=self.cache, slot=self.slot)


class _GraphedStep:
    """The decode step as CUDA graphs, one per attention window, replayed with new inputs copied into
    static buffers: one launch per step instead of hundreds of small kernels."""

    def __init__(self, model, cache, rows, dev):
        self.model, self.cache = model, cache
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(3, rows, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros((), dtype=torch.long, device=dev)
        self.ones = torch.ones(rows, 1, dtype=torch.long, device=dev)
        self.graphs, self.outputs, self.pool = {}, {}, None

    def _run(self):
        return self.model.next_token_logits(self.tok, self.pos, self.ones, cache=self.cache, slot=self.slot)

    def __call__(self, tok, pos, slot):
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.slot.fill_(slot)
        key = self.cache.attend_len
        if key not in self.graphs:          # warm up on a side stream, then capture (writes slot again: harmless)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[key] = self._run()
            self.graphs[key], self.pool = graph, graph.pool()
        self.graphs[key].replay()
        return self.outputs[key]


# ----------------------------------------------------------------------------------------------------
# Benchmark: 7B-shaped decode against Hugging Face generate
# ----------------------------------------------------------------------------------------------------
def qwen7b_config(layers=28, vision_layers=32):
    """Qwen2.5-VL-7B-Instruct's configuration (its widths and vocabulary); fewer blocks for a reduced model."""
    from transformers import Qwen2_5_VLConfig
    full_attention = [i for i in (7, 15, 23, 31) if i < vision_layers] or [vision_layers - 1]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                         max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=vision_layers, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, fullatt_block_indexes=full_attention, window_size=112, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _on_gpu_bf16(build):
    """Build a module directly on the GPU in bf16 (no fp32 copy on the host)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return build().eval()
    finally:
        torch.set_default_dtype(old)


def _copy_bandwidth(dev):
    """Bytes per second a 1 GiB device-to-device copy moves (read + write)."""
    import triton
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3)


def bench(new_tokens=256, text_tokens=60):
    """ms per decode step at batch 1, 64 and 16 prompts x G=4, beside HF generate, vs the bandwidth floor.

    A step's time is (time for new_tokens) - (time for new_tokens / 2), divided by new_tokens / 2, so
    prefill and one-off costs cancel; the floor is the bytes a step must read (text weights + KV cache)
    over the copy bandwidth measured in the same run.
    """
    if not torch.cuda.is_available():
        print("sample.py --bench needs a CUDA GPU; nothing measured here.")
        return []
    import inspect
    import numpy as np
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    from model import Batch, Qwen2_5_VL, _image_processor_class, mrope_positions
    dev = torch.device("cuda")
    config = qwen7b_config()
    torch.manual_seed(0)
    ours = _on_gpu_bf16(lambda: Qwen2_5_VL(config))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else (p.zero_() if name.endswith("bias") else p.fill_(1.0))
    hf = _on_gpu_bf16(lambda: Qwen2_5_VLForConditionalGeneration(config))
    hf.load_state_dict(ours.state_dict())
    proc = _image_processor_class()(min_pixels=336 * 336, max_pixels=336 * 336)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8))
    pix = proc(images=[img], return_tensors="pt")
    n_img = int(pix["image_grid_thw"].prod()) // 4
    ids = [151644] + list(range(1000, 1000 + text_tokens // 2)) + [151652] + [151655] * n_img + [151653] + \
        list(range(2000, 2000 + text_tokens // 2)) + [151645, 151644]
    pos, nxt = mrope_positions(ids, pix["image_grid_thw"], 151655, 2)

    def batch(b):
        return Batch(torch.tensor([ids] * b), torch.ones(b, len(ids), dtype=torch.long),
                     pos[:, None].expand(3, b, -1).contiguous(), torch.full((b,), nxt),
                     pix["pixel_values"].repeat(b, 1), pix["image_grid_thw"].repeat(b, 1)).to(dev)

    bw = _copy_bandwidth(dev)
    c = config.text_config
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters()
                       if "visual" not in n and "embed_tokens" not in n)
    kv_per_slot = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    takes_types = "mm_token_type_ids" in inspect.signature(hf.forward).parameters

    def per_step(run):
        times = []
        for n in (new_tokens // 2, new_tokens):
            run(n)
            torch.cuda.synchronize()
            t = time.perf_counter()
            run(n)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return (times[1] - times[0]) / (new_tokens - new_tokens // 2) * 1e3

    rows = []
    for prompts, G in ((1, 1), (64, 1), (16, 4)):
        b, R = batch(prompts), prompts * G
        ms = per_step(lambda n: generate(ours, b, G, n, temperature=1.0, top_p=0.99,
                                         seeds=torch.arange(prompts, device=dev)))
        kw = dict(input_ids=b.input_ids.repeat_interleave(G, 0), attention_mask=b.attention_mask.repeat_interleave(G, 0),
                  pixel_values=b.pixel_values.repeat(G, 1), image_grid_thw=b.image_grid_thw.repeat(G, 1),
                  do_sample=True, temperature=1.0, top_p=0.99, top_k=0)
        if takes_types:
            kw["mm_token_type_ids"] = (kw["input_ids"] == 151655).int()
        hf_ms = per_step(lambda n: hf.generate(**kw, max_new_tokens=n, min_new_tokens=n))
        floor = (weight_bytes + R * kv_per_slot * (len(ids) + new_tokens * 3 / 4)) / bw * 1e3
        rows.append((f"{prompts} prompts x G={G}", R, ms, R / ms * 1e3, floor, hf_ms))
    print(f"\ndecode, Qwen2.5-VL-7B shape (random bf16 weights), {len(ids)}-token prompt with a 336x336 image, "
          f"T=1.0 top-p 0.99, {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'batch':18s} {'rows':>5s} {'ms/step':>8s} {'tok/s':>8s} {'floor ms':>9s} {'of floor':>9s} "
          f"{'HF ms':>7s} {'vs HF':>6s}")
    for name, R, ms, tps, floor, hf_ms in rows:
        print(f"{name:18s} {R:5d} {ms:8.2f} {tps:8.0f} {floor:9.2f} {100 * floor / ms:8.0f}% {hf_ms:7.1f} "
              f"{hf_ms / ms:5.1f}x")
    return rows


if __name__ == "__main__":
    import sys
    if "--bench" in sys.argv:
        bench()
    else:
        print(__doc__)
