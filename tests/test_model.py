"""model.py against transformers' Qwen2.5-VL with the same weights, and features that must not change numbers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import model as M
from conftest import hf_kwargs, questions

ROOT = Path(__file__).resolve().parent.parent


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tiny():
    m, proc = M.load("tiny", seed=1)
    # larger images than the preset so that differently sized images give different grids
    proc.image_processor = M._image_processor_class()(min_pixels=56 * 56, max_pixels=168 * 168)
    return m.eval(), proc


@pytest.fixture(scope="module")
def hf(tiny):
    m, _ = tiny
    ref = Qwen2_5_VLForConditionalGeneration(m.config).eval()
    missing, unexpected = ref.load_state_dict(m.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return ref


def test_logits_match_transformers(tiny, hf):
    m, proc = tiny
    batch = proc.encode(questions(3))
    assert len(set(batch.image_grid_thw[:, 1:].prod(1).tolist())) > 1, "images of different sizes"
    assert (batch.attention_mask == 0).any(), "left padding present"
    with torch.no_grad():
        feats = m.image_features(batch.pixel_values, batch.image_grid_thw)
        hidden, _ = m(batch.input_ids, batch.positions, batch.attention_mask, feats)
        ours = m.lm_head(hidden)
        theirs = hf(**hf_kwargs(hf, batch)).logits
    valid = batch.attention_mask.bool()
    assert rel(ours[valid], theirs[valid]) < 1e-5
    assert torch.equal(ours[valid].argmax(-1), theirs[valid].argmax(-1))


def test_mrope_positions_match_transformers(tiny, hf):
    _, proc = tiny
    batch = proc.encode(questions(3, seed=1))
    kw = hf_kwargs(hf, batch)
    args = {k: kw[k] for k in ("input_ids", "image_grid_thw", "attention_mask", "mm_token_type_ids") if k in kw}
    pos, deltas = hf.model.get_rope_index(**args)
    valid = batch.attention_mask.bool()
    assert torch.equal(batch.positions[:, valid], pos[:, valid])
    assert torch.equal(batch.next_position, valid.sum(1) + deltas.view(-1))


def full_sequence_logprobs(m, batch, comp, cmask):
    """The plain way: each prompt + completion as one sequence, all logits, log_softmax, gather."""
    G, T = comp.shape[0] // batch.input_ids.shape[0], comp.shape[1]
    feats = m.image_features(batch.pixel_values, batch.image_grid_thw)
    sizes = [int(g.prod()) // 4 for g in batch.image_grid_thw]
    feats_rows = torch.cat([f for f in feats.split(sizes) for _ in range(G)])
    P = batch.input_ids.shape[1]
    ids = torch.cat([batch.input_ids.repeat_interleave(G, 0), comp], 1)
    mask = torch.cat([batch.attention_mask.repeat_interleave(G, 0), cmask], 1)
    pos_c = batch.next_position.repeat_interleave(G)[:, None] + torch.arange(T)
    pos = torch.cat([batch.positions.repeat_interleave(G, 1), pos_c.expand(3, -1, -1)], 2)
    hidden, _ = m(ids, pos, mask, feats_rows)
    logp = torch.log_softmax(m.lm_head(hidden[:, P - 1:-1]).float(), -1).gather(2, comp[..., None]).squeeze(-1)
    return logp * cmask


def test_shared_prefix_scoring_equals_full_sequences(tiny):
    """completion_logprobs runs each prompt once for its G completions; it must equal scoring each
    prompt+completion sequence in full."""
    m, proc = tiny
    batch = proc.encode(questions(2, seed=2))
    G, T = 3, 9
    comp = torch.randint(0, 256, (2 * G, T))
    cmask = (torch.arange(T)[None] < torch.tensor([9, 4, 1, 7, 9, 2])[:, None]).long()
    with torch.no_grad():
        shared = m.completion_logprobs(batch, comp, cmask)
        full = full_sequence_logprobs(m, batch, comp, cmask)
    assert torch.equal(shared == 0, cmask == 0)
    assert rel(shared[cmask.bool()], full[cmask.bool()]) < 1e-5


def test_completion_logprobs_gradients_match_full_sequences(tiny):
    m, proc = tiny
    batch = proc.encode(questions(2, seed=3))
    comp = torch.randint(0, 256, (4, 5))
    cmask = (torch.arange(5)[None] < torch.tensor([5, 3, 5, 1])[:, None]).long()
    weights = torch.randn(4, 5)
    grads = []
    for score in (lambda: m.completion_logprobs(batch, comp, cmask), lambda: full_sequence_logprobs(m, batch, comp, cmask)):
        m.zero_grad()
        (score() * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    m.zero_grad()
    for n in grads[0]:
        assert rel(grads[0][n], grads[1][n]) < 1e-4, n


def test_checkpointing_keeps_gradients_identical():
    m, proc = M.load("tiny", seed=2)
    batch = proc.encode(questions(2, seed=4))
    comp = torch.randint(0, 256, (4, 6))
    cmask = torch.ones(4, 6, dtype=torch.long)
    m.completion_logprobs(batch, comp, cmask).sum().backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    M.apply_checkpointing(m)
    m.completion_logprobs(batch, comp, cmask).sum().backward()
    for n, p in m.named_parameters():
        assert torch.equal(plain[n], p.grad), n


def test_export_loads_in_transformers_and_back_with_identical_logits(tiny, tmp_path):
    m, proc = tiny
    M.save_hf(m.state_dict(), m.config, proc, tmp_path)
    again, proc2 = M.load(str(tmp_path))
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = proc.encode(questions(2, seed=5))
    batch2 = proc2.encode(questions(2, seed=5))
    assert torch.equal(batch.input_ids, batch2.input_ids) and torch.equal(batch.pixel_values, batch2.pixel_values)
    with torch.no_grad():
        def ours(model):
            h, _ = model(batch.input_ids, batch.positions, batch.attention_mask,
                         model.image_features(batch.pixel_values, batch.image_grid_thw))
            return model.lm_head(h)
        a, b = ours(m), ours(again)
        c = ref(**hf_kwargs(ref, batch)).logits
    valid = batch.attention_mask.bool()
    assert torch.equal(a, b)
    assert rel(a[valid], c[valid]) < 1e-5


def test_kernels_py_and_hugging_faces_kernels_package_both_import():
    """transformers >= 5.25 imports Hugging Face's `kernels` package, which kernels.py's name shadows from this
    folder: whichever is imported first, `import kernels` is ours and transformers holds its own (or, where the
    package is not installed, none), the way `python grpo.py` and a test run import them."""
    check = ("import sys, transformers.integrations.hub_kernels as hub, kernels; "
             "assert kernels.__file__ == sys.argv[1], kernels.__file__; assert kernels.fused_logprob; "
             "assert not hasattr(hub, 'CUDAProperties') or hub.CUDAProperties.__module__.startswith('kernels.'); "
             "print('ok')")
    for first in ("import kernels, model", "import model, kernels"):
        out = subprocess.run([sys.executable, "-c", f"{first}; {check}", str(ROOT / "kernels.py")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("ok"), (first, out.stderr[-2000:])


def test_long_prompt_is_rejected_with_a_clear_error(tiny):
    _, proc = tiny
    q = questions(1)[0]
    with pytest.raises(ValueError, match=r"sample .*: prompt is \d+ tokens, over the limit of 100"):
        proc.encode([q], max_prompt_len=100)


def test_unknown_model_name_says_what_it_accepts(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        M.load(str(tmp_path / "nope"))


def test_an_incomplete_model_folder_is_named_before_any_work(tiny, tmp_path):
    """model.check_source (grpo.py and eval.py call it before touching anything) names what a folder lacks."""
    import data
    m, proc = tiny
    M.save_hf(m.state_dict(), m.config, proc, tmp_path)
    assert M.check_source(str(tmp_path)) == tmp_path
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.bak")
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(data.UserError, match=r"--model .*lacks the image processor's preprocessor_config\.json, "
                                             r"weights \(\*\.safetensors\)"):
        M.check_source(str(tmp_path))
    (tmp_path / "weights.bak").rename(tmp_path / "model.safetensors")
    proc.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(data.UserError, match="describes a 'llama' model, not Qwen2.5-VL"):
        M.check_source(str(tmp_path), "--compare")


def test_bf16_loading_keeps_the_vision_rotary_table_in_fp32_as_transformers_does(tiny, tmp_path):
    """Loaded in bf16, our model casts parameters only: the vision tower (transformers' own module) then
    gives bit-identical image tokens to transformers' model loaded in bf16."""
    m, proc = tiny
    M.save_hf(m.state_dict(), m.config, proc, tmp_path)
    ours, _ = M.load(str(tmp_path), torch.bfloat16)
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert ours.model.visual.rotary_pos_emb.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    batch = proc.encode(questions(2, seed=7))
    with torch.no_grad():
        a = ours.image_features(batch.pixel_values, batch.image_grid_thw)
        b = ref.model.visual(batch.pixel_values.to(torch.bfloat16), grid_thw=batch.image_grid_thw)
    b = getattr(b, "pooler_output", b)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def squares(n, seed):
    """'Where is the white square?': a square filling most of one quadrant of a grey 112 x 112 image (the tiny
    preset's 4 x 4 image tokens), the four places as options in a fixed order. Only its position tells."""
    from PIL import Image, ImageDraw

    import data
    places = ("top left", "top right", "bottom left", "bottom right")
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        k, s = int(rng.integers(4)), int(rng.integers(40, 50))
        x, y = int(rng.integers(0, 56 - s)) + 56 * (k % 2), int(rng.integers(0, 56 - s)) + 56 * (k // 2)
        image = Image.new("RGB", (112, 112), (128, 128, 128))
        ImageDraw.Draw(image).rectangle([x, y, x + s, y + s], fill=(255, 255, 255))
        options = "\n".join(f"[[{a}]] {p}" for a, p in zip(data.LETTERS, places))
        out.append(data.Sample(f"square/{i}", "square", data.SCENE, image, "<image>\nWhere is the white square?\n"
                               + options, list(places), data.LETTERS[k], places[k]))
    return out


@pytest.mark.usefixtures("torch_kernels")
@pytest.mark.parametrize("rope_theta, learns", [(4.0, True), (1e4, False)])
def test_a_small_model_learns_where_only_when_mrope_resolves_the_image_grid(rope_theta, learns, monkeypatch):
    """M-RoPE tells attention an image token's row and column only through rotary frequencies, and Qwen2.5-VL
    gives rows (h) the middle and columns (w) the slowest of them. With head_dim 32, sections 4/6/6 and the
    presets' rope_theta 1e4, one row turns h's fastest pair by 0.1 rad and one column turns w's by 0.003 rad:
    left and right look the same. At rope_theta 4 they turn by 0.71 and 0.42 rad. The same SFT from scratch
    on squares() then reaches >= 90% on unseen images (by step 400 with these seeds; up to 600 allowed), and
    at 1e4 is still at chance after those 400 steps: small models learn *where* only when the frequencies
    resolve the grid (the README's "GRPO against SFT, in miniature")."""
    import data
    import grpo
    monkeypatch.setitem(M.PRESETS["tiny"]["text"], "rope_theta", rope_theta)
    torch.manual_seed(0)
    policy, proc = M.load("tiny", seed=0)
    train, test = squares(256, seed=0), squares(64, seed=1)
    truth = torch.tensor([data.LETTERS.index(q.answer) for q in test])
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def logprobs(questions, answers):                   # -> (questions, T) log-probs of [[answer]], mask
        groups = grpo.written(questions, [f"[[{a}]]" for a in answers], proc, "cpu")
        mask = torch.cat([x.mask for x in groups])
        return policy.completion_logprobs(proc.encode(questions), torch.cat([x.tokens for x in groups]), mask), mask

    def accuracy():
        with torch.no_grad():
            scores = torch.stack([logprobs(test, [a] * len(test))[0].sum(1) for a in data.LETTERS], 1)
        return (scores.argmax(1) == truth).float().mean().item()

    for step in range(1, 601 if learns else 401):
        batch = [train[i] for i in torch.randint(len(train), (16,), generator=g).tolist()]
        loss, _ = grpo.sft_loss(*logprobs(batch, [q.answer for q in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if learns and step % 50 == 0 and accuracy() >= 0.9:
            break
    acc = accuracy()
    assert (acc >= 0.9) if learns else (acc <= 0.45), (rope_theta, step, acc)
