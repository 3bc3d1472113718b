"""On a CUDA GPU only (skipped elsewhere): the compiled Triton kernels at the 7B shapes, and the CUDA-graph
decode against the eager one. The CPU suite holds the same code to float64 in Triton's interpreter; these
tests check what only the GPU runs: compiled kernels, tensor-core matmuls, graph capture and replay.

    python -m pytest -q tests/test_gpu.py

Tolerances, as relative norms against float64 on the same bf16 inputs: the forward accumulates H = 3,584
products in fp32 (~sqrt(3584) x 6e-8 ~ 4e-6 per logit, and the log-sum-exp averages it down): 1e-4; the
gradients come back in bf16 (~4e-3 per element): 1e-2.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def compiled_triton(monkeypatch):
    """tests/conftest.py turns on Triton's interpreter for the CPU suite; here the kernels run compiled."""
    import kernels
    monkeypatch.setattr(kernels, "INTERPRET", False)


def test_fused_logprob_at_the_7b_shape_matches_float64():
    import kernels
    N, H, V = 512, 3584, 152064
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=gen) / H ** 0.5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=gen)
    g = torch.randn(N, device="cuda", generator=gen)
    logp = kernels.fused_logprob(h, w, t)
    (logp * g).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = kernels.fused_logprob_reference(h64, w64, t)
    (ref * g.double()).sum().backward()
    assert rel(logp, ref) < 1e-4
    assert rel(h.grad, h64.grad) < 1e-2 and rel(w.grad, w64.grad) < 1e-2


def test_group_advantages_on_cuda_match_float64():
    import kernels
    r = torch.randint(0, 3, (64 * 5,), device="cuda").float()
    assert torch.allclose(kernels.group_advantages(r, 5).double(),
                          kernels.group_advantages_reference(r.double(), 5), atol=1e-5)


def test_graphed_decode_equals_eager_decode():
    """A 2-layer model at the 7B width in bf16: the same prompts, seeds and sampling through the CUDA
    graphs and through eager steps give the same tokens (the graph replays the same kernels)."""
    import data
    import model as M
    from sample import generate, qwen7b_config
    config = qwen7b_config()
    config.text_config.num_hidden_layers, config.vision_config.depth = 2, 2
    config.vision_config.fullatt_block_indexes = [1]
    torch.manual_seed(0)
    model = M.Qwen2_5_VL(config)
    M.init_weights(model, 0)
    model = M.cast_parameters(model.cuda(), torch.bfloat16).eval()
    _, proc = M.load("tiny")                         # a tokenizer for the prompts; ids stay below 7B's vocabulary
    batch = proc.encode(data.probe_samples(4, 0))
    batch.input_ids[batch.input_ids == proc.image_token_id] = config.image_token_id
    batch = batch.to("cuda")
    runs = [generate(model, batch, 3, 40, temperature=1.0, top_p=0.99, generator=torch.arange(4), cuda_graph=graph)
            for graph in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].mask, runs[1].mask)
    assert torch.allclose(runs[0].logprobs, runs[1].logprobs, atol=1e-3)
