"""data.py: robot demonstrations -> keypoints -> Robot-R1 questions.

Robot-R1 never imitates actions. It turns expert demonstrations into multiple-choice questions about
the robot's *state* (Kim et al., Robot-R1, arXiv 2506.00070, data generation): for every 10th frame t of
a demonstration, find the next keypoint k* > t (a frame where the arm stops or the gripper opens or
closes), then ask
  waypoint   "here is the image and the current position: which option is the next keypoint?"
  state      "here is the image: which option is the current position?"
  movement   "which movement phrase ('move down, slightly move left') gets us to the next keypoint?"
  waypoint_open  the waypoint question with no options: write [x, y, z] yourself.
Beside them, two kinds that are not Robot-R1's: scene (where objects are, how high the hand is: the
simulator's ground truth, for pre-training a small base model) and probe (a CPU sanity question; as
probe_shuffled, with its options in a random order).
Positions are the end-effector xyz in RLBench's world frame (metres, origin at the table's corner of
the room; the table-surface centre is [0.25, 0, 0.752]; +X toward the front camera, +Y right, +Z up).

Demonstrations come from RLBench's saved datasets (`load_rlbench`, no RLBench install needed) or from
the built-in tabletop simulator below, which renders the front camera with Pillow and scripts an expert
for 8 tasks, so that the whole method runs with no outside data.

The file reads in the method's order: keypoints and movement phrases; the questions, their prompts and
options; dataset folders. Then where demonstrations come from: the Episode, RLBench's saved datasets,
and the tabletop simulator with its tasks (each fills in `Task`).

    python data.py                                  # 5 training tasks x 50 episodes -> data/tabletop
    python data.py --tasks stack_blocks --episodes 5 --out data/heldout
    python data.py --rlbench /path/to/rlbench_data --out data/rlbench
"""
from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import re
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ----------------------------------------------------------------------------------------------------
# The world: RLBench's frame, the workspace, the front camera
# ----------------------------------------------------------------------------------------------------
TABLE_Z = 0.752
# "The valid workspace above the table": where distractor positions are drawn (left open by the paper).
WORKSPACE = (np.array([-0.05, -0.35, 0.77]), np.array([0.55, 0.35, 1.25]))
TRAIN_TASKS = ("pick_up_cup", "push_button", "put_rubbish_in_bin", "phone_on_base", "take_lid_off_saucepan")
HELDOUT_TASKS = ("stack_blocks", "reach_target", "slide_block_to_target")
KINDS = ("waypoint", "state", "movement", "waypoint_open")      # built from demonstrations
SCENE = "scene"                                                  # built by scene_samples
PROBE = "probe"                                                  # built by probe_samples
PROBE_SHUFFLED = "probe_shuffled"                                # the same, its options in a random order
LOOKUP = "lookup"                                                # built by lookup_samples
WORDS = "words"                                                  # built by word_samples
PROBES = (PROBE, PROBE_SHUFFLED)
NO_DEMOS = PROBES + (WORDS,)                                     # need no demonstrations
ALL_KINDS = KINDS + (SCENE, LOOKUP, WORDS) + PROBES
LETTERS = "ABCD"


@dataclass
class Camera:
    """A pinhole camera. `pose` is camera-to-world; the camera looks along its +z, x right, y down."""
    K: np.ndarray            # (3, 3) intrinsics in pixels
    pose: np.ndarray         # (4, 4) camera-to-world
    size: tuple = (224, 224)  # (width, height)

    @classmethod
    def look_at(cls, eye, target, fov_deg=50.0, size=(224, 224)):
        eye, target = np.asarray(eye, float), np.asarray(target, float)
        fwd = (target - eye) / np.linalg.norm(target - eye)
        right = np.cross(fwd, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        pose = np.eye(4)
        pose[:3, :3] = np.stack([right, np.cross(fwd, right), fwd], axis=1)
        pose[:3, 3] = eye
        f = size[1] / 2 / math.tan(math.radians(fov_deg) / 2)
        return cls(np.array([[f, 0, size[0] / 2], [0, f, size[1] / 2], [0, 0, 1]]), pose, tuple(size))

    def project(self, xyz):
        """World points (..., 3) -> pixel coordinates (..., 2) and depth along the view axis (...)."""
        p = (np.asarray(xyz, float) - self.pose[:3, 3]) @ self.pose[:3, :3]  # world -> camera frame
        uv = p[..., :2] / p[..., 2:3] * np.diag(self.K)[:2] + self.K[:2, 2]
        return uv, p[..., 2]


FRONT_CAMERA = Camera.look_at(eye=[1.05, 0.0, 1.40], target=[0.15, 0.0, 0.86], fov_deg=50.0)

# ----------------------------------------------------------------------------------------------------
# Keypoints and movement phrases
# ----------------------------------------------------------------------------------------------------
def keypoint_discovery(gripper_open, joint_velocities, stopping_delta=0.1):
    """ARM's keypoint heuristic (James & Davison, arXiv 2105.14829), as Robot-R1 uses it. Frame i > 0 is a
    keypoint when the gripper state changed since i-1, when i is the last frame, or when the arm
    *stopped*: all joint velocities within
    ±stopping_delta, the gripper unchanged over frames i-2..i+1, i not the second-to-last frame, and no
    stop in the 4 frames before. If the last two keypoints are adjacent, the earlier one is dropped.

    Example: gripper_open = [1,1,1,0,0,0,0,0,0] with the arm moving except at frame 6 -> [3, 6, 8].
    Like ARM's reference code, frames i-1 and i-2 wrap around to the episode's end when i < 2.
    """
    g = np.asarray(gripper_open, float)
    v = np.asarray(joint_velocities, float)
    T, keypoints, buffer = len(g), [], 0
    for i in range(T):
        still = bool(np.all(np.abs(v[i]) <= stopping_delta))
        steady = i < T - 2 and g[i] == g[i + 1] and g[i] == g[i - 1] and g[i - 2] == g[i - 1]
        stopped = buffer <= 0 and still and i != T - 2 and steady
        buffer = 4 if stopped else buffer - 1
        if i > 0 and (g[i] != g[i - 1] or i == T - 1 or stopped):
            keypoints.append(i)
    if len(keypoints) > 1 and keypoints[-1] - 1 == keypoints[-2]:
        keypoints.pop(-2)
    return keypoints


AXIS_WORDS = (("forward", "backward"), ("right", "left"), ("up", "down"))


def movement_phrase(delta_xyz, dead_zone=0.01):
    """Δ = next keypoint - current position -> e.g. 'slightly move forward, slightly move left, and move down'.

    An axis moves when |Δ| > dead_zone; it is 'slightly' when |Δ| <= half the largest |Δ|. No axis: 'stay still'.
    """
    return _phrase(_moves(delta_xyz, dead_zone))


def _moves(delta_xyz, dead_zone=0.01):
    """Δ -> {axis: (positive, slight)} for the axes that move."""
    d = np.asarray(delta_xyz, float)
    big = np.abs(d).max()
    return {a: (bool(d[a] > 0), bool(abs(d[a]) <= big / 2)) for a in range(3) if abs(d[a]) > dead_zone}


def _phrase(moves):
    """{axis: (positive, slight)} -> words, axes in x, y, z order."""
    parts = [("slightly " if slight else "") + "move " + AXIS_WORDS[a][0 if pos else 1]
             for a, (pos, slight) in sorted(moves.items())]
    if not parts:
        return "stay still"
    return parts[0] if len(parts) == 1 else (", ".join(parts[:-1]) + ("," if len(parts) > 2 else "") + " and "
                                              + parts[-1])


def _neighbours(moves):
    """{phrase: moves} one edit away from `moves`, its own phrase left out."""
    own = _phrase(moves)
    return {p: m for m in _neighbour_moves(moves) if (p := _phrase(m)) != own}


def phrase_moves(phrase):
    """The inverse of _phrase: 'slightly move forward and move down' -> {0: (True, True), 2: (False, False)}."""
    moves = {}
    if phrase != "stay still":
        for part in phrase.replace(", and ", ", ").replace(" and ", ", ").split(", "):
            word = part.split()[-1]
            axis = next(a for a, words in enumerate(AXIS_WORDS) if word in words)
            moves[axis] = (word == AXIS_WORDS[axis][0], part.startswith("slightly "))
    return moves


def _neighbour_moves(moves):
    """'Adjacent movements' (the paper's words; their choice is left open): flip one axis, toggle 'slightly',
    add or drop one axis."""
    out = []
    for a, (pos, slight) in moves.items():
        out.append({**moves, a: (not pos, slight)})
        out.append({**moves, a: (pos, not slight)})
        out.append({k: m for k, m in moves.items() if k != a})
    for a in set(range(3)) - set(moves):
        for pos in (True, False):
            out.append({**moves, a: (pos, bool(moves))})
    return out


# ----------------------------------------------------------------------------------------------------
# Questions: the paper's prompts (Robot-R1's appendix), options, answers
# ----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    id: str
    task: str
    kind: str                 # "waypoint" | "state" | "movement" | "waypoint_open"
    image: object             # PIL image, or a path to one; None: a text-only question (kind words)
    prompt: str               # holds "<image>" where the image goes
    options: list             # 4 option strings (multiple choice) or [] (open)
    answer: str               # "A".."D", or the xyz string for open questions
    target: object            # ground truth: xyz list or movement phrase
    meta: dict = field(default_factory=dict)

    def load_image(self):
        return self.image if isinstance(self.image, Image.Image) else _read_png(self.image)


HEADER = """# You are Franka Robot Assistant: Task Planning and Execution System
## Task description
{task}
## Visual Input
You will receive a single combined image for scene understanding:
- <image>: front view of the workspace
## Coordinate System
The world coordinate frame follows these conventions:
- This is based on the front view. (Wrist view has the Y-axis (left and right) opposite)
- X-axis: Front of table (positive) to back of table (negative)
- Y-axis: Left (negative) to right (positive)
- Z-axis: Down toward floor (negative) to up toward ceiling (positive)
- World origin [0.25, 0, 0.752] is at the center of the table surface
## Robot Specifications
- Gripper dimensions: 0.06m width (x-direction) × 0.2 length (y-direction) × 0.09 height (z-direction), with fingers 0.04 in length
"""
STATE_BLOCK = "## Current Robot State\nPosition: {xyz}\n"
QUESTIONS = {
    "waypoint": "Based on the provided image and current robot state, predict the next waypoint position [x, y, z]",
    "state": "Let's predict the current robot state base on image",
    "movement": "What movements are needed to get to the next keypoint to perform the task?",
}
OUTPUT_FORMAT = """## Output Format
First think through the reasoning process as an internal monologue, then provide the final answer.
The reasoning process MUST BE enclosed within <think> </think> tags and the final answer MUST BE
enclosed within <answer> </answer> tags, e.g. <think> [detailed reasoning process] </think> <answer> {example} </answer>"""


def template_corpus():
    """The fixed text of every prompt and answer (no question data): what a tokenizer for this
    domain should compress (model.py's tiny preset trains its BPE on it)."""
    texts = [HEADER.format(task=p.format(c=c, a=c, b="blue")) for t in TASKS.values() for p in t.phrasings
             for c in COLOURS]
    moves = [{a: m for a, m in zip(range(3), combo) if m} for combo in itertools.product(
        [None, (True, False), (False, False), (True, True), (False, True)], repeat=3)]
    texts += [_phrase(m) for m in moves] + [STATE_BLOCK.format(xyz="[0.123, -0.456, 0.789]"), *QUESTIONS.values(),
                                            "## Choice Question\nChoose the most accurate option:\n", "## Question\n"]
    texts += [OUTPUT_FORMAT.format(example=e) for e in ("[[A]]", "[x, y, z]")]
    texts += [f"<think> {w} </think> <answer> [[{x}]] </answer>" for w in ("", "the gripper") for x in LETTERS]
    return texts


def fmt_xyz(p):
    return "[" + ", ".join(f"{v:.3f}".replace("-0.000", "0.000") for v in p) + "]"


def make_prompt(kind, instruction, current_xyz, options=(), question=None):
    """The paper's prompt: the header, the current position (all kinds but state and scene), then the
    question (`question`, or the kind's own): multiple choice with `options`, else open (answered freely)."""
    text = HEADER.format(task=instruction)
    if kind not in ("state", SCENE):
        text += STATE_BLOCK.format(xyz=fmt_xyz(current_xyz))
    if not options:
        example = "[x, y, z]" if question is None else "[your answer]"
        return text + "## Question\n" + (question or QUESTIONS["waypoint"]) + "\n" + OUTPUT_FORMAT.format(example=example)
    return text + "## Choice Question\n" + (question or QUESTIONS[kind]) + "\n" + choices(options)


def option_lines(options):
    """One line per option, '[[B]] back right\n'. grpo.rationale's option thought is an option as this prints it."""
    return "".join(f"[[{L}]] {o}\n" for L, o in zip(LETTERS, options))


def choices(options):
    """The end of every multiple-choice prompt: the instruction, the option lines, the answer format."""
    return "Choose the most accurate option:\n" + option_lines(options) + OUTPUT_FORMAT.format(example="[[A]]")


PROBE_COLOURS = ("red", "green", "blue", "yellow")


def probe_samples(n, seed=0, shuffled=False):
    """A sanity task beside Robot-R1's questions: "what colour is the mat on the table?", with the
    options in a fixed order, so that the answer is in the image alone. It is a scene-wide cue: the
    tiny preset (1.3M parameters, random start) learns it within minutes of GRPO on a CPU, which it
    does not for Robot-R1's questions, nor the small preset for where an object is (the README's
    "GRPO against SFT, in miniature"). Real checkpoints train without it.
    shuffled: the options in a random order per question (kind probe_shuffled), as in every other
    kind: the model must find the option that names the colour and answer with that option's letter.
    The same images and colours; the README's "GRPO against SFT, in miniature" measures the difference."""
    rng = np.random.default_rng([seed, 31])
    kind = PROBE_SHUFFLED if shuffled else PROBE
    out = []
    for i in range(n):
        k = int(rng.integers(4))
        mat = _box("mat", [0.2 + rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), TABLE_Z], (0.55, 0.8, 0.005),
                   COLOURS[PROBE_COLOURS[k]])
        image = render([mat], rng.uniform([0.0, -0.25, 0.85], [0.45, 0.25, 1.1]), True)
        # the order from a stream of its own: the same images and colours, shuffled or not
        order = np.random.default_rng([seed, 32, i]).permutation(4) if shuffled else range(4)
        options = [PROBE_COLOURS[j] for j in order]
        prompt = "<image>\nWhat colour is the mat on the table?\n" + choices(options)
        right = options.index(PROBE_COLOURS[k])
        out.append(Sample(f"{kind}/{i:05d}", PROBE, kind, image, prompt, options, LETTERS[right], options[right]))
    return out


SCENE_QUESTIONS = {
    "object": "Where is the {name}? (the centre of its base, [x, y, z])",
    "height": "How high above the table is the gripper's tool centre point?",
    "object_region": "Which part of the table is the {name} over?",
    "gripper_region": "Which part of the table is the gripper over?",
}
# The table's quarters as the camera sees them: front = toward the camera (+x, the movement phrases'
# "forward"), right = the image's right (+y). They meet at the middle of where the tasks place objects.
REGIONS = ("back left", "back right", "front left", "front right")
TABLE_MIDDLE = np.array([0.235, 0.0])


def table_region(xyz):
    """The quarter of the table a point is over, or None within MATCHED_GAP of a dividing line (too close
    to call from the image)."""
    dx, dy = np.asarray(xyz[:2], float) - TABLE_MIDDLE
    if min(abs(dx), abs(dy)) < MATCHED_GAP:
        return None
    return REGIONS[2 * int(dx > 0) + int(dy > 0)]


def scene_samples(episodes, every=10, seed=0):
    """Scene questions from the simulator's ground truth (SimInfo), for pre-training a small model: what a
    pre-trained VLM brings to Robot-R1 (where things are, how high the hand is) and none of Robot-R1's
    own kinds. Per used frame:
      object          where is the task's object? options: positions of bodies in the same task's scenes,
                      drawn like matched distractors (_matched_positions), this frame's other bodies among them
      height          how high above the table is the gripper? options: heights at the task's other frames
      object_region   which quarter of the table is the task's object over? options: the four REGIONS
      gripper_region  the same for the gripper: with object_region, the coarse form of "where" that a base
                      can see before it resolves coordinates (the README's "GRPO against SFT, in miniature")
    The prompt carries no current position (it would give the height away). Letters balanced per
    question, deterministic for (episodes, seed)."""
    by_task, out = {}, []
    for ep in episodes:
        if ep.sim is None:
            raise ValueError(f"episode {ep.id}: scene questions need the simulator's ground truth (Episode.sim)")
        by_task.setdefault(ep.task, []).append(ep)
    pools = {task: (np.concatenate([e.sim.body_xyz[::every].reshape(-1, 3) for e in eps]),
                    np.concatenate([e.positions[::every, 2] for e in eps]) - TABLE_Z) for task, eps in by_task.items()}
    drafts = {question: [] for question in SCENE_QUESTIONS}     # question -> [(episode, frame, answer, wrong, target)]
    slots = [(ep, t) for ep in episodes for t in range(0, len(ep.positions), every)]
    for j, (ep, t) in enumerate(slots):
        bodies, heights = pools[ep.task]
        rng = np.random.default_rng([seed, 3, j])
        where = ep.sim.body_xyz[t, ep.sim.bodies.index(ep.sim.target)]
        others = _matched_positions(rng, where, np.concatenate([ep.sim.body_xyz[t], bodies]))
        h = ep.positions[t, 2] - TABLE_Z
        picked = [f"{h:.3f} m"]
        for i in rng.permutation(len(heights)):
            if all(abs(heights[i] - float(o.split()[0])) >= MATCHED_GAP for o in picked):
                picked.append(f"{heights[i]:.3f} m")
        drafts["object"].append((ep, t, fmt_xyz(where), others, [round(float(v), 3) for v in where]))
        drafts["height"].append((ep, t, picked[0], picked[1:4], round(float(h), 3)))
        for question, xyz in (("object_region", where), ("gripper_region", ep.positions[t])):
            r = table_region(xyz)
            drafts[question].append((ep, t, r, r and [str(o) for o in rng.permutation(REGIONS) if o != r], r))
    for q, (question, rows) in enumerate(drafts.items()):
        rows = [row for row in rows if row[3] and len(row[3]) >= 3]    # else too few distinct values in the
        letters = np.random.default_rng([seed, 2, q]).permutation(   # task's scenes, or too close to call
            np.resize(np.arange(4), len(rows)))
        for (ep, t, answer, wrong, target), right in zip(rows, letters):
            options = list(wrong[:right]) + [answer] + list(wrong[right:3])
            text = SCENE_QUESTIONS[question].format(name=ep.sim.target_name)
            out.append(Sample(f"{ep.id}/t{t}/scene_{question}", ep.task, SCENE, ep.images[t],
                              make_prompt(SCENE, ep.instruction, ep.positions[t], options, question=text), options,
                              LETTERS[right], target, {"question": question, "episode": ep.id, "frame": t}))
    return out


def lookup_samples(questions, seed=0):
    """The step between knowing an answer and naming its letter, as a lesson of its own: each multiple-
    choice question asked again as 'Which option reads "X"?', X one of its own options (the letter asked
    for balanced, and independent of the question's answer). The prompt, image and options are the
    question's own, so the lookup spans the same distance as in the question it stands for: from the
    scene's options, across the Robot-R1 header. A base that cannot do this step gets every scene answer
    right in its thought and the letter at chance (the README's "GRPO against SFT, in miniature").
    It never yields Robot-R1's kinds: the base learns it with the scene questions."""
    letters = np.random.default_rng([seed, 41]).permutation(np.resize(np.arange(4), len(questions)))
    out = []
    for q, right in zip(questions, letters):
        if not q.options or "## Choice Question\n" not in q.prompt:
            raise ValueError(f"{q.id}: a lookup is built from a multiple-choice question of the paper's layout")
        head = q.prompt[:q.prompt.index("## Choice Question\n")]
        asked = q.options[right]
        prompt = head + f'## Choice Question\nWhich option reads "{asked}"?\n' + choices(q.options)
        out.append(Sample(f"{q.id}/lookup", q.task, LOOKUP, q.image, prompt, list(q.options), LETTERS[right], asked,
                          {**q.meta, "source": q.id}))
    return out


# English words that our BPE (model.bpe_tokenizer) writes as one token in an option line and in a thought
WORD_LIST = ("able", "all", "and", "answer", "are", "away", "back", "ball", "base", "bin", "block", "button",
             "ceiling", "cup", "cyan", "down", "face", "fin", "grasp", "green", "image", "left", "length", "own",
             "pan", "pin", "pink", "press", "put", "right", "row", "stack", "stand", "target", "think", "under",
             "up", "war", "ward", "way", "yellow")
WORD_QUESTIONS = 100_000   # word_samples on their own: more than eval.py experiment's lesson meets (64k)


def word_samples(n, seed=0):
    """The letter's lookup on its own, in text: 'Which option reads: X' above four option lines of single
    words, no image, no header, no output-format paragraph (kind 'words'). It is the second skill of
    the README's "GRPO against SFT, in miniature" (naming the letter of an option) in its easiest form:
    each option one token, a few tokens from the answer, the word named before the option lines. The small
    preset learns it from random weights from many fresh questions (96% after ~58k), the first lesson of
    eval.py experiment's base; the same lesson with the question after the lines, where a thought stands,
    it does not learn in as many (README, "Why the thought goes unread"). Letters balanced, deterministic
    for (n, seed)."""
    rng = np.random.default_rng([seed, 51])
    letters = rng.permutation(np.resize(np.arange(4), n))
    out = []
    for i, right in enumerate(letters):
        options = [WORD_LIST[j] for j in rng.choice(len(WORD_LIST), 4, replace=False)]
        prompt = f"Which option reads: {options[right]}\n" + option_lines(options)
        out.append(Sample(f"words/{i:06d}", WORDS, WORDS, None, prompt, options, LETTERS[right], options[right]))
    return out


def uniform_positions(rng, answer, n=3, min_dist=0.1, workspace=WORKSPACE):
    """The paper's rule: n positions uniform in the workspace, 3 decimals, >= min_dist from the answer and
    from each other. Text alone can find the answer among them (README: blind baselines), so the
    default is _matched_positions."""
    chosen = [np.round(np.asarray(answer, float), 3)]
    while len(chosen) < n + 1:
        p = np.round(rng.uniform(*workspace), 3)
        if all(np.linalg.norm(p - q) >= min_dist for q in chosen):
            chosen.append(p)
    return [fmt_xyz(p) for p in chosen[1:]]


MATCHED_GAP = 0.02     # metres between any two options drawn by _matched_positions


def _matched_positions(rng, answer, candidates, n=3, min_dist=MATCHED_GAP):
    """n positions drawn from `candidates`, positions made the way the answer is made (other moments
    of the same task's demonstrations), >= min_dist from the answer and from each other. The answer and
    its distractors then come from one distribution: nothing in the text (nearness to the current
    position, to the usual answer, to the other options) singles it out; the image has to."""
    chosen = [np.round(np.asarray(answer, float), 3)]
    for i in rng.permutation(len(candidates)):
        p = np.round(candidates[i], 3)
        if all(np.linalg.norm(p - q) >= min_dist for q in chosen):
            chosen.append(p)
            if len(chosen) == n + 1:
                return [fmt_xyz(p) for p in chosen[1:]]
    return None                                 # too few distinct moments: the caller falls back


@dataclass
class _Moments:
    """Every frame of a task's demonstrations that has a keypoint after it: the pool that matched
    distractors are drawn from, so that they come from the distribution the answers come from."""
    states: np.ndarray        # (N, 3) gripper positions
    deltas: np.ndarray        # (N, 3) displacements to the next keypoint
    phrases: np.ndarray       # (P,) the distinct movement phrases of those displacements
    weights: np.ndarray       # (P,) their set weights (_set_weights)

    @staticmethod
    def of(episodes, n=3):
        states, deltas = [], []
        for ep in episodes:
            kps = keypoint_discovery(ep.gripper_open, ep.joint_velocities)
            pos = np.asarray(ep.positions, float)
            frames = [f for f in range(len(pos)) if f < kps[-1]]
            states.append(pos[frames])
            deltas.append(pos[[next(k for k in kps if k > f) for f in frames]] - pos[frames])
        states, deltas = np.concatenate(states), np.concatenate(deltas)
        phrases, counts = np.unique([movement_phrase(d) for d in deltas], return_counts=True)
        weights = _set_weights(counts / counts.sum(), n + 1) if len(phrases) > n else None
        return _Moments(states, deltas, phrases, weights)


def _moment_phrases(rng, answer, moments, n=3, tries=200):
    """n movement phrases of the task's moments, distinct from the answer and each other, drawn so that
    the answer is any of the n + 1 options with equal chance: a set of n + 1 distinct phrases has
    probability proportional to the product of their weights, solved for (_set_weights) so that a
    phrase is a member of a set as often as it is an answer (its share of the frames). Drawn the plain
    way, a frequent phrase would be the answer more often than its share of the options."""
    if moments.weights is None or answer not in moments.phrases:
        return None
    for _ in range(tries):
        drawn = [str(moments.phrases[i]) for i in rng.choice(len(moments.phrases), n, p=moments.weights)]
        if len(set(drawn + [answer])) == n + 1:
            return drawn
    return None


def _set_weights(p, k, iters=300):
    """Weights w such that drawing k distinct items with probability proportional to the product of
    their weights makes item i a member with probability k * p_i (p capped at 1/k, which no member
    share can exceed). Fixed-point iteration on the members' shares, through elementary symmetric sums."""
    cap = 0.9 / k
    for _ in range(len(p)):                             # cap, and share the excess among the others
        over = p > cap
        if not over.any() or over.all():
            break
        p = np.where(over, cap, p * (1 - cap * over.sum()) / p[~over].sum())
    w = p.copy()

    def sums(x):                                        # e[j]: the sum of products of j distinct weights
        e = np.zeros(k + 1)
        e[0] = 1.0
        for v in x:
            e[1:] = e[1:] + v * e[:-1]
        return e
    for _ in range(iters):
        share = np.array([w[i] * sums(np.delete(w, i))[k - 1] for i in range(len(w))]) / (k * sums(w)[k])
        w = w * p / share
        w = w / w.sum()
    return w


DISTRACTORS = ("matched", "uniform")


def build_samples(episodes, kinds=("waypoint", "state", "movement"), every=10, seed=0, workspace=WORKSPACE,
                  stats=None, progress=False, distractors="matched"):
    """Questions from demonstrations: frames 0, every, 2*every, ... paired with their next keypoint.

    distractors: how the wrong options are drawn. 'matched' (default): from the answer's own distribution,
    so that text alone cannot find the answer: waypoints are the current position plus the displacement
    to the next keypoint at another moment of the same demonstration, states are its positions at
    other moments, movements the phrases of other moments (_moment_phrases). 'uniform': the paper's
    rule (Robot-R1, Sec. 4.1): positions uniform in the workspace, movements one edit from the answer;
    a text-only rule then finds 77% of waypoints, 66% of states and 98% of movements (chance 25%).

    Deterministic for a seed. The correct letter is balanced over each kind (a seeded shuffle of
    A, B, C, D repeated), and the other options are drawn per question from a generator seeded by
    (seed, episode, frame, kind), so a question does not change when other episodes are added.
    `stats`, when a dict, receives counts of what was built and skipped; `progress` shows a bar.
    """
    if distractors not in DISTRACTORS:
        raise ValueError(f"unknown distractors rule {distractors!r}; choose from {DISTRACTORS}")
    from tqdm import tqdm
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown question kind {k!r} for demonstrations; choose from {KINDS} "
                             "(probe and probe_shuffled questions come from probe_samples)")
    slots = []                                 # (episode index, frame, keypoint frame)
    skipped = fallbacks = 0
    moments = {t: _Moments.of([ep for ep in episodes if ep.task == t]) for t in dict.fromkeys(ep.task for ep in episodes)} \
        if distractors == "matched" else {}
    for e, ep in enumerate(episodes):
        kps = keypoint_discovery(ep.gripper_open, ep.joint_velocities)
        for t in range(0, len(ep.positions), every):
            nxt = next((k for k in kps if k > t), None)
            if nxt is None:
                skipped += 1
                continue
            slots.append((e, t, nxt))
    letter_rng = np.random.default_rng([seed, 1])
    letters = {k: letter_rng.permutation(np.resize(np.arange(4), len(slots))) for k in kinds}
    images, samples = {}, []
    for j, (e, t, nxt) in enumerate(tqdm(slots, desc="rendering", unit="frame", disable=not progress)):
        ep = episodes[e]
        cur, goal = ep.positions[t], ep.positions[nxt]
        if (e, t) not in images:
            images[(e, t)] = ep.images[t]
        meta = {"episode": ep.id, "frame": t, "keypoint": nxt, "current": [round(float(v), 4) for v in cur],
                "next": [round(float(v), 4) for v in goal], "instruction": ep.instruction}
        for ki, kind in enumerate(kinds):
            rng = np.random.default_rng([seed, e, t, ki])
            if kind == "waypoint_open":
                options, answer, target = [], fmt_xyz(goal), [round(float(v), 3) for v in goal]
            else:
                if kind == "movement":
                    moves = _moves(goal - cur)
                    target = _phrase(moves)
                    pool = list(_neighbours(moves))
                    others = _moment_phrases(rng, target, moments[ep.task]) if distractors == "matched" else None
                    if others is None:
                        fallbacks += distractors == "matched"
                        others = [pool[i] for i in rng.choice(len(pool), 3, replace=False)]
                else:
                    xyz = goal if kind == "waypoint" else cur
                    target = [round(float(v), 3) for v in xyz]
                    pool = moments.get(ep.task)
                    others = _matched_positions(rng, xyz, cur + pool.deltas if kind == "waypoint" else pool.states) \
                        if distractors == "matched" else None
                    if others is None:
                        fallbacks += distractors == "matched"
                        others = uniform_positions(rng, xyz, workspace=workspace)
                right = int(letters[kind][j])
                correct = target if kind == "movement" else fmt_xyz(target)
                options = others[:right] + [correct] + others[right:]
                answer = LETTERS[right]
            samples.append(Sample(f"{ep.id}/t{t}/{kind}", ep.task, kind, images[(e, t)],
                                  make_prompt(kind, ep.instruction, cur, options), options, answer, target, meta))
    if stats is not None:
        stats.update(frames_used=len(slots), frames_after_last_keypoint=skipped, samples=len(samples),
                     uniform_fallbacks=fallbacks)
    return samples



def make_questions(episodes, kinds, every=10, seed=0, stats=None, progress=False, distractors="matched"):
    """build_samples for the demonstration kinds, scene_samples for 'scene', lookup_samples of the scene
    questions for 'lookup', plus, for 'probe' and 'probe_shuffled' among the kinds, probe questions: as many
    as all the others together, or 512 on their own (each); for 'words', word_samples: as many as all the
    others together, or WORD_QUESTIONS on their own."""
    demo_kinds = [k for k in kinds if k in KINDS]
    samples = build_samples(episodes, demo_kinds, every, seed, stats=stats, progress=progress,
                            distractors=distractors) if demo_kinds else []
    scene = scene_samples(episodes, every, seed) if {SCENE, LOOKUP} & set(kinds) else []
    samples += scene if SCENE in kinds else []
    samples += lookup_samples(scene, seed) if LOOKUP in kinds else []
    others = len(samples)
    for kind in PROBES:
        if kind in kinds:
            samples += probe_samples(others or 512, seed, shuffled=kind == PROBE_SHUFFLED)
    if WORDS in kinds:
        samples += word_samples(others or WORD_QUESTIONS, seed)
    return samples


# ----------------------------------------------------------------------------------------------------
# Dataset folders: samples.jsonl + images/ + manifest.json + preview.png
# ----------------------------------------------------------------------------------------------------
REQUIRED = {"id": str, "task": str, "kind": str, "image": (str, type(None)), "prompt": str, "options": list,
            "answer": str}


def save_samples(samples, out, manifest=None, progress=True):
    """Write samples (images as PNG, one per distinct frame) and a manifest to folder `out`."""
    from tqdm import tqdm
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = {}
    tmp = out / "samples.jsonl.tmp"
    with open(tmp, "w") as f:
        for s in tqdm(samples, desc="writing", unit="q", disable=not progress):
            key = id(s.image)
            if s.image is not None and key not in names:   # one file per distinct image, numbered, named after the frame
                stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in s.id.rsplit("/", 1)[0])
                names[key] = f"images/{len(names):06d}_{stem}.png"
                s.load_image().save(out / names[key])
            rec = {**asdict(s), "image": names.get(key)}                # None: a text-only question (words)
            f.write(json.dumps(rec) + "\n")
    tmp.replace(out / "samples.jsonl")
    counts = Counter((s.task, s.kind) for s in samples)
    manifest = {**(manifest or {}), "samples": len(samples), "images": len(names),
                "counts": {f"{t}/{k}": n for (t, k), n in sorted(counts.items())}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_samples(folder):
    """Samples written by save_samples; images stay paths until used. Errors name the file and line."""
    folder = Path(folder)
    path = folder / "samples.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; write a dataset with `python data.py --out {folder}`")
    samples = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            for key, typ in REQUIRED.items():
                if not isinstance(rec.get(key), typ):
                    what = "str (null: a text-only question)" if key == "image" else typ.__name__
                    raise ValueError(f"{path}:{line_no}: field {key!r} missing or not a {what}")
            if rec["kind"] not in ALL_KINDS:
                raise ValueError(f"{path}:{line_no}: kind {rec['kind']!r} is not one of {ALL_KINDS}")
            if rec["image"] is not None:
                image = folder / rec["image"]
                if not image.exists():
                    raise FileNotFoundError(f"{path}:{line_no}: image {image} does not exist")
                rec["image"] = str(image)
            samples.append(Sample(**{k: rec.get(k) for k in Sample.__dataclass_fields__ if k in rec}))
    return samples


def contact_sheet(samples, episodes_by_id=None, n=6, camera=FRONT_CAMERA):
    """A picture of n questions: the image, scaled up, with the current position (green ring) and the
    next keypoint (red cross) projected on it, and the question and its options beside it, answer in bold."""
    cell_w, img_w = 900, 448
    sheet = Image.new("RGB", (cell_w * 2, (n + 1) // 2 * (img_w + 16) + 40), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    draw.text((12, 10), "Robot-R1 questions: green ring = current gripper position, red cross = next keypoint",
              fill="black", font=font)
    for i, s in enumerate(samples[:n]):
        x0, y0 = (i % 2) * cell_w + 8, (i // 2) * (img_w + 16) + 40
        im = s.load_image().convert("RGB") if s.image is not None else Image.new("RGB", (256, 256), (235, 235, 235))
        cam = camera if episodes_by_id is None else (episodes_by_id.get(s.meta.get("episode")) or camera)
        scale = img_w / im.size[0]
        big = im.resize((img_w, int(im.size[1] * scale)), Image.LANCZOS)
        d = ImageDraw.Draw(big)
        if cam is not None and "current" in s.meta:
            (u0, v0), _ = cam.project(s.meta["current"])
            (u1, v1), _ = cam.project(s.meta["next"])
            u0, v0, u1, v1 = (c * scale * im.size[0] / cam.size[0] for c in (u0, v0, u1, v1))
            d.line([u0, v0, u1, v1], fill=(255, 220, 0), width=3)
            d.ellipse([u0 - 9, v0 - 9, u0 + 9, v0 + 9], outline=(0, 220, 0), width=4)
            d.line([u1 - 9, v1 - 9, u1 + 9, v1 + 9], fill=(230, 0, 0), width=4)
            d.line([u1 - 9, v1 + 9, u1 + 9, v1 - 9], fill=(230, 0, 0), width=4)
        sheet.paste(big, (x0, y0))
        tx, ty = x0 + img_w + 10, y0
        question = re.search(r"(?:## (?:Choice )?Question\n|<image>\n)([^\n]+)\n", s.prompt) or re.match(
            r"([^\n]+)\n", s.prompt)                                          # a text-only question's first line
        lines = [(f"{s.task}  ·  {s.kind}", font, "black"), (s.meta.get("instruction", ""), small, "black")]
        lines += [(piece, small, (90, 90, 90)) for piece in textwrap.wrap(question[1] if question else "", 70)]
        lines += [(f"current {fmt_xyz(s.meta['current'])}" if "current" in s.meta else "", small, "black"),
                  ("", small, "black")]
        for j, o in enumerate(s.options or [f"answer: {s.answer}"]):
            right = not s.options or LETTERS[j] == s.answer
            text = (f"[[{LETTERS[j]}]] " if s.options else "") + o + ("   <- answer" if s.options and right else "")
            for k, piece in enumerate(textwrap.wrap(text, 50, subsequent_indent="      ")):
                lines.append((piece, font if right else small, (0, 120, 0) if right else "black"))
        for text, f, colour in lines:
            draw.text((tx, ty), text, fill=colour, font=f)
            ty += 20
    return sheet


def main(tasks: tuple[str, ...] = TRAIN_TASKS, episodes: int = 50, out: Path = Path("data/tabletop"),
         kinds: tuple[str, ...] = ("waypoint", "state", "movement"), every: int = 10, seed: int = 0,
         rlbench: Path | None = None, variation: int = 0, distractors: str = "matched"):
    """Build Robot-R1 questions from simulated (default) or RLBench demonstrations and write a dataset folder.

    Args:
        tasks: built-in task names (with --rlbench: RLBench task folders; empty = all found).
        episodes: demonstrations per built-in task.
        out: output folder (samples.jsonl, images/, manifest.json, preview.png).
        kinds: question kinds: waypoint, state, movement, waypoint_open; scene and lookup (pre-training,
            simulator only), words (pre-training, text only), probe, probe_shuffled.
        every: take every n-th frame as a current frame.
        seed: seed of the demonstrations and the questions.
        rlbench: read demonstrations from this RLBench dataset folder instead of simulating.
        variation: RLBench variation number.
        distractors: 'matched' (wrong options from the answers' own distribution: text alone cannot find
            the answer) or 'uniform' (the paper's rule: a text-only rule finds most answers).
    """
    from tqdm import tqdm
    t0 = time.time()
    problems = [m for ok, m in (
        (episodes >= 1, f"--episodes {episodes}: must be at least 1"),
        (every >= 1, f"--every {every}: must be at least 1"),
        (kinds and set(kinds) <= set(ALL_KINDS), f"--kinds {' '.join(kinds)}: choose from {' '.join(ALL_KINDS)}"),
        (rlbench is not None or set(tasks) <= set(TASKS), f"--tasks: unknown {sorted(set(tasks) - set(TASKS))}; "
                                                          f"built-in tasks: {' '.join(TASKS)}"),
        (rlbench is None or Path(rlbench).is_dir(), f"--rlbench {rlbench}: no such folder"),
        (distractors in DISTRACTORS, f"--distractors {distractors}: choose from {' '.join(DISTRACTORS)}")) if not ok]
    if problems:
        raise UserError("; ".join(problems))
    check_writable(out)
    if rlbench is not None:
        eps = load_rlbench(rlbench, list(tasks) if tasks != TRAIN_TASKS else None, variation)
    elif any(k not in NO_DEMOS for k in kinds):
        eps = [ep for task in tqdm(tasks, desc="demonstrating", unit="task")
               for ep in generate_episodes(task, episodes, seed)]
    else:
        eps = []
    stats = {}
    samples = make_questions(eps, kinds, every, seed, stats=stats, progress=True, distractors=distractors)
    manifest = save_samples(samples, out, {"seed": seed, "every": every, "kinds": list(kinds), "distractors": distractors,
                                           "source": str(rlbench) if rlbench else "tabletop simulator",
                                           "tasks": sorted({e.task for e in eps}), "episodes": len(eps), **stats})
    cams = {e.id: e.camera for e in eps}
    pick = np.random.default_rng(seed).choice(len(samples), size=min(6, len(samples)), replace=False)
    contact_sheet([samples[i] for i in sorted(pick)], cams).save(Path(out) / "preview.png")
    print(f"\n{len(eps)} demonstrations -> {len(samples)} questions in {time.time() - t0:.1f}s -> {out}/")
    if stats:
        print(f"  frames used {stats['frames_used']}, skipped {stats['frames_after_last_keypoint']} "
              f"(after the last keypoint)")
    for key, n in manifest["counts"].items():
        print(f"  {key:40s} {n}")
    print(f"  preview: {Path(out) / 'preview.png'}")


# ----------------------------------------------------------------------------------------------------
# Demonstrations: the scripted expert -> Episode
# ----------------------------------------------------------------------------------------------------
class Frames(Sequence):
    """Per-frame images, read or rendered only when indexed (a demo has ~150 frames; we use every 10th)."""

    def __init__(self, n, load: Callable[[int], Image.Image]):
        self.n, self.load = n, load

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.load(i % self.n)


@dataclass
class SimInfo:
    """What the simulator knows of a demonstration beyond what a robot records (eval.py's bench uses it)."""
    keyframes: list           # the expert's keyframe frames (ARM's heuristic finds exactly these)
    subtasks: list            # a label per keyframe: "grasp the orange cup", ...
    bodies: list              # body names, in body_xyz's order
    body_xyz: np.ndarray      # (T, n_bodies, 3) every body's position in every frame
    target: str               # the body the task is about
    target_name: str          # its words: "orange cup"
    success: bool             # did the expert succeed


@dataclass
class Episode:
    images: Sequence          # T PIL images (a Frames: loaded lazily)
    positions: np.ndarray     # (T, 3) end-effector xyz, metres
    gripper_open: np.ndarray  # (T,) 1.0 open, 0.0 closed
    joint_velocities: np.ndarray  # (T, J)
    instruction: str
    task: str
    id: str = ""
    camera: Camera | None = None
    sim: SimInfo | None = None    # simulated demonstrations only


# A fixed map from Cartesian velocity (m/s) to 7 joint velocities (rad/s): the ARM heuristic only asks
# "are all joints (nearly) still?", so any full-rank map with a realistic scale serves.
JOINT_MAP = np.random.default_rng(7).normal(size=(7, 3)) * 2.5
DT = 0.05                     # RLBench records at 20 Hz


def demonstrate(task, seed, speed=0.008, name=None):
    """Run the scripted expert once. Returns (Episode, final Scene).

    Between keyframes the arm moves with a sine speed profile that never drops below 30% of its peak,
    reaches the keyframe one frame early and stands still on the keyframe frame itself; a gripper
    change happens on that frame. So the ARM heuristic finds exactly the planned keyframes.
    """
    rng = np.random.default_rng(seed)
    scene, instruction = TASKS[task].reset(rng)
    plan = TASKS[task].plan(scene)
    pos, grip, vel, bodies_t = [scene.gripper.copy()], [float(scene.gripper_open)], [np.zeros(3)], [scene.snapshot()]
    keyframes = []
    for kf in plan:
        start = pos[-1]
        n = max(6, math.ceil(np.linalg.norm(kf.xyz - start) / (speed * rng.uniform(0.8, 1.2))) + 1)
        profile = 0.3 + 0.7 * np.sin(np.pi * np.arange(1, n) / n)       # moving frames 1..n-1
        steps = np.cumsum(profile) / profile.sum()
        for i in range(1, n + 1):
            p = start + (kf.xyz - start) * steps[min(i, n - 1) - 1]
            vel.append((p - pos[-1]) / DT)
            pos.append(p)
            if i == n:                                                   # the keyframe frame: still
                scene.set_gripper(kf.gripper_open)
                keyframes.append(len(pos) - 1)
            scene.move_to(p)
            grip.append(float(scene.gripper_open))
            bodies_t.append(scene.snapshot())
    positions, bodies_t = np.array(pos), np.array(bodies_t)
    jv = np.array(vel) @ JOINT_MAP.T + rng.normal(0, 0.005, (len(pos), 7))
    names = list(scene.bodies)
    proto = [Body(b.name, b.xyz, b.parts) for b in scene.bodies.values()]

    def load(i):
        for b, xyz in zip(proto, bodies_t[i]):
            b.xyz = xyz
        return render(proto, positions[i], grip[i] > 0.5)

    ep = Episode(Frames(len(pos), load), positions, np.array(grip), jv, instruction, task, name or f"{task}/{seed}",
                 FRONT_CAMERA, SimInfo(keyframes, [k.label for k in plan], names, bodies_t, TASKS[task].target[0],
                                       TASKS[task].target[1].format(**scene.words), bool(TASKS[task].success(scene))))
    return ep, scene


def generate_episodes(task, n, seed=0):
    """n expert demonstrations of a built-in task, deterministic for (task, n, seed)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")
    return [demonstrate(task, [seed, list(TASKS).index(task), i], name=f"{task}/ep{i:03d}")[0] for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# RLBench's saved datasets, read without RLBench or PyRep
# ----------------------------------------------------------------------------------------------------
class _Record:
    """Stands in for rlbench.demo.Demo and rlbench.backend.observation.Observation when unpickling."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _RLBenchUnpickler(pickle.Unpickler):
    """Loads what an RLBench dataset holds and nothing else. A pickle names the functions it calls to
    rebuild objects, so a crafted file can call any importable function (os.system...). Only RLBench's
    demo and observation classes (mapped to _Record, RLBench itself need not be installed) and numpy's
    array and scalar rebuilders are let through; any other name is refused before anything runs."""
    RECORDS = {("rlbench.demo", "Demo"), ("rlbench.backend.observation", "Observation")}
    NUMPY = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | \
            {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
             ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.RECORDS:
            return _Record
        if (module, name) in self.NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: an RLBench dataset holds only demos, "
                                     "observations and numpy arrays (a pickle naming anything else could run code)")


def _unpickle(path):
    with open(path, "rb") as f:
        return _RLBenchUnpickler(f).load()


def _read_png(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image missing (every frame of a demo needs front_rgb/<i>.png)") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def load_rlbench(root, tasks=None, variation=0):
    """Episodes from RLBench's layout: {task}/variation{N}/episodes/episode{M}/low_dim_obs.pkl + front_rgb/."""
    root = Path(root)
    tasks = tasks or sorted(p.name for p in root.iterdir() if (p / f"variation{variation}").is_dir())
    if not tasks:
        raise UserError(f"{root}: no task folders with a variation{variation}/ inside (RLBench's layout is "
                        f"{{task}}/variation{variation}/episodes/episode0/low_dim_obs.pkl)")
    episodes = []
    for task in tasks:
        ep_root = root / task / f"variation{variation}" / "episodes"
        ep_dirs = sorted(ep_root.glob("episode*"), key=lambda p: int(p.name[7:] or -1))
        if not ep_dirs:
            raise FileNotFoundError(f"{ep_root}: no episode folders (expected episode0, episode1, ...)")
        for d in ep_dirs:
            episodes.append(_load_rlbench_episode(d, task))
    return episodes


def _load_rlbench_episode(d, task):
    pkl = d / "low_dim_obs.pkl"
    try:
        demo = _unpickle(pkl)
    except FileNotFoundError:
        raise FileNotFoundError(f"{pkl}: missing (each episode folder needs low_dim_obs.pkl)") from None
    except Exception as e:
        raise ValueError(f"{pkl}: not a readable RLBench demo pickle ({type(e).__name__}: {e})") from None
    obs = getattr(demo, "_observations", demo if isinstance(demo, list) else None)
    if not obs:
        raise ValueError(f"{pkl}: the demo has no frames")
    try:
        pose = np.array([o.gripper_pose for o in obs], float)
        grip = np.array([o.gripper_open for o in obs], float)
        jv = np.array([o.joint_velocities for o in obs], float)
    except AttributeError as e:
        raise ValueError(f"{pkl}: an observation lacks a field ({e})") from None
    for name, arr in (("gripper_pose", pose), ("gripper_open", grip), ("joint_velocities", jv)):
        bad = np.argwhere(~np.isfinite(arr.reshape(len(obs), -1)).all(1))
        if len(bad):
            raise ValueError(f"{pkl}: frame {int(bad[0, 0])}: {name} is not finite")
    desc_file = next((p for p in (d / "variation_descriptions.pkl", d.parent.parent / "variation_descriptions.pkl")
                      if p.exists()), None)
    if desc_file is None:
        raise FileNotFoundError(f"{d}: no variation_descriptions.pkl in the episode or the variation folder")
    try:
        descriptions = _unpickle(desc_file)
    except Exception as e:
        raise ValueError(f"{desc_file}: not a readable list of task descriptions ({type(e).__name__}: {e})") from None
    if not (isinstance(descriptions, (list, tuple)) and descriptions):
        raise ValueError(f"{desc_file}: expected a non-empty list of task descriptions")
    misc = getattr(obs[0], "misc", None) or {}
    camera = None
    if "front_camera_intrinsics" in misc and "front_camera_extrinsics" in misc:
        im0 = _read_png(d / "front_rgb" / "0.png")
        camera = Camera(np.asarray(misc["front_camera_intrinsics"]), np.asarray(misc["front_camera_extrinsics"]),
                        im0.size)
    missing = [i for i in range(len(obs)) if not (d / "front_rgb" / f"{i}.png").exists()]
    if missing:
        raise FileNotFoundError(f"{d / 'front_rgb'}: {len(missing)} frame image(s) missing, first {missing[0]}.png")
    return Episode(Frames(len(obs), lambda i: _read_png(d / "front_rgb" / f"{i}.png")), pose[:, :3], grip, jv,
                   str(descriptions[0]), task, f"{task}/{d.name}", camera, {"source": str(d)})


# ----------------------------------------------------------------------------------------------------
# The tabletop simulator: bodies made of prisms, a two-finger gripper, grasp / release / push
# ----------------------------------------------------------------------------------------------------
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 200), "yellow": (230, 200, 40),
           "purple": (130, 60, 170), "orange": (235, 130, 30), "cyan": (40, 190, 200), "pink": (230, 120, 170)}


@dataclass
class Part:
    shape: str               # "box" | "cylinder" | "sphere"
    offset: tuple            # bottom centre relative to the body's xyz (sphere: its centre)
    size: tuple              # (sx, sy, sz); a cylinder's radii are sx/2, sy/2; a sphere's radius is sx/2
    colour: tuple


@dataclass
class Body:
    name: str
    xyz: np.ndarray          # bottom centre, world frame
    parts: list
    graspable: bool = False
    pushable: bool = False
    grasp_z: float = 0.0     # height of the grasp point above xyz
    rest_z: float | None = None  # height above xyz where things put on it rest (default: its top)

    def height(self):
        return max(p.offset[2] + p.size[2] for p in self.parts)

    def half_xy(self):
        return max(max(abs(p.offset[0]) + p.size[0] / 2, abs(p.offset[1]) + p.size[1] / 2) for p in self.parts)


def finger_gap(gripper_open):
    return 0.04 if gripper_open else 0.012


def gripper_parts(gripper_open):
    """The hand as prisms around the tool centre point (between the fingertips)."""
    w, grey, white = finger_gap(gripper_open), (70, 70, 75), (225, 225, 230)
    return [Part("box", (0, -w - 0.007, -0.005), (0.02, 0.014, 0.055), grey),
            Part("box", (0, w + 0.007, -0.005), (0.02, 0.014, 0.055), grey),
            Part("box", (0, 0, 0.05), (0.06, 0.2, 0.035), white)] + [
            Part("cylinder", (0, 0, 0.085 + 0.1 * i), (0.07, 0.07, 0.1), (200, 200, 205)) for i in range(10)]


class Scene:
    """Bodies on a table and a gripper. Moves are split into 5 mm steps so that pushing works."""

    def __init__(self, bodies, gripper, gripper_open=True):
        self.bodies = {b.name: b for b in bodies}
        self.gripper = np.array(gripper, float)
        self.gripper_open = gripper_open
        self.held, self.held_offset = None, None

    def move_to(self, target):
        target = np.asarray(target, float)
        n = max(1, math.ceil(np.linalg.norm(target - self.gripper) / 0.005))
        start = self.gripper.copy()
        for i in range(1, n + 1):
            prev, self.gripper = self.gripper, start + (target - start) * i / n
            if self.held:
                self.bodies[self.held].xyz = self.gripper + self.held_offset
            self._push(self.gripper - prev)

    def _push(self, step):
        d = np.array([step[0], step[1]])
        if np.linalg.norm(d) < 1e-9:
            return
        d /= np.linalg.norm(d)
        for b in self.bodies.values():
            if not b.pushable or b.name == self.held or self.gripper[2] > b.xyz[2] + b.height():
                continue
            rel = b.xyz[:2] - self.gripper[:2]
            along, across = rel @ d, abs(rel @ np.array([-d[1], d[0]]))
            need = b.half_xy() + 0.012
            if -need < along < need and across < b.half_xy() + 0.03:
                b.xyz[:2] += d * (need - along)

    def set_gripper(self, gripper_open):
        if gripper_open == self.gripper_open:
            return
        self.gripper_open = gripper_open
        if not gripper_open:                       # closing: grasp whatever sits between the fingers
            for b in self.bodies.values():
                grasp = b.xyz + [0, 0, b.grasp_z]
                if b.graspable and np.abs(grasp[:2] - self.gripper[:2]).max() < 0.03 \
                        and abs(grasp[2] - self.gripper[2]) < 0.03:
                    self.held, self.held_offset = b.name, b.xyz - self.gripper
                    return
        elif self.held:                            # opening: the held body drops onto what is below
            b, self.held = self.bodies[self.held], None
            b.xyz[2] = self.support_z(b)

    def support_z(self, body):
        z = TABLE_Z
        for o in self.bodies.values():
            if o is not body and np.abs(o.xyz[:2] - body.xyz[:2]).max() < o.half_xy():
                z = max(z, o.xyz[2] + (o.rest_z if o.rest_z is not None else o.height()))
        return z

    def snapshot(self):
        return np.stack([b.xyz.copy() for b in self.bodies.values()])


# --- rendering: painter's algorithm over shaded prism faces, shadows on the table ---------------------
LIGHT = np.array([0.35, 0.25, 1.0]) / np.linalg.norm([0.35, 0.25, 1.0])


def _prism(part, origin, n_round=18):
    """(faces, footprint): faces as (world polygon (k, 3), outward normal, colour); footprint (k, 2)."""
    cx, cy, z0 = np.asarray(origin, float) + part.offset
    sx, sy, sz = part.size
    if part.shape == "box":
        ring = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [sx / 2, sy / 2]
    else:
        a = np.linspace(0, 2 * np.pi, n_round, endpoint=False)
        ring = np.stack([np.cos(a) * sx / 2, np.sin(a) * sy / 2], 1)
    ring = ring + [cx, cy]
    bottom, top = np.c_[ring, np.full(len(ring), z0)], np.c_[ring, np.full(len(ring), z0 + sz)]
    faces = [(top, np.array([0, 0, 1.0]), part.colour)]
    for i in range(len(ring)):
        j = (i + 1) % len(ring)
        n = np.array([ring[j, 1] - ring[i, 1], ring[i, 0] - ring[j, 0], 0.0])
        faces.append((np.stack([bottom[i], bottom[j], top[j], top[i]]), n / np.linalg.norm(n), part.colour))
    return faces, ring


def render(bodies, gripper_xyz, gripper_open, camera=FRONT_CAMERA, supersample=2):
    """Render the front camera: table, shadows, bodies and the gripper, shaded. -> PIL RGB image."""
    W, H = camera.size
    s = supersample
    img = Image.new("RGB", (W * s, H * s))
    draw = ImageDraw.Draw(img)
    for y in range(0, H * s, 4):                                   # back wall: a soft vertical gradient
        g = int(150 + 60 * y / (H * s))
        draw.rectangle([0, y, W * s, y + 4], fill=(g, g, g + 8))
    eye = camera.pose[:3, 3]

    def poly(points):
        uv, _ = camera.project(points)
        return [tuple(p) for p in uv * s]

    table = np.array([[-0.3, -0.6], [0.8, -0.6], [0.8, 0.6], [-0.3, 0.6]])
    draw.polygon(poly(np.c_[table, np.full(4, TABLE_Z)]), fill=(160, 120, 80))
    draw.polygon(poly(np.array([[0.8, -0.6, TABLE_Z], [0.8, 0.6, TABLE_Z], [0.8, 0.6, 0.0], [0.8, -0.6, 0.0]])),
                 fill=(110, 80, 55))
    prisms = [(p, b.xyz) for b in bodies for p in b.parts]
    prisms += [(p, gripper_xyz) for p in gripper_parts(gripper_open)[:3]]   # the arm link casts no shadow
    shadow = Image.new("L", img.size, 0)
    sdraw = ImageDraw.Draw(shadow)
    for part, origin in prisms:                                    # shadows: footprints, fading with height
        lift = np.asarray(origin, float)[2] + part.offset[2] - TABLE_Z
        if part.shape == "sphere":
            lift -= part.size[0] / 2
        _, ring = _prism(part, origin)
        sdraw.polygon(poly(np.c_[ring, np.full(len(ring), TABLE_Z + 1e-3)]), fill=int(210 * math.exp(-lift / 0.6)))
    img = Image.composite(Image.new("RGB", img.size, (40, 30, 25)), img, shadow.point(lambda v: v * 0.75))
    draw = ImageDraw.Draw(img)
    faces = []
    for part, origin in prisms + [(p, gripper_xyz) for p in gripper_parts(gripper_open)[3:]]:
        if part.shape == "sphere":
            c = np.asarray(origin, float) + part.offset
            faces.append((np.linalg.norm(c - eye), "sphere", (c, part.size[0] / 2, part.colour)))
            continue
        for pts, n, colour in _prism(part, origin)[0]:
            centre = pts.mean(0)
            if n @ (eye - centre) > 0:                             # facing the camera
                shade = 0.45 + 0.55 * max(0.0, float(n @ LIGHT))
                faces.append((np.linalg.norm(centre - eye), "face", (pts, tuple(int(c * shade) for c in colour))))
    for _, kind, item in sorted(faces, key=lambda f: -f[0]):       # far to near
        if kind == "face":
            draw.polygon(poly(item[0]), fill=item[1])
        else:
            c, r, colour = item
            (u, v), depth = camera.project(c)
            rad = camera.K[0, 0] * r / depth * s
            for k, shade in ((1.0, 0.6), (0.7, 0.85), (0.35, 1.0)):
                off = (1 - k) * rad * 0.4
                draw.ellipse([u * s - off - rad * k, v * s - off - rad * k, u * s - off + rad * k,
                              v * s - off + rad * k], fill=tuple(int(ch * shade) for ch in colour))
    return img.resize((W, H), Image.LANCZOS)


# ----------------------------------------------------------------------------------------------------
# Tasks: a random scene, a few phrasings, the expert's plan of keyframes, a success check
# ----------------------------------------------------------------------------------------------------
@dataclass
class Keyframe:
    xyz: np.ndarray
    gripper_open: bool        # gripper state from this keyframe on
    label: str                # the subtask it completes, e.g. "grasp the red cup"


def _spots(rng, n, min_dist=0.14, low=(0.02, -0.28), high=(0.45, 0.28)):
    """n table positions at least min_dist apart."""
    out = []
    while len(out) < n:
        p = rng.uniform(low, high)
        if all(np.linalg.norm(p - q) >= min_dist for q in out):
            out.append(p)
    return [np.array([p[0], p[1], TABLE_Z]) for p in out]


def _colours(rng, n):
    names = rng.choice(list(COLOURS), size=n, replace=False)
    return [str(c) for c in names]


def _box(name, xyz, size, colour, **kw):
    return Body(name, np.asarray(xyz, float), [Part("box", (0, 0, 0), size, colour)], **kw)


def _cup(name, xyz, colour):
    return Body(name, np.asarray(xyz, float), [Part("cylinder", (0, 0, 0), (0.07, 0.07, 0.09), colour)],
                graspable=True, grasp_z=0.05)


def _above(p, dz):
    return np.asarray(p, float) + [0, 0, dz]


def _pick(body, label, lift=0.2, approach=0.12):
    g = body.xyz + [0, 0, body.grasp_z]
    return [Keyframe(_above(g, approach), True, f"move above the {label}"),
            Keyframe(g, False, f"grasp the {label}"),
            Keyframe(_above(g, lift), False, f"lift the {label}")]


def _place(body, label, target_xyz, held_rest, where, drop=0.0):
    """Keyframes that carry the held body above target_xyz (`where`), lower it (by drop), release it."""
    over = _above(target_xyz, held_rest + 0.12)
    kfs = [Keyframe(over, False, f"move the {label} over {where}")]
    if drop:
        kfs.append(Keyframe(_above(target_xyz, held_rest + drop), False, f"lower the {label}"))
    kfs[-1] = Keyframe(kfs[-1].xyz, True, f"release the {label} {'onto' if drop else 'over'} {where}")
    return kfs


class Task:
    """One task family; a new task fills in:
        phrasings        instructions, with {placeholders} for the scene's words (colours, names)
        setup(rng)       -> (bodies, words): a random scene, and the words its instruction uses
        plan(scene)      -> [Keyframe]: the expert's keyframes (where the gripper goes, open or closed)
        success(scene)   -> bool: is the task done
        target           (body name, description) of the object the task is about
    reset(rng) then gives the scene with the gripper at its home, and an instruction."""
    phrasings: tuple = ()
    start_open = True
    target = ("", "")

    def setup(self, rng):
        raise NotImplementedError

    def plan(self, scene):
        raise NotImplementedError

    def success(self, scene):
        raise NotImplementedError

    def reset(self, rng):
        bodies, words = self.setup(rng)
        home = np.array([0.30, 0.0, 1.12]) + rng.uniform(-0.04, 0.04, 3)
        scene = Scene(bodies, home, self.start_open)
        scene.words = words
        return scene, str(rng.choice(self.phrasings)).format(**words)


class PickUpCup(Task):
    target = ("cup_0", "{c} cup")
    phrasings = ("pick up the {c} cup", "grasp the {c} cup and lift it", "lift the {c} cup off the table")

    def setup(self, rng):
        cols, spots = _colours(rng, 3), _spots(rng, 3)
        return [_cup(f"cup_{i}", s, COLOURS[c]) for i, (s, c) in enumerate(zip(spots, cols))], {"c": cols[0]}

    def plan(self, scene):
        return _pick(scene.bodies["cup_0"], f"{scene.words['c']} cup")

    def success(self, scene):
        return scene.held == "cup_0" and scene.bodies["cup_0"].xyz[2] > TABLE_Z + 0.1


class PushButton(Task):
    target = ("button", "{c} button")
    phrasings = ("push the {c} button", "press the {c} button", "press down on the {c} button")
    start_open = False

    def setup(self, rng):
        cols, spots = _colours(rng, 3), _spots(rng, 3)
        button = Body("button", spots[0], [Part("box", (0, 0, 0), (0.1, 0.1, 0.025), (90, 90, 95)),
                                           Part("cylinder", (0, 0, 0.025), (0.05, 0.05, 0.015), COLOURS[cols[0]])])
        others = [_box(f"block_{i}", s, (0.05, 0.05, 0.05), COLOURS[c]) for i, (s, c) in
                  enumerate(zip(spots[1:], cols[1:]))]
        return [button] + others, {"c": cols[0]}

    def plan(self, scene):
        b = scene.bodies["button"]
        return [Keyframe(_above(b.xyz, 0.16), False, "move above the button"),
                Keyframe(_above(b.xyz, 0.035), False, "press the button")]

    def success(self, scene):
        b = scene.bodies["button"]
        return np.abs(scene.gripper[:2] - b.xyz[:2]).max() < 0.025 and scene.gripper[2] < b.xyz[2] + 0.045


class PutRubbishInBin(Task):
    target = ("rubbish", "rubbish")
    phrasings = ("put the rubbish in the bin", "drop the rubbish into the bin", "throw away the trash")

    def setup(self, rng):
        spots = _spots(rng, 4, min_dist=0.16)
        bin_ = Body("bin", spots[0], [Part("box", (0, 0, 0), (0.16, 0.2, 0.11), (60, 65, 70)),
                                      Part("box", (0, 0, 0.1), (0.13, 0.17, 0.011), (25, 25, 28))], rest_z=0.012)
        rubbish = Body("rubbish", spots[1], [Part("box", (0, 0, 0), (0.045, 0.045, 0.04), (235, 235, 225))],
                       graspable=True, grasp_z=0.025)
        tomatoes = [Body(f"tomato_{i}", s, [Part("sphere", (0, 0, 0.03), (0.06, 0.06, 0.06), (210, 40, 30))])
                    for i, s in enumerate(spots[2:])]
        return [bin_, rubbish] + tomatoes, {}

    def plan(self, scene):
        return _pick(scene.bodies["rubbish"], "rubbish") + _place(scene.bodies["rubbish"], "rubbish",
                                                                   scene.bodies["bin"].xyz, 0.11, "the bin")

    def success(self, scene):
        r, b = scene.bodies["rubbish"], scene.bodies["bin"]
        return scene.held is None and np.abs(r.xyz[:2] - b.xyz[:2]).max() < 0.06 and r.xyz[2] < b.xyz[2] + 0.05


class PhoneOnBase(Task):
    target = ("phone", "phone")
    phrasings = ("put the phone on the base", "put the phone on the charging base", "charge the phone")

    def setup(self, rng):
        spots = _spots(rng, 3, min_dist=0.18)
        base = Body("base", spots[0], [Part("box", (0, 0, 0), (0.1, 0.17, 0.02), (150, 150, 155)),
                                       Part("box", (0, 0, 0.02), (0.03, 0.12, 0.004), (40, 40, 45))])
        phone = Body("phone", spots[1], [Part("box", (0, 0, 0), (0.075, 0.15, 0.016), (20, 20, 25))],
                     graspable=True, grasp_z=0.01)
        clutter = _box("block_0", spots[2], (0.05, 0.05, 0.05), COLOURS[_colours(rng, 1)[0]])
        return [base, phone, clutter], {}

    def plan(self, scene):
        phone, base = scene.bodies["phone"], scene.bodies["base"]
        return _pick(phone, "phone", lift=0.15) + _place(phone, "phone", _above(base.xyz, 0.02), 0.01, "the base", drop=0.02)

    def success(self, scene):
        p, b = scene.bodies["phone"], scene.bodies["base"]
        return scene.held is None and np.abs(p.xyz[:2] - b.xyz[:2]).max() < 0.03 and p.xyz[2] > TABLE_Z + 0.015


class TakeLidOffSaucepan(Task):
    target = ("lid", "saucepan lid")
    phrasings = ("take the lid off the saucepan", "remove the lid from the pan", "lift the lid off the saucepan")

    def setup(self, rng):
        spots = _spots(rng, 2, min_dist=0.2)
        pan = Body("saucepan", spots[0], [Part("cylinder", (0, 0, 0), (0.17, 0.17, 0.08), (160, 165, 175)),
                                          Part("box", (0, 0.13, 0.06), (0.03, 0.1, 0.015), (40, 40, 40))])
        lid = Body("lid", _above(spots[0], 0.08), [Part("cylinder", (0, 0, 0), (0.175, 0.175, 0.01), (120, 125, 135)),
                                                   Part("cylinder", (0, 0, 0.01), (0.025, 0.025, 0.03), (30, 30, 30))],
                   graspable=True, grasp_z=0.03)
        clutter = _cup("cup_0", spots[1], COLOURS[_colours(rng, 1)[0]])
        return [pan, lid, clutter], {}

    def plan(self, scene):
        return _pick(scene.bodies["lid"], "lid", lift=0.2, approach=0.1)

    def success(self, scene):
        return scene.held == "lid" and scene.bodies["lid"].xyz[2] > scene.bodies["saucepan"].xyz[2] + 0.18


class StackBlocks(Task):
    target = ("block_0", "{a} block")
    phrasings = ("stack the {a} block on the {b} block", "put the {a} block on top of the {b} block")

    def setup(self, rng):
        cols, spots = _colours(rng, 3), _spots(rng, 3)
        return [_box(f"block_{i}", s, (0.05, 0.05, 0.05), COLOURS[c], graspable=True, grasp_z=0.03)
                for i, (s, c) in enumerate(zip(spots, cols))], {"a": cols[0], "b": cols[1]}

    def plan(self, scene):
        a, b = scene.bodies["block_0"], scene.bodies["block_1"]
        return _pick(a, f"{scene.words['a']} block", lift=0.15) + _place(
            a, f"{scene.words['a']} block", _above(b.xyz, 0.05), 0.03, f"the {scene.words['b']} block", drop=0.005)

    def success(self, scene):
        a, b = scene.bodies["block_0"], scene.bodies["block_1"]
        return scene.held is None and np.abs(a.xyz[:2] - b.xyz[:2]).max() < 0.025 and a.xyz[2] > b.xyz[2] + 0.04


class ReachTarget(Task):
    target = ("target_0", "{c} target")
    phrasings = ("reach the {c} target", "touch the {c} ball with the gripper", "move to the {c} target")

    def setup(self, rng):
        cols, spots = _colours(rng, 3), _spots(rng, 3, min_dist=0.15)
        return [Body(f"target_{i}", _above(s, rng.uniform(0.05, 0.35)), [Part("sphere", (0, 0, 0), (0.05,) * 3,
                COLOURS[c])]) for i, (s, c) in enumerate(zip(spots, cols))], {"c": cols[0]}

    def plan(self, scene):
        return [Keyframe(scene.bodies["target_0"].xyz.copy(), True, f"reach the {scene.words['c']} target")]

    def success(self, scene):
        return np.linalg.norm(scene.gripper - scene.bodies["target_0"].xyz) < 0.03


class SlideBlockToTarget(Task):
    target = ("block", "blue block")
    phrasings = ("slide the block to the target", "push the block onto the green square")
    start_open = False

    def setup(self, rng):
        while True:
            block_at, target_at = _spots(rng, 2, min_dist=0.15, low=(0.05, -0.25), high=(0.42, 0.25))
            d = (target_at - block_at)[:2] / np.linalg.norm((target_at - block_at)[:2])
            if WORKSPACE[0][0] < block_at[0] - 0.09 * d[0] < WORKSPACE[1][0]:
                break
        target = Body("target", target_at, [Part("box", (0, 0, 0), (0.09, 0.09, 0.002), COLOURS["green"])])
        block = _box("block", block_at, (0.05, 0.05, 0.05), COLOURS["blue"], pushable=True)
        return [target, block], {}

    def plan(self, scene):
        b, t = scene.bodies["block"].xyz, scene.bodies["target"].xyz
        d = np.r_[(t - b)[:2] / np.linalg.norm((t - b)[:2]), 0]
        behind = b - d * 0.09 + [0, 0, 0.025]
        return [Keyframe(_above(behind, 0.1), False, "move behind the block"),
                Keyframe(behind, False, "lower the gripper behind the block"),
                Keyframe(t - d * (0.025 + 0.012) + [0, 0, 0.025], False, "push the block onto the target")]

    def success(self, scene):
        return np.abs(scene.bodies["block"].xyz[:2] - scene.bodies["target"].xyz[:2]).max() < 0.03


TASKS: dict[str, Task] = {"pick_up_cup": PickUpCup(), "push_button": PushButton(),
                          "put_rubbish_in_bin": PutRubbishInBin(), "phone_on_base": PhoneOnBase(),
                          "take_lid_off_saucepan": TakeLidOffSaucepan(), "stack_blocks": StackBlocks(),
                          "reach_target": ReachTarget(), "slide_block_to_target": SlideBlockToTarget()}


# ----------------------------------------------------------------------------------------------------
# Command lines (data.py, grpo.py, eval.py): check before working, errors in one line
# ----------------------------------------------------------------------------------------------------
class UserError(ValueError):
    """Something the person running the command can fix (a flag, a file, a folder). The command line
    prints it as one line with no traceback."""


def check_writable(folder, flag="--out"):
    """Fail now, not after hours of work, when `folder` cannot be created or written (creates it)."""
    folder = Path(folder)
    probe = folder / f".write_test_{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there ({e.strerror or e}); choose another folder") from None


def cli(run):
    """Run a command line: `run()` parses the flags (tyro) and works. An error the user can cause (a
    UserError, a missing or unreadable file, a full disk) prints `error: ...` and exits with status 2;
    ROBOT_R1_DEBUG=1 prints the traceback as well. Anything else is a bug and keeps its traceback."""
    import errno
    import sys
    try:
        run()
    except (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, OSError) as e:
        if os.environ.get("ROBOT_R1_DEBUG"):
            raise
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            message = (f"no space left on the device while writing {e.filename or 'a file'}; free some space (a run's "
                       "previous checkpoint is intact: continue with --resume)")
        elif type(e) is OSError:                  # other OS errors are not the user's to fix: a bug report
            raise
        else:
            message = str(e)
        print(f"error: {message}\n(ROBOT_R1_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    import tyro
    cli(lambda: tyro.cli(main))
