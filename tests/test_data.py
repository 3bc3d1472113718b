"""data.py: keypoints, movement phrases, questions, RLBench loading, bad input, the simulator."""
import json
import os
import pickle
import re
import sys
import types
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data
import model as M


# --- keypoints ----------------------------------------------------------------------------------------
def moving(T, J=7):
    return np.full((T, J), 0.5)


def test_keypoint_on_gripper_change_and_last_frame():
    g = [1, 1, 1, 0, 0, 0, 0, 0]
    assert data.keypoint_discovery(g, moving(8)) == [3, 7]


def test_keypoint_on_stop_and_buffer_suppresses_the_next_four_frames():
    v = moving(20)
    v[5:12] = 0.0                       # still from frame 5 to 11: a stop at 5, then again at 10 (buffer 4)
    kps = data.keypoint_discovery([1] * 20, v)
    assert kps == [5, 10, 19]


def test_no_stop_on_second_to_last_frame_and_adjacent_final_keypoints_drop_the_earlier():
    v = moving(10)
    v[8] = 0.0                          # still on the second-to-last frame: not a stop
    assert data.keypoint_discovery([1] * 10, v) == [9]
    g = [1] * 9 + [0]                   # gripper change at 9 = last frame: one keypoint
    assert data.keypoint_discovery(g, moving(10)) == [9]
    g = [1] * 8 + [0, 0]                # change at 8, last at 9: adjacent, 8 is dropped
    assert data.keypoint_discovery(g, moving(10)) == [9]


def test_no_stop_while_the_gripper_changes_nearby():
    v = moving(12)
    v[4] = 0.0
    g = [1] * 5 + [0] * 7               # still at 4 but the gripper changes at 5: only the change counts
    assert data.keypoint_discovery(g, v) == [5, 11]
    assert data.keypoint_discovery([1] * 12, v) == [4, 11]


def test_stopping_delta_is_inclusive_and_per_joint():
    v = moving(10)
    v[4] = 0.1
    assert 4 in data.keypoint_discovery([1] * 10, v)
    v[4, 3] = 0.1001
    assert 4 not in data.keypoint_discovery([1] * 10, v)


@pytest.mark.parametrize("task", list(data.TASKS))
def test_simulated_expert_succeeds_and_keypoints_recover_its_keyframes(task):
    for ep in data.generate_episodes(task, 6, seed=11):
        assert data.keypoint_discovery(ep.gripper_open, ep.joint_velocities) == ep.sim.keyframes
        assert ep.sim.success, ep.id
        assert len(ep.images) == len(ep.positions) == len(ep.gripper_open) == len(ep.joint_velocities)


# --- movement phrases ---------------------------------------------------------------------------------
def test_movement_phrase_matches_the_paper_examples():
    assert data.movement_phrase([0.02, -0.03, -0.1]) == "slightly move forward, slightly move left, and move down"
    assert data.movement_phrase([0.0, 0.0, -0.2]) == "move down"
    assert data.movement_phrase([-0.2, 0.15, 0.005]) == "move backward and move right"
    assert data.movement_phrase([0.004, -0.009, 0.0]) == "stay still"
    assert data.movement_phrase([0.1, 0.05, 0.0]) == "move forward and slightly move right"   # |Δ| = half: slightly


# --- questions ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def episodes():
    return [ep for task in data.TRAIN_TASKS for ep in data.generate_episodes(task, 12, seed=3)]


@pytest.fixture(scope="module")
def samples(episodes):
    return data.build_samples(episodes, kinds=data.KINDS, seed=5)


def test_question_invariants_hold_over_thousands_of_samples(samples):
    assert len(samples) > 2000
    for s in samples:
        assert s.prompt.count("<image>") == 1
        assert ("## Current Robot State" in s.prompt) == (s.kind != "state")
        if s.kind == "waypoint_open":
            assert s.options == [] and s.answer == data.fmt_xyz(s.target)
            continue
        assert len(s.options) == 4 and len(set(s.options)) == 4
        truth = s.target if s.kind == "movement" else data.fmt_xyz(s.target)
        assert [o == truth for o in s.options].count(True) == 1
        assert s.options["ABCD".index(s.answer)] == truth
        assert f"[[{s.answer}]] {truth}" in s.prompt
        if s.kind in ("waypoint", "state"):
            pts = np.array([json.loads(o) for o in s.options])
            gaps = np.linalg.norm(pts[:, None] - pts[None], axis=-1)[np.triu_indices(4, 1)]
            assert gaps.min() >= data.MATCHED_GAP - 2e-3
        expected_xyz = s.meta["next"] if s.kind == "waypoint" else s.meta["current"]
        if s.kind != "movement":
            assert np.allclose(s.target, expected_xyz, atol=6e-4)
        else:
            assert s.target == data.movement_phrase(np.subtract(s.meta["next"], s.meta["current"]))


def test_no_text_only_rule_finds_the_answer_but_each_finds_the_papers(episodes, samples):
    """The default questions need the image: over the ~1,800 questions of the fixture, every text-only rule
    of eval.BLIND_RULES (nearness to the current position, to the mean answer, the centre of the options,
    the most frequent phrase...) stays within 5 points of chance on every kind. The same rules on the
    paper's uniform distractors find the answer most of the time: they are real detectors."""
    import eval as E
    matched = E.blind_baselines([s for s in samples if s.kind in ("waypoint", "state", "movement")])
    for key, rules in matched.items():
        for rule, acc in rules.items():
            assert abs(acc - 0.25) <= 0.05, (key, rule, acc)
    uniform = E.best_blind(E.blind_baselines(data.build_samples(episodes, seed=5, distractors="uniform")))
    assert {k: acc > 0.6 for k, (_, acc) in uniform.items()} == {f"{k}/In": True for k in ("waypoint", "state", "movement")}


def test_answer_letters_are_balanced_per_kind(samples):
    for kind in ("waypoint", "state", "movement"):
        counts = Counter(s.answer for s in samples if s.kind == kind)
        assert set(counts) == set("ABCD") and max(counts.values()) - min(counts.values()) <= 1


def test_questions_pair_every_tenth_frame_with_the_next_keypoint(episodes, samples):
    ep = episodes[0]
    kps = data.keypoint_discovery(ep.gripper_open, ep.joint_velocities)
    mine = [s for s in samples if s.meta["episode"] == ep.id and s.kind == "waypoint"]
    assert [s.meta["frame"] for s in mine] == [t for t in range(0, len(ep.positions), 10) if t < kps[-1]]
    for s in mine:
        assert s.meta["keypoint"] == min(k for k in kps if k > s.meta["frame"])


def test_building_is_deterministic_for_a_seed(episodes):
    a = data.build_samples(episodes[:10], seed=9)
    b = data.build_samples(episodes[:10], seed=9)
    c = data.build_samples(episodes[:10], seed=10)
    key = lambda ss: [(s.id, s.options, s.answer) for s in ss]
    assert key(a) == key(b) and key(a) != key(c)
    ea = data.generate_episodes("pick_up_cup", 2, seed=4)
    eb = data.generate_episodes("pick_up_cup", 2, seed=4)
    assert np.array_equal(ea[1].positions, eb[1].positions)
    assert np.array_equal(np.asarray(ea[1].images[5]), np.asarray(eb[1].images[5]))


def test_build_samples_counts_what_it_skips(episodes):
    stats = {}
    data.build_samples(episodes[:5], stats=stats)
    lengths = [len(e.positions) for e in episodes[:5]]
    assert stats["frames_used"] + stats["frames_after_last_keypoint"] == sum((n + 9) // 10 for n in lengths)


def test_dataset_folder_round_trip_and_preview(tmp_path, episodes):
    samples = data.build_samples(episodes[:3], kinds=data.KINDS)
    data.save_samples(samples, tmp_path, {"seed": 0}, progress=False)
    back = data.load_samples(tmp_path)
    assert [(s.id, s.prompt, s.options, s.answer, s.target) for s in back] == \
           [(s.id, s.prompt, s.options, s.answer, s.target) for s in samples]
    for a, b in zip(back, samples):
        assert np.array_equal(np.asarray(a.load_image()), np.asarray(b.load_image())), a.id
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["samples"] == len(samples) and manifest["seed"] == 0
    sheet = data.contact_sheet(back, n=4)
    assert sheet.size[0] > 1000 and np.asarray(sheet).std() > 10


def test_scene_questions_ask_about_the_scene_never_robot_r1s_kinds(episodes):
    """The experiment's pre-training questions (data.scene_samples) must not teach the three kinds GRPO
    and SFT are compared on: no Robot-R1 question, no current position (it would give the height away)."""
    qs = data.scene_samples(episodes, seed=4)
    assert len(qs) > 1000 and {q.kind for q in qs} == {data.SCENE}
    robot_r1 = list(data.QUESTIONS.values()) + ["## Current Robot State"]
    assert not [q.id for q in qs if any(text in q.prompt for text in robot_r1)]
    assert Counter(q.meta["question"] for q in qs).keys() == set(data.SCENE_QUESTIONS)
    for question in data.SCENE_QUESTIONS:                                      # letters balanced per question
        counts = Counter(q.answer for q in qs if q.meta["question"] == question)
        assert max(counts.values()) - min(counts.values()) <= 1, (question, counts)
    by_id = {ep.id: ep for ep in episodes}
    for q in qs:
        ep, t = by_id[q.meta["episode"]], q.meta["frame"]
        assert len(set(q.options)) == 4
        chosen = q.options[data.LETTERS.index(q.answer)]
        where = ep.sim.body_xyz[t, ep.sim.bodies.index(ep.sim.target)]
        if q.meta["question"] == "object":
            assert chosen == data.fmt_xyz(where) and ep.sim.target_name in q.prompt
            xyz = np.array([json.loads(o) for o in q.options])
            assert min(np.linalg.norm(a - b) for i, a in enumerate(xyz) for b in xyz[i + 1:]) >= data.MATCHED_GAP - 1e-3
        elif q.meta["question"] == "height":
            assert chosen == f"{ep.positions[t, 2] - data.TABLE_Z:.3f} m"
        else:                               # a quarter of the table: the four REGIONS, in a random order
            xyz = ep.positions[t] if q.meta["question"] == "gripper_region" else where
            assert chosen == data.table_region(xyz) and sorted(q.options) == sorted(data.REGIONS)
    orders = Counter(tuple(q.options) for q in qs if q.meta["question"].endswith("region"))
    assert len(orders) == 24, "region options in every order: their order must not point at the answer"


def test_a_lookup_asks_a_scene_question_back_by_one_of_its_options(episodes):
    """data.lookup_samples: the scene question's own prompt, image and options, its question line replaced by
    'Which option reads "X"?'; the letter of X is the answer, balanced, and unrelated to the scene answer."""
    scene = data.scene_samples(episodes[::4], seed=4)
    qs = data.lookup_samples(scene, seed=4)
    assert len(qs) == len(scene) > 100 and {q.kind for q in qs} == {data.LOOKUP}
    robot_r1 = list(data.QUESTIONS.values()) + ["## Current Robot State"]
    assert not [q.id for q in qs if any(text in q.prompt for text in robot_r1)]
    for q, s in zip(qs, scene):
        asked = q.options[data.LETTERS.index(q.answer)]
        assert q.options == s.options and q.image is s.image and q.target == asked
        line = f'Which option reads "{asked}"?\n'
        assert q.prompt.replace(line, "") == s.prompt.replace(s.prompt.split("## Choice Question\n")[1].split("\n")[0] + "\n", "")
    counts = Counter(q.answer for q in qs)
    assert max(counts.values()) - min(counts.values()) <= 1
    same = np.mean([q.answer == s.answer for q, s in zip(qs, scene)])
    assert 0.15 < same < 0.35, same                                   # the scene's answer does not tell it
    built = data.make_questions(episodes[::4], ("lookup",), seed=4)
    assert [q.prompt for q in built] == [q.prompt for q in qs]
    with pytest.raises(ValueError, match="multiple-choice"):
        data.lookup_samples(data.build_samples(episodes[:1], kinds=("waypoint_open",)))


def test_probe_answers_are_in_the_image_alone():
    qs = data.probe_samples(40, seed=2)
    assert {q.prompt.split("<image>")[1] for q in qs} == {qs[0].prompt.split("<image>")[1]}    # one text for all
    assert Counter(q.answer for q in qs).keys() == set("ABCD")
    for q in qs[:8]:                 # the mat's colour is the most common colour in the picture's lower half
        px = np.asarray(q.image)[150:].reshape(-1, 3).astype(int)
        rgb = np.array(data.COLOURS[q.target])
        assert (np.abs(px - rgb).sum(1) < 90).mean() > 0.2


def test_the_shuffled_probe_is_the_same_question_with_its_letters_to_find():
    fixed, shuffled = data.probe_samples(400, seed=2), data.probe_samples(400, seed=2, shuffled=True)
    assert {q.kind for q in shuffled} == {"probe_shuffled"} and {q.task for q in shuffled} == {"probe"}
    for f, s in zip(fixed, shuffled):             # the same picture and colour, the options reordered
        assert np.array_equal(np.asarray(f.image), np.asarray(s.image)) and f.target == s.target
        assert sorted(s.options) == sorted(data.PROBE_COLOURS) and s.options[data.LETTERS.index(s.answer)] == s.target
        assert f"[[{s.answer}]] {s.target}\n" in s.prompt
    # a colour no longer names its letter: each colour's answers spread over the four letters
    for colour in data.PROBE_COLOURS:
        letters = Counter(q.answer for q in shuffled if q.target == colour)
        assert len(letters) == 4 and max(letters.values()) < 0.4 * sum(letters.values()), (colour, letters)
    both = data.make_questions([], ("probe", "probe_shuffled"))
    assert len(both) == 1024 and len({q.id for q in both}) == 1024


# --- the simulator ------------------------------------------------------------------------------------
def test_every_distinct_image_gets_its_own_file(tmp_path):
    rng = np.random.default_rng(0)
    qs = [data.Sample(f"probe/{i}", "probe", "state", Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
                      "<image>", ["a", "b", "c", "d"], "A", "a") for i in range(5)]
    data.save_samples(qs, tmp_path, progress=False)
    back = data.load_samples(tmp_path)
    assert len({s.image for s in back}) == 5
    for a, b in zip(back, qs):
        assert np.array_equal(np.asarray(a.load_image()), np.asarray(b.image))


def test_projected_gripper_lands_between_the_rendered_fingers():
    rng = np.random.default_rng(0)
    for _ in range(8):
        p = rng.uniform([0.0, -0.25, 0.8], [0.45, 0.25, 1.15])     # where the expert's hand goes
        away = np.array([0.5, 0.3 if p[1] < 0 else -0.3, 1.2])
        with_g = np.asarray(data.render([], p, True)).astype(int)
        without = np.asarray(data.render([], away, True)).astype(int)
        changed = np.abs(with_g - without).sum(-1) > 30
        (u, v), _ = data.FRONT_CAMERA.project(p)
        u, v = int(round(u)), int(round(v))
        row = changed[v - 1:v + 2, :].any(0)
        assert row[max(0, u - 15):u].any() and row[u + 1:u + 16].any(), "fingers on both sides of the TCP"
        assert changed[max(0, v - 30):v + 3, u - 3:u + 4].any(), "the hand right above the TCP"


def test_camera_axes_follow_rlbench_front_view():
    (u0, v0), _ = data.FRONT_CAMERA.project([0.25, 0.0, 0.9])
    (u1, _), _ = data.FRONT_CAMERA.project([0.25, 0.1, 0.9])      # +Y: right in the image
    (_, v2), _ = data.FRONT_CAMERA.project([0.25, 0.0, 1.0])      # +Z: up in the image
    (_, v3), d3 = data.FRONT_CAMERA.project([0.45, 0.0, 0.76])    # +X: toward the camera, lower
    _, d4 = data.FRONT_CAMERA.project([0.05, 0.0, 0.76])
    assert u1 > u0 and v2 < v0 and d3 < d4


def test_grasped_objects_move_with_the_gripper_and_drop_on_release():
    scene, _ = data.TASKS["pick_up_cup"].reset(np.random.default_rng(1))
    cup = scene.bodies["cup_0"]
    for kf in data.TASKS["pick_up_cup"].plan(scene):
        scene.move_to(kf.xyz)
        scene.set_gripper(kf.gripper_open)
    assert scene.held == "cup_0" and cup.xyz[2] > data.TABLE_Z + 0.1
    scene.set_gripper(True)
    assert scene.held is None and cup.xyz[2] == pytest.approx(data.TABLE_Z)


# --- RLBench's layout ---------------------------------------------------------------------------------
def write_rlbench(root, task="pick_up_cup", n_eps=2, T=30, nan_frame=None, drop_png=None):
    """Write RLBench's saved layout, pickled with RLBench's real class paths."""
    demo_mod, obs_mod = types.ModuleType("rlbench.demo"), types.ModuleType("rlbench.backend.observation")
    Demo = type("Demo", (), {"__module__": "rlbench.demo"})
    Observation = type("Observation", (), {"__module__": "rlbench.backend.observation"})
    demo_mod.Demo, obs_mod.Observation = Demo, Observation
    saved = {k: sys.modules.get(k) for k in ("rlbench", "rlbench.demo", "rlbench.backend", "rlbench.backend.observation")}
    sys.modules.update({"rlbench": types.ModuleType("rlbench"), "rlbench.demo": demo_mod,
                        "rlbench.backend": types.ModuleType("rlbench.backend"), "rlbench.backend.observation": obs_mod})
    rng = np.random.default_rng(0)
    expected = []
    try:
        var = root / task / "variation0"
        for m in range(n_eps):
            d = var / "episodes" / f"episode{m}"
            (d / "front_rgb").mkdir(parents=True)
            grip = np.ones(T)
            grip[12:] = 0.0
            vel = rng.uniform(0.3, 1.0, (T, 7))
            vel[6] = 0.0
            observations = []
            for i in range(T):
                o = Observation()
                o.gripper_pose = np.r_[rng.uniform(0, 1, 3), 0, 0, 0, 1]
                o.gripper_open, o.joint_velocities, o.front_rgb, o.misc = grip[i], vel[i], None, {}
                observations.append(o)
            if nan_frame is not None:
                observations[nan_frame].gripper_pose[1] = np.nan
            demo = Demo()
            demo._observations, demo.random_seed = observations, None
            with open(d / "low_dim_obs.pkl", "wb") as f:
                pickle.dump(demo, f)
            for i in range(T):
                if i != drop_png:
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / "front_rgb" / f"{i}.png")
            expected.append([6, 12, T - 1])
        with open(var / "variation_descriptions.pkl", "wb") as f:
            pickle.dump(["pick up the red cup", "lift the red cup"], f)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return expected


def test_word_questions_are_the_letters_lookup_alone_in_text(tmp_path):
    """data.word_samples: no image, no header; the question names one of four different words and its letter
    is the answer, balanced; each word one token of our BPE both in its option line and in an option thought
    (grpo.rationale), so finding the letter is matching one token; written and read back without an image."""
    import grpo
    qs = data.word_samples(400, seed=2)
    assert {q.kind for q in qs} == {data.WORDS} and all(q.image is None for q in qs)
    assert [q.prompt for q in data.word_samples(400, seed=2)] == [q.prompt for q in qs]    # deterministic
    for q in qs:
        asked = q.options[data.LETTERS.index(q.answer)]
        assert len(set(q.options)) == 4 and q.target == asked and "<image>" not in q.prompt
        assert q.prompt == f"Which option reads: {asked}\n" + "".join(
            f"[[{L}]] {o}\n" for L, o in zip(data.LETTERS, q.options))
    counts = Counter(q.answer for q in qs)
    assert max(counts.values()) - min(counts.values()) <= 1
    tok = M.bpe_tokenizer()
    pieces = lambda text: tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    for w in data.WORD_LIST:
        line = pieces(f"[[A]] {w}\n")[1:]                   # after '[[A]]': ['Ġ', w, 'Ċ'] or ['Ġ' + w, 'Ċ']
        thought = pieces(grpo.ANSWER.format(w + "\n", "[[A]]"))[1:1 + len(line)]      # after '<think>'
        assert line == thought and "".join(line) == f"Ġ{w}Ċ" and len(line) <= 3 and w in line[-2], (w, line, thought)
    assert len(data.make_questions([], ("words",))) == data.WORD_QUESTIONS
    data.save_samples(qs[:5], tmp_path, progress=False)
    back = data.load_samples(tmp_path)
    assert [(b.prompt, b.answer, b.image) for b in back] == [(q.prompt, q.answer, None) for q in qs[:5]]
    assert json.loads((tmp_path / "manifest.json").read_text())["images"] == 0
    assert data.contact_sheet(back, n=2).size[0] > 1000


def test_rlbench_layout_loads_without_rlbench_and_yields_the_right_keypoints(tmp_path):
    expected = write_rlbench(tmp_path)
    assert "rlbench" not in sys.modules
    eps = data.load_rlbench(tmp_path)
    assert len(eps) == 2 and eps[0].instruction == "pick up the red cup" and eps[0].task == "pick_up_cup"
    for ep, kps in zip(eps, expected):
        assert data.keypoint_discovery(ep.gripper_open, ep.joint_velocities) == kps
        assert ep.positions.shape == (30, 3) and ep.images[3].size == (32, 32)
    qs = data.build_samples(eps)
    assert len(qs) == 2 * 3 * 3                      # frames 0, 10, 20 (< last keypoint 29) x 3 kinds


@pytest.mark.parametrize("breakage, message", [
    ("nan", r"episode0/low_dim_obs\.pkl: frame 4: gripper_pose is not finite"),
    ("png", r"front_rgb: 1 frame image\(s\) missing, first 7\.png"),
    ("corrupt_png", r"episode0/front_rgb/3\.png: not a readable image"),
    ("pickle", r"episode0/low_dim_obs\.pkl: not a readable RLBench demo pickle"),
    ("empty", r"episode0/low_dim_obs\.pkl: the demo has no frames"),
])
def test_rlbench_bad_input_names_the_file_and_frame(tmp_path, breakage, message):
    write_rlbench(tmp_path, nan_frame=4 if breakage == "nan" else None, drop_png=7 if breakage == "png" else None)
    d = tmp_path / "pick_up_cup" / "variation0" / "episodes" / "episode0"
    if breakage == "corrupt_png":
        (d / "front_rgb" / "3.png").write_bytes(b"not a png")
    if breakage == "pickle":
        (d / "low_dim_obs.pkl").write_bytes(b"\x80\x04garbage")
    if breakage == "empty":
        with open(d / "low_dim_obs.pkl", "wb") as f:
            pickle.dump([], f)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        eps = data.load_rlbench(tmp_path)
        eps[0].images[3]


def test_bad_dataset_records_name_the_file_line_and_field(tmp_path, episodes):
    data.save_samples(data.build_samples(episodes[:1]), tmp_path, progress=False)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    del rec["answer"]
    lines[1] = json.dumps(rec)
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape("samples.jsonl:2: field 'answer' missing")):
        data.load_samples(tmp_path)
    lines[1] = "{broken"
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: not valid JSON"):
        data.load_samples(tmp_path)
    (tmp_path / "samples.jsonl").write_text(lines[0] + "\n")
    (tmp_path / json.loads(lines[0])["image"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"samples\.jsonl:1: image .* does not exist"):
        data.load_samples(tmp_path)


def test_rlbench_pickles_load_only_what_a_dataset_holds(tmp_path):
    """A pickle that would run a command when loaded (it names os.system) is refused by name, and the
    command never runs; the same refusal guards the task descriptions file."""
    write_rlbench(tmp_path, n_eps=1)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    d = tmp_path / "pick_up_cup" / "variation0"
    for victim in (d / "episodes" / "episode0" / "low_dim_obs.pkl", d / "variation_descriptions.pkl"):
        original = victim.read_bytes()
        victim.write_bytes(pickle.dumps(Payload()))
        with pytest.raises(ValueError, match=r"refusing to load (posix|os|nt)\.system"):
            data.load_rlbench(tmp_path)
        assert not marker.exists(), "the payload ran"
        victim.write_bytes(original)
    assert len(data.load_rlbench(tmp_path)) == 1                 # numpy arrays and RLBench records still load


def test_table_regions_are_the_quarters_the_camera_sees():
    """front = toward the camera (lower in the image), right = the image's right; a point within
    MATCHED_GAP of a dividing line is not asked about."""
    def centre(x, y):          # (row, column) of a magenta box's pixels
        box = data._box("b", [x, y, data.TABLE_Z], (0.06, 0.06, 0.06), (255, 0, 255))
        im = np.asarray(data.render([box], np.array([0.3, 0.0, 1.2]), True)).astype(int)
        rows, cols = np.nonzero((im[..., 0] > 200) & (im[..., 1] < 60) & (im[..., 2] > 200))
        return rows.mean(), cols.mean()
    seen = {data.table_region([x, y, data.TABLE_Z]): centre(x, y) for x in (0.05, 0.42) for y in (-0.25, 0.25)}
    assert set(seen) == set(data.REGIONS)
    for side in ("left", "right"):
        assert seen[f"front {side}"][0] > seen[f"back {side}"][0] + 20           # front: lower in the image
    for depth in ("front", "back"):
        assert seen[f"{depth} right"][1] > seen[f"{depth} left"][1] + 60         # right: the image's right
    assert data.table_region([*data.TABLE_MIDDLE + [0.01, 0.2], data.TABLE_Z]) is None
