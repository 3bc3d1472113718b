"""reward.py: completion text + question -> reward components.

Robot-R1's reward (Kim et al., arXiv 2506.00070) is R = r_format + r_answer, each 0 or 1:
    format   the whole completion is <think>...</think> then <answer>...</answer> (whitespace around)
    choice   the <answer> content names the correct option: "[[C]]" (or a bare "C")
    l1       open-ended variant: clip(1 - |x-x*| - |y-y*| - |z-z*|, 0, 1) metres

    >>> s = Sample(..., kind="waypoint", answer="C", ...)
    >>> score("<think>the cup is left</think> <answer>[[C]]</answer>", s, {"format": 1, "choice": 1})
    {'format': 1.0, 'choice': 1.0, 'total': 2.0}

A reward function takes (text, sample) and returns a float. The contract for every reward, yours too:
it never raises and it runs in time linear in the text, whatever the text (a completion can be 2,048
tokens of anything, and one slow reward stalls every rank of a training step; tests/test_reward.py
feeds each registered reward 1 MB adversarial texts). To try a new reward, write one here, add it to
REWARDS and name it on the command line:
    python grpo.py --rewards format=1,choice=1,my_reward=0.5
"""
from __future__ import annotations

import re

# Every rule below runs in time linear in the text, on any input: a completion can be 2,048 tokens of
# anything, and one slow reward would stall every rank of a training step. So no pattern may backtrack
# over a long run: tags are found with str.find, and a number is `digits [. digits]`, never
# `digits . digits` with both parts optional (which splits a digit run in n ways and takes ~n^4 for three).
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def answer_text(text):
    """The content of the last <answer>...</answer>, stripped; None when there is none.
    Pairs are taken left to right, each <answer> with the first </answer> after it."""
    found, pos = None, 0
    while (start := text.find("<answer>", pos)) >= 0:
        end = text.find("</answer>", start + 8)
        if end < 0:
            break
        found, pos = text[start + 8:end], end + 9
    return found.strip() if found is not None else None


def format_reward(text, sample=None):
    """1 when the completion is exactly <think>...</think> <answer>...</answer>, else 0."""
    t = text.strip()
    if not (t.startswith("<think>") and t.endswith("</answer>") and all(t.count(tag) == 1 for tag in _TAGS)):
        return 0.0
    between = t[t.index("</think>") + len("</think>"):t.index("<answer>")]     # empty if the order is wrong
    return 1.0 if t.index("</think>") < t.index("<answer>") and not between.strip() else 0.0


def chosen_letter(text, letters="ABCD"):
    """The option the answer names, "[[C]]" or a bare "C" -> "C"; None when it names none."""
    got = answer_text(text)
    return next((L for L in letters if got in (f"[[{L}]]", L)), None)


def choice_reward(text, sample):
    """1 when the answer names the correct option, "[[C]]" or "C"; 0 otherwise and for open questions."""
    return 1.0 if sample.options and chosen_letter(text) == sample.answer else 0.0


def parse_xyz(text):
    """'[0.25, -0.1, 0.9]' -> [0.25, -0.1, 0.9]; None when the answer is not three numbers."""
    got = answer_text(text)
    if got is None:
        return None
    parts = [p.strip() for p in got.removeprefix("[").removesuffix("]").split(",")]
    if len(parts) != 3 or not all(NUMBER.fullmatch(p) for p in parts):
        return None
    xyz = [float(p) for p in parts]
    return xyz if all(abs(v) < 1e6 for v in xyz) else None


def l1_reward(text, sample):
    """Open-ended waypoint: clip(1 - L1 distance in metres, 0, 1); 0 for multiple choice or no xyz."""
    if sample.options:
        return 0.0
    xyz = parse_xyz(text)
    if xyz is None:
        return 0.0
    return max(0.0, 1.0 - sum(abs(a - b) for a, b in zip(xyz, sample.target)))


REWARDS = {"format": format_reward, "choice": choice_reward, "l1": l1_reward}
DEFAULT_WEIGHTS = {"format": 1.0, "choice": 1.0, "l1": 1.0}   # R = format + answer, for any mix of kinds


def parse_weights(spec):
    """'format=1,choice=1,my_reward=0.5' -> {'format': 1.0, 'choice': 1.0, 'my_reward': 0.5}."""
    weights = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in --rewards; known: {', '.join(REWARDS)} "
                             "(add yours to REWARDS in reward.py)")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"--rewards: weight of {name!r} must be a number, got {value!r}") from None
    if not weights:
        raise ValueError("--rewards names no reward; e.g. format=1,choice=1")
    return weights


def score(text, sample, weights=None):
    """Every weighted component and their weighted sum 'total'."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    out = {name: float(REWARDS[name](text, sample)) for name in weights}
    out["total"] = sum(weights[name] * out[name] for name in weights)
    return out
