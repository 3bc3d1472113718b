"""sample.py: the KV-cached sampler against recomputation, transformers' generate, and itself."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import model as M
import sample
from conftest import hf_kwargs, questions


@pytest.fixture(scope="module")
def tiny():
    m, proc = M.load("tiny", seed=3)
    proc.image_processor = M._image_processor_class()(min_pixels=56 * 56, max_pixels=168 * 168)
    return m.eval(), proc


def test_cached_decoding_equals_recomputing_the_whole_sequence(tiny):
    m, proc = tiny
    batch = proc.encode(questions(3, seed=7))
    out = sample.generate(m, batch, num_samples=2, max_new_tokens=12, temperature=1.0,
                          seeds=torch.arange(3))
    G, T = 2, 12
    with torch.no_grad():
        feats = m.image_features(batch.pixel_values, batch.image_grid_thw)
        sizes = [int(g.prod()) // 4 for g in batch.image_grid_thw]
        feats_rows = torch.cat([f for f in feats.split(sizes) for _ in range(G)])
        P = batch.input_ids.shape[1]
        ids = torch.cat([batch.input_ids.repeat_interleave(G, 0), out.tokens], 1)
        mask = torch.cat([batch.attention_mask.repeat_interleave(G, 0), out.mask], 1)
        pos_c = batch.next_position.repeat_interleave(G)[:, None] + torch.arange(T)
        pos = torch.cat([batch.positions.repeat_interleave(G, 1), pos_c.expand(3, -1, -1)], 2)
        hidden, _ = m(ids, pos, mask, feats_rows)
        logp = torch.log_softmax(m.lm_head(hidden[:, P - 1:-1]).float(), -1)
    full = logp.gather(2, out.tokens[..., None]).squeeze(-1) * out.mask
    assert out.mask.sum() > 0
    assert torch.allclose(out.logprobs, full, atol=1e-4), (out.logprobs - full).abs().max()


def test_greedy_generation_matches_transformers_token_for_token(tiny):
    m, proc = tiny
    ref = Qwen2_5_VLForConditionalGeneration(m.config).eval()
    ref.load_state_dict(m.state_dict())
    batch = proc.encode(questions(3, seed=8))
    assert (batch.attention_mask == 0).any()
    ours = sample.generate(m, batch, 1, max_new_tokens=15, temperature=0, eos_ids=proc.eos_ids,
                           pad_id=proc.pad_id)
    theirs = ref.generate(**hf_kwargs(ref, batch), max_new_tokens=15, do_sample=False, eos_token_id=proc.eos_ids,
                          pad_token_id=proc.pad_id)[:, batch.input_ids.shape[1]:]
    for r in range(3):
        n = int(ours.lengths[r])
        assert ours.tokens[r, :n].tolist() == theirs[r, :n].tolist(), r


def test_one_shared_prefill_equals_separate_prefills(tiny):
    m, proc = tiny
    qs = questions(2, seed=9)
    G = 3
    seeds = sample.row_seeds(torch.tensor([11, 12]), G)
    shared = sample.generate(m, proc.encode(qs), G, 10, temperature=1.0, top_p=0.9, seeds=seeds)
    separate = sample.generate(m, proc.encode([q for q in qs for _ in range(G)]), 1, 10, temperature=1.0,
                               top_p=0.9, seeds=seeds)
    assert torch.equal(shared.tokens, separate.tokens)
    assert torch.allclose(shared.logprobs, separate.logprobs, atol=1e-5)
    assert len({tuple(t.tolist()) for t in shared.tokens[:G]}) > 1, "samples of one prompt differ"


def test_a_rows_output_does_not_depend_on_its_batch_neighbours(tiny):
    m, proc = tiny
    qs = questions(3, seed=10)
    for temperature in (0.0, 1.0):
        alone = sample.generate(m, proc.encode(qs[2:]), 2, 10, temperature, seeds=torch.tensor([5]))
        crowd = sample.generate(m, proc.encode(qs), 2, 10, temperature, seeds=torch.tensor([3, 4, 5]))
        assert torch.equal(alone.tokens, crowd.tokens[4:])


def test_sampling_logprobs_equal_training_logprobs(tiny):
    m, proc = tiny
    batch = proc.encode(questions(2, seed=11))
    for temperature in (1.0, 0.7):
        out = sample.generate(m, batch, 3, 10, temperature, top_p=0.95, seeds=torch.tensor([1, 2]))
        with torch.no_grad():
            train = m.completion_logprobs(batch, out.tokens, out.mask, temperature)
        assert torch.allclose(out.logprobs, train, atol=1e-4)


def test_eos_ends_a_row_and_pads_the_rest(tiny):
    m, proc = tiny
    batch = proc.encode(questions(2, seed=12))
    free = sample.generate(m, batch, 2, 12, temperature=0)
    stop = int(free.tokens[1, 4])                    # make row 1's fifth token an end token
    first = {r: next((i for i, t in enumerate(free.tokens[r].tolist()) if t == stop), None) for r in range(4)}
    out = sample.generate(m, batch, 2, 12, temperature=0, eos_ids=[stop], pad_id=proc.pad_id)
    for r in range(4):
        n = 12 if first[r] is None else first[r] + 1
        assert int(out.lengths[r]) == n and int(out.mask[r].sum()) == n
        assert out.tokens[r, :n].tolist() == free.tokens[r, :n].tolist()
        assert (out.tokens[r, n:] == proc.pad_id).all() and (out.logprobs[r, n:] == 0).all()
    assert int(out.lengths[1]) <= 5


def test_choose_samples_the_top_p_nucleus_with_the_right_frequencies():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = probs.log()[None].repeat(20000, 1) * 2.0          # temperature 2 recovers probs
    tok, logp = sample.choose(logits, 2.0, 0.85, torch.arange(20000), step=3)
    counts = torch.bincount(tok, minlength=5).float() / 20000
    kept = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9      # nucleus {0, 1, 2}: mass 0.9 >= 0.85
    assert (counts - kept).abs().max() < 0.015
    assert torch.allclose(logp, probs.log()[tok], atol=1e-5)
    greedy, _ = sample.choose(logits[:3], 0, 1.0, torch.arange(3), 0)
    assert (greedy == 0).all()


def test_sampling_is_a_pure_function_of_the_seeds(tiny):
    m, proc = tiny
    batch = proc.encode(questions(2, seed=13))
    a = sample.generate(m, batch, 2, 8, 1.0, seeds=torch.tensor([7, 8]))
    b = sample.generate(m, batch, 2, 8, 1.0, seeds=torch.tensor([7, 8]))
    c = sample.generate(m, batch, 2, 8, 1.0, seeds=torch.tensor([7, 9]))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens[:2], c.tokens[:2]) and not torch.equal(a.tokens[2:], c.tokens[2:])
    u = sample.uniform(torch.arange(100000), 5)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
