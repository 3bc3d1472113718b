"""reward.py: the paper's format and answer rewards, the open-ended L1 reward, never raising."""
import random
import re
import time

import pytest

import reward
from data import Sample


def mc(answer="C"):
    return Sample("q", "pick_up_cup", "waypoint", None, "", ["a", "b", "c", "d"], answer, [0.1, 0.2, 0.9])


def open_q():
    return Sample("q", "pick_up_cup", "waypoint_open", None, "", [], "[0.100, 0.200, 0.900]", [0.1, 0.2, 0.9])


@pytest.mark.parametrize("text, fmt, choice", [
    ("<think>the cup is left of the gripper</think><answer>[[C]]</answer>", 1, 1),
    ("  <think>\nmulti\nline\n</think>\n\n<answer> [[C]] </answer>\n", 1, 1),
    ("<think>x</think><answer>C</answer>", 1, 1),                       # bare letter (left open by the paper)
    ("<think>x</think><answer>[[B]]</answer>", 1, 0),
    ("<think>x</think><answer>[[C]] or [[D]]</answer>", 1, 0),
    ("<answer>[[C]]</answer>", 0, 1),                                   # right answer, no reasoning
    ("I think C", 0, 0),
    ("<think>x</think>[[C]]", 0, 0),
    ("<think>x</think><answer>[[C]]</answer> and more", 0, 1),          # trailing text breaks the format
    ("<think>a <think> b</think><answer>[[C]]</answer>", 0, 1),         # nested tag
    ("<think>x</think><answer>[[C]]</answer><answer>[[C]]</answer>", 0, 1),
    ("<answer>[[C]]</answer><think>x</think>", 0, 1),                   # wrong order
    ("<think>x</think><answer>[[c]]</answer>", 1, 0),                   # letters are exact
])
def test_format_and_choice(text, fmt, choice):
    assert reward.format_reward(text) == fmt
    assert reward.choice_reward(text, mc()) == choice
    s = reward.score(text, mc(), {"format": 1, "choice": 1})
    assert s == {"format": fmt, "choice": choice, "total": fmt + choice}


def test_l1_reward_is_clipped_one_minus_l1():
    q = open_q()
    assert reward.l1_reward("<think>.</think><answer>[0.1, 0.2, 0.9]</answer>", q) == pytest.approx(1.0)
    assert reward.l1_reward("<think>.</think><answer>[0.2, 0.1, 1.0]</answer>", q) == pytest.approx(0.7)
    assert reward.l1_reward("<answer>0.2,0.1,1.0</answer>", q) == pytest.approx(0.7)
    assert reward.l1_reward("<answer>[5, 5, 5]</answer>", q) == 0.0
    assert reward.l1_reward("<answer>[[A]]</answer>", q) == 0.0
    assert reward.l1_reward("<answer>[0.1, 0.2]</answer>", q) == 0.0
    assert reward.l1_reward("<answer>[0.1, 0.2, 0.9]</answer>", mc()) == 0.0    # not an open question
    assert reward.choice_reward("<answer>[[A]]</answer>", q) == 0.0


def test_default_total_is_format_plus_answer_for_any_kind():
    good = "<think>.</think><answer>[[C]]</answer>"
    assert reward.score(good, mc())["total"] == 2.0
    assert reward.score("<think>.</think><answer>[0.1, 0.2, 0.9]</answer>", open_q())["total"] == pytest.approx(2.0)


def test_parse_weights():
    assert reward.parse_weights("format=1,choice=0.5") == {"format": 1.0, "choice": 0.5}
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        reward.parse_weights("format=1,nope=2")
    with pytest.raises(ValueError, match="must be a number"):
        reward.parse_weights("format=x")


def test_rewards_never_raise_on_any_string():
    rng = random.Random(0)
    atoms = ["<think>", "</think>", "<answer>", "</answer>", "[[", "]]", "A", "C", "[", "]", ",", "-", ".", "e",
             "9", "1e999", "nan", "inf", " ", "\n", "\x00", "é", "😀", "<", ">", "/"]
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        for fn in reward.REWARDS.values():
            for q in (mc(), open_q()):
                v = fn(text, q)
                assert 0.0 <= v <= 1.0
    assert reward.l1_reward("<answer>[1e999, 0, 0]</answer>", open_q()) == 0.0
    assert reward.l1_reward("<answer>[nan, 0, 0]</answer>", open_q()) == 0.0


# The earlier regular expressions, kept as the reference the linear-time rules must agree with. On short
# texts they are fast; on long digit runs or repeated tags they backtrack for minutes.
_OLD_NO_TAGS = r"(?:(?!</?think>|</?answer>).)*"
OLD_FORMAT = re.compile(rf"\s*<think>{_OLD_NO_TAGS}</think>\s*<answer>{_OLD_NO_TAGS}</answer>\s*", re.DOTALL)
OLD_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OLD_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
OLD_XYZ = re.compile(rf"^\[?\s*({_OLD_NUMBER})\s*,\s*({_OLD_NUMBER})\s*,\s*({_OLD_NUMBER})\s*\]?$")


def test_linear_rules_agree_with_the_regular_expressions_on_short_texts():
    rng = random.Random(1)
    atoms = ["<think>", "</think>", "<answer>", "</answer>", "[[C]]", "C", "[", "]", ",", " ", "\n", "-", ".", "e",
             "1", "25", "x", "<", ">", "/"]
    for _ in range(20000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        assert reward.format_reward(text) == (1.0 if OLD_FORMAT.fullmatch(text) else 0.0), repr(text)
        found = OLD_ANSWER.findall(text)
        old_answer = found[-1].strip() if found else None
        assert reward.answer_text(text) == old_answer, repr(text)
        m = OLD_XYZ.match(old_answer) if old_answer is not None else None
        old_xyz = [float(v) for v in m.groups()] if m else None
        assert reward.parse_xyz(text) == old_xyz, repr(text)


@pytest.mark.parametrize("name, text", [
    ("digit run", "<answer>" + "1" * 1_000_000 + "</answer>"),
    ("three long numbers", "<answer>[" + ",".join(["9" * 300_000] * 3) + "x]</answer>"),
    ("unclosed answers", "<answer>" * 125_000),
    ("answers closed once at the end", "<answer>" * 120_000 + "</answer>"),
    ("repeated think pairs", "<think>" + "</think><answer></answer>x" * 40_000),
    ("whitespace then no tag", " " * 1_000_000 + "x"),
    ("random tag soup", "".join(random.Random(2).choice(["<think>", "</answer>", "<answer>", "1", ".", ","])
                                for _ in range(200_000))),
])
def test_rewards_take_linear_time_on_adversarial_megabytes(name, text):
    """Every reward and the answer extraction on 1 MB texts built to make backtracking patterns explode.
    A linear scan of 1 MB takes milliseconds; the bound of 2 s per call is ~100x that, and far below
    what a quadratic rule needs here (hours): this checks the complexity, not the speed."""
    for fn in [reward.answer_text, *(lambda t, f=f: [f(t, q) for q in (mc(), open_q())] for f in reward.REWARDS.values())]:
        t0 = time.perf_counter()
        fn(text)
        assert time.perf_counter() - t0 < 2.0, f"{name}: {fn} took {time.perf_counter() - t0:.1f}s on {len(text)} chars"
