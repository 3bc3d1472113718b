"""kernels.py against float64 PyTorch: forward and both gradients, Triton (interpreted) and the torch path.

Tolerances, as relative norms ||ours - ref|| / ||ref||:
- fp32 inputs: the kernels accumulate in fp32 over H <= 128 terms: ~1e-6; we allow 1e-5.
- bf16 inputs: the reference runs in float64 on the same bf16 values, so the forward (fp32 accumulation)
  still lands near 1e-6; the gradients come back in bf16 (8 bits of mantissa, ~4e-3 per element), so 1e-2.
- Entropy, in nats: within 1e-5 + 1e-4 relative, plus what the logits' own fp32 rounding moves it by. Each
  logit is an fp32 dot product over H terms, off by at most dz_v = (H + 2) 2^-24 sum_k |h_k w_vk| / tau,
  and the entropy moves by dH = -sum_v p_v (z_v - E_p z) dz_v: nothing for a row with one dominant logit,
  up to a few 1e-2 nats for a near-tied row with logits of 1e5 (the extreme test draws one about once in
  100 seeds). No summation order recovers that; an entropy taken as lse - E_p z would add fp32's rounding
  of 1e5 (1e-2) to every row, and this bound catches it (seen before kernels.py took it from the max).
"""
import pytest
import torch

import kernels


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Run each test through the Triton kernels (interpreted on the CPU) and through the torch path."""
    assert kernels.INTERPRET, "tests/conftest.py sets TRITON_INTERPRET=1 before kernels is imported"
    if request.param == "torch":
        monkeypatch.setattr(kernels, "INTERPRET", False)
    return request.param


def check_logprob(N, H, V, dtype, temperature, scale=1.0, seed=None, chunk_bytes=1 << 27):
    seed = seed if seed is not None else torch.seed() % 2**31          # fresh inputs, named when a check fails
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=gen) * scale).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * scale / H ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=gen)
    g = torch.randn(N, generator=gen)
    logp, ent = kernels.fused_logprob(h, w, t, temperature, return_entropy=True, chunk_bytes=chunk_bytes)
    (logp * g).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = kernels.fused_logprob_reference(h64, w64, t, temperature)
    (ref * g.double()).sum().backward()
    z = h64 @ w64.T / temperature
    p = torch.softmax(z, -1)
    ref_ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    dz = (H + 2) * 2.0 ** -24 * (h64.abs() @ w64.abs().T) / temperature              # the module docstring
    ent_tol = 1e-5 + 1e-4 * ref_ent + (p * (z - (p * z).sum(-1, keepdim=True)).abs() * dz).sum(-1)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    assert torch.isfinite(logp).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all(), seed
    grad_tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(logp, ref) < 1e-5, seed
    bad = ((ent.double() - ref_ent).abs() > ent_tol).nonzero().flatten().tolist()
    assert not bad, f"seed {seed}, rows {bad}: entropy {ent[bad]}, float64 {ref_ent[bad]}, allowed {ent_tol[bad]}"
    assert rel(h.grad, h64.grad) < grad_tol, seed
    assert rel(w.grad, w64.grad) < grad_tol, seed
    return logp, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_logprob_matches_float64_on_odd_shapes(backend, dtype, temperature):
    check_logprob(N=37, H=72, V=1003, dtype=dtype, temperature=temperature)


def test_fused_logprob_in_several_blocks_of_rows_and_vocabulary(backend):
    # A tiny chunk_bytes forces the backward through many [rows x vocabulary] blocks.
    check_logprob(N=300, H=40, V=17000, dtype=torch.float32, temperature=1.0, chunk_bytes=1 << 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logprob_at_qwen_vocab_size(backend, dtype):
    check_logprob(N=3, H=64, V=152064, dtype=dtype, temperature=1.0)


@pytest.mark.parametrize("seed", [None, 278])     # 278 draws a near-tied row (see the module docstring)
def test_fused_logprob_extreme_logits_stay_finite(backend, seed):
    # logits of order +-1e5: a naive exp overflows; the online log-sum-exp must not.
    logp, ref = check_logprob(N=20, H=16, V=500, dtype=torch.float32, temperature=1.0, scale=300.0, seed=seed)
    assert (ref < -100).any(), "the test really produces extreme log-probs"


def test_fused_logprob_rejects_bad_shapes():
    with pytest.raises(ValueError, match="hidden \\[N, H\\], weight \\[V, H\\]"):
        kernels.fused_logprob(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("G", [1, 2, 5, 8, 13])
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_reference(backend, G, scale):
    B = 11
    r = torch.randint(0, 3, (B * G,)).float() + torch.rand(B * G) * (torch.rand(B * G) < 0.5)
    r[:G] = 1.5                                          # one constant group
    adv = kernels.group_advantages(r, G, scale=scale)
    ref = kernels.group_advantages_reference(r.double(), G, scale=scale)
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    # (r - mean) and std are computed in fp32: each is off by a few ulps of |r| (<= 3), and dividing by a
    # group's std magnifies that when the group's rewards nearly tie (std ~ 1e-4 happens with these rewards).
    std = r.double().view(B, G).std(1, unbiased=True).nan_to_num(0).repeat_interleave(G) if scale else 0
    tol = 1e-5 + 8 * 2 ** -23 * 3 / (std + 1e-6) * (1 + ref.abs()) if scale else 1e-5
    assert ((adv.double() - ref).abs() <= tol).all()
    assert (adv[:G] == 0).all()
    if G == 1:
        assert (adv == 0).all()


def test_group_advantages_hand_example_and_exact_zero_for_equal_rewards(backend):
    adv = kernels.group_advantages(torch.tensor([2.0, 1.0, 1.0, 0.0]), 4)
    assert torch.allclose(adv, torch.tensor([1.2247, 0.0, 0.0, -1.2247]), atol=1e-4)
    # 0.1 summed five times is not exactly 0.5 in fp32; equal rewards must still give exactly 0.
    adv = kernels.group_advantages(torch.full((5,), 0.1), 5)
    assert (adv == 0).all()
    assert torch.equal(kernels.group_advantages(torch.tensor([0.0, 2.0, 0.0, 2.0]), 2, scale=False),
                       torch.tensor([-1.0, 1.0, -1.0, 1.0]))
