"""grpo.py: Robot-R1's training loop: GRPO on Qwen2.5-VL, from one CPU to FSDP on 8 GPUs.

    python grpo.py                                             # tiny model, built-in tabletop data, CPU
    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct
    python grpo.py --help                                      # every setting, with the paper's defaults
    python grpo.py --algorithm sft                             # the paper's SFT baseline, the same loop

One step, as the code below reads (the numbers: Robot-R1, arXiv 2506.00070, and EasyR1's defaults it used):
  1. rollout    `rollout_prompts` questions, G completions each (sample.py); every rank samples its share
  2. reward     format + answer for every completion (reward.py)
  3. advantage  A = (r - mean of its group) / (std of its group + 1e-6)  (kernels.py)
  4. update     the rollout in `update_prompts` slices, one optimizer step each, micro-batched:
                log-probs (model.completion_logprobs) -> grpo_loss -> backward -> clip -> AdamW
  5. record     metrics.jsonl, curves.png, completions.jsonl, checkpoints/, and at the end final/
GRPO needs no value network: the G samples of a prompt are each other's baseline. A group where every
sample scored the same (all right or all wrong) has zero advantage and teaches nothing.
SFT (--algorithm sft) runs the same loop with phases 1-3 replaced by each question's correct answer,
written out, and the loss by its negative log-likelihood: one budget, one code path, two algorithms.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

import data
import model as M
import reward
from kernels import group_advantages
from sample import WINDOW, Engine, generate


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """Robot-R1 GRPO. Settings left unset take their preset: the paper's recipe for a real checkpoint,
    a CPU-sized one for a preset model ('tiny')."""
    model: str = "tiny"
    """preset name ('tiny', 'small'), local folder, or hub id such as Qwen/Qwen2.5-VL-7B-Instruct"""
    algorithm: Literal["grpo", "sft"] = "grpo"
    """'grpo': Robot-R1's RL; 'sft': supervised fine-tuning on the same questions' correct answers (the
    paper's SFT baseline), with the same steps, prompts per step and optimizer steps as GRPO"""
    preset: Literal["auto", "paper", "tiny"] = "auto"
    """the defaults for unset settings: 'paper' (a real checkpoint), 'tiny' (CPU-sized); 'auto': tiny's
    for a preset model, the paper's for anything else (a folder a CPU run exported wants 'tiny')"""
    dataset: str = "tabletop"
    """'tabletop' (the built-in simulator; written to OUT/data) or a dataset folder written by data.py"""
    tasks: tuple[str, ...] = data.TRAIN_TASKS
    """tabletop tasks to train on"""
    episodes: int | None = None
    """tabletop demonstrations per task [paper 50, tiny 12; unused by the probe]"""
    kinds: tuple[str, ...] | None = None
    """question kinds: waypoint, state, movement, waypoint_open, scene, lookup (each scene question asked back
    by one of its options: data.lookup_samples), words (the letter's lookup alone, text only:
    data.word_samples), and probe (data.probe_samples: an image-dependent sanity question a tiny model can
    learn on a CPU; probe_shuffled: its options in a random order) [paper: waypoint state movement; tiny: probe]"""
    distractors: str = "matched"
    """tabletop questions' wrong options: 'matched' (from the answers' own distribution, so that only the
    image tells the answer) or 'uniform' (the paper's rule, which text alone mostly sees through)"""
    rewards: str = "format=1,choice=1,l1=1"
    """reward components and weights (reward.py's REWARDS); R = format + answer by default"""
    out: Path = Path("runs/robot_r1")
    """run folder: metrics, curves, completions, checkpoints, final export"""
    seed: int = 0
    group_size: int | None = None
    """G, completions per prompt [paper 5, tiny 8]; SFT trains on one, the correct answer"""
    temperature: float = 1.0
    top_p: float = 0.99
    rollout_prompts: int | None = None
    """prompts per step, all ranks together [paper 512, tiny 16]"""
    update_prompts: int | None = None
    """prompts per optimizer step; rollout_prompts / update_prompts steps per rollout [paper 128, tiny 16]"""
    micro_prompts: int | None = None
    """prompts (with their G completions) per forward/backward on one rank [paper 4, tiny 16]"""
    gen_prompts: int | None = None
    """prompts per generation batch on one rank [paper 16, tiny 16]"""
    epochs: float | None = None
    """passes over the questions [paper 5]"""
    steps: int | None = None
    """rollout steps; overrides epochs [tiny 250]"""
    max_prompt_len: int = 2048
    max_new_tokens: int | None = None
    """[paper 2048, tiny 24]"""
    lr: float | None = None
    """AdamW learning rate, constant [paper 1e-6, tiny 1e-3]"""
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    clip_low: float = 0.2
    """PPO ratio clip below: 1 - clip_low"""
    clip_high: float = 0.3
    """PPO ratio clip above: 1 + clip_high"""
    dual_clip: float = 3.0
    """caps the loss of negative-advantage tokens at -A * dual_clip"""
    beta: float = 1e-2
    """k3 KL penalty coefficient against the starting model; 0 loads no reference model. It also rescues
    a run whose rewards all drop to 0 (no group has any signal then, only the KL term pulls back)"""
    loss_agg: Literal["token", "sequence"] = "token"
    """'token': mean over all tokens of the update batch; 'sequence': mean of per-sequence means"""
    scale_advantages: bool = True
    """divide by the group std (GRPO); False: mean-centred only (Dr. GRPO)"""
    filter_groups: bool = False
    """drop zero-variance groups from the update (DAPO's dynamic sampling filter)"""
    flip_advantages: bool = False
    """negate every advantage: a control run that must not learn"""
    min_pixels: int | None = None
    """image resize bounds [paper 262144 .. 4194304; tiny: its preset's]"""
    max_pixels: int | None = None
    checkpointing: bool | None = None
    """activation checkpointing per block [paper on, tiny off]"""
    format_warmup: int | None = None
    """preset models only: supervised steps on the answer format with random letters [tiny 100, real 0]"""
    think: Literal["gripper", "option"] = "gripper"
    """what written completions (SFT, format warm-up) put between <think> and </think>: 'gripper', the fixed
    words 'the gripper'; 'option', the option the answer names as the prompt prints it, line end included
    (a one-line rationale: the letter becomes a lookup of what was just written; README, 'finding the
    letter'). A position is ~20 tokens: sampling its thought needs --max_new_tokens ~48 (tiny's 24 fits the
    probe's colours)"""
    save_every: int = 10
    """checkpoint every n steps (and at the end)"""
    resume: bool = False
    """continue the run in --out from its latest complete checkpoint, with the same settings"""
    overwrite: bool = False
    """start afresh in an --out that holds a run, deleting its checkpoints, records and exports"""
    export: bool = True
    """write OUT/final in Hugging Face format at the end"""
    log_samples: int = 6
    """completions per step written to completions.jsonl"""
    sample_copy: bool = True
    """under FSDP, sample from a plain copy of the policy in the compute dtype (bf16 on GPUs), refreshed
    from the shards at every rollout: no FSDP hooks, so on a GPU the decode step is a CUDA graph. Costs the
    model in bf16 per GPU (--plan); False samples through FSDP's gathered parameters, eagerly"""
    keep_graphs: bool = False
    """keep the sampler's KV cache, and with it the CUDA graphs, from one rollout to the next (captured
    once for the whole run); the cache then stays in memory during the update too (--plan). False frees
    them after each rollout: graphs are captured again once per rollout, reused over its batches"""
    max_bad_steps: int = 3
    """abort after this many optimizer steps in a row with a NaN/Inf loss or gradient"""
    plan: int = 0
    """print the memory plan per GPU for this many GPUs (from the model's real sizes, no weights loaded)
    and exit; 0 trains"""


PAPER = dict(kinds=("waypoint", "state", "movement"), episodes=50, group_size=5, rollout_prompts=512, update_prompts=128, micro_prompts=4, gen_prompts=16,
             epochs=5.0, max_new_tokens=2048, lr=1e-6, min_pixels=262144, max_pixels=4194304, checkpointing=True,
             format_warmup=0)
TINY = dict(kinds=("probe",), episodes=12, group_size=8, rollout_prompts=16, update_prompts=16,
            micro_prompts=16, gen_prompts=16, steps=250, max_new_tokens=24, lr=1e-3, checkpointing=False,
            format_warmup=100)


# Settings a resumed run may change: they decide how long the run goes and what it records, never the
# numbers of the optimisation. Every other setting must equal the run's (resume is exact, or refuses).
RESUMABLE_CHANGES = ("steps", "epochs", "save_every", "log_samples", "export", "max_bad_steps", "resume", "overwrite",
                     "out", "plan", "sample_copy", "keep_graphs")


def resolve(cfg: Config) -> Config:
    """Fill unset settings from the preset that fits the model, and check every one of them."""
    preset = TINY if cfg.preset == "tiny" or (cfg.preset == "auto" and cfg.model in M.PRESETS) else PAPER
    cfg = Config(**{f.name: getattr(cfg, f.name) if getattr(cfg, f.name) is not None else preset.get(f.name)
                    for f in fields(cfg)})
    check(cfg)
    return cfg


def check(cfg: Config):
    """Every setting in its range and the settings consistent, or one UserError naming each bad flag."""
    def positive(name, minimum=1):
        v = getattr(cfg, name)
        return v >= minimum, f"--{name} {v}: must be at least {minimum}"

    def between(name, lo, hi, what):
        v = getattr(cfg, name)
        return math.isfinite(v) and lo(v) and hi(v), f"--{name} {v}: must be {what}"
    rules = [
        (cfg.group_size >= 2 or cfg.algorithm == "sft",
         f"--group_size {cfg.group_size}: GRPO compares a prompt's samples with each other, so it needs at least 2"),
        *(positive(n) for n in ("rollout_prompts", "update_prompts", "micro_prompts", "gen_prompts",
                                "max_new_tokens", "max_prompt_len", "save_every", "max_bad_steps", "episodes")),
        *(positive(n, 0) for n in ("format_warmup", "log_samples")),
        (cfg.rollout_prompts % max(cfg.update_prompts, 1) == 0,
         f"--rollout_prompts {cfg.rollout_prompts} must be a multiple of --update_prompts {cfg.update_prompts}"),
        (cfg.steps is not None or cfg.epochs is not None, "set --epochs or --steps"),
        (cfg.steps is None or cfg.steps >= 1, f"--steps {cfg.steps}: must be at least 1"),
        (cfg.epochs is None or (math.isfinite(cfg.epochs) and cfg.epochs > 0), f"--epochs {cfg.epochs}: must be > 0"),
        between("lr", lambda v: v > 0, lambda v: v < 1, "in (0, 1)"),
        between("temperature", lambda v: v > 0, lambda v: v <= 10, "in (0, 10]: GRPO samples (0 would be greedy, "
                "every sample of a prompt alike and nothing to learn)"),
        between("top_p", lambda v: v > 0, lambda v: v <= 1, "in (0, 1]"),
        between("grad_clip", lambda v: v > 0, lambda v: True, "> 0 (the largest gradient norm a step may take)"),
        between("clip_low", lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
        between("clip_high", lambda v: v >= 0, lambda v: True, ">= 0"),
        between("dual_clip", lambda v: v > 1, lambda v: True, "> 1"),
        between("beta", lambda v: v >= 0, lambda v: True, ">= 0"),
        between("weight_decay", lambda v: v >= 0, lambda v: True, ">= 0"),
        (all(0 <= b < 1 for b in cfg.betas), f"--betas {cfg.betas}: each must be in [0, 1)"),
        (cfg.kinds and set(cfg.kinds) <= set(data.ALL_KINDS),
         f"--kinds {' '.join(cfg.kinds or ())}: choose from {' '.join(data.ALL_KINDS)}"),
        (cfg.tasks and set(cfg.tasks) <= set(data.TASKS),
         f"--tasks {' '.join(cfg.tasks)}: built-in tasks are {' '.join(data.TASKS)}"),
        (cfg.distractors in data.DISTRACTORS, f"--distractors {cfg.distractors}: choose from {' '.join(data.DISTRACTORS)}"),
        (cfg.think in ("gripper", "option"), f"--think {cfg.think}: choose gripper or option"),
        (not (cfg.min_pixels and cfg.max_pixels) or 0 < cfg.min_pixels <= cfg.max_pixels,
         f"--min_pixels {cfg.min_pixels} and --max_pixels {cfg.max_pixels}: need 0 < min <= max"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other: choose one"),
        (cfg.plan >= 0, f"--plan {cfg.plan}: the number of GPUs to plan for, or 0 to train"),
    ]
    problems = [message for ok, message in rules if not ok]
    try:
        reward.parse_weights(cfg.rewards)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise data.UserError("; ".join(problems))


# ----------------------------------------------------------------------------------------------------
# The GRPO objective
# ----------------------------------------------------------------------------------------------------
def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0, beta=0.01,
              loss_agg="token"):
    """Clipped policy-gradient loss with a k3 KL penalty, averaged over the batch. -> (loss, stats)

    logp, old_logp, ref_logp (None: no KL), mask: (R, T) per completion token; advantages: (R,).
    Per token, with ratio = exp(logp - old_logp):
        pg = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))     PPO's pessimistic bound
        pg = min(pg, -A dual_clip)   where A < 0                            dual clip: no runaway losses
        kl = exp(ref - logp) - (ref - logp) - 1                               k3: unbiased, always >= 0
        loss = pg + beta * kl
    With one update per rollout, old_logp = logp.detach(): ratio = 1 and the gradient is -A grad logp.
    """
    A = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    pg1, pg2 = -A * ratio, -A * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    pg3 = -A * dual_clip
    dual = (A < 0) & (pg3 < pg)
    pg = torch.where(A < 0, torch.minimum(pg, pg3), pg)
    per_token, kl = pg, torch.zeros_like(pg)
    if ref_logp is not None and beta > 0:
        d = (ref_logp - logp).clamp(-20, 20)
        kl = (torch.exp(d) - d - 1).clamp(-10, 10)
        per_token = pg + beta * kl
    m = mask.to(logp.dtype)
    if loss_agg == "token":
        loss = (per_token * m).sum() / m.sum().clamp_min(1)
    else:
        rows = m.sum(1) > 0
        loss = ((per_token * m).sum(1) / m.sum(1).clamp_min(1))[rows].sum() / rows.sum().clamp_min(1)
    n = m.sum().clamp_min(1)
    clipped = (pg2 > pg1).to(m.dtype) * m
    stats = {"loss": loss.item(), "pg_loss": ((pg * m).sum() / n).item(), "kl": ((kl * m).sum() / n).item(),
             "clip_low": ((clipped * (A < 0)).sum() / n).item(), "clip_high": ((clipped * (A > 0)).sum() / n).item(),
             "dual_clip": ((dual * m).sum() / n).item(), "ratio": ((ratio * m).sum() / n).item()}
    return loss, stats


def sft_loss(logp, mask, loss_agg="token"):
    """Supervised fine-tuning's objective: the negative log-likelihood of the written completions, averaged
    like grpo_loss ('token' or 'sequence'). -> loss, stats"""
    m = mask.float()
    nll = -(logp * m).sum() / m.sum().clamp_min(1) if loss_agg == "token" else \
        (-(logp * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    return nll, {"loss": nll.item()}


# ----------------------------------------------------------------------------------------------------
# Setup: ranks, data, models
# ----------------------------------------------------------------------------------------------------
def load_questions(cfg, rank):
    """The tabletop simulator's questions, written to OUT/data (a --dataset folder is read by prepare_run).
    The folder's manifest records the settings that built it; other settings rebuild it, never reuse it."""
    folder = cfg.out / "data"
    built_from = {"seed": cfg.seed, "tasks": list(cfg.tasks), "episodes": cfg.episodes, "kinds": list(cfg.kinds),
                  "distractors": cfg.distractors}
    if rank == 0:
        manifest = folder / "manifest.json"
        current = (folder / "samples.jsonl").exists() and manifest.exists() and \
            json.loads(manifest.read_text()).get("built_from") == built_from
        if not current:
            shutil.rmtree(folder, ignore_errors=True)
            demos = any(k not in data.NO_DEMOS for k in cfg.kinds)
            eps = [e for t in cfg.tasks for e in data.generate_episodes(t, cfg.episodes, cfg.seed)] if demos else []
            samples = data.make_questions(eps, cfg.kinds, seed=cfg.seed, progress=True, distractors=cfg.distractors)
            data.save_samples(samples, folder, {"built_from": built_from})
    barrier()
    return data.load_samples(folder)


def step_questions(n, step, cfg, rank, world):
    """This rank's question indices for a step: a slice of the seeded per-epoch permutations, so the
    order depends only on (seed, step): the same after a resume, whatever the number of ranks."""
    idx = []
    for pos in range(step * cfg.rollout_prompts, (step + 1) * cfg.rollout_prompts):
        epoch, k = divmod(pos, n)
        idx.append(int(np.random.default_rng([cfg.seed, epoch]).permutation(n)[k]))
    per = cfg.rollout_prompts // world
    mine = list(range(rank * per, (rank + 1) * per)) if cfg.rollout_prompts % world == 0 else list(
        range(rank, cfg.rollout_prompts, world))
    # a prompt's seed depends on (seed, step, its place in the step): sampling is rank-independent
    return [idx[i] for i in mine], [(cfg.seed * 1_000_003 + step * 10_007 + i) % (2 ** 31) for i in mine]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def on_every_rank(fn):
    """Run `fn` on rank 0 and raise its UserError on every rank: one rank failing alone would leave the
    others waiting in a collective forever."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            fn()
        except data.UserError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise data.UserError(error)


def peak_memory(device):
    """GB of GPU memory allocated at the peak since the last call (0 off a GPU); starts the next count."""
    if device.type != "cuda":
        return 0.0
    gb = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return gb


def all_sum(values, device):
    """Sum a list of floats over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def compute_dtype(device):
    """The dtype blocks compute in: bf16 on GPUs (FSDP keeps fp32 master shards), fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def uses_ref(cfg):
    """GRPO's KL term needs the frozen start model; SFT has none."""
    return cfg.beta > 0 and cfg.algorithm == "grpo"


def build_models(cfg, questions, device, rank, log):
    """The policy (trained) and the reference (frozen, None when beta = 0), placed for this run's ranks.

    A checkpoint under torchrun loads lean (model.load_sharded): built on the meta device, sharded, and
    each rank reads only its own rows from the files; the reference straight into the compute dtype
    (bf16 on GPUs), loaded again rather than copied. A preset starts from random weights and the format
    warm-up, on every rank alike, and is then checkpointed and sharded like the rest; resumed, from the
    warm-up's export, OUT/start."""
    low = compute_dtype(device)
    fsdp = dict(param_dtype=low, reduce_dtype=torch.float32)
    mesh = None
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    source = cfg.model
    if cfg.resume and source in M.PRESETS and (cfg.out / "start" / "model.safetensors").exists():
        # A resumed preset run starts from the warm-up it exported before its first checkpoint (a fresh
        # run clears OUT/start): the same weights, bit for bit, without repeating the warm-up. The
        # reference is that start; the policy's weights come from the checkpoint next (resume).
        source = str(cfg.out / "start")
    if mesh is not None and source not in M.PRESETS:
        policy, processor = M.load_sharded(source, mesh, torch.float32, cfg.checkpointing, **fsdp)
        ref = M.load_sharded(source, mesh, low, **fsdp)[0] if uses_ref(cfg) else None
        processor = M.with_pixels(processor, cfg.min_pixels, cfg.max_pixels)
    else:
        torch.manual_seed(cfg.seed)
        policy, processor = M.load(source, torch.float32, "cpu", seed=cfg.seed, min_pixels=cfg.min_pixels,
                                   max_pixels=cfg.max_pixels)
        if cfg.format_warmup and source in M.PRESETS:
            format_warmup(policy, processor, questions, cfg, device, log)
            if rank == 0 and cfg.export:            # the starting point eval.py compares against
                M.save_hf(policy.state_dict(), policy.config, processor, cfg.out / "start")
        ref = copy.deepcopy(policy) if uses_ref(cfg) else None
        if cfg.checkpointing:
            M.apply_checkpointing(policy)
        for m in (policy, ref):
            if m is not None:
                M.apply_fsdp(m, mesh, **fsdp) if mesh is not None else m.to(device)
    if ref is not None:
        ref.requires_grad_(False).eval()
    return policy.train(), ref, processor


# ----------------------------------------------------------------------------------------------------
# Phase 0 (preset models only): the answer format
# ----------------------------------------------------------------------------------------------------
def format_warmup(model, processor, questions, cfg, device, log):
    """A random-weight model cannot write '<think> .. </think> <answer> [[X]] </answer>' by chance, so
    GRPO would see only zero rewards. Real checkpoints bring this from instruction tuning; a preset
    model gets it here, by supervised steps on that format with the letter X drawn at random: it
    learns how to answer, not what (its answers stay at chance, 25%). With --think option the thought is
    the text of X's option: the lookup from a thought to its letter is then part of the lesson (on the
    shuffled probe not learned in 500 steps, measured before the thought had its line end: README, "GRPO
    against SFT, in miniature")."""
    rng = np.random.default_rng([cfg.seed, 77])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    # The learning rate decays to 0 and the gradient norm is clipped: at a constant 5e-3, Adam's last steps
    # can throw the model out of the format it has just learned (seen: loss 0.26 -> 1.3 in the last 15 of
    # 100 steps, then a format rate of 12%), and GRPO would start from chaos.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / cfg.format_warmup)
    model.to(device).train()
    for step in range(cfg.format_warmup):
        chunk = [questions[i] for i in rng.choice(len(questions), min(16, len(questions)), replace=False)]
        answers = [f"[[{rng.choice(list(data.LETTERS))}]]" if q.options else data.fmt_xyz(rng.uniform(*data.WORKSPACE))
                   for q in chunk]
        groups = written(chunk, answers, processor, device, cfg.think)
        batch, tokens, mask, _ = micro_batch(groups, processor, cfg, device)
        loss, _ = sft_loss(model.completion_logprobs(batch, tokens, mask), mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg.format_warmup - 1:
            log(f"format warm-up {step + 1}/{cfg.format_warmup}: loss {loss.item():.3f}")
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------
# Phases 1-3: rollout, reward, advantage
# ----------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """One prompt and its G completions (SFT: one, written, not sampled)."""
    question: data.Sample
    tokens: torch.Tensor        # (G, T)
    mask: torch.Tensor          # (G, T)
    texts: list
    scores: list = None         # G dicts of reward components and 'total' (phase 2)
    advantages: torch.Tensor = None   # (G,) (phase 3)
    old_logp: torch.Tensor = None     # (G, T) when the rollout feeds several optimizer steps


def sampler(policy, cfg, device):
    """The Engine rollouts sample through: on the policy itself, or under FSDP (with --sample_copy) on a
    plain copy of it (M.plain_copy), which rollout() refreshes from the shards before sampling."""
    sharded = dist.is_initialized() and cfg.sample_copy
    return Engine(M.plain_copy(policy, compute_dtype(device)) if sharded else policy)


def rollout(policy, engine, processor, questions, seeds, cfg, device):
    """Phase 1: G completions of each of this rank's questions, `gen_prompts` prompts per batch."""
    groups = []
    policy.eval()
    if engine.model is not policy:
        M.copy_weights(engine.model, policy)            # the copy samples with the policy's latest weights
    G = cfg.group_size
    for i in range(0, len(questions), cfg.gen_prompts):
        chunk = questions[i:i + cfg.gen_prompts]
        batch = processor.encode(chunk, cfg.max_prompt_len).to(device)
        out = generate(engine.model, batch, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                       processor.eos_ids, torch.tensor(seeds[i:i + cfg.gen_prompts]), processor.pad_id,
                       engine=engine)
        texts = processor.decode(out.tokens, out.mask)                  # R = len(chunk) * G rows
        for b, q in enumerate(chunk):
            rows = slice(b * G, (b + 1) * G)
            groups.append(Group(q, out.tokens[rows], out.mask[rows], texts[rows]))
    if not cfg.keep_graphs:
        engine.release()
    policy.train()
    return groups


ANSWER = "<think> {} </think> <answer> {} </answer>"


def correct_answer(q):
    return f"[[{q.answer}]]" if q.options else q.answer


def rationale(q, answer, think="gripper"):
    """The thought a written completion gives before `answer` (--think): 'gripper', the fixed words 'the
    gripper'; 'option', the option the answer names as the prompt prints it, its line end included
    ('[[B]]' -> q.options[1] + '\n'), or an open answer itself. The line end matters: a tokenizer splits
    ' back right\n' as it does in the prompt's option line, and ' back right </think>' otherwise (our
    BPE: 'right' there, 'righ' 't ' here), so finding the letter is a match of the same tokens."""
    if think == "gripper":
        return "the gripper"
    return q.options[data.LETTERS.index(answer[2])] + "\n" if q.options else answer


def written(questions, answers, processor, device, think="gripper"):
    """Phase 1 of SFT (and of the format warm-up): each question with a completion written for it, the
    answer in Robot-R1's format after its rationale, as a group of one; padded to a common width. Teacher
    forcing trains on it."""
    texts = [ANSWER.format(rationale(q, a, think), a) for q, a in zip(questions, answers)]
    ids = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] + processor.eos_ids[:1] for t in texts]
    tokens, mask = padded(ids, processor.pad_id, device)
    return [Group(q, tokens[k:k + 1], mask[k:k + 1], [t], advantages=torch.ones(1, device=device))
            for k, (q, t) in enumerate(zip(questions, texts))]


def padded(ids, pad_id, device):
    """Token lists -> (tokens, mask), each (N, T): right-padded to the longest, mask 1 on real tokens."""
    T = max(map(len, ids))
    return (torch.tensor([i + [pad_id] * (T - len(i)) for i in ids], device=device),
            torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i in ids], device=device))


def score(groups, weights):
    """Phase 2: every completion's reward components and their weighted total (reward.py)."""
    for g in groups:
        g.scores = [reward.score(text, g.question, weights) for text in g.texts]


def advantages(groups, cfg, device):
    """Phase 3: each group's rewards, normalised within the group (kernels.group_advantages)."""
    rewards = torch.tensor([s["total"] for g in groups for s in g.scores], device=device)     # (groups * G,)
    adv = group_advantages(rewards, cfg.group_size, scale=cfg.scale_advantages)
    adv = -adv if cfg.flip_advantages else adv
    for g, a in zip(groups, adv.view(len(groups), -1)):
        g.advantages = a                                                 # (G,)


# ----------------------------------------------------------------------------------------------------
# Phase 4: the update
# ----------------------------------------------------------------------------------------------------
def update(policy, ref, opt, groups, processor, cfg, device, world, state):
    """Optimizer steps over this rank's rollout, `update_prompts` (all ranks) at a time. -> mean stats"""
    per_rank = cfg.update_prompts // world
    n_steps = len(groups) // per_rank
    if n_steps > 1 and cfg.algorithm == "grpo":         # later steps need the rollout policy's log-probs
        old_logprobs(policy, groups, processor, cfg, device)
    totals, grad_norms = {}, []
    for u in range(n_steps):
        stats, count, grad_norm = optimizer_step(policy, ref, opt, groups[u * per_rank:(u + 1) * per_rank],
                                                 processor, cfg, device, world, state, on_policy=n_steps == 1)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v
        totals["count"] = totals.get("count", 0.0) + count
        grad_norms.append(grad_norm)
    count = max(totals.pop("count", 1.0), 1.0)
    return {**{k: v / count for k, v in totals.items()}, "grad_norm": sum(grad_norms) / n_steps}


def micro_batch(groups, processor, cfg, device):
    """Stack groups into (prompt batch, completions (R, T), mask, advantages), trimmed to the longest."""
    batch = processor.encode([g.question for g in groups], cfg.max_prompt_len).to(device)
    mask = torch.cat([g.mask for g in groups])
    T = max(int(mask.sum(1).max()), 1)
    return batch, torch.cat([g.tokens for g in groups])[:, :T], mask[:, :T], torch.cat([g.advantages for g in groups])


def old_logprobs(policy, groups, processor, cfg, device):
    """log p(token) (G, T) of every group's completions under the policy that sampled them, before any
    step: the denominator of the PPO ratio when one rollout feeds several optimizer steps."""
    G = cfg.group_size
    with torch.no_grad():
        for i in range(0, len(groups), cfg.micro_prompts):
            part = groups[i:i + cfg.micro_prompts]
            batch, comp, mask, _ = micro_batch(part, processor, cfg, device)
            logp = policy.completion_logprobs(batch, comp, mask, cfg.temperature)           # (R, T)
            for k, g in enumerate(part):
                g.old_logp = logp[k * G:(k + 1) * G]


def optimizer_step(policy, ref, opt, part, processor, cfg, device, world, state, on_policy):
    """One optimizer step on `part` (this rank's groups of it), in micro-batches of `micro_prompts`.
    -> (stats summed with weight count, count, gradient norm)

    The loss of a micro-batch is its mean, reweighted by its share of the whole update batch (tokens
    or sequences, counted over all ranks) times the world size, since FSDP averages gradients over
    ranks: the sum over micro-batches and ranks is then exactly the update batch's mean.
    """
    G = part[0].tokens.shape[0]                         # completions per group (SFT: 1)
    # DAPO's filter: groups with no signal leave the loss (their rows still run, keeping ranks in step)
    keep = [not (cfg.filter_groups and bool((g.advantages == 0).all())) for g in part]
    tokens, seqs = all_sum([float(sum(int(g.mask.sum()) for g, k in zip(part, keep) if k)),
                            float(sum(keep) * G)], device)
    total = max(tokens if cfg.loss_agg == "token" else seqs, 1.0)
    sums, counted, step_loss = {}, 0.0, 0.0               # step_loss: this step's loss on this rank
    for i in range(0, len(part), cfg.micro_prompts):
        groups = part[i:i + cfg.micro_prompts]
        batch, comp, mask, adv = micro_batch(groups, processor, cfg, device)                # comp, mask (R, T)
        loss_mask = mask * torch.tensor(keep[i:i + cfg.micro_prompts], device=device).repeat_interleave(G)[:, None]
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logp = ref.completion_logprobs(batch, comp, mask, cfg.temperature)
        logp, ent = policy.completion_logprobs(batch, comp, mask, cfg.temperature, return_entropy=True)
        if cfg.algorithm == "sft":
            loss, st = sft_loss(logp, loss_mask, cfg.loss_agg)
        else:
            old = logp.detach() if on_policy else torch.cat([g.old_logp[:, :comp.shape[1]] for g in groups])
            loss, st = grpo_loss(logp, old, ref_logp, adv, loss_mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip,
                                 cfg.beta, cfg.loss_agg)
        count = float(loss_mask.sum()) if cfg.loss_agg == "token" else float((loss_mask.sum(1) > 0).sum())
        (loss * (count / total * world)).backward()
        step_loss += st["loss"] * count / total
        st["entropy"] = float((ent * mask).sum() / mask.sum().clamp_min(1))
        for k, v in st.items():
            sums[k] = sums.get(k, 0.0) + v * count
        counted += count
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    # Skip or step is decided by all ranks together (the gradient norm is already global; a loss is
    # per rank): a rank that skipped alone would fall out of step with the others, and hang them.
    bad_ranks, loss_all = all_sum([float(not math.isfinite(step_loss)), step_loss], device)
    if bad_ranks or not math.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)                 # skip: parameters untouched
        state["bad_streak"] += 1
        state["skipped"] += 1
        if state["bad_streak"] >= cfg.max_bad_steps:
            raise data.UserError(
                f"{state['bad_streak']} optimizer steps in a row had a NaN/Inf loss or gradient (the last: loss "
                f"{loss_all}, gradient norm {grad_norm}, non-finite on {int(bad_ranks)} of {world} rank(s)); "
                f"stopping. Lower --lr, or check the data, the rewards and the model.")
        return sums, counted, grad_norm
    opt.step()
    opt.zero_grad(set_to_none=True)
    state["bad_streak"] = 0
    return sums, counted, grad_norm


def rollout_stats(groups, device):
    """Means over this step's completions, all ranks: reward components, accuracy per question kind,
    completion length, and the fraction of groups whose samples all scored the same."""
    sums = {}                                       # name -> [sum, count]

    def add(name, value):
        s = sums.setdefault(name, [0.0, 0.0])
        s[0] += float(value)
        s[1] += 1.0
    for g in groups:
        for score, m in zip(g.scores or [None] * len(g.mask), g.mask):
            if score is not None:                   # SFT's written completions are not scored
                for comp, v in score.items():
                    add(f"reward/{comp}", v)
                add(f"acc/{g.question.kind}", score.get("choice" if g.question.options else "l1", 0.0))
            add("length", m.sum())
        if g.scores:
            add("zero_variance_groups", all(s["total"] == g.scores[0]["total"] for s in g.scores))
    names = sorted(sums)
    if dist.is_initialized():                       # ranks may have drawn different question kinds
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, names)
        names = sorted(set().union(*every))
    flat = all_sum([x for n in names for x in sums.get(n, [0.0, 0.0])], device)
    return {n: flat[2 * i] / flat[2 * i + 1] for i, n in enumerate(names) if flat[2 * i + 1] > 0}


# ----------------------------------------------------------------------------------------------------
# Phase 5: records, checkpoints, export
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(policy, opt, cfg, step, state, rank):
    """Sharded checkpoint (torch.distributed.checkpoint): every rank writes its shards. Written to
    step_N.tmp, renamed when complete, then `latest` is switched: a crash mid-write loses nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    root = cfg.out / "checkpoints"
    name = f"step_{step:06d}"
    tmp = root / (name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    barrier()
    dcp.save({"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, opt)},
             checkpoint_id=str(tmp))
    barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**state, "step": step}))
        shutil.rmtree(root / name, ignore_errors=True)
        tmp.rename(root / name)
        (root / "latest.tmp").write_text(name)
        (root / "latest.tmp").replace(root / "latest")
        for old in sorted(root.glob("step_??????"))[:-2]:          # keep the last two
            shutil.rmtree(old)
    barrier()


def checkpoints(out):
    """Complete checkpoints, the one `latest` names first, then the others newest first (step_N.tmp
    folders are writes that never finished and do not count)."""
    root = out / "checkpoints"
    done = sorted((p for p in root.glob("step_??????") if (p / "trainer.json").exists()), reverse=True)
    latest = root / (root / "latest").read_text().strip() if (root / "latest").exists() else None
    return sorted(done, key=lambda p: p != latest)


def load_checkpoint(policy, opt, cfg, device, log):
    """Load the newest checkpoint that reads back whole; a damaged one is passed over with a warning
    (a crash or a full disk can leave one), and the run continues from the one before it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException      # a BaseException, not an Exception
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    for folder in checkpoints(cfg.out):
        state = {"model": get_model_state_dict(policy), "optim": get_optimizer_state_dict(policy, opt)}
        try:
            dcp.load(state, checkpoint_id=str(folder))
            trainer = json.loads((folder / "trainer.json").read_text())
            ok = 1.0
        except (Exception, CheckpointException) as e:   # any failure to read it back means damaged
            log(f"warning: checkpoint {folder} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "trying the one before it")
            ok = 0.0
        if all_sum([ok], device)[0] == (dist.get_world_size() if dist.is_initialized() else 1):   # whole on every rank
            set_model_state_dict(policy, state["model"])
            set_optimizer_state_dict(policy, opt, state["optim"])
            opt.zero_grad(set_to_none=True)
            return trainer, folder
    raise data.UserError(f"--resume: no checkpoint in {cfg.out / 'checkpoints'} reads back whole; start a fresh run "
                         f"with --overwrite")


def export(policy, processor, folder, rank):
    """The trained model in Hugging Face format (transformers' from_pretrained loads it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        M.save_hf(full, policy.config, processor, folder)
    barrier()


def read_jsonl(path, log=print):
    """Records of a JSONL file. A line cut short (the process died while writing it) is dropped with
    a warning; the run rewrites it."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1) if path.exists() else ():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log(f"warning: {path}:{n}: dropping a line cut short ({line[:60]!r}...)")
    return rows


def keep_lines(path, last_step, log):
    """Drop records after `last_step` (a resumed run rewrites them exactly)."""
    if path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(path, log) if r["step"] <= last_step))


def plot_curves(metrics_path, png_path):
    from eval import line_chart                     # the project's charts are drawn in one place, eval.py
    rows = read_jsonl(metrics_path, lambda *a: None)
    series = lambda prefix: {k[len(prefix):] or k: [(r["step"], r[k]) for r in rows if k in r]
                             for k in sorted({k for r in rows for k in r if k.startswith(prefix)})}
    grpo = any("reward/total" in r for r in rows)
    keys = ("kl", "entropy") if grpo else ("loss", "entropy")
    last = ("KL to the start model, entropy" if grpo else "SFT loss, entropy",
            {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys})
    line_chart([("reward (mean over completions)", series("reward/")),
                ("answer accuracy by question kind", series("acc/")),
                ("completion length (tokens)", {"length": [(r["step"], r["length"]) for r in rows]}),
                last], png_path, x_label="step")


def record(metrics, groups, cfg, bar, seconds):
    """Phase 5 (rank 0): the step's metrics, some completions, the curves, the progress bar's line."""
    with open(cfg.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    log_completions(cfg.out / "completions.jsonl", metrics["step"], groups, cfg.log_samples)
    plot_curves(cfg.out / "metrics.jsonl", cfg.out / "curves.png")
    acc = [v for k, v in metrics.items() if k.startswith("acc/")]
    shown = dict(reward=f"{metrics['reward/total']:.2f}", acc=f"{sum(acc) / max(len(acc), 1):.2f}") if acc else \
        dict(loss=f"{metrics['loss']:.3f}")
    bar.set_postfix(**shown, len=f"{metrics['length']:.0f}", s=f"{seconds:.1f}")


def resume(policy, opt, cfg, device, rank, log):
    """The latest complete checkpoint's weights and optimizer state, and the records cut back to its
    step. -> the trainer's state"""
    state, folder = load_checkpoint(policy, opt, cfg, device, log)
    if rank == 0:
        keep_lines(cfg.out / "metrics.jsonl", state["step"], log)
        keep_lines(cfg.out / "completions.jsonl", state["step"], log)
    log(f"resumed from {folder} (step {state['step']})")
    return state


def log_completions(path, step, groups, n):
    with open(path, "a") as f:
        for g in groups[:n]:
            q = g.question
            f.write(json.dumps({"step": step, "id": q.id, "kind": q.kind, "image": q.image and str(q.image), "answer": q.answer,
                                "text": g.texts[0], "reward": g.scores[0] if g.scores else None}) + "\n")


# ----------------------------------------------------------------------------------------------------
# The run folder: never clobbered, one live run at a time, resumed exactly or not at all
# ----------------------------------------------------------------------------------------------------
RUN_RECORDS = ("config.json", "metrics.jsonl", "completions.jsonl", "curves.png", "checkpoints", "start", "final")


def holds_run(out):
    return any((out / name).exists() for name in RUN_RECORDS)


def check_run_folder(cfg):
    """Read-only: may this run use --out? A fresh run refuses a folder that holds a run (unless
    --overwrite); --resume needs a complete checkpoint and the settings the run was started with."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise data.UserError(f"--out {out}: is a file, not a folder")
    if cfg.resume:
        if not checkpoints(out):
            raise data.UserError(f"--resume: no complete checkpoint in {out / 'checkpoints'}; start afresh without "
                                 f"--resume{' and with --overwrite' if holds_run(out) else ''}")
        saved = json.loads((out / "config.json").read_text())
        now = json.loads(json.dumps(asdict(cfg), default=str))
        diffs = [f"--{k} {saved.get(k)} in the run, {v} now" for k, v in now.items()
                 if k not in RESUMABLE_CHANGES and saved.get(k) != v]
        if diffs:
            raise data.UserError(f"--resume: a resumed run must continue the same optimisation, but {'; '.join(diffs)}. "
                                 f"Pass the run's values (see {out / 'config.json'}), or start a fresh run in another --out")
    elif holds_run(out) and not cfg.overwrite:
        done = read_jsonl(out / "metrics.jsonl", lambda *a: None)
        raise data.UserError(f"--out {out} holds a run ({len(done)} steps recorded): continue it with --resume, replace "
                             f"it with --overwrite, or choose another --out")


class RunLock:
    """One live run per folder: an exclusive lock on OUT/.lock while the run lives. The operating system
    drops it when the process ends, however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, out):
        import fcntl
        self.file = open(out / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            other = self.file.read().strip() or "another process"
            self.file.close()
            raise data.UserError(f"--out {out} is in use by a live run ({other}); wait for it to end, or choose "
                                 "another --out") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self.file.flush()

    def release(self):
        self.file.close()


def prepare_run(cfg, rank):
    """Everything checked before anything is touched: the settings (resolve), the dataset folder, the
    model source, the run folder. Then rank 0 locks the folder and, for a fresh run, clears its records.
    -> (the lock: rank 0's, None on other ranks; the questions of a --dataset folder, None for tabletop)."""
    questions = data.load_samples(cfg.dataset) if cfg.dataset != "tabletop" else None   # names a bad record
    if questions == []:
        raise data.UserError(f"--dataset {cfg.dataset}: holds no questions")
    M.check_source(cfg.model)
    locks = []

    def claim():                                          # rank 0: lock first, so that no other run slips in
        data.check_writable(cfg.out)
        lock = RunLock(cfg.out)
        try:
            check_run_folder(cfg)
        except data.UserError:
            lock.release()
            raise
        locks.append(lock)
    on_every_rank(claim)
    if rank == 0:
        if not cfg.resume:
            for name in RUN_RECORDS:
                path = cfg.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    barrier()
    return (locks[0] if locks else None), questions


# ----------------------------------------------------------------------------------------------------
# The memory plan: bytes per GPU from the model's real sizes and the run's settings
# ----------------------------------------------------------------------------------------------------
def plan_config(name):
    """A model's configuration without its weights: a preset, a folder's config.json, the 7B shape."""
    from transformers import Qwen2_5_VLConfig
    if name in M.PRESETS:
        return M.load(name)[0].config
    if name == "Qwen/Qwen2.5-VL-7B-Instruct" and not Path(name).is_dir():
        from sample import qwen7b_config
        return qwen7b_config()
    return Qwen2_5_VLConfig.from_pretrained(M.check_source(name))


def memory_plan(cfg, world):
    """GB per GPU by component, at the configured lengths (the worst case: every prompt max_prompt_len
    tokens, every answer max_new_tokens). The model is built on the meta device to count its parameters;
    the rest is arithmetic on its shapes. On a GPU, FSDP keeps fp32 shards and computes in bf16.
    -> [(component, phase, GB, how it is counted)]"""
    config = plan_config(cfg.model)
    with torch.device("meta"):
        n = sum(p.numel() for p in M.Qwen2_5_VL(config).parameters())
    t = config.text_config
    L, H, I, V = t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.vocab_size
    hd, g = H // t.num_attention_heads, t.num_attention_heads // t.num_key_value_heads
    kv = L * 2 * t.num_key_value_heads * hd * 2                    # bytes of K and V per token, all layers, bf16
    G, P, T = cfg.group_size, cfg.max_prompt_len, cfg.max_new_tokens
    rows, B = cfg.gen_prompts * G, cfg.micro_prompts
    R, tokens = B * G, B * P + B * G * T                          # a micro-batch: prompts once, G answers each
    slots = -(-(P + T) // WINDOW) * WINDOW                        # the sampler's cache: whole windows
    GB = 1e9
    return [
        ("parameters, fp32 shards", "always", 4 * n / world / GB, f"{n / 1e9:.2f}B x 4 B / {world}"),

        ("AdamW moments, fp32 shards", "always", 8 * n / world / GB, "2 x the parameters"),
        *([("reference model, bf16 shards", "always", 2 * n / world / GB, f"{n / 1e9:.2f}B x 2 B / {world} (beta > 0)")
           if cfg.model not in M.PRESETS else                      # a checkpoint loads it lean, in bf16
           ("reference model, fp32 shards", "always", 4 * n / world / GB, "as the parameters (beta > 0)")]
          if cfg.beta > 0 else []),
        ("policy copy for sampling, bf16 (--sample_copy)", "always", 2 * n / GB, f"{n / 1e9:.2f}B x 2 B")
        if cfg.sample_copy else ("policy gathered in bf16", "rollout", 2 * n / GB, f"{n / 1e9:.2f}B x 2 B, per rollout"),
        ("decode KV cache" + (" (--keep_graphs)" if cfg.keep_graphs else ""), "always" if cfg.keep_graphs else "rollout",
         rows * slots * kv / GB, f"{cfg.gen_prompts} prompts x {G} rows x {slots} slots x {kv:,} B"),
        ("prefill KV cache", "rollout", cfg.gen_prompts * P * kv / GB, f"{cfg.gen_prompts} prompts x {P} slots x {kv:,} B"),
        ("prefill activations, one block at a time", "rollout", cfg.gen_prompts * P * (3 * I + 4 * H) * 2 / GB,
         f"{cfg.gen_prompts} prompts x {P} tokens x (3 x {I} + 4 x {H}) x 2 B"),
        ("gradients, fp32 shards", "update", 4 * n / world / GB, "as the parameters (freed after each step)"),
        ("embeddings and lm_head gathered in bf16", "update", 2 * 2 * V * H / GB, f"2 x {V:,} x {H} x 2 B"),
        ("block inputs kept by checkpointing", "update", tokens * H * 2 * L / GB,
         f"{tokens:,} tokens ({B} prompts + {R} answers) x {H} x 2 B x {L} layers"),
        ("prompt keys/values repeated for the G answers", "update", R * P * kv / GB, f"{R} rows x {P} x {kv:,} B"),
        ("one block recomputed, with its gradients", "update", tokens * (4 * I + 7 * H) * 2 / GB,
         f"{tokens:,} tokens x (4 x {I} + 7 x {H}) x 2 B"),
        ("attention mask, additive bf16, one per forward", "update", 2 * R * g * T * (P + T) / GB,
         f"{R} rows x {g} heads per key head x {T} x {P + T} x 2 B"),
        ("log-prob kernel: grad of h, a slice of grad W and of the logits", "update",
         (B * G * T * H * 4 + 2 * 16384 * H * 4) / GB, f"{B * G * T:,} x {H} x 4 B + 2 x 16,384 x {H} x 4 B"),
    ]


def print_plan(cfg, world):
    rows = memory_plan(cfg, world)
    always = sum(gb for _, phase, gb, _ in rows if phase == "always")
    print(f"Memory per GPU, {cfg.model} on {world} GPUs: {cfg.gen_prompts} prompts x G={cfg.group_size} per rollout "
          f"batch, {cfg.micro_prompts} prompts per micro-batch, prompts <= {cfg.max_prompt_len} and answers <= "
          f"{cfg.max_new_tokens} tokens (by calculation: `python grpo.py --plan {world} ...`)\n")
    print("| component | when | GB | counted as |\n|---|---|---|---|")
    for phase in ("always", "rollout", "update"):
        for name, p, gb, how in rows:
            if p == phase:
                print(f"| {name} | {phase} | {gb:.1f} | {how} |")
        extra = sum(gb for _, p, gb, _ in rows if p == phase)
        if phase != "always":
            print(f"| **{phase} peak** (always held + {phase}) | | **{always + extra:.1f}** | |")
        else:
            print(f"| **always held** | | **{always:.1f}** | |")


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
def main(cfg: Config):
    from tqdm import tqdm
    cfg = resolve(cfg)
    if cfg.plan:
        return print_plan(cfg, cfg.plan)
    rank, world, device = M.setup_distributed()
    if cfg.update_prompts % world:
        raise data.UserError(f"--update_prompts {cfg.update_prompts} must be divisible by the {world} ranks")
    weights = reward.parse_weights(cfg.rewards)
    log = tqdm.write if rank == 0 else (lambda *a: None)
    lock, questions = prepare_run(cfg, rank)
    try:
        train(cfg, questions or load_questions(cfg, rank), rank, world, device, weights, log)
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, questions, rank, world, device, weights, log):
    from tqdm import tqdm
    out = cfg.out
    policy, ref, processor = build_models(cfg, questions, device, rank, log)
    engine = sampler(policy, cfg, device) if cfg.algorithm == "grpo" else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    state = resume(policy, opt, cfg, device, rank, log) if cfg.resume else {"step": -1, "bad_streak": 0, "skipped": 0}
    total = cfg.steps or math.ceil(cfg.epochs * len(questions) / cfg.rollout_prompts)
    per_prompt = f"x {cfg.group_size} samples" if cfg.algorithm == "grpo" else "with their answers"
    log(f"{len(questions)} questions, {total} {cfg.algorithm.upper()} steps of {cfg.rollout_prompts} prompts {per_prompt} "
        f"on {world} {device.type} rank(s); model {cfg.model}; run folder {out}")
    bar = tqdm(range(state["step"] + 1, total), desc=cfg.algorithm.upper(), unit="step", disable=rank != 0,
               initial=state["step"] + 1, total=total)
    for step in bar:
        t0 = time.time()
        peak_memory(device)                             # starts this step's count
        idx, seeds = step_questions(len(questions), step, cfg, rank, world)
        chosen = [questions[i] for i in idx]
        if cfg.algorithm == "grpo":
            groups = rollout(policy, engine, processor, chosen, seeds, cfg, device)                    # 1. rollout
            score(groups, weights)                                                                     # 2. reward
            advantages(groups, cfg, device)                                                            # 3. advantage
        else:                                                                         # SFT: 1. the answers
            groups = written(chosen, [correct_answer(q) for q in chosen], processor, device, cfg.think)
        t1, gb1 = time.time(), peak_memory(device)
        stats = update(policy, ref, opt, groups, processor, cfg, device, world, state)                 # 4. update
        stats = dict(zip(stats, (v / world for v in all_sum(list(stats.values()), device))))
        metrics = {"step": step, **rollout_stats(groups, device), **stats, "skipped_steps": state["skipped"],
                   "rollout_s": t1 - t0, "update_s": time.time() - t1}
        if device.type == "cuda":                       # this rank's peak per phase, beside --plan's
            metrics.update(rollout_gb=gb1, update_gb=peak_memory(device))
        state["step"] = step
        if rank == 0:
            record(metrics, groups, cfg, bar, time.time() - t0)                                        # 5. record
        if (step + 1) % cfg.save_every == 0 or step == total - 1:
            save_checkpoint(policy, opt, cfg, step, state, rank)
    if cfg.export:
        export(policy, processor, out / "final", rank)
        log(f"exported the trained model in Hugging Face format to {out / 'final'}")
    log(f"done: curves {out / 'curves.png'}, metrics {out / 'metrics.jsonl'}, completions {out / 'completions.jsonl'}")


if __name__ == "__main__":
    import tyro
    data.cli(lambda: main(tyro.cli(Config)))
