"""reward.py: the paper's format and answer rewards, the open-ended L1 reward, never raising."""
import random

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
    ("<think>x</think><answer>C</answer>", 1, 1),                       # bare letter (PAPER.md §4, open)
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
