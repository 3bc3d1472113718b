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
    graphs and through eager steps give the same tokens (the graph replays the same kernels), and an Engine
    kept for a second call replays the graphs it captured in the first, capturing none."""
    import data
    import model as M
    from sample import Engine, generate, qwen7b_config
    config = qwen7b_config(2, 2)
    torch.manual_seed(0)
    model = M.Qwen2_5_VL(config)
    M.init_weights(model, 0)
    model = M.cast_parameters(model.cuda(), torch.bfloat16).eval()
    _, proc = M.load("tiny")                         # a tokenizer for the prompts; ids stay below 7B's vocabulary
    batch = proc.encode(data.probe_samples(4, 0))
    batch.input_ids[batch.input_ids == proc.image_token_id] = config.image_token_id
    batch = batch.to("cuda")
    graphed, eager, captured = Engine(model, cuda_graph=True), Engine(model, cuda_graph=False), []
    for seed in (0, 100):                            # the second call replays the first call's graphs
        runs = [generate(model, batch, 3, 40, temperature=1.0, top_p=0.99, seeds=torch.arange(4) + seed,
                         engine=engine) for engine in (graphed, eager)]
        assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].mask, runs[1].mask)
        assert torch.allclose(runs[0].logprobs, runs[1].logprobs, atol=1e-3)
        captured.append(len(graphed.slots[12][1].graphs))
    assert captured[0] == captured[1] > 0, captured


def reduced_7b(folder, layers=4):
    """A checkpoint folder with Qwen2.5-VL-7B's widths and vocabulary, `layers` decoder and vision blocks,
    random weights, and the tiny preset's tokenizer (its special ids; unknown ids decode to nothing)."""
    import model as M
    from sample import qwen7b_config
    _, proc = M.load("tiny")
    config = qwen7b_config(layers, layers)
    ids = {t: proc.tokenizer.convert_tokens_to_ids(t) for t in M.QWEN_SPECIAL}
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    config.text_config.eos_token_id, config.text_config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    model = M.Qwen2_5_VL(config)
    M.init_weights(model, 0)
    M.save_hf(M.cast_parameters(model, torch.bfloat16).state_dict(), config, proc, folder)
    return folder


def test_one_grpo_step_of_a_reduced_7b_model_fits_its_memory_plan(tmp_path):
    """grpo.py as a user runs it on one GPU (FSDP on a 1-rank group, bf16 compute, rollouts through the
    sampling copy on CUDA graphs), on a 7B-width model with 4 blocks: two steps of Robot-R1's questions at
    the paper's batch shape per rank (16 prompts x G = 5, micro-batches of 4). The second step's phase
    times and peak memory are printed beside the plan (`python grpo.py --plan 1` for the same settings),
    which counts the worst case: measured peaks must lie below it and above what it says is always held."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    import grpo
    root = Path(__file__).resolve().parent.parent
    folder = reduced_7b(tmp_path / "reduced_7b")
    args = dict(model=str(folder), out=str(tmp_path / "run"), steps=2, rollout_prompts=16, update_prompts=16,
                micro_prompts=4, gen_prompts=16, group_size=5, max_new_tokens=256, max_prompt_len=1024, episodes=2,
                save_every=1000)
    cmd = [sys.executable, "grpo.py", "--no-export"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    step = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    cfg = grpo.resolve(grpo.Config(**{k: v for k, v in args.items() if k != "out"}))
    plan = grpo.memory_plan(cfg, 1)
    always = sum(gb for _, phase, gb, _ in plan if phase == "always")
    peaks = {ph: always + sum(gb for _, p, gb, _ in plan if p == ph) for ph in ("rollout", "update")}
    rows = 16 * 5
    print(f"\n{torch.cuda.get_device_name()}: rollout {step['rollout_s']:.2f} s ({rows * step['length'] / step['rollout_s']:.0f}"
          f" generated tok/s), update {step['update_s']:.2f} s; peak GB rollout {step['rollout_gb']:.1f} (plan "
          f"{peaks['rollout']:.1f}), update {step['update_gb']:.1f} (plan {peaks['update']:.1f}); always held (plan) "
          f"{always:.1f}")
    for phase in ("rollout", "update"):
        assert 0.9 * always < step[f"{phase}_gb"] < peaks[phase], (phase, step[f"{phase}_gb"], always, peaks[phase])
