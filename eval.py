"""eval.py: did training help? Robot-R1's evaluations, with what can be verified scored by rules.

    python eval.py                          # after python grpo.py: the trained tiny model vs its start
    python eval.py --model runs/robot_r1/final --compare Qwen/Qwen2.5-VL-7B-Instruct
    torchrun --nproc_per_node 8 eval.py --model ...    # questions split across ranks
    python eval.py experiment               # GRPO vs SFT from one pre-trained base, 3 seeds (end of file)

Four measurements, each on tasks seen in training ("In") and held-out tasks ("Out"), greedy decoding
(temperature 0, as the paper):
  1. multiple choice   accuracy per question kind and task, format rate, response length; the
                       open-ended waypoint variant: L1 / L2 error in metres and clip(1 - L1);
                       letter_given_thought: the letter alone, given the right option's text as thought
  2. bench             open questions in Robot-R1 Bench's categories, from simulator ground truth:
                       movement and spatial scored 0-3 by rules; planning and high-level action (and
                       all four, when --judge_url is given) by an LLM judge with the paper's rubric
  3. closed loop       the model picks the next keypoint from the current image, the simulator moves
                       the gripper there (opening/closing by the task's script): success rate per task;
                       an oracle (~100%) and a random policy (~0%) check the harness itself
  4. report            report.json, report.md (A beside B), bars.png, examples.png in --out
"""
from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data
import model as M
import reward
from sample import generate

# ----------------------------------------------------------------------------------------------------
# Models and answers
# ----------------------------------------------------------------------------------------------------
def load_policy(name, ckpt=None, device="cpu"):
    """A model by preset, folder or hub id; with ckpt, the weights of a training checkpoint
    (OUT/checkpoints/step_N) loaded into that architecture."""
    model, proc = M.load(name, torch.float32, "cpu")
    if ckpt is not None:
        import torch.distributed.checkpoint as dcp
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(ckpt))
        model.load_state_dict(state["model"])
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return M.cast_parameters(model.to(device), dtype).eval(), proc


def answers(model, proc, questions, max_new_tokens, batch_size, device, desc="answering", progress=True):
    """Greedy completions (temperature 0, as the paper evaluates) -> texts, lengths in tokens."""
    from tqdm import tqdm
    texts, lengths = [], []
    for i in tqdm(range(0, len(questions), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = proc.encode(questions[i:i + batch_size]).to(device)
        out = generate(model, batch, 1, max_new_tokens, temperature=0, eos_ids=proc.eos_ids, pad_id=proc.pad_id)
        texts += proc.decode(out.tokens, out.mask)
        lengths += out.lengths.tolist()
    return texts, lengths


def split_of(task):
    return "probe" if task == "probe" else "In" if task in data.TRAIN_TASKS else "Out"


# ----------------------------------------------------------------------------------------------------
# 1. Multiple choice (and the open-ended waypoint)
# ----------------------------------------------------------------------------------------------------
def score_choice(questions, texts, lengths):
    rows = []
    for q, text, n in zip(questions, texts, lengths):
        row = {"id": q.id, "task": q.task, "split": split_of(q.task), "kind": q.kind, "length": n,
               "format": reward.format_reward(text), "text": text, "group": _group(q)}
        if q.options:
            row["correct"] = reward.choice_reward(text, q)
            letter = reward.chosen_letter(text, data.LETTERS)
            # a model that thinks its option's text (grpo.py --think option): is that the right option's
            # text, and does the letter it then writes name it? (seeing, and finding the letter, apart)
            thought = text.split("<think>")[1].split("</think>")[0].strip() if row["format"] else None
            row["thought_right"] = float(thought == q.options[data.LETTERS.index(q.answer)])
            row["letter_follows"] = float(letter is not None and thought == q.options[data.LETTERS.index(letter)])
            if letter and q.kind == "waypoint":
                row["predicted_xyz"] = json.loads(q.options[data.LETTERS.index(letter)])
        else:
            xyz = reward.parse_xyz(text)
            err = None if xyz is None else np.abs(np.subtract(xyz, q.target))
            row.update(l1=None if err is None else float(err.sum()), l2=None if err is None else float(np.sqrt((err ** 2).sum())),
                       score=reward.l1_reward(text, q), predicted_xyz=xyz)
        rows.append(row)
    return rows


def letter_given_thought(model, proc, questions, batch_size=16, device="cpu"):
    """Finding the letter, measured apart from seeing: each multiple-choice question's completion is
    written with the right option's text as its thought (grpo.py --think option) and each of the four
    letters as its answer; the model picks the letter whose completion it finds likeliest (teacher
    forcing, no sampling). -> {row ('scene:object_region', 'lookup:height', ...): accuracy}. A model at
    chance here cannot turn a right thought into a right letter, whatever it sees."""
    import grpo
    hits = {}
    for i in range(0, len(questions), batch_size):
        part = [q for q in questions[i:i + batch_size] if q.options]
        if not part:
            continue
        thoughts = [grpo.rationale(q, grpo.correct_answer(q), "option") for q in part]
        ids = [proc.tokenizer(grpo.ANSWER.format(t, f"[[{L}]]"), add_special_tokens=False)["input_ids"]
               for t in thoughts for L in data.LETTERS]                                   # 4 per question
        completions, mask = grpo.padded(ids, proc.pad_id, device)                             # (4B, T)
        with torch.no_grad():
            logp = model.completion_logprobs(proc.encode(part).to(device), completions, mask)  # (4B, T)
        best = (logp * mask).sum(1).view(len(part), len(data.LETTERS)).argmax(1)               # (B,)
        for q, b in zip(part, best.tolist()):
            hits.setdefault(_group(q), []).append(float(data.LETTERS[b] == q.answer))
    return {row: mean(v) for row, v in sorted(hits.items())}


# ----------------------------------------------------------------------------------------------------
# Blind baselines: how much of a multiple-choice score the text alone explains
# ----------------------------------------------------------------------------------------------------
CURRENT = re.compile(r"Position: (\[[^\]]*\])")


def _xyz(q):
    return np.array([json.loads(o) for o in q.options])


def _spread(q):
    """Each option's summed distance to the others: in metres for positions, in edits for movements."""
    if q.kind == "movement":
        m = [data.phrase_moves(o) for o in q.options]
        edits = lambda a, b: sum((x in a) != (x in b) or (x in a and (a[x][0] != b[x][0]) + (a[x][1] != b[x][1]))
                                 for x in range(3))
        return np.array([sum(edits(a, b) for b in m) for a in m], float)
    p = _xyz(q)
    return np.linalg.norm(p[:, None] - p[None], axis=-1).sum(1)


def _to_current(q):
    return np.linalg.norm(_xyz(q) - json.loads(CURRENT.search(q.prompt).group(1)), axis=1)


# Text-only rules: (question, what the rule learned from the answers of training questions) -> an option's
# index. Each reads only what a model reads, minus the image. A rule far *below* chance is as telling as
# one above it (its opposite is in the list).
BLIND_RULES = {
    "waypoint": {
        "nearest the current position": lambda q, fit: _to_current(q).argmin(),
        "farthest from the current position": lambda q, fit: _to_current(q).argmax(),
    },
    ("waypoint", "state"): {
        "nearest the mean answer": lambda q, fit: np.linalg.norm(_xyz(q) - fit[q.kind], axis=1).argmin(),
        "nearest the task's mean answer": lambda q, fit: np.linalg.norm(
            _xyz(q) - fit.get((q.kind, q.task), fit[q.kind]), axis=1).argmin(),
        "centre of the options": lambda q, fit: np.linalg.norm(_xyz(q) - _xyz(q).mean(0), axis=1).argmin(),
        "highest": lambda q, fit: _xyz(q)[:, 2].argmax(),
        "lowest": lambda q, fit: _xyz(q)[:, 2].argmin(),
    },
    ("waypoint", "state", "movement"): {
        "closest to the other options": lambda q, fit: _spread(q).argmin(),
        "farthest from the other options": lambda q, fit: _spread(q).argmax(),
    },
    ("movement", "scene:object_region", "scene:gripper_region"): {     # answers from a small fixed set
        "the most frequent answer": lambda q, fit: np.argmax([fit["answers"].get((_group(q), o), 0) for o in q.options]),
    },
    "movement": {
        "fewest axes": lambda q, fit: np.argmin([len(data.phrase_moves(o)) for o in q.options]),
        "most axes": lambda q, fit: np.argmax([len(data.phrase_moves(o)) for o in q.options]),
    },
}


def blind_rules(kind):
    return {name: rule for kinds, rules in BLIND_RULES.items() if kind in ((kinds,) if isinstance(kinds, str) else kinds)
            for name, rule in rules.items()}


def _group(q):
    """A question's row: its kind, and for scene questions which one ('scene:object_region')."""
    return f"{q.kind}:{q.meta['question']}" if "question" in q.meta else q.kind


def fit_blind(questions):
    """What the rules may know of the answers: mean positions (overall and per task), how often each
    answer's text is the right one (per row)."""
    fit = {"answers": {}}
    for kind in ("waypoint", "state"):
        answers = [(q.task, np.asarray(q.target, float)) for q in questions if q.kind == kind]
        if answers:
            fit[kind] = np.mean([a for _, a in answers], 0)
            for task in {t for t, _ in answers}:
                fit[(kind, task)] = np.mean([a for t, a in answers if t == task], 0)
    for q in questions:
        if q.options:
            key = (_group(q), q.options[data.LETTERS.index(q.answer)])
            fit["answers"][key] = fit["answers"].get(key, 0) + 1
    return fit


def blind_baselines(questions, fit_on=None):
    """Accuracy of every text-only rule per 'kind/split' (scene: per question), fitted on `fit_on`
    (default: the training-task questions among `questions`). -> {key: {rule: accuracy}}"""
    fit = fit_blind(fit_on or [q for q in questions if split_of(q.task) == "In"])
    out = {}
    for q in questions:
        for name, rule in blind_rules(_group(q)).items():
            hit = data.LETTERS[int(rule(q, fit))] == q.answer
            out.setdefault(f"{_group(q)}/{split_of(q.task)}", {}).setdefault(name, []).append(hit)
    return {k: {name: float(np.mean(v)) for name, v in rules.items()} for k, rules in out.items()}


def best_blind(baselines):
    """{key: (rule, accuracy)} of the rule farthest from chance, above or below, per key."""
    return {k: max(rules.items(), key=lambda r: abs(r[1] - 0.25)) for k, rules in baselines.items()}


# ----------------------------------------------------------------------------------------------------
# 2. The bench: open questions in Robot-R1 Bench's categories, from simulator ground truth
# ----------------------------------------------------------------------------------------------------
BENCH_QUESTIONS = {
    "movement": "What movement is needed to reach the next keypoint? Answer with a phrase such as "
                "'move down and slightly move left'.",
    "spatial": "Where is the gripper relative to the {target}? Answer with a phrase such as "
               "'above, in front of and slightly left of the {target}'.",
    "planning": "List the subtasks that complete the task, in order, separated by semicolons.",
    "high-level action": "What is the next subtask to perform?",
}
AXIS_RELATIONS = (("in front of", "behind"), ("right of", "left of"), ("above", "below"))


def spatial_phrase(delta, dead_zone=0.03):
    """gripper - object -> 'above, slightly right of and in front of' (x, y, z as in movement phrases)."""
    d = np.asarray(delta, float)
    big = np.abs(d).max()
    parts = [("slightly " if abs(d[a]) <= big / 2 else "") + AXIS_RELATIONS[a][0 if d[a] > 0 else 1]
             for a in (2, 1, 0) if abs(d[a]) > dead_zone]
    return "at" if not parts else (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])


def bench_questions(episodes, every=10):
    out = []
    for ep in episodes:
        kps, subtasks = ep.sim.keyframes, ep.sim.subtasks
        target = ep.sim.bodies.index(ep.sim.target)
        for t in range(0, len(ep.positions), every):
            k = next((i for i, kp in enumerate(kps) if kp > t), None)
            if k is None:
                continue
            cur = ep.positions[t]
            obj = ep.sim.body_xyz[t][target]
            truths = {"movement": data.movement_phrase(ep.positions[kps[k]] - cur),
                      "spatial": spatial_phrase(cur - obj) + f" the {ep.sim.target_name}",
                      "planning": "; ".join(subtasks), "high-level action": subtasks[k]}
            for cat, truth in truths.items():
                prompt = data.make_prompt(cat, ep.instruction, cur,
                                          question=BENCH_QUESTIONS[cat].format(target=ep.sim.target_name))
                out.append(data.Sample(f"{ep.id}/t{t}/{cat}", ep.task, cat, ep.images[t], prompt, [], truth, truth,
                                       {"frame": t}))
    return out


def _relations(text, words):
    """{axis: (first_word, slight)} for each relation named in text, e.g. 'slightly move left'."""
    found = {}
    for a, (pos, neg) in enumerate(words):
        for sign, w in ((True, pos), (False, neg)):
            for m in re.finditer(rf"(slightly )?(?:move )?{w}", text.lower()):
                found.setdefault(a, set()).add((sign, bool(m.group(1))))
    return found


def rule_score(category, text, truth):
    """0-3 in the spirit of the paper's rubric, for answers checkable by rules:
    3 every axis right (direction and 'slightly'); 2 every direction right, some 'slightly' off;
    1 at least one direction right and none contradicted; 0 otherwise."""
    words = {"movement": [(f"move {a}", f"move {b}") for a, b in data.AXIS_WORDS], "spatial": AXIS_RELATIONS}[category]
    words = [(a.replace("move ", ""), b.replace("move ", "")) for a, b in words]
    got, want = _relations(text or "", words), _relations(truth, words)
    if not got:
        return 3 if not want and text and text.strip().lower() in (truth.lower(), "stay still", "at") else 0
    if any(len(v) > 1 for v in got.values()):
        return 0                                            # says both left and right
    got = {a: next(iter(v)) for a, v in got.items()}
    want = {a: next(iter(v)) for a, v in want.items()}
    if any(a in want and got[a][0] != want[a][0] for a in got):
        return 0
    if got == want:
        return 3
    if set(got) == set(want):
        return 2
    return 1 if set(got) & set(want) else 0


JUDGE_PROMPT = """You grade a robot assistant's answer against the reference answer.
Question: {question}
Reference answer: {truth}
Assistant's answer: {answer}
Score from 0 to 3: 3 = correct in every respect; 2 = mostly correct with a minor error; 1 = partly correct;
0 = wrong, contradictory or missing. Reply with the single digit only."""


LOOPBACK = ("localhost", "127.0.0.1", "::1")


class JudgeUnavailable(Exception):
    """The endpoint refused, failed or timed out, after the retries for transient errors."""


def judge_request(url, model, prompt, key=None, timeout=30, retries=3, backoff=1.0):
    """One chat completion from an OpenAI-compatible endpoint (URL up to /v1) -> the reply's text.

    Bounded: `timeout` seconds to connect and for each read. Transient failures (a timeout, a reset
    connection, HTTP 429 or 5xx) are retried `retries` times, waiting backoff, 2 backoff, 4 backoff...;
    anything else (a refused key, a bad request) fails at once. -> JudgeUnavailable with the reason."""
    import time
    body = json.dumps({"model": model, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url.rstrip("/") + "/chat/completions", body, headers)
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            reason, transient = f"HTTP {e.code} {e.reason}", e.code == 429 or e.code >= 500
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            why = getattr(e, "reason", e)
            reason = f"{type(why).__name__}: {why}"
            transient = not isinstance(why, ConnectionRefusedError)        # nobody listens: retrying won't help
        except (ValueError, KeyError, IndexError, TypeError) as e:
            reason, transient = f"an unreadable reply ({type(e).__name__}: {e})", False
        if not transient or attempt == retries:
            raise JudgeUnavailable(reason)
        time.sleep(backoff * 2 ** attempt)


def judge(url, model, question, truth, answer, key=None, timeout=30, retries=3):
    """One score 0-3 for an answer; None when the judge could not be reached or gave no digit."""
    try:
        reply = judge_request(url, model, JUDGE_PROMPT.format(question=question, truth=truth, answer=answer), key,
                              timeout, retries)
    except JudgeUnavailable:
        return None
    m = re.search(r"[0-3]", reply)
    return int(m.group()) if m else None


def check_judge(url, model, key):
    """Before any evaluation: the key never travels unencrypted off this machine, and one request gets
    an answer, so that an unreachable judge or a refused key costs seconds, not one timeout per answer."""
    from urllib.parse import urlparse
    where = urlparse(url)
    if where.scheme not in ("http", "https") or not where.hostname:
        raise data.UserError(f"--judge_url {url}: expected http(s)://host/v1")
    if key and where.scheme == "http" and where.hostname not in LOOPBACK:
        raise data.UserError(f"--judge_url {url}: refusing to send $JUDGE_API_KEY over plain http to another machine; "
                             "use https")
    try:
        judge_request(url, model, "Reply with the digit 3.", key, timeout=10, retries=1)
    except JudgeUnavailable as e:
        raise data.UserError(f"--judge_url {url}: the judge does not answer ({e}); check the URL, --judge_model and "
                             "$JUDGE_API_KEY, or leave --judge_url out (movement and spatial are scored by rules)") from None


def judge_all(items, judge_cfg, workers=8, give_up_after=8):
    """Scores for (question, truth, answer) items, `workers` requests in flight. Scores already given
    are kept when the judge fails midway: after `give_up_after` failures in a row the rest stay None
    (counted as unscored in the report) instead of each waiting out its own timeouts."""
    from concurrent.futures import ThreadPoolExecutor
    failures = [0]

    def one(item):
        if failures[0] >= give_up_after:
            return None
        score = judge(judge_cfg["url"], judge_cfg["model"], *item, judge_cfg.get("key"))
        failures[0] = failures[0] + 1 if score is None else 0
        return score
    with ThreadPoolExecutor(workers) as pool:
        scores = list(pool.map(one, items))
    if failures[0] >= give_up_after:
        print(f"judge: {give_up_after} answers in a row went unscored; the judge was not asked about the rest")
    return scores


def score_bench(questions, texts, lengths, judge_cfg=None):
    rows = []
    for q, text, n in zip(questions, texts, lengths):
        got = reward.answer_text(text)
        rows.append({"id": q.id, "task": q.task, "split": split_of(q.task), "category": q.kind, "truth": q.target,
                     "answer": got, "length": n,
                     "rule": rule_score(q.kind, got, q.target) if q.kind in ("movement", "spatial") else None})
    if judge_cfg:
        scores = judge_all([(BENCH_QUESTIONS[q.kind], q.target, row["answer"] or text)
                            for q, text, row in zip(questions, texts, rows)], judge_cfg)
        for row, score in zip(rows, scores):
            row["judge"] = score
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. Closed-loop control in the simulator
# ----------------------------------------------------------------------------------------------------
def closed_loop(task, n, seed, policy, rng_seed=0):
    """Run n episodes of a task: at each stage k the policy picks the next keypoint from a waypoint
    question about the current image (4 options: the planned keypoint k and 3 workspace positions),
    the gripper moves there and opens/closes as the task's script says at stage k.
    policy(questions) -> xyz per question (or None: stay). -> list of successes."""
    spec = data.TASKS[task]
    runs = []
    for i in range(n):
        scene, instruction = spec.reset(np.random.default_rng([seed, list(data.TASKS).index(task), i, 99]))
        runs.append((scene, instruction, spec.plan(scene)))
    success = [False] * n
    rng = np.random.default_rng([rng_seed, len(task)])
    for k in range(len(runs[0][2])):
        live = [i for i in range(n) if not success[i]]
        if not live:
            break
        qs = []
        for i in live:
            scene, instruction, plan = runs[i]
            right = int(rng.integers(4))
            others = data.uniform_positions(rng, plan[k].xyz)
            options = others[:right] + [data.fmt_xyz(plan[k].xyz)] + others[right:]
            image = data.render(list(scene.bodies.values()), scene.gripper, scene.gripper_open)
            qs.append(data.Sample(f"{task}/{i}/stage{k}", task, "waypoint", image,
                                  data.make_prompt("waypoint", instruction, scene.gripper, options), options,
                                  data.LETTERS[right], [round(float(v), 3) for v in plan[k].xyz]))
        for i, xyz in zip(live, policy(qs)):
            scene, _, plan = runs[i]
            if xyz is not None:
                scene.move_to(np.asarray(xyz, float))
            scene.set_gripper(plan[k].gripper_open)
            success[i] = bool(spec.success(scene))
    return success


def oracle_policy(qs):
    return [q.target for q in qs]


def random_policy(seed):
    rng = np.random.default_rng(seed)
    return lambda qs: [rng.uniform(*data.WORKSPACE) for _ in qs]


def model_policy(model, proc, max_new_tokens, batch_size, device):
    def choose(qs):
        texts, _ = answers(model, proc, qs, max_new_tokens, batch_size, device, progress=False)
        out = []
        for q, text in zip(qs, texts):
            letter = reward.chosen_letter(text, data.LETTERS)
            out.append(json.loads(q.options[data.LETTERS.index(letter)]) if letter else None)
        return out
    return choose


# ----------------------------------------------------------------------------------------------------
# 4. Report
# ----------------------------------------------------------------------------------------------------
def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(result):
    """Per-row results -> the tables' numbers."""
    s = {"choice": {}, "thought": {}, "open": {}, "bench": {}, "loop": {t: mean(v) for t, v in result.get("loop", {}).items()}}
    for r in result.get("choice", []):
        key = f"{r['kind']}/{r['split']}"
        if "correct" in r:           # scene questions also per question: 'scene:object_region/In'
            for k in {key, f"{r['group']}/{r['split']}"}:
                s["choice"].setdefault(k, []).append(r["correct"])
                s["thought"].setdefault(k, []).append((r["thought_right"], r["letter_follows"]))
        else:
            s["open"].setdefault(key, []).append(r)
    s["choice"] = {k: mean(v) for k, v in s["choice"].items()}
    s["thought"] = {k: {"right": mean([a for a, _ in v]), "follows": mean([b for _, b in v])}
                    for k, v in s["thought"].items()}
    s["open"] = {k: {"l1": mean([r["l1"] for r in v]), "l2": mean([r["l2"] for r in v]),
                     "score": mean([r["score"] for r in v])} for k, v in s["open"].items()}
    rows = result.get("choice", [])
    s["format"] = mean([r["format"] for r in rows])
    s["length"] = mean([r["length"] for r in rows])
    s["by_task"] = {t: mean([r["correct"] for r in rows if r["task"] == t and "correct" in r])
                    for t in sorted({r["task"] for r in rows})}
    for r in result.get("bench", []):
        key = f"{r['category']}/{r['split']}"
        s["bench"].setdefault(key, {"rule": [], "judge": []})
        s["bench"][key]["rule"].append(r["rule"])
        s["bench"][key]["judge"].append(r.get("judge"))
    s["bench"] = {k: {m: mean(v[m]) for m in v} for k, v in s["bench"].items()}
    s["judge_unscored"] = sum("judge" in r and r["judge"] is None for r in result.get("bench", []))
    return s


def fmt(v, pct=False):
    if v is None:
        return "—"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def markdown(names, sums, references=None, blind=None):
    """The paper-style tables, the models side by side (multiple choice: beside the best text-only rule;
    closed loop: beside the oracle and random)."""
    references, best = references or {}, best_blind(blind or {})
    head = lambda first: f"| {first} | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    md = [f"# Robot-R1 evaluation: {' vs '.join(names)}\n", "## Multiple choice: accuracy (chance 25%)\n"]
    if best:
        md.append("Beside each model: the text-only rule farthest from chance on the same questions (no image, no "
                  "model; eval.BLIND_RULES): what the text alone gives away.\n\n")
    md.append("| question / tasks | " + " | ".join(names) + (" | best text-only rule" if best else "") + " |\n|---|"
              + "---|" * (len(names) + bool(best)) + "\n")
    for key in sorted({k for s in sums for k in s["choice"]}):
        rule = f" | {fmt(best[key][1], True)} ({best[key][0]})" if key in best else (" | —" if best else "")
        md.append(f"| {key.replace('/', ' · ')} | " + " | ".join(fmt(s["choice"].get(key), True) for s in sums) + rule + " |\n")
    pad = " | " if best else ""
    md.append("| format followed | " + " | ".join(fmt(s["format"], True) for s in sums) + pad + " |\n")
    md.append("| mean response length (tokens) | " + " | ".join(f"{s['length']:.0f}" if s["length"] else "—" for s in sums)
              + pad + " |\n")
    thought = lambda s, key, m: s["thought"].get(key, {}).get(m)
    if any(v["right"] or v["follows"] for s in sums for v in s["thought"].values()):
        md += ["\n## The thought (grpo.py --think option): it names the right option · the letter names the thought\n",
               head("question / tasks")]
        for key in sorted({k for s in sums for k in s["thought"]}):
            md.append(f"| {key.replace('/', ' · ')} | " + " | ".join(
                f"{fmt(thought(s, key, 'right'), True)} · {fmt(thought(s, key, 'follows'), True)}" for s in sums) + " |\n")
    if any(s["open"] for s in sums):
        md += ["\n## Open-ended waypoint: error in metres, and clip(1 - L1)\n", head("tasks · measure")]
        for key in sorted({k for s in sums for k in s["open"]}):
            for m in ("l1", "l2", "score"):
                md.append(f"| {key.split('/')[1]} · {m} | " + " | ".join(fmt(s["open"].get(key, {}).get(m)) for s in sums) + " |\n")
    if any(s["bench"] for s in sums):
        md += ["\n## Bench (0-3): rules for movement and spatial, the judge where configured\n", head("category · tasks · scorer")]
        for key in sorted({k for s in sums for k in s["bench"]}):
            for m in ("rule", "judge"):
                if any(s["bench"].get(key, {}).get(m) is not None for s in sums):
                    md.append(f"| {key.replace('/', ' · ')} · {m} | " + " | ".join(
                        fmt(s["bench"].get(key, {}).get(m)) for s in sums) + " |\n")
        if any(s.get("judge_unscored") for s in sums):
            md.append("| answers the judge left unscored (excluded above) | " + " | ".join(
                str(s.get("judge_unscored", 0)) for s in sums) + " |\n")
    if any(s["loop"] for s in sums):
        cols = names + list(references)
        md += ["\n## Closed loop: success rate per task\n", "| task | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"]
        for t in data.TRAIN_TASKS + data.HELDOUT_TASKS:
            cells = [fmt(s["loop"].get(t), True) for s in sums] + [fmt(r.get(t), True) for r in references.values()]
            md.append(f"| {t} ({split_of(t)}) | " + " | ".join(cells) + " |\n")
    return "".join(md)


def examples_picture(questions, rows_by_model, names, n=6):
    """Waypoint questions with the true next keypoint (green ring) and each model's pick drawn on them."""
    by_task = {}
    for q in questions:
        if q.kind == "waypoint":
            by_task.setdefault(q.task, []).append(q)
    picks = [qs[len(qs) // 2] for qs in by_task.values()][:n]               # one mid-episode question per task
    font = ImageFont.load_default(size=14)
    sheet = Image.new("RGB", (3 * 340, (len(picks) + 2) // 3 * 370 + 30), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), "green ring: true next keypoint; " + ", ".join(
        f"{['red', 'blue'][i]} cross: {n}" for i, n in enumerate(names[:2])), fill="black", font=font)
    for j, q in enumerate(picks):
        img = q.load_image().convert("RGB").resize((320, 320))
        d = ImageDraw.Draw(img)
        s = 320 / data.FRONT_CAMERA.size[0]
        (u, v), _ = data.FRONT_CAMERA.project(q.target)
        d.ellipse([u * s - 10, v * s - 10, u * s + 10, v * s + 10], outline=(0, 200, 0), width=4)
        for i, rows in enumerate(rows_by_model[:2]):
            xyz = rows.get(q.id, {}).get("predicted_xyz")
            if xyz is not None:
                (u, v), _ = data.FRONT_CAMERA.project(xyz)
                c = [(230, 0, 0), (0, 80, 255)][i]
                d.line([u * s - 9, v * s - 9, u * s + 9, v * s + 9], fill=c, width=4)
                d.line([u * s - 9, v * s + 9, u * s + 9, v * s - 9], fill=c, width=4)
        x0, y0 = (j % 3) * 340 + 10, (j // 3) * 370 + 30
        sheet.paste(img, (x0, y0))
        draw.text((x0, y0 + 324), f"{q.task} · {q.meta.get('instruction', '')}"[:48], fill="black", font=font)
    return sheet


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------
def evaluate(model, proc, cfg, rank=0, world=1, device="cpu", judge_cfg=None, name="model"):
    """Every section for one model; with several ranks each takes every world-th question/episode."""
    result = {}
    eps = [e for t in data.TRAIN_TASKS + data.HELDOUT_TASKS for e in data.generate_episodes(t, cfg["episodes"], cfg["seed"])]
    if "choice" in cfg["sections"]:
        qs = data.build_samples(eps, data.KINDS, every=cfg["every"], seed=cfg["seed"], distractors=cfg["distractors"])
        scene = data.scene_samples(eps, cfg["every"], cfg["seed"]) if cfg.get("scene") else []   # --scene
        qs += scene + data.lookup_samples(scene, cfg["seed"])     # and each asked back by an option's text
        probes = [q for shuffled in (False, True) for q in data.probe_samples(32, cfg["seed"], shuffled)]
        qs = (qs + probes)[rank::world]                                     # the tiny preset's sanity tasks
        texts, lengths = answers(model, proc, qs, cfg["max_new_tokens"], cfg["batch_size"], device, f"{name}: choice", rank == 0)
        result["choice"] = score_choice(qs, texts, lengths)
    if "bench" in cfg["sections"]:
        qs = bench_questions(eps, cfg["every"])[rank::world]
        texts, lengths = answers(model, proc, qs, cfg["max_new_tokens"], cfg["batch_size"], device, f"{name}: bench", rank == 0)
        result["bench"] = score_bench(qs, texts, lengths, judge_cfg)
    if "loop" in cfg["sections"]:
        policy = model_policy(model, proc, cfg["max_new_tokens"], cfg["batch_size"], device)
        result["loop"] = {t: closed_loop(t, cfg["loop_episodes"], cfg["seed"], policy)[rank::world]
                          for t in data.TRAIN_TASKS + data.HELDOUT_TASKS}
    return result, eps


def gather(result, world):
    if world == 1:
        return result
    import torch.distributed as dist
    parts = [None] * world
    dist.all_gather_object(parts, result)
    out = {k: [r for p in parts for r in p[k]] for k in ("choice", "bench") if k in result}
    if "loop" in result:
        out["loop"] = {t: [s for p in parts for s in p["loop"][t]] for t in result["loop"]}
    return out


SECTIONS = ("choice", "bench", "loop")


def main(model: str = "runs/robot_r1/final", compare: str | None = "auto", ckpt: Path | None = None,
         out: Path = Path("reports/robot_r1"), episodes: int = 3, loop_episodes: int = 5, every: int = 10,
         seed: int = 1000, max_new_tokens: int | None = None, batch_size: int = 32,
         sections: tuple[str, ...] = ("choice", "bench", "loop"), judge_url: str | None = None,
         judge_model: str = "gpt-4o", distractors: str = "matched", scene: bool = False):
    """Evaluate --model (and --compare) and write report.json, report.md and PNGs to --out.

    Args:
        model: preset, folder or hub id; default: the model python grpo.py just trained.
        compare: a second model for the side-by-side columns; 'auto': the run's starting point.
        ckpt: evaluate a training checkpoint (OUT/checkpoints/step_N) in --model's architecture.
        out: report folder.
        episodes: simulated demonstrations per task for the questions (8 tasks, In and Out).
        loop_episodes: closed-loop episodes per task.
        every: current frame every n frames.
        seed: seed of the evaluation episodes (training uses others).
        max_new_tokens: answer length limit; default: the training run's, else 1024.
        batch_size: questions per generation batch.
        sections: choice, bench, loop.
        judge_url: OpenAI-compatible endpoint (e.g. https://api.openai.com/v1) to score the bench with an
            LLM judge; key from $JUDGE_API_KEY. Optional: movement and spatial are scored by rules anyway.
        judge_model: the judge's model name.
        distractors: how the wrong options are drawn: 'matched' (text alone cannot find the answer) or
            'uniform' (the paper's rule); see data.build_samples. The report gives the best text-only
            rule's accuracy beside every model's either way.
        scene: also ask the scene questions (data.scene_samples), which eval.py experiment's base learns,
            and their lookups (data.lookup_samples: text answers them; they show whether a model names the
            letter of an option it has in mind).
    """
    import torch.distributed as dist
    rank, world, device = M.setup_distributed(group_on_one_gpu=False)
    run = Path(model).parent if (Path(model).parent / "config.json").exists() else None
    run_cfg = json.loads((run / "config.json").read_text()) if run else {}
    if compare == "auto":
        compare = str(run / "start") if run and (run / "start").exists() else run_cfg.get("model")
    if max_new_tokens is None:
        max_new_tokens = int(run_cfg.get("max_new_tokens") or 1024)
    # every input checked before the first model is evaluated: a bad --compare or --out found after
    # an hour of answering would waste that hour
    problems = [m for ok, m in (
        (episodes >= 1, f"--episodes {episodes}: must be at least 1"),
        (loop_episodes >= 0, f"--loop_episodes {loop_episodes}: must be at least 0"),
        (every >= 1, f"--every {every}: must be at least 1"),
        (batch_size >= 1, f"--batch_size {batch_size}: must be at least 1"),
        (max_new_tokens >= 1, f"--max_new_tokens {max_new_tokens}: must be at least 1"),
        (sections and set(sections) <= set(SECTIONS), f"--sections {' '.join(sections)}: choose from {' '.join(SECTIONS)}"),
        (ckpt is None or Path(ckpt).is_dir(), f"--ckpt {ckpt}: no such checkpoint folder"),
        (distractors in data.DISTRACTORS, f"--distractors {distractors}: choose from {' '.join(data.DISTRACTORS)}"))
        if not ok]
    if problems:
        raise data.UserError("; ".join(problems))
    if not Path(model).exists() and model not in M.PRESETS and "/" not in model:
        raise data.UserError(f"--model {model}: no such model; train one with `python grpo.py` or pass --model")
    for flag, name in (("--model", model), ("--compare", compare)):
        if name:
            M.check_source(name, flag)
    data.check_writable(out)
    judge_cfg = {"url": judge_url, "model": judge_model, "key": os.environ.get("JUDGE_API_KEY")} if judge_url else None
    if judge_cfg:
        check_judge(judge_url, judge_model, judge_cfg["key"])
    cfg = dict(episodes=episodes, loop_episodes=loop_episodes, every=every, seed=seed, max_new_tokens=max_new_tokens,
               batch_size=batch_size, sections=sections, distractors=distractors, scene=scene)
    names, results, eps = [], [], None
    for i, name in enumerate([model] + ([compare] if compare else [])):
        policy, proc = load_policy(name, ckpt if i == 0 else None, device)
        result, eps = evaluate(policy, proc, cfg, rank, world, device, judge_cfg, name)
        results.append(gather(result, world))
        names.append(name + (f" @ {Path(ckpt).name}" if ckpt and i == 0 else ""))
        del policy
    if rank == 0:
        write_report(names, results, eps, cfg, out)
    if dist.is_initialized():
        dist.destroy_process_group()


def write_report(names, results, eps, cfg, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sums = [summarise(r) for r in results]
    tasks = data.TRAIN_TASKS + data.HELDOUT_TASKS
    references = {}
    if "loop" in cfg["sections"]:                   # the harness's own check: ~100% and ~0%
        references = {n: {t: mean(closed_loop(t, cfg["loop_episodes"], cfg["seed"], p)) for t in tasks}
                      for n, p in (("oracle", oracle_policy), ("random", random_policy(cfg["seed"])))}
    blind = {}
    if "choice" in cfg["sections"]:                 # the same questions, answered from the text alone
        blind = blind_baselines(data.build_samples(eps, ("waypoint", "state", "movement"), every=cfg["every"],
                                                   seed=cfg["seed"], distractors=cfg["distractors"])
                                + (data.scene_samples(eps, cfg["every"], cfg["seed"]) if cfg.get("scene") else []))
    (out / "report.json").write_text(json.dumps({"models": names, "config": cfg, "summary": sums, "blind": blind,
                                                 "references": references, "rows": results}, indent=1, default=list))
    (out / "report.md").write_text(markdown(names, sums, references, blind))
    kinds = sorted({k for s in sums for k in s["choice"]})
    if kinds:
        series = {n: [s["choice"].get(k) for k in kinds] for n, s in zip(names, sums)}
        if blind:
            series["best text-only rule"] = [best_blind(blind).get(k, (None, None))[1] for k in kinds]
        bar_chart("multiple-choice accuracy (chance 0.25)", [k.split("/")[0] if k.startswith(data.PROBE) else
                                                             k.replace("/", " ") for k in kinds],
                  series, out / "choice.png", width=1300, y_max=1.0)
    cats = sorted({k for s in sums for k in s["bench"] if s["bench"][k]["rule"] is not None})
    if cats:
        bar_chart("bench: movement and spatial, rule score 0-3", [k.replace("/", " ") for k in cats],
                  {n: [s["bench"].get(k, {}).get("rule") for k in cats] for n, s in zip(names, sums)},
                  out / "bench.png", y_max=3.0)
    if references:
        series = {n: [s["loop"].get(t) for t in tasks] for n, s in zip(names, sums)}
        series.update({n: [r.get(t) for t in tasks] for n, r in references.items()})
        bar_chart("closed-loop success rate", [t.split("_")[0] + ".." + t.split("_")[-1] for t in tasks], series,
                  out / "loop.png", width=1400, y_max=1.0)
    if results[0].get("choice"):
        qs = data.build_samples(eps, ("waypoint",), every=cfg["every"], seed=cfg["seed"], distractors=cfg["distractors"])
        by_model = [{r["id"]: r for r in res.get("choice", [])} for res in results]
        examples_picture(qs, by_model, names).save(out / "examples.png")
    print(markdown(names, sums, references, blind))
    print(f"report: {out / 'report.md'} (and report.json, *.png)")


# ----------------------------------------------------------------------------------------------------
# Charts, drawn with Pillow (no plotting library): the report's bars here, grpo.py's training curves
# ----------------------------------------------------------------------------------------------------
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_ticks(lo, hi, n=5):
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks = [start + i * step for i in range(n + 3) if start + i * step <= hi + step * 0.999]
    return ticks[0], ticks[-1], ticks


def _label(v):
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.2f}".rstrip("0").rstrip(".")


def _moving_average(ys, window):
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def line_chart(panels, path, x_label="", width=1100, panel_height=300, smooth=10):
    """panels: [(title, {name: [(x, y), ...]})] -> one PNG, panels stacked, with axes, ticks and legends.
    Series that are 0 throughout are left out; with smooth > 1 each series is drawn faint as measured and
    bold as its moving average over `smooth` points."""
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    img = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    for p, (title, series) in enumerate(panels):
        top = p * panel_height
        left, right, y0, y1 = 70, width - 190, top + 30, top + panel_height - 40
        draw.text((left, top + 6), title, fill="black", font=font)
        points = [pt for pts in series.values() for pt in pts]
        if not points:
            draw.text((left, y0 + 40), "(nothing yet)", fill="grey", font=small)
            continue
        xlo, xhi = min(x for x, _ in points), max(x for x, _ in points)
        ylo, yhi, yticks = _nice_ticks(min(y for _, y in points), max(y for _, y in points))
        xlo, xhi, xticks = _nice_ticks(xlo, max(xhi, xlo + 1), 8)
        sx = lambda x: left + (x - xlo) / (xhi - xlo) * (right - left)
        sy = lambda y: y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)
        for t in yticks:
            draw.line([left, sy(t), right, sy(t)], fill=(232, 232, 232))
            draw.text((left - 8, sy(t)), _label(t), fill="black", font=small, anchor="rm")
        for t in xticks:
            draw.text((sx(t), y1 + 6), _label(t), fill="black", font=small, anchor="mt")
        draw.rectangle([left, y0, right, y1], outline="black")
        if x_label:
            draw.text(((left + right) / 2, y1 + 22), x_label, fill="black", font=small, anchor="mt")
        series = {n: p for n, p in series.items() if any(y != 0 for _, y in p)} or series
        for i, (name, pts) in enumerate(series.items()):
            colour = PALETTE[i % len(PALETTE)]
            pts = sorted(pts)
            xy = [(sx(x), sy(y)) for x, y in pts]
            if len(xy) > smooth > 1:
                draw.line(xy, fill=tuple(c + (255 - c) * 3 // 5 for c in colour), width=1)
                xy = [(sx(x), sy(y)) for (x, _), y in zip(pts, _moving_average([y for _, y in pts], smooth))]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy[-1:] if len(xy) > 1 else xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            draw.line([right + 15, y0 + 10 + 18 * i, right + 35, y0 + 10 + 18 * i], fill=colour, width=3)
            draw.text((right + 40, y0 + 10 + 18 * i), name, fill="black", font=small, anchor="lm")
    img.save(path)
    return img


def bar_chart(title, categories, series, path, width=1000, height=420, y_max=None, spread=None, lines=None):
    """Grouped bars: categories along x, one bar per series name {name: [value per category]}; `spread`
    {name: [(low, high) per category]} draws whiskers, `lines` {name: [value per category]} a dashed
    level across each category (a reference, such as the best text-only rule)."""
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, y0, y1 = 70, width - 170, 40, height - 60
    draw.text((left, 10), title, fill="black", font=font)
    values = [v for vs in series.values() for v in vs if v is not None]
    ylo, yhi, yticks = _nice_ticks(0.0, y_max if y_max is not None else max(values + [1e-9]))
    sy = lambda y: y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)
    for t in yticks:
        draw.line([left, sy(t), right, sy(t)], fill=(232, 232, 232))
        draw.text((left - 8, sy(t)), _label(t), fill="black", font=small, anchor="rm")
    slot = (right - left) / max(len(categories), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for c, cat in enumerate(categories):
        for s, (name, vs) in enumerate(series.items()):
            v = vs[c]
            if v is None:
                continue
            x = left + c * slot + slot * 0.1 + s * bar
            draw.rectangle([x, sy(v), x + bar - 2, y1], fill=PALETTE[s % len(PALETTE)])
            lo, hi = (spread or {}).get(name, [(None, None)] * len(categories))[c]
            if lo is not None:
                mid = x + bar / 2 - 1
                draw.line([mid, sy(lo), mid, sy(hi)], fill="black", width=2)
                for y in (lo, hi):
                    draw.line([mid - bar / 5, sy(y), mid + bar / 5, sy(y)], fill="black", width=2)
            draw.text((x + bar / 2 + (bar / 5 if lo is not None else 0), sy(v if lo is None else hi) - 3), _label(v),
                      fill="black", font=small, anchor="mb")
        for level in ((lines or {}).values()):
            if level[c] is not None:
                x0 = left + c * slot + slot * 0.05
                for x in np.arange(x0, x0 + slot * 0.9, 12):
                    draw.line([x, sy(level[c]), min(x + 7, x0 + slot * 0.9), sy(level[c])], fill=(90, 90, 90), width=2)
        draw.text((left + (c + 0.5) * slot, y1 + 8), cat, fill="black", font=small, anchor="mt")
    draw.rectangle([left, y0, right, y1], outline="black")
    for s, name in enumerate(series):
        draw.rectangle([right + 15, y0 + 10 + 20 * s, right + 30, y0 + 22 + 20 * s], fill=PALETTE[s % len(PALETTE)])
        draw.text((right + 38, y0 + 16 + 20 * s), name, fill="black", font=small, anchor="lm")
    for k, name in enumerate(lines or {}):
        y = y0 + 16 + 20 * (len(series) + k)
        draw.line([right + 15, y, right + 30, y], fill=(90, 90, 90), width=2)
        draw.text((right + 38, y), name, fill="black", font=small, anchor="lm")
    img.save(path)
    return img


# ----------------------------------------------------------------------------------------------------
# The experiment: GRPO against SFT from one base model, in miniature (python eval.py experiment)
# ----------------------------------------------------------------------------------------------------
ARMS = ("base", "sft", "grpo")
ROBOT_R1_KINDS = ("waypoint", "state", "movement")


def experiment(out: Path = Path("runs/experiment"), seeds: tuple[int, ...] = (0, 1, 2), model: str = "small",
               word_steps: int = 1000, pretrain_steps: int = 300, pretrain_prompts: int = 64, steps: int = 100,
               train_episodes: int = 12, episodes: int = 2, loop_episodes: int = 2, every: int = 10,
               lr: float = 1e-4, think: str = "option"):
    """Robot-R1's claim in miniature (Kim et al., Robot-R1, arXiv 2506.00070, Tables 2-3: SFT gains on the
    training tasks and loses on unseen ones; GRPO gains on both), on a CPU. Once, like the paper's one
    pre-trained VLM:
      base   a preset model pre-trained by SFT in two lessons, which stand in for a VLM's general knowledge:
             words  naming the letter of the option a question names (data.word_samples: text only, one
                    token per option; the small preset learns it from random weights from ~58k fresh
                    questions, but as a lookup of the question's word, not of its thought: README "GRPO
                    against SFT, in miniature")
             base   scene questions (data.scene_samples: where objects are, which quarter of the table,
                    how high the hand is), each asked back by one of its options (data.lookup_samples),
                    and more word questions; never Robot-R1's kinds
    Then per seed, both from that base:
      sft    the base, fine-tuned on Robot-R1's questions' correct answers  (grpo.py --algorithm sft)
      grpo   the base, trained with GRPO and the paper's reward               (grpo.py)

    Both arms: the same questions (5 training tasks), `steps` optimizer steps of 16 prompts. Then all
    three are evaluated (eval.py's multiple choice and closed loop, In and Out; the base once, its greedy
    answers being the same for every seed), and summary.md, summary.json and summary.png give the mean
    and range over seeds beside the best text-only rule. Every stage is a run folder of its own: an
    interrupted experiment continues where it stopped.

    Args:
        out: experiment folder: the base's lessons {words,base}/, then seed_N/{sft,grpo} runs, seed_N/report,
            summary.*
        seeds: one pair of arms per seed (their data, updates and sampling); the base is trained once, at
            seed 0.
        model: preset the base starts from.
        word_steps: SFT steps of the base's first lesson, word questions (lr 1e-3): the small preset names
            the letter of 96% of unseen ones after 900 (README, "GRPO against SFT, in miniature").
        pretrain_steps: SFT steps of its second lesson, scene questions, their lookups and word questions.
        pretrain_prompts: prompts per step of both lessons (a lesson's questions are many and cheap).
        steps: optimizer steps of each arm.
        train_episodes: training demonstrations per task (5 tasks), for the scene and Robot-R1 questions.
        episodes: evaluation demonstrations per task.
        loop_episodes: closed-loop episodes per task.
        every: evaluation questions at every n-th frame.
        lr: both arms' learning rate. At 1e-3 (the tiny preset's) GRPO broke the small base's answer format
            within 10 steps (format rate 100% -> 0%, every group's reward 0, no recovery); at 1e-4 it holds.
        think: what the base's and the SFT arm's written completions think (grpo.py --think): 'option',
            the text of the option they name (the letter is then a lookup of the thought, the lesson the
            word questions teach), or 'gripper'.
    """
    import grpo
    problems = [m for ok, m in (
        (model in M.PRESETS, f"--model {model}: the experiment starts from a preset: {' '.join(M.PRESETS)}"),
        (seeds, "--seeds: give at least one"),
        (0 < lr < 1, f"--lr {lr}: must be in (0, 1)"),
        (min(word_steps, pretrain_steps, pretrain_prompts, steps, train_episodes, episodes, every) >= 1,
         "--word_steps, --pretrain_steps, --pretrain_prompts, --steps, --train_episodes, --episodes, --every: "
         "each at least 1"),
        (loop_episodes >= 0, f"--loop_episodes {loop_episodes}: must be at least 0")) if not ok]
    if problems:
        raise data.UserError("; ".join(problems))
    data.check_writable(out)
    # an answer is ~10 tokens; a thought that states a position adds ~20 (and GRPO's samples must have room)
    new_tokens = 24 if think == "gripper" else 48
    cfg = dict(episodes=episodes, loop_episodes=loop_episodes, every=every, seed=1000, max_new_tokens=new_tokens,
               batch_size=32, sections=("choice", "loop") if loop_episodes else ("choice",), distractors="matched",
               scene=True)
    lesson = dict(algorithm="sft", rollout_prompts=pretrain_prompts, update_prompts=pretrain_prompts,
                  micro_prompts=pretrain_prompts, lr=1e-3, format_warmup=0, think=think, seed=0)
    base = out / "base" / "final"
    run_stages(out, {"words": grpo.Config(model=model, kinds=(data.WORDS,), steps=word_steps, **lesson),
                     "base": grpo.Config(model=str(out / "words" / "final"), preset="tiny", steps=pretrain_steps,
                                         kinds=(data.SCENE, data.LOOKUP, data.WORDS), episodes=train_episodes,
                                         **lesson)})
    base_result = None                              # greedy decoding: the base scores the same for every seed
    for seed in seeds:
        runs = out / f"seed_{seed}"
        run_stages(runs, {arm: grpo.Config(model=str(base), preset="tiny", algorithm=arm, kinds=ROBOT_R1_KINDS,
                                           steps=steps, episodes=train_episodes, format_warmup=0, lr=lr,
                                           think=think, max_new_tokens=new_tokens, seed=seed)
                          for arm in ("sft", "grpo")})
        report = runs / "report"
        if not (report / "report.json").exists():
            if base_result is None:
                base_result, eps = evaluate(*load_policy(str(base)), cfg, name="base")
            results = [base_result] + [evaluate(*load_policy(str(runs / arm / "final")), cfg, name=f"seed {seed} {arm}")[0]
                                       for arm in ARMS[1:]]
            write_report(list(ARMS), results, eps, cfg, report)
    return summarise_experiment(out, seeds)


def run_stages(folder, stages):
    """Train each grpo.Config into folder/NAME, in order, unless folder/NAME/final exists (a finished run)."""
    import grpo
    for name, c in stages.items():
        if not (folder / name / "final").exists():
            c.out, c.overwrite, c.log_samples = folder / name, True, 2
            grpo.main(c)


def summarise_experiment(out, seeds):
    """summary.json / .md / .png: per arm and 'kind/split', the mean and range over seeds; training's own
    signals (GRPO's zero-variance groups, SFT's last loss) beside them."""
    import grpo
    reports = [json.loads((out / f"seed_{s}" / "report" / "report.json").read_text()) for s in seeds]
    keys = [f"{k}/{split}" for k in ROBOT_R1_KINDS + (data.SCENE,) for split in ("In", "Out")]
    rows = {}
    for a, arm in enumerate(ARMS):
        per_seed = lambda get: [get(r["summary"][a]) for r in reports]
        stats = {k: per_seed(lambda s: s["choice"].get(k)) for k in keys}
        stats["format"] = per_seed(lambda s: s["format"])
        for split, tasks in (("In", data.TRAIN_TASKS), ("Out", data.HELDOUT_TASKS)):
            stats[f"loop/{split}"] = per_seed(lambda s: mean([s["loop"].get(t) for t in tasks]) if s["loop"] else None)
        rows[arm] = {k: {"mean": mean(v), "min": min(v, default=None), "max": max(v, default=None), "seeds": v}
                     for k, v in stats.items() for v in [[x for x in v if x is not None]]}
    train = {}
    for s in seeds:
        for arm in ARMS:
            last = grpo.read_jsonl((out if arm == "base" else out / f"seed_{s}") / arm / "metrics.jsonl")[-20:]
            train.setdefault(arm, []).append({k: mean([m.get(k) for m in last]) for k in (
                "loss", "zero_variance_groups", "reward/total")})
    blind = {k: v[1] for k, v in best_blind(reports[0]["blind"]).items()}
    summary = {"seeds": list(seeds), "arms": rows, "blind": blind, "training_last_20_steps": train}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = [f"# GRPO vs SFT in miniature: {len(seeds)} seed(s), mean [min, max]\n\n",
          "| question · tasks | " + " | ".join(ARMS) + " | best text-only rule |\n|---|---|---|---|---|\n"]
    cell = lambda r: "—" if r["mean"] is None else f"{100 * r['mean']:.1f}% [{100 * r['min']:.0f}, {100 * r['max']:.0f}]"
    for k in keys + ["format", "loop/In", "loop/Out"]:
        b = f"{100 * blind[k]:.1f}%" if k in blind else "—"
        md.append(f"| {k.replace('/', ' · ')} | " + " | ".join(cell(rows[a][k]) for a in ARMS) + f" | {b} |\n")
    md.append("\nTraining, mean of the last 20 steps over seeds: " + "; ".join(
        f"{arm}: " + ", ".join(f"{k} {mean([t[k] for t in train[arm]]):.3f}" for k in train[arm][0]
                               if mean([t[k] for t in train[arm]]) is not None) for arm in ARMS) + "\n")
    (out / "summary.md").write_text("".join(md))
    bar_chart("GRPO vs SFT: accuracy by question kind (chance 0.25; scene: the base's pre-training); "
              "whiskers: range over seeds", [k.replace("/", " ") for k in keys],
              {a: [rows[a][k]["mean"] for k in keys] for a in ARMS}, out / "summary.png", width=1500, y_max=1.0,
              spread={a: [(rows[a][k]["min"], rows[a][k]["max"]) for k in keys] for a in ARMS},
              lines={"best text-only rule": [blind.get(k) for k in keys]})
    print("".join(md))
    print(f"summary: {out / 'summary.md'} (and summary.json, summary.png)")
    return summary


if __name__ == "__main__":
    import sys

    import tyro
    if sys.argv[1:2] == ["experiment"]:             # python eval.py experiment [--seeds 0 1 2 ...]
        data.cli(lambda: tyro.cli(experiment, args=sys.argv[2:]))
    else:
        data.cli(lambda: tyro.cli(main))
