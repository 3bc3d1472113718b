"""kernels.py: Triton kernels for the two places where GRPO in plain PyTorch wastes memory or launches.

1. fused_logprob(hidden [N, H], weight [V, H], targets [N], temperature) -> log p(target) [N] fp32
   The policy loss needs one number per completion token, log p(token), yet `log_softmax(h @ W.T)`
   builds the whole [N, V] logits tensor first: for Qwen2.5-VL's V = 152,064 and 16 x 1,024 tokens
   that is 10 GB in fp32, twice over with its gradient. Here the vocabulary is tiled and the logits
   of one tile live only in registers.
2. group_advantages(rewards [B*G], group_size) -> advantages [B*G]
   GRPO's baseline: each sample's reward against its own group's mean and std, one program per group.

Each has a plain-PyTorch twin (`*_reference`) that the tests compare against in float64. Dispatch:
Triton on CUDA; Triton's CPU interpreter when TRITON_INTERPRET=1 (the tests); otherwise a chunked
PyTorch path that still never builds [N, V].

    python kernels.py --bench      # N=16,384 H=3,584 V=152,064 bf16, against plain torch (and Liger)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _on_triton(t):
    return t.is_cuda or INTERPRET


# ----------------------------------------------------------------------------------------------------
# fused log-prob: forward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc[i, j] = h[rows[i]] . w[cols[j]], fp32, on the tensor cores (K-loop over H)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < H),
                    other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=(cols[:, None] < V) & (ks[None, :] < H),
                    other=0.0)
        if UPCAST:  # Triton's interpreter multiplies bf16 tiles as raw integers; bf16 -> fp32 is exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logprob_fwd_kernel(h_ptr, w_ptr, t_ptr, part_ptr, N, V, H, stride_h, stride_w, tiles_per_split, inv_temp,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_N rows x one split of the vocabulary. Online log-sum-exp over its V tiles.

    Writes, per row, (m, s, z_t, a) for its split: running max m, sum s = sum_v exp(z_v - m), the target's
    logit z_t when the target falls in this split (else 0), and a = sum_v exp(z_v - m) (z_v - m), for the
    entropy log s - a / s. Taken from the max, not as lse - E[z]: with logits of 1e5 those two would agree
    to fp32's last bits (1e-2) and leave their rounding as the entropy of a near-tied row.
    """
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = tl.load(t_ptr + rows, mask=rows < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(pid_s * tiles_per_split, (pid_s + 1) * tiles_per_split):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K,
                         UPCAST, PRECISION) * inv_temp
        z = tl.where(cols[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # a tile wholly past V
        p = tl.exp(z - m_safe[:, None])                              # 0 past V (z = -inf there)
        zs = tl.where(cols[None, :] < V, z - m_safe[:, None], 0.0)  # z - m, <= 0; 0, not -inf, past V
        scale = tl.exp(m - m_safe)
        shift = tl.where(s > 0, m - m_safe, 0.0)                     # re-centre a on the new max
        a = (a + shift * s) * scale + tl.sum(p * zs, 1)
        s = s * scale + tl.sum(p, 1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
    base = part_ptr + pid_s * 4 * N + rows
    tl.store(base, m, mask=rows < N)
    tl.store(base + N, s, mask=rows < N)
    tl.store(base + 2 * N, zt, mask=rows < N)
    tl.store(base + 3 * N, a, mask=rows < N)


def _triton_config(hidden):
    if hidden.is_cuda:
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_N=32, BLOCK_V=1024, BLOCK_K=64)   # the interpreter: fewer, larger tiles run faster


def _precision(t):
    """fp32 operands: exact fp32 products ("ieee"), not tf32; bf16 operands: the tensor cores' default."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _lse_triton(hidden, weight, targets, inv_temp):
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _triton_config(hidden)
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    # Enough programs to fill the GPU: split the vocabulary when there are few row blocks.
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 1
    splits = max(1, min(n_tiles, triton.cdiv(2 * sms, row_blocks)))
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)
    part = torch.empty(splits, 4, N, device=hidden.device, dtype=torch.float32)
    _logprob_fwd_kernel[(row_blocks, splits)](
        hidden, weight, targets, part, N, V, H, hidden.stride(0), weight.stride(0), per_split, inv_temp,
        UPCAST=INTERPRET and hidden.dtype != torch.float32, PRECISION=_precision(hidden), **cfg)
    m, s, zt, a = part.unbind(1)                                     # each (splits, N); every split holds
    big = m.max(0).values                                            # a column < V, so each m is finite
    w = torch.exp(m - big)
    total = (s * w).sum(0)
    a = (w * (a + (m - big) * s)).sum(0)                             # re-centred on the overall max
    lse = big + torch.log(total)
    return lse, zt.sum(0), torch.log(total) - a / total              # lse, target logit, entropy


def _lse_torch(hidden, weight, targets, inv_temp, chunk_rows):
    """The same numbers, chunk of rows by chunk of rows, in fp32 (CPU without Triton)."""
    lse, zt, ent = (torch.empty(len(hidden), device=hidden.device, dtype=torch.float32) for _ in range(3))
    for i in range(0, len(hidden), chunk_rows):
        z = (hidden[i:i + chunk_rows].float() @ weight.float().T) * inv_temp       # (C, V)
        lse[i:i + chunk_rows] = torch.logsumexp(z, 1)
        zt[i:i + chunk_rows] = z.gather(1, targets[i:i + chunk_rows, None]).squeeze(1)
        zs = z - z.max(1, keepdim=True).values                                   # entropy from the max,
        e = torch.exp(zs)                                                        # as the kernel takes it
        s = e.sum(1)
        ent[i:i + chunk_rows] = torch.log(s) - (e * zs).sum(1) / s
    return lse, zt, ent


# ----------------------------------------------------------------------------------------------------
# fused log-prob: backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, g_ptr, d_ptr, N, V, H, stride_h, stride_w, stride_d, inv_temp,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One [BLOCK_N, BLOCK_V] tile of d loss / d (h.w): recompute the logits, then g (onehot - p) / tau."""
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K,
                     UPCAST, PRECISION) * inv_temp
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    g = tl.load(g_ptr + rows, mask=rows < N, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=rows < N, other=-1)
    p = tl.exp(z - lse[:, None])
    d = (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p) * (g * inv_temp)[:, None]
    tl.store(d_ptr + rows[:, None] * stride_d + cols[None, :], d.to(d_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < V))


def _dlogits(h, w, targets, lse, g, inv_temp, out):
    """out[i, v] = g_i (1[v = t_i] - p_iv) / tau for a block of rows and a block of vocabulary."""
    if _on_triton(h):
        cfg = _triton_config(h)
        grid = (triton.cdiv(len(h), cfg["BLOCK_N"]), triton.cdiv(len(w), cfg["BLOCK_V"]))
        _dlogits_kernel[grid](h, w, targets, lse, g, out, len(h), len(w), h.shape[1], h.stride(0), w.stride(0),
                              out.stride(0), inv_temp, UPCAST=INTERPRET and h.dtype != torch.float32,
                              PRECISION=_precision(h), **cfg)
        return out
    z = (h.float() @ w.float().T) * inv_temp
    d = -torch.exp(z - lse[:, None])
    hit = (targets >= 0) & (targets < len(w))
    d[hit, targets[hit]] += 1.0
    return out.copy_(d * (g * inv_temp)[:, None])


class _FusedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_bytes):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        inv_temp = 1.0 / temperature
        if _on_triton(hidden):
            lse, zt, ent = _lse_triton(hidden, weight, targets, inv_temp)
        else:
            lse, zt, ent = _lse_torch(hidden, weight, targets, inv_temp, _rows_per_chunk(weight, 4, chunk_bytes))
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.inv_temp, ctx.chunk_bytes = inv_temp, chunk_bytes
        ctx.mark_non_differentiable(ent)
        return zt - lse, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        """grad_h = D @ W and grad_W = D^T @ h with D = d loss / d(h.w), built block by block.

        Vocabulary blocks outside, row blocks inside: grad_W's fp32 accumulator is one vocabulary
        block, grad_h's is [N, H]; each block of D is computed once (the recomputed matmul).
        """
        hidden, weight, targets, lse = ctx.saved_tensors
        N, H = hidden.shape
        V = weight.shape[0]
        g = grad_logp.float().contiguous()
        dtype = hidden.dtype
        rows, cols = _block_shape(N, V, hidden.element_size(), ctx.chunk_bytes)
        grad_h = torch.zeros(N, H, device=hidden.device, dtype=torch.float32)
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        buf = torch.empty(rows, cols, device=hidden.device, dtype=dtype)
        for v0 in range(0, V, cols):
            w = weight[v0:v0 + cols]
            gw = torch.zeros(len(w), H, device=hidden.device, dtype=torch.float32)
            for n0 in range(0, N, rows):
                h = hidden[n0:n0 + rows]
                d = _dlogits(h, w, targets[n0:n0 + rows] - v0, lse[n0:n0 + rows], g[n0:n0 + rows], ctx.inv_temp,
                             buf[:len(h), :len(w)])
                grad_h[n0:n0 + rows] += d @ w.to(dtype)
                if grad_w is not None:
                    gw += d.T @ h
            if grad_w is not None:
                grad_w[v0:v0 + cols] = gw
        return grad_h.to(dtype), grad_w, None, None, None


def _rows_per_chunk(weight, bytes_per_el, chunk_bytes):
    return max(16, chunk_bytes // (weight.shape[0] * bytes_per_el))


def _block_shape(N, V, el_bytes, chunk_bytes):
    """Rows x vocabulary of one block of D within chunk_bytes; large enough to keep matmuls efficient."""
    cols = min(V, 1 << 14)
    rows = min(N, max(128, chunk_bytes // (cols * el_bytes)))
    return rows, cols


def fused_logprob(hidden, weight, targets, temperature=1.0, return_entropy=False, chunk_bytes=1 << 27):
    """log softmax(hidden @ weight.T / temperature)[targets], without ever building [N, V].

    hidden [N, H] and weight [V, H] in bf16 or fp32, targets [N] int64 -> [N] fp32, differentiable in
    hidden and weight. The forward streams the vocabulary through an online log-sum-exp:
        m_new = max(m, max_v z_v);  s = s * exp(m - m_new) + sum_v exp(z_v - m_new);  lse = m + log s
    which is exact (the same sum, rescaled as the running max grows) and keeps one [BLOCK_N, BLOCK_V]
    tile of logits in registers. The backward recomputes each tile instead of storing it: memory goes
    from O(N V) to O(N H) plus one block of `chunk_bytes`, for one extra matmul of compute.
    With return_entropy, also the per-token entropy of the softmax (for logging; not differentiable).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_logprob wants hidden [N, H], weight [V, H], targets [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    logp, ent = _FusedLogProb.apply(hidden, weight, targets.long(), float(temperature), int(chunk_bytes))
    return (logp, ent) if return_entropy else logp


def fused_logprob_reference(hidden, weight, targets, temperature=1.0):
    """The plain definition: build all logits, log_softmax, gather. Float64 when given float64."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden.to(acc) @ weight.to(acc).T) / temperature
    return torch.log_softmax(logits, -1).gather(1, targets.long()[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _group_adv_kernel(r_ptr, out_ptr, G, eps, SCALE: tl.constexpr, BLOCK_G: tl.constexpr):
    """One program per group of G samples of the same prompt: (r - mean) / (std + eps), unbiased std."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_G)
    valid = offs < G
    r = tl.load(r_ptr + pid * G + offs, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(r, 0) / G
    dev = tl.where(valid, r - mean, 0.0)
    std = tl.sqrt(tl.sum(dev * dev, 0) / tl.maximum(G - 1, 1))
    adv = dev / (std + eps) if SCALE else dev
    # All rewards equal (G = 1 included): no signal. Exactly 0, not rounding noise over eps.
    same = tl.max(tl.where(valid, r, float("-inf")), 0) == tl.min(tl.where(valid, r, float("inf")), 0)
    tl.store(out_ptr + pid * G + offs, tl.where(same, 0.0, adv), mask=valid)


def group_advantages(rewards, group_size, scale=True, eps=1e-6):
    """GRPO's advantage: rewards [B*G] (G consecutive samples per prompt) -> [B*G] fp32.

    A_i = (r_i - mean_g r) / (std_g r + eps) with the unbiased std (EasyR1, which the paper used);
    scale=False gives Dr. GRPO's mean-centred A_i = r_i - mean_g r. A group whose rewards are all
    equal (every sample right, or every sample wrong) teaches nothing and gets exactly 0.
    Example: rewards [2, 1, 1, 0] with G = 4 -> mean 1, std 0.816 -> [1.22, 0, 0, -1.22].
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B*G] with G={group_size} dividing it; got {tuple(rewards.shape)}")
    if not _on_triton(rewards):
        return group_advantages_reference(rewards.float(), group_size, scale, eps)
    r = rewards.float().contiguous()
    out = torch.empty_like(r)
    _group_adv_kernel[(r.numel() // group_size,)](r, out, group_size, eps, SCALE=scale,
                                                   BLOCK_G=triton.next_power_of_2(group_size))
    return out


def group_advantages_reference(rewards, group_size, scale=True, eps=1e-6):
    r = rewards.view(-1, group_size)
    dev = r - r.mean(1, keepdim=True)
    adv = dev / (r.std(1, keepdim=True) + eps) if scale and group_size > 1 else dev
    same = r.max(1, keepdim=True).values == r.min(1, keepdim=True).values
    return torch.where(same, torch.zeros_like(adv), adv).view(-1)


# ----------------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------------
def bench(N=16384, H=3584, V=152064, reps=10):
    """Forward and forward+backward: time (median ms) and peak memory beyond the inputs, vs plain torch."""
    if not torch.cuda.is_available():
        print("kernels.py --bench needs a CUDA GPU (Triton compiles for it); nothing measured here.")
        return []
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    h = (torch.randn(N, H, device=dev, dtype=dt) * 0.5).requires_grad_()
    w = (torch.randn(V, H, device=dev, dtype=dt) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev)
    g = torch.randn(N, device=dev)

    def plain(h, w, t):
        return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None]).squeeze(1)

    impls = {"torch (logits + log_softmax)": plain, "fused_logprob (ours)": fused_logprob}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        impls["Liger fused linear CE"] = lambda h, w, t: -liger(w, h, t)
    except ImportError:
        print("(liger_kernel not importable: its row is left out)")
    flops = 2 * N * H * V
    rows = []
    for name, fn in impls.items():
        for mode in ("fwd", "fwd+bwd"):
            def step():
                if mode == "fwd":
                    with torch.no_grad():
                        return fn(h, w, t)
                h.grad = w.grad = None
                (fn(h, w, t) * g).sum().backward()
            step()
            torch.cuda.synchronize()
            h.grad = w.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 1e9
            ms = triton.testing.do_bench(step, warmup=50, rep=reps * 100, return_mode="median")
            n_mm = 1 if mode == "fwd" else 4
            rows.append((name, mode, ms, extra, n_mm * flops / ms / 1e9))
    print(f"\nfused log-prob, N={N} H={H} V={V} bf16, {torch.cuda.get_device_name()}")
    print(f"{'implementation':32s} {'pass':8s} {'ms':>8s} {'extra GB':>9s} {'TFLOP/s*':>9s}")
    for name, mode, ms, extra, tf in rows:
        print(f"{name:32s} {mode:8s} {ms:8.1f} {extra:9.2f} {tf:9.0f}")
    print("* counting 1 matmul (2NHV) forward and 4 forward+backward, as a recomputing backward does")
    return rows


if __name__ == "__main__":
    import sys
    if "--bench" in sys.argv:
        bench()
    else:
        print(__doc__)
