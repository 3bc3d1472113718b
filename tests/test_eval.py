"""eval.py: rule scorers, the closed-loop harness, the judge client, and the whole report on the tiny model."""
import http.server
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import data
import eval as E

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("answer, score", [
    ("move down and slightly move left", 3),
    ("slightly move left and move down", 3),                 # order does not matter
    ("move down and move left", 2),                          # directions right, 'slightly' off
    ("move down", 1),                                        # one axis right, one missing
    ("move up and slightly move left", 0),                   # a direction contradicted
    ("move down, move left and move right", 0),              # both left and right
    ("move forward and move down and slightly move left", 1),  # an extra axis
    ("", 0), (None, 0), ("I do not know", 0),
])
def test_movement_rule_score(answer, score):
    assert E.rule_score("movement", answer, "move down and slightly move left") == score


def test_spatial_phrase_and_rule_score():
    truth = E.spatial_phrase([0.1, -0.02, 0.2]) + " the red cup"
    assert truth == "above and slightly in front of the red cup"
    assert E.rule_score("spatial", "above and slightly in front of the cup", truth) == 3
    assert E.rule_score("spatial", "above and in front of the cup", truth) == 2
    assert E.rule_score("spatial", "above the cup", truth) == 1
    assert E.rule_score("spatial", "below the cup", truth) == 0
    assert E.spatial_phrase([0.0, 0.01, 0.0]) == "at"


def test_closed_loop_harness_oracle_succeeds_random_fails():
    for task in data.TASKS:
        assert all(E.closed_loop(task, 3, 5, E.oracle_policy)), task
    random = [s for task in data.TASKS for s in E.closed_loop(task, 3, 5, E.random_policy(0))]
    assert np.mean(random) <= 0.05


def test_judge_client_speaks_the_openai_chat_protocol():
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            reply = json.dumps({"choices": [{"message": {"content": "Score: 2"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    assert E.judge(url, "judge-model", "Which way?", "move down", "move up", key="k") == 2
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "judge-model"
    assert "move down" in body["messages"][0]["content"] and body["temperature"] == 0
    server.shutdown()
    assert E.judge("http://127.0.0.1:1/v1", "m", "q", "t", "a", timeout=2) is None     # unreachable: no score

    # an unscored answer is left out of the judge's mean and counted in the report
    rows = [dict(category="planning", split="In", rule=None, judge=j) for j in (3, 1, None)]
    s = E.summarise({"bench": rows})
    assert s["bench"]["planning/In"]["judge"] == 2.0 and s["judge_unscored"] == 1
    assert "| answers the judge left unscored (excluded above) | 1 |" in E.markdown(["m"], [dict(s, length=None)])


def test_report_has_every_section_and_is_deterministic(tmp_path):
    kw = dict(model="tiny", episodes=1, loop_episodes=2, max_new_tokens=12, batch_size=64, every=20)
    E.main(out=tmp_path / "a", compare="tiny", **kw)
    E.main(out=tmp_path / "b", compare=None, **{**kw, "sections": ("choice",)})     # alone, a second time
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["models"] == ["tiny", "tiny"] and b["models"] == ["tiny"]
    assert a["summary"][0] == a["summary"][1]                                 # deterministic
    assert a["summary"][0]["choice"] == b["summary"][0]["choice"] and not b["summary"][0]["loop"]
    s = a["summary"][0]
    assert {k.split("/")[0] for k in s["choice"]} == {"waypoint", "state", "movement", "probe", "probe_shuffled"}
    assert {k.split("/")[1] for k in s["choice"]} >= {"In", "Out"}
    assert set(s["open"]) == {"waypoint_open/In", "waypoint_open/Out"}
    assert {k.split("/")[0] for k in s["bench"]} == {"movement", "spatial", "planning", "high-level action"}
    assert set(s["loop"]) == set(data.TASKS)
    assert all(v == 1.0 for v in a["references"]["oracle"].values())
    md = (tmp_path / "a" / "report.md").read_text()
    for heading in ("## Multiple choice", "## Open-ended waypoint", "## Bench", "## Closed loop"):
        assert heading in md
    # beside every multiple-choice accuracy, the text-only rules on the same questions
    assert {f"{k}/{s}" for k in ("waypoint", "state", "movement") for s in ("In", "Out")} == set(a["blind"])
    assert "best text-only rule" in md and all(0 <= v <= 1 for r in a["blind"].values() for v in r.values())
    for png in ("choice.png", "bench.png", "loop.png", "examples.png"):
        assert (tmp_path / "a" / png).stat().st_size > 5000


def fake_judge(replies):
    """A local OpenAI-compatible endpoint answering with the given (status, text) pairs in turn, then 200 '2'."""
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, text = replies[len(calls)] if len(calls) < len(replies) else (200, "2")
            calls.append(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"choices": [{"message": {"content": text}}]}).encode())

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1", calls


def test_judge_is_bounded_retries_transient_errors_and_fails_fast():
    server, url, calls = fake_judge([(503, ""), (429, "")])
    assert E.judge_request(url, "m", "q", backoff=0.01) == "2" and calls == [503, 429, 200]     # retried
    server.shutdown()
    server, url, calls = fake_judge([(401, "bad key")])
    with pytest.raises(data.UserError, match="does not answer \\(HTTP 401"):                       # not retried
        E.check_judge(url, "m", "k")
    assert calls == [401]
    server.shutdown()
    with pytest.raises(data.UserError, match="plain http to another machine"):
        E.check_judge("http://judge.example.com/v1", "m", "secret")
    # scores already given are kept when the judge dies midway; the rest are not waited for one by one
    server, url, calls = fake_judge([(200, "3")] * 4 + [(400, "")] * 100)
    scores = E.judge_all([("q", "t", "a")] * 40, {"url": url, "model": "m"}, workers=1, give_up_after=3)
    assert scores[:4] == [3] * 4 and scores[4:] == [None] * 36 and len(calls) == 4 + 3
    server.shutdown()


def test_unreachable_judge_stops_eval_before_any_answer_within_seconds(tmp_path):
    """A closed loopback port: eval.py refuses at once, before evaluating anything, with one clear line."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--compare", "None", "--out", str(tmp_path / "r"),
                        "--judge_url", "http://127.0.0.1:1/v1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "error: --judge_url http://127.0.0.1:1/v1: the judge does not answer (ConnectionRefusedError" in p.stderr
    assert time.time() - t0 < 60 and not (tmp_path / "r" / "report.json").exists()


def test_experiment_pipeline_writes_every_promised_file(tmp_path):
    """python eval.py experiment at a toy size: one base (pre-trained on word questions, then scene questions,
    their lookups and words: never Robot-R1's kinds), per seed the SFT and GRPO arms from it with one budget,
    three evaluations, the summary over seeds; run again, it reuses every finished stage."""
    out = tmp_path / "exp"
    kw = dict(out=out, seeds=(0, 1), model="tiny", word_steps=2, pretrain_steps=2, pretrain_prompts=4, steps=2,
              train_episodes=1, episodes=1, loop_episodes=0, every=60)
    summary = E.experiment(**kw)
    runs = [out / "seed_0", out / "seed_1"]
    for folder in [out / "words", out / "base"] + [r / arm for r in runs for arm in ("sft", "grpo")]:
        assert (folder / "final" / "model.safetensors").exists() and (folder / "curves.png").exists()
    assert not (runs[1] / "base").exists() and not (runs[1] / "words").exists()      # the base is trained once
    kinds = lambda run: Counter(json.loads(l)["kind"] for l in (run / "data" / "samples.jsonl").open())
    assert kinds(out / "words") == {data.WORDS: data.WORD_QUESTIONS}
    base = kinds(out / "base")                            # pre-training never sees Robot-R1's kinds
    assert set(base) == {data.SCENE, data.LOOKUP, data.WORDS} and base[data.WORDS] == 2 * base[data.SCENE]
    lessons = {arm: json.loads((out / arm / "config.json").read_text()) for arm in ("words", "base")}
    assert lessons["base"]["model"] == str(out / "words" / "final")
    assert all(c["rollout_prompts"] == 4 and c["think"] == "option" and c["seed"] == 0 for c in lessons.values())
    for seed, run in enumerate(runs):
        for arm in ("sft", "grpo"):
            assert {json.loads(l)["kind"] for l in (run / arm / "data" / "samples.jsonl").read_text().splitlines()} \
                == set(E.ROBOT_R1_KINDS)
        arms = {arm: json.loads((run / arm / "config.json").read_text()) for arm in ("sft", "grpo")}
        same = ("steps", "rollout_prompts", "update_prompts", "lr", "seed", "episodes", "tasks", "distractors")
        assert [arms["sft"][k] for k in same] == [arms["grpo"][k] for k in same] and arms["sft"]["seed"] == seed
        assert arms["sft"]["model"] == arms["grpo"]["model"] == str(out / "base" / "final")
        for f in ("report.md", "report.json", "choice.png"):
            assert (run / "report" / f).exists()
    reports = [json.loads((r / "report" / "report.json").read_text()) for r in runs]
    assert {"scene/In", "lookup/In"} <= set(reports[0]["summary"][0]["choice"])   # the scene, and its lookups
    assert reports[0]["summary"][0] == reports[1]["summary"][0]                   # one base, scored once
    for f in ("summary.md", "summary.json", "summary.png"):
        assert (out / f).exists()
    assert set(summary["arms"]) == set(E.ARMS) and "waypoint/In" in summary["arms"]["grpo"]
    assert "| waypoint · In |" in (out / "summary.md").read_text()
    stamp = (runs[1] / "grpo" / "final" / "model.safetensors").stat().st_mtime
    E.experiment(**kw)
    assert (runs[1] / "grpo" / "final" / "model.safetensors").stat().st_mtime == stamp


def test_scores_tell_seeing_from_finding_the_letter_and_scene_questions_apart():
    """A --think option model's thought is scored apart from its letter (it names the right option; the
    letter names the thought), and scene questions are reported per question beside their kind's row."""
    import dataclasses
    qs = data.probe_samples(4, seed=3, shuffled=True)
    qs[3] = dataclasses.replace(qs[3], task="pick_up_cup", kind=data.SCENE, meta={"question": "gripper_region"})
    right = lambda q: q.options[data.LETTERS.index(q.answer)]
    other = lambda q: next(L for L in data.LETTERS if L != q.answer)
    texts = [f"<think> {right(qs[0])} </think> <answer> [[{qs[0].answer}]] </answer>",       # sees, finds
             f"<think> {right(qs[1])} </think> <answer> [[{other(qs[1])}]] </answer>",       # sees, not finds
             f"<think> {qs[2].options[data.LETTERS.index(other(qs[2]))]} </think> <answer> [[{other(qs[2])}]] </answer>",
             f"<think> the gripper </think> <answer> [[{qs[3].answer}]] </answer>"]
    rows = E.score_choice(qs, texts, [10] * 4)
    assert [(r["correct"], r["thought_right"], r["letter_follows"]) for r in rows] == [
        (1, 1, 1), (0, 1, 0), (0, 0, 1), (1, 0, 0)]
    s = E.summarise({"choice": rows})
    assert s["choice"]["scene/In"] == s["choice"]["scene:gripper_region/In"] == 1.0
    assert s["thought"]["probe_shuffled/probe"] == {"right": 2 / 3, "follows": 2 / 3}
    md = E.markdown(["m"], [s])
    assert "## The thought" in md and "| scene:gripper_region · In | 100.0% |" in md
    assert "## The thought" not in E.markdown(["m"], [E.summarise({"choice": rows[3:]})])   # 'the gripper' only


def test_the_best_constant_answer_is_the_blind_baseline_of_the_table_quarters():
    """Quarters are not equally frequent: the text-only rule 'the most frequent answer' (fitted on the
    training tasks' questions) scores the share of the most frequent quarter, not 25%."""
    eps = data.generate_episodes("pick_up_cup", 2, 7) + data.generate_episodes("stack_blocks", 2, 7)
    qs = data.scene_samples(eps, every=5, seed=7)                  # seed 7: no two quarters tie for the most
    blind = E.blind_baselines(qs)
    assert {k for k in blind if k.startswith("scene")} == {f"scene:{q}_region/{s}" for q in ("object", "gripper")
                                                          for s in ("In", "Out")}
    for question in ("object_region", "gripper_region"):
        fit = Counter(q.target for q in qs if q.meta["question"] == question and q.task == "pick_up_cup")
        top = fit.most_common(1)[0][0]
        for split, task in (("In", "pick_up_cup"), ("Out", "stack_blocks")):
            answers = [q.target for q in qs if q.meta["question"] == question and q.task == task]
            rate = blind[f"scene:{question}/{split}"]["the most frequent answer"]
            assert rate == pytest.approx(answers.count(top) / len(answers)), (question, split)


def test_letter_given_thought_scores_each_letter_of_each_question_in_its_own_place():
    """Batched (questions of different lengths padded together, four completions per prompt) it picks the
    same letters as scoring each question's four completions one at a time."""
    import torch
    import grpo
    import model as M
    policy, proc = M.load("tiny", seed=4)
    policy.eval()
    qs = data.probe_samples(3, seed=5, shuffled=True) + data.scene_samples(data.generate_episodes("pick_up_cup", 1, 5), 20, 5)[:5]
    picked = []
    for q in qs:
        scores = []
        for L in data.LETTERS:
            text = grpo.ANSWER.format(grpo.rationale(q, grpo.correct_answer(q), "option"), f"[[{L}]]")
            ids = torch.tensor([proc.tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                scores.append(float(policy.completion_logprobs(proc.encode([q]), ids, torch.ones_like(ids)).sum()))
        picked.append(data.LETTERS[int(np.argmax(scores))])
    assert len(set(picked)) > 1                       # letters that differ, so a mix-up would show
    rows = {}
    for q, L in zip(qs, picked):
        rows.setdefault(E._group(q), []).append(float(L == q.answer))
    assert E.letter_given_thought(policy, proc, qs, batch_size=3) == pytest.approx({k: np.mean(v) for k, v in rows.items()})
