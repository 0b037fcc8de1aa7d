"""Co-training readers on hand-made inputs: frame sampling, exact dialogue text and labels, data-config sampling."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import write_mp4
from pipeline.config import MMC4ShardConfig, ScanQAShardConfig, VideoQAShardConfig
from pipeline.convo_reader import (DatasetSpec, load_data_config, parse_strategy, read_conversations, read_mmc4,
                                   select)
from pipeline.cotrain import build_mmc4, build_scanqa, build_videoqa
from pipeline.cotrain_dialogue import DialogueError, mmc4_turns, scene_qa_turns, video_qa_turns
from pipeline.reader import AnnotationError
from pipeline.tokens import IGNORE_INDEX, tokenize_dialogue
from pipeline.video_frames import open_video, scene_frame_plan, video_frame_plan

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def rendered(turns) -> str:
    roles = {"human": "user", "gpt": "assistant"}
    return SYSTEM + "".join(f"<|im_start|>{roles[w]}\n{t}<|im_end|>\n" for w, t in turns)


def decode(tok, ids) -> str:
    image = tok.convert_tokens_to_ids("<image>")
    return tok.decode([i if i >= 0 else image for i in ids.tolist()])


def check_sample(sample, tok, token_ids, expected_turns):
    """Exact text, and labels exactly the reference rule over those turns (assistant turns labelled)."""
    assert decode(tok, sample.input_ids) == rendered(expected_turns)
    roles = {"human": "user", "gpt": "assistant"}
    want_ids, want_labels = tokenize_dialogue(tok, token_ids, [(roles[w], t) for w, t in expected_turns])
    assert np.array_equal(sample.input_ids, want_ids) and np.array_equal(sample.labels, want_labels)
    labelled = tok.decode([i for i in sample.labels.tolist() if i != IGNORE_INDEX])
    answers = "".join(f"<|im_start|>assistant\n{t}<|im_end|>\n" for w, t in expected_turns if w == "gpt")
    # the answers in order, with only the always-labelled ids (newline, im_start/im_end) of other turns around them
    assert "".join(c for c in labelled if c != "\n").replace("<|im_start|><|im_end|>", "") == answers.replace("\n", "")


# ---------------------------------------------------------------- frame sampling


def test_video_frame_plan_fps_then_upbound_then_force():
    # 10 fps, 45 frames, 1 frame a second: every 10th frame, stamped i / 10
    assert video_frame_plan(45, 10.0, 32, 1, False) == ([0, 10, 20, 30, 40], [0.0, 1.0, 2.0, 3.0, 4.0])
    # more than the bound: linspace(0, 44, 4) as int, stamped i / fps
    assert video_frame_plan(45, 10.0, 4, 1, False) == ([0, 14, 29, 44], [0.0, 1.4, 2.9, 4.4])
    # force_sample: linspace even when fewer
    idx, _ = video_frame_plan(45, 10.0, 8, 1, True)
    assert idx == np.linspace(0, 44, 8, dtype=int).tolist() and len(idx) == 8
    # no bound, 2 frames a second: step round(10 / 2) = 5
    assert video_frame_plan(45, 10.0, 0, 2, False)[0] == list(range(0, 45, 5))
    # 29.97 fps: step round(29.97) = 30, stamps i / 30 as the reference
    assert video_frame_plan(100, 29.97, 32, 1, False) == ([0, 30, 60, 90], [0.0, 1.0, 2.0, 3.0])


def test_read_video_decodes_the_planned_frames_with_decord(tmp_path):
    write_mp4(tmp_path / "v.mp4", 45, 10)
    clip = open_video(str(tmp_path / "v.mp4"), 4, 1, False)
    assert clip.indices == [0, 14, 29, 44] and clip.seconds == pytest.approx(4.5)
    frames = clip.decode()
    assert frames.shape == (4, 48, 64, 3)
    assert np.allclose(frames.reshape(4, -1).mean(1), [0, 70, 145, 220], atol=8)  # grey level 5 * index


def test_scene_frame_plan_linspace_option_spreads_over_the_scene():
    files = [f"{i:05d}.jpg" for i in range(25)][::-1]  # listed out of order
    assert scene_frame_plan(files, 10, 5, "linspace") == ["00000.jpg", "00000.jpg", "00010.jpg", "00010.jpg",
                                                          "00020.jpg"]
    many = [f"{i}.jpg" for i in range(200)]  # unpadded names sort by number, not text
    assert scene_frame_plan(many, 10, 4, "linspace") == ["0.jpg", "60.jpg", "120.jpg", "190.jpg"]


def test_scene_frame_plan_as_the_reference():
    """kept = every 10th; more than N kept: kept[i * (len // N)] (a prefix when not a multiple); fewer: cycle."""
    many = [f"{i}.jpg" for i in range(200)]  # 20 kept: 0, 10, ..., 190; N = 6: step 20 // 6 = 3
    assert scene_frame_plan(many, 10, 6) == ["0.jpg", "30.jpg", "60.jpg", "90.jpg", "120.jpg", "150.jpg"]
    # the last kept frames (160..190) are never seen: the reference's prefix, worked out from its indexing
    assert scene_frame_plan(many, 10, 4) == ["0.jpg", "50.jpg", "100.jpg", "150.jpg"]
    few = [f"{i:05d}.jpg" for i in range(25)][::-1]  # 3 kept: 0, 10, 20, cycled to 7
    assert scene_frame_plan(few, 10, 7) == ["00000.jpg", "00010.jpg", "00020.jpg"] * 2 + ["00000.jpg"]
    exact = [f"{i}.jpg" for i in range(40)]  # 4 kept, N = 4: each once
    assert scene_frame_plan(exact, 10, 4) == ["0.jpg", "10.jpg", "20.jpg", "30.jpg"]


# ---------------------------------------------------------------- exact samples per format


def videoqa_record(tmp_path, conversations):
    (tmp_path / "qa.json").write_text(json.dumps([{"id": "v1", "video": "clip.mp4", "data_source": "src",
                                                   "conversations": conversations}]))
    write_mp4(tmp_path / "videos" / "src" / "clip.mp4", 45, 10)
    records, rejects, total, _ = read_conversations(tmp_path / "qa.json")
    assert not rejects and total == 1
    return records[0]


CONVERSATION = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A grey screen."},
                {"from": "human", "value": "Does it change?"}, {"from": "gpt", "value": "It gets brighter."}]


def test_videoqa_sample_with_time_instruction_is_exact(tmp_path, tok, token_ids):
    record = videoqa_record(tmp_path, CONVERSATION)
    cfg = VideoQAShardConfig(image_size=32, add_time_instruction=True)
    (sample,), rejects = build_videoqa(record, tmp_path / "videos", cfg, tok, token_ids)
    assert not rejects
    time_text = ("The video lasts for 4.50 seconds, and 5 frames are uniformly sampled from it. These frames are "
                 "located at 0.00s,1.00s,2.00s,3.00s,4.00s.Please answer the following questions related to this video.")
    first = "<image>" * 5 + "\n" + time_text + "\n" + "\nWhat is shown?"
    check_sample(sample, tok, token_ids, [("human", first)] + [(t["from"], t["value"]) for t in CONVERSATION[1:]])
    assert sample.meta["frame_times"] == [0.0, 1.0, 2.0, 3.0, 4.0] and sample.meta["frame_indices"] == [0, 10, 20, 30, 40]
    assert sample.meta["n_frames"] == len(sample.frames) == 5 and sample.meta["video"] == "src/clip.mp4"
    assert sample.meta["task"] == "videoqa" and sample.meta["n_history"] == 0


def test_videoqa_without_time_instruction_expands_the_image_token(tmp_path, tok, token_ids):
    record = videoqa_record(tmp_path, CONVERSATION)
    cfg = VideoQAShardConfig(image_size=32, frames_upbound=3)
    (sample,), _ = build_videoqa(record, tmp_path / "videos", cfg, tok, token_ids)
    first = "<image>" * 3 + "\nWhat is shown?"
    check_sample(sample, tok, token_ids, [("human", first)] + [(t["from"], t["value"]) for t in CONVERSATION[1:]])
    assert sample.meta["frame_indices"] == [0, 22, 44]


def test_scanqa_sample_is_exact(tmp_path, tok, token_ids):
    scene = tmp_path / "scenes" / "posed_images" / "scene0001_00"
    scene.mkdir(parents=True)
    for i in range(25):
        cv2.imwrite(str(scene / f"{i:05d}.jpg"), np.full((30, 40, 3), 9 * i, np.uint8))
        (scene / f"{i:05d}.txt").write_text("pose")
    conv = [{"from": "human", "value": "<video>\nWhere is the chair?"}, {"from": "gpt", "value": "By the desk."}]
    (tmp_path / "scanqa.json").write_text(json.dumps([{"id": "q0", "video": "posed_images/scene0001_00",
                                                       "conversations": conv}]))
    (record,), _, _, _ = read_conversations(tmp_path / "scanqa.json")
    (sample,), rejects = build_scanqa(record, tmp_path / "scenes", ScanQAShardConfig(image_size=32, frames_upbound=5),
                                      tok, token_ids)
    check_sample(sample, tok, token_ids, [("human", "<image>" * 5 + "\nWhere is the chair?"), ("gpt", "By the desk.")])
    assert sample.meta["frame_files"] == ["00000.jpg", "00010.jpg", "00020.jpg", "00000.jpg", "00010.jpg"]
    assert sample.frames[0] == sample.frames[3] != sample.frames[1]
    (sample,), _ = build_scanqa(record, tmp_path / "scenes", ScanQAShardConfig(image_size=32, frames_upbound=5,
                                                                               frame_sampling="linspace"), tok, token_ids)
    assert sample.meta["frame_files"] == ["00000.jpg", "00000.jpg", "00010.jpg", "00010.jpg", "00020.jpg"]


def mmc4_doc(tmp_path):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for k in range(8):
        cv2.imwrite(str(images / f"im{k}.jpg"), np.full((20, 20, 3), 30 * k, np.uint8))
    text = ["Intro one.", "Intro two.", "First pic.", "More <image> text.", "Second pic.", "End."]
    # listed out of order; eight images, five on sentence 5, the last listed on sentence 0
    info = [{"image_name": "im1.jpg", "matched_text_index": 4}, {"image_name": "im0.jpg", "matched_text_index": 2}] + \
        [{"image_name": f"im{k}.jpg", "matched_text_index": 5} for k in range(2, 7)] + \
        [{"image_name": "im7.jpg", "matched_text_index": 0}]
    (tmp_path / "docs.jsonl").write_text(json.dumps({"url": "u", "text_list": text, "image_info": info,
                                                     "similarity_matrix": []}) + "\n")
    (doc,), rejects = read_mmc4(tmp_path / "docs.jsonl")
    return doc, images


def test_mmc4_sample_is_exact_as_the_reference(tmp_path, tok, token_ids):
    """The first 6 images as listed (im1, im0, im2..im5; not im7 on sentence 0), then by sentence; glued with ""."""
    doc, images = mmc4_doc(tmp_path)
    (sample,), rejects = build_mmc4(doc, images, MMC4ShardConfig(image_size=32), tok, token_ids)
    want = [("human", "Intro one.Intro two.<image>."), ("gpt", "First pic.More <IMAGE> text."),
            ("human", "<image>."), ("gpt", "Second pic."),
            ("human", "<image>."), ("gpt", ""), ("human", "<image>."), ("gpt", ""),
            ("human", "<image>."), ("gpt", ""), ("human", "<image>."), ("gpt", "End.")]
    check_sample(sample, tok, token_ids, want)
    assert sample.meta["images"] == ["im0.jpg", "im1.jpg", "im2.jpg", "im3.jpg", "im4.jpg", "im5.jpg"]
    assert len(sample.frames) == 6


def test_mmc4_options_sentence_order_and_spaces(tmp_path, tok, token_ids):
    doc, images = mmc4_doc(tmp_path)
    cfg = MMC4ShardConfig(image_size=32, image_choice="sentence_order", sentence_join=" ")
    (sample,), _ = build_mmc4(doc, images, cfg, tok, token_ids)
    assert sample.meta["images"] == ["im7.jpg", "im0.jpg", "im1.jpg", "im2.jpg", "im3.jpg", "im4.jpg"]
    assert sample.meta["turns"][:4] == [["human", "<image>."], ["gpt", "Intro one. Intro two."],
                                        ["human", "<image>."], ["gpt", "First pic. More <IMAGE> text."]]


def test_mmc4_reference_choice_keeps_the_listed_first_six(tmp_path):
    from pipeline.cotrain_dialogue import mmc4_images
    listed = [("late.jpg", 9), ("a.jpg", 3), ("b.jpg", 1), ("c.jpg", 4), ("d.jpg", 2), ("e.jpg", 8), ("early.jpg", 0)]
    assert [n for n, _ in mmc4_images(listed, 6)] == ["b.jpg", "d.jpg", "a.jpg", "c.jpg", "e.jpg", "late.jpg"]
    assert [n for n, _ in mmc4_images(listed, 6, "sentence_order")] == ["early.jpg", "b.jpg", "d.jpg", "a.jpg",
                                                                        "c.jpg", "e.jpg"]


def test_a_single_image_inside_the_first_turn_moves_to_the_front():
    turns = [("human", "What happens in this video? <image> Answer briefly."), ("gpt", "A ball rolls.")]
    assert video_qa_turns(turns, 2)[0] == ("human", "<image><image>\nWhat happens in this video?  Answer briefly.")
    assert video_qa_turns(turns, 2, image_to_front=False)[0] == (
        "human", "What happens in this video? <image><image> Answer briefly.")
    at_front = [("human", "<image>\nQ?"), ("gpt", "A.")]
    assert video_qa_turns(at_front, 2)[0] == ("human", "<image><image>\nQ?")


def test_videoqa_sample_moves_the_image_and_drops_the_noisy_marker(tmp_path, tok, token_ids):
    conv = [{"from": "human", "value": "QA_GT_caption_based_noisy Describe <image> it."},
            {"from": "gpt", "value": "QA_GT_caption_based_noisyA grey screen."}]
    record = videoqa_record(tmp_path, conv)
    (sample,), _ = build_videoqa(record, tmp_path / "videos", VideoQAShardConfig(image_size=32, frames_upbound=2),
                                 tok, token_ids)
    # moved first ("<image>\n" + the rest stripped), then the marker deleted, as preprocess_multimodal
    check_sample(sample, tok, token_ids, [("human", "<image><image>\n Describe  it."), ("gpt", "A grey screen.")])
    cfg = VideoQAShardConfig(image_size=32, frames_upbound=2, image_to_front=False, remove_noisy_marker=False)
    (sample,), _ = build_videoqa(record, tmp_path / "videos", cfg, tok, token_ids)
    assert sample.meta["turns"][0][1] == "QA_GT_caption_based_noisy Describe <image><image> it."


def test_scanqa_sample_drops_the_noisy_marker(tmp_path, tok, token_ids):
    scene = tmp_path / "scenes" / "s0"
    scene.mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(scene / f"{i}.jpg"), np.full((30, 40, 3), 50 * i, np.uint8))
    conv = [{"from": "human", "value": "<video>\nQA_GT_caption_based_noisyColour?"}, {"from": "gpt", "value": "Red."}]
    (tmp_path / "scanqa.json").write_text(json.dumps([{"id": "q", "video": "s0", "conversations": conv}]))
    (record,), _, _, _ = read_conversations(tmp_path / "scanqa.json")
    (sample,), _ = build_scanqa(record, tmp_path / "scenes", ScanQAShardConfig(image_size=32, frames_upbound=2,
                                                                               frame_stride=1), tok, token_ids)
    check_sample(sample, tok, token_ids, [("human", "<image><image>\nColour?"), ("gpt", "Red.")])


def test_media_token_rules():
    turns = [("human", "<image>\nQ?"), ("gpt", "A."), ("human", "<image> again?"), ("gpt", "B.")]
    with pytest.raises(DialogueError, match="outside the first human turn"):
        video_qa_turns(turns, 3)
    assert video_qa_turns([("human", "Q?"), ("gpt", "A.")], 2)[0] == ("human", "<image><image>\nQ?")
    with pytest.raises(DialogueError, match="0 <video> tokens"):
        scene_qa_turns([("human", "Q?"), ("gpt", "A.")], 2)
    assert mmc4_turns(["Only."], [("a.jpg", 0)]) == [("human", "<image>."), ("gpt", "Only.")]


# ---------------------------------------------------------------- sampling


def entries(n):
    return [{"id": i, "video": f"{'cooking' if i % 2 else 'sports'}/v{i}.mp4"} for i in range(n)]


@pytest.mark.parametrize("strategy, want", [
    ("all", list(range(10))), ("first:3", [0, 1, 2]), ("end:3", [7, 8, 9]), ("first:25%", [0, 1, 2]),
    ("end:10%", [9]), ("first:100%", list(range(10))), ("end:50", list(range(10))),
])
def test_sampling_strategies(strategy, want):
    assert select(entries(10), DatasetSpec("a.json", strategy), seed=0) == want


def test_random_sampling_is_seeded_and_keeps_file_order():
    a = select(entries(50), DatasetSpec("a.json", "random:10"), seed=0)
    assert a == select(entries(50), DatasetSpec("a.json", "random:10"), seed=0) and a == sorted(a) and len(a) == 10
    assert a != select(entries(50), DatasetSpec("a.json", "random:10"), seed=1)
    assert len(select(entries(50), DatasetSpec("a.json", "random:30%"), seed=0)) == 15


def test_strategy_then_subset_keywords_case_insensitive():
    """As the reference: first:N takes the file's first N entries, then the lower-cased keywords filter them."""
    got = select(entries(10), DatasetSpec("a.json", "first:4", "cooking, nothing"), seed=0)
    assert got == [1, 3]
    assert select(entries(10), DatasetSpec("a.json", "first:20%", "COOKING"), seed=0) == [1]  # 20% of all 10
    assert select(entries(10), DatasetSpec("a.json", "end:3", "sports"), seed=0) == [8]


def test_reference_data_config_keeps_nextqa_and_charades():
    """The reference's config/co-training_data.yaml subset against LLaVA-Video-178K's folder names."""
    videos = ["academic_source/NextQA/1.mp4", "academic_source/Charades/2.mp4", "academic_source/activitynet/3.mp4",
              "academic_source/ego4d/4.mp4", "liwei_youtube_videos/5.mp4", "academic_source/youcook2/6.mp4"]
    listed = [{"id": i, "video": v} for i, v in enumerate(videos)]
    spec = DatasetSpec("a.json", "all", "nextqa,activitynet,ego4d,charades")
    assert select(listed, spec, seed=0) == [0, 1, 2, 3]
    from pipeline.convo_reader import unmatched_subset_words
    assert unmatched_subset_words(listed, spec) == []
    assert unmatched_subset_words(listed, DatasetSpec("a.json", "all", "nextqa,perceptiontest")) == ["perceptiontest"]


@pytest.mark.parametrize("bad", ["some", "first", "first:0", "first:x", "random:0%", "end:101%", "middle:3"])
def test_bad_strategies_are_refused(bad):
    with pytest.raises(AnnotationError, match="sampling_strategy"):
        parse_strategy(bad)


def test_data_config_paths_are_relative_to_the_yaml(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mix.yaml").write_text(
        "datasets:\n  - json_path: ../a.json\n    sampling_strategy: first:2\n    sampling_subset: cooking\n")
    (spec,) = load_data_config(tmp_path / "cfg" / "mix.yaml")
    assert Path(spec.json_path).resolve() == (tmp_path / "a.json").resolve()
    assert (spec.sampling_strategy, spec.sampling_subset) == ("first:2", "cooking")
    (tmp_path / "bad.yaml").write_text("datasets:\n  - json_path: a.json\n    sampling: all\n")
    with pytest.raises(AnnotationError, match="json_path"):
        load_data_config(tmp_path / "bad.yaml")
