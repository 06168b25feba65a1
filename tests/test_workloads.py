"""Workloads: the MMSpec jsonl loader, limit/topic selection, the synthetic suite, the registry."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mmspec.workloads import (
    TOPICS,
    Sample,
    SampleError,
    WorkloadError,
    WorkloadSpec,
    builtin_workloads,
    load_mmspec,
    load_workload,
    synthetic_references,
    synthetic_suite,
)
from mmspec.workloads.synthetic import Scene, scene_split, synthetic_scenes

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data" / "mmspec").resolve()
TEST_SPLIT = DATA / "test"
TESTMINI_SPLIT = DATA / "testmini"

needs_test = pytest.mark.skipif(
    not (TEST_SPLIT / "mmspec.jsonl").is_file(),
    reason=f"MMSpec test split not found at {TEST_SPLIT} (shared data copy absent)",
)
needs_testmini = pytest.mark.skipif(
    not (TESTMINI_SPLIT / "mmspec.jsonl").is_file(),
    reason=f"MMSpec testmini split not found at {TESTMINI_SPLIT} (shared data copy absent)",
)


def _record(i: int, topic: str = "general vqa", **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": f"s{i:03d}",
        "image": f"s{i:03d}.png",
        "turns": [f"question {i}?"],
        "category": "default",
        "topic": topic,
    }
    rec.update(over)
    return rec


def _write_split(
    root: Path,
    records: list[Any],
    *,
    images: bool = True,
    raw_lines: dict[int, str] | None = None,
) -> Path:
    """A split folder with the given records; a tiny PNG per record unless images=False."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    lines = [json.dumps(r) for r in records]
    for index, text in (raw_lines or {}).items():
        lines.insert(index, text)
    (root / "mmspec.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if images:
        png = synthetic_suite(per_topic=1)[0].image_bytes
        assert png is not None
        for r in records:
            if isinstance(r, dict) and isinstance(r.get("image"), str):
                (root / "images" / r["image"]).write_bytes(png)
    return root


def _balanced(root: Path, per_topic: int) -> Path:
    records = [
        _record(t * 100 + i, topic=topic)
        for t, topic in enumerate(TOPICS)
        for i in range(per_topic)
    ]
    return _write_split(root, records)


# --- the real MMSpec splits ---------------------------------------------------------------------


@needs_test
def test_real_test_split_loads_all_600() -> None:
    samples = load_mmspec(TEST_SPLIT)
    assert len(samples) == 600
    assert Counter(s.topic for s in samples) == {t: 100 for t in TOPICS}
    assert len({s.id for s in samples}) == 600
    assert all(s.error is None and s.image_bytes for s in samples)
    multi = [s for s in samples if len(s.turns) > 1]
    assert len(multi) == 70
    assert all(s.topic == "multi-turn conversation" and 2 <= len(s.turns) <= 4 for s in multi)
    # a spread over topics decodes (decoding all 600 would make the suite slow)
    for sample in load_mmspec(TEST_SPLIT, limit=12):
        image = sample.load_image()
        assert image is not None and image.mode == "RGB" and min(image.size) > 0


@needs_testmini
def test_real_testmini_split_decodes() -> None:
    samples = load_mmspec(TESTMINI_SPLIT / "mmspec.jsonl")  # the jsonl file works too
    assert len(samples) == 60
    assert Counter(s.topic for s in samples) == {t: 10 for t in TOPICS}
    for sample in samples:
        image = sample.load_image()
        assert image is not None and image.mode == "RGB"
        assert Path(sample.image_name).is_file()


@needs_test
def test_real_limit_and_topics() -> None:
    samples = load_mmspec(TEST_SPLIT, limit=12)
    assert Counter(s.topic for s in samples) == {t: 2 for t in TOPICS}
    picked = load_mmspec(TEST_SPLIT, limit=30, topics=["text vqa", "chart understanding"])
    assert Counter(s.topic for s in picked) == {"text vqa": 15, "chart understanding": 15}
    spec = WorkloadSpec(path=str(TEST_SPLIT), limit=6)
    assert spec.name == "test"
    assert [s.id for s in load_workload(spec)] == [s.id for s in load_mmspec(TEST_SPLIT, 6)]


# --- limit and topic selection ------------------------------------------------------------------


def test_limit_spreads_round_robin_and_keeps_file_order(tmp_path: Path) -> None:
    split = _balanced(tmp_path / "split", per_topic=5)
    all_samples = load_mmspec(split)
    samples = load_mmspec(split, limit=12)
    assert Counter(s.topic for s in samples) == {t: 2 for t in TOPICS}
    order = [s.id for s in all_samples]
    assert [s.id for s in samples] == sorted((s.id for s in samples), key=order.index)
    assert samples == load_mmspec(split, limit=12)  # deterministic
    # an uneven limit gives the extra samples to the topics that come first in the file
    counts = Counter(s.topic for s in load_mmspec(split, limit=8))
    assert [counts[t] for t in TOPICS] == [2, 2, 1, 1, 1, 1]
    assert len(load_mmspec(split, limit=1000)) == 30


def test_limit_fills_from_larger_topics(tmp_path: Path) -> None:
    records = [_record(i, "general vqa") for i in range(1)]
    records += [_record(100 + i, "text vqa") for i in range(6)]
    split = _write_split(tmp_path / "split", records)
    counts = Counter(s.topic for s in load_mmspec(split, limit=5))
    assert counts == {"general vqa": 1, "text vqa": 4}


def test_topics_filter(tmp_path: Path) -> None:
    split = _balanced(tmp_path / "split", per_topic=3)
    samples = load_mmspec(split, topics=("image captioning", "text vqa"))
    assert [s.topic for s in samples] == ["text vqa"] * 3 + ["image captioning"] * 3


@pytest.mark.parametrize("limit", [0, -1, 2.5, True, "3"])
def test_bad_limit(tmp_path: Path, limit: Any) -> None:
    split = _balanced(tmp_path / "split", per_topic=1)
    with pytest.raises(WorkloadError, match="limit"):
        load_mmspec(split, limit=limit)


def test_unknown_topic_lists_allowed(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0, "general vqa"), _record(1, "text vqa")])
    with pytest.raises(WorkloadError, match=r"unknown topic 'genral vqa'.*'general vqa'") as e:
        load_mmspec(split, topics=["genral vqa"])
    assert "mmspec.jsonl" in str(e.value)
    # a real MMSpec topic that the file lacks is named as such
    with pytest.raises(WorkloadError, match=r"'chart understanding'.*no samples"):
        load_mmspec(split, topics=["chart understanding"])
    with pytest.raises(WorkloadError, match="list of topic names"):
        load_mmspec(split, topics="text vqa")


# --- loader errors ------------------------------------------------------------------------------


def test_missing_folder_and_jsonl(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"not found.*nowhere"):
        load_mmspec(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorkloadError, match=r"no mmspec\.jsonl in .*empty"):
        load_mmspec(empty)
    # pointing at the dataset root instead of a split names the splits below it
    _balanced(tmp_path / "root" / "test", per_topic=1)
    with pytest.raises(WorkloadError, match=r"splits found below it: \['test'\]"):
        load_mmspec(tmp_path / "root")


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0), _record(1)], raw_lines={1: "{oops"})
    with pytest.raises(WorkloadError, match=r"mmspec\.jsonl:2: invalid JSON"):
        load_mmspec(split)


def test_blank_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0), _record(0)], raw_lines={1: "", 2: "   "})
    with pytest.raises(WorkloadError, match=r"mmspec\.jsonl:4: duplicate id 's000'.*line 1"):
        load_mmspec(split)


def test_empty_file(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [])
    with pytest.raises(WorkloadError, match="no records"):
        load_mmspec(split)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({k: v for k, v in _record(0).items() if k != "turns"}, "missing field 'turns'"),
        ({k: v for k, v in _record(0).items() if k != "id"}, "missing field 'id'"),
        (_record(0, id=7), "field 'id' must be a string, got int"),
        (_record(0, topic=None), "field 'topic' must be a string, got NoneType"),
        (_record(0, turns="hello?"), "field 'turns' must be a list of strings, got str"),
        (_record(0, turns=["a", 3]), "must be a list of strings, got a list of int, str"),
        (_record(0, turns=[]), "field 'turns' is empty"),
        (_record(0, turns=["first", "  "]), "turn 2 is empty"),
        (_record(0, image=""), "field 'image' is empty"),
        (_record(0, image="../secret.png"), "must be a path inside images/"),
        (_record(0, image="/etc/passwd"), "must be a path inside images/"),
        (["not", "an", "object"], "expected a JSON object, got list"),
        # valid JSON ("\ud800"), not text: the workload hash could not encode it
        (_record(0, id="s\ud800"), "field 'id' holds a lone surrogate '\\ud800' at character 1"),
        (_record(0, turns=["fine", "x \udfff"]), "field 'turns' (turn 2) holds a lone surrogate"),
        (_record(0, image="\udc80.png"), "field 'image' holds a lone surrogate"),
        (_record(0, category="\ud83d"), "field 'category' holds a lone surrogate"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path: Path, record: Any, message: str) -> None:
    split = _write_split(tmp_path / "split", [_record(1), record], images=False)
    with pytest.raises(WorkloadError) as e:
        load_mmspec(split)
    assert f"{split / 'mmspec.jsonl'}:2: " in str(e.value)
    assert message in str(e.value)


def test_duplicate_id(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0), _record(1), _record(0)])
    match = r"mmspec\.jsonl:3: duplicate id 's000' \(first on line 1\)"
    with pytest.raises(WorkloadError, match=match):
        load_mmspec(split)


def test_bad_record_is_caught_even_when_filtered_out(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0), _record(1, "text vqa", turns=[])])
    with pytest.raises(WorkloadError, match=":2: field 'turns' is empty"):
        load_mmspec(split, topics=["general vqa"])


def test_missing_image_becomes_error_sample(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0), _record(1)])
    (split / "images" / "s001.png").unlink()
    good, missing = load_mmspec(split)
    assert good.error is None and good.load_image() is not None
    assert missing.image_bytes is None
    assert missing.error == f"image not found: {split / 'images' / 's001.png'}"
    with pytest.raises(SampleError, match="sample s001: image not found"):
        missing.load_image()


def test_unreadable_image_becomes_error_sample(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0)], images=False)
    (split / "images" / "s000.png").mkdir()  # a directory where the file should be
    (sample,) = load_mmspec(split)
    assert sample.image_bytes is None
    assert sample.error is not None and sample.error.startswith("image unreadable: ")


def test_corrupt_image_raises_on_decode_only(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0)])
    (split / "images" / "s000.png").write_bytes(b"\x89PNG not really")
    (sample,) = load_mmspec(split)  # bytes are read as-is, not decoded by the loader
    assert sample.error is None and sample.image_bytes == b"\x89PNG not really"
    with pytest.raises(SampleError, match=r"sample s000: image .*s000\.png cannot be decoded"):
        sample.load_image()


def test_jsonl_path_uses_its_folder_images(tmp_path: Path) -> None:
    split = _write_split(tmp_path / "split", [_record(0)])
    (sample,) = load_mmspec(str(split / "mmspec.jsonl"))
    assert sample.image_bytes and sample.error is None


# --- synthetic suite ----------------------------------------------------------------------------


def test_synthetic_suite_shape_and_determinism() -> None:
    first = synthetic_suite()
    second = synthetic_suite()
    assert len(first) == 60
    assert first == second  # bytes included: Sample equality compares image_bytes
    assert [s.image_bytes for s in first] == [s.image_bytes for s in second]
    assert Counter(s.topic for s in first) == {t: 10 for t in TOPICS}
    assert len({s.id for s in first}) == 60
    assert first[0].id == "syn_general-vqa_000"
    assert all(s.category == "synthetic" and s.error is None for s in first)
    for sample in first:
        assert all(turn.strip() for turn in sample.turns)
        image = sample.load_image()
        assert image is not None and image.size == (224, 224)
        assert sample.image_bytes is not None and sample.image_bytes.startswith(b"\x89PNG")


def test_synthetic_is_stable_across_processes() -> None:
    """Run hashes include the image bytes: a fresh interpreter (other hash seed) must agree."""
    code = (
        "import hashlib; from mmspec.workloads import synthetic_suite; "
        "print(hashlib.sha256(b''.join(s.image_bytes for s in synthetic_suite(2))).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = hashlib.sha256(b"".join(s.image_bytes or b"" for s in synthetic_suite(2))).hexdigest()
    assert out.stdout.strip() == here


def test_synthetic_topics_content() -> None:
    samples = synthetic_suite(per_topic=6)
    by_topic: dict[str, list[Sample]] = {}
    for s in samples:
        by_topic.setdefault(s.topic, []).append(s)
    assert all(len(s.turns) in (2, 3) for s in by_topic["multi-turn conversation"])
    assert all(s.turns == ("Describe this image in detail.",) for s in by_topic["image captioning"])
    for s in by_topic["complex reasoning pro"]:
        assert all(f"\n{letter}. " in s.turns[0] for letter in "ABCD")
    # single-turn topics ask one question
    for topic in TOPICS[:5]:
        assert all(len(s.turns) == 1 for s in by_topic[topic])


def test_synthetic_seed_and_prefix_stability() -> None:
    small = synthetic_suite(per_topic=2)
    large = synthetic_suite(per_topic=3)
    # a larger suite only adds samples: the first two per topic are unchanged
    assert [s for s in large if not s.id.endswith("_002")] == small
    other = synthetic_suite(per_topic=2, seed=1)
    assert [s.id for s in other] == [s.id for s in small]
    assert [s.image_bytes for s in other] != [s.image_bytes for s in small]


def test_synthetic_references_match_turns() -> None:
    refs = synthetic_references(per_topic=3)
    samples = synthetic_suite(per_topic=3)
    assert set(refs) == {s.id for s in samples}
    for s in samples:
        assert len(refs[s.id]) == len(s.turns)
        assert all(r for r in refs[s.id])
        if s.topic == "complex reasoning pro":
            assert refs[s.id][0].endswith(tuple(f"The answer is {k}." for k in "ABCD"))


def test_synthetic_splits_are_disjoint_and_seeded() -> None:
    eval_scenes = synthetic_scenes(per_topic=150, seed=0)
    train_scenes = synthetic_scenes(per_topic=450, seed=0, split="train")
    more_train = synthetic_scenes(per_topic=150, seed=7, split="train")

    def key(scene: Scene) -> str:
        return repr((scene.topic, scene.picture, scene.turns))

    held_out = {key(s) for _, s in eval_scenes}
    assert not held_out & {key(s) for _, s in train_scenes + more_train}
    assert all(scene_split(s) == "eval" for _, s in eval_scenes)
    assert all(sid.startswith("syn-train_") for sid, _ in train_scenes)
    first_three = [x for x in train_scenes if x[0].endswith(("_000", "_001", "_002"))]
    assert synthetic_scenes(per_topic=3, seed=0, split="train") == first_three
    # the default suite is the eval split
    assert [s.id for s in synthetic_suite(per_topic=2)] == [
        s.id for s in synthetic_suite(per_topic=2, split="eval")
    ]
    with pytest.raises(WorkloadError, match="split"):
        synthetic_suite(per_topic=1, split="test")  # type: ignore[arg-type]


def test_synthetic_grounded_spans() -> None:
    for _, scene in synthetic_scenes(per_topic=40, seed=3):
        assert len(scene.grounded) == len(scene.references)
        for ref, spans in zip(scene.references, scene.grounded, strict=True):
            for start, end in spans:
                assert 0 <= start < end <= len(ref)
                assert ref[start:end].strip() == ref[start:end]
        if scene.topic in ("general vqa", "text vqa", "image captioning", "chart understanding"):
            assert all(scene.grounded), scene  # every answer reads something off the picture


def test_synthetic_answer_lengths_keep_mmspec_proportions() -> None:
    """Mean answer length per topic ~ MMSpec's (47, 63, 192, 69, 286, 748 tokens) / 8."""
    mmspec = dict(zip(TOPICS, (47, 63, 192, 69, 286, 748)))
    lengths: dict[str, list[int]] = {t: [] for t in TOPICS}
    for _, scene in synthetic_scenes(per_topic=60, seed=0):
        # a rough Qwen2-style count: words, single digits, punctuation runs
        words = re.findall(r"\d|[A-Za-z]+|[^\sA-Za-z\d]+", " ".join(scene.references))
        lengths[scene.topic].append(len(words))
    for topic, values in lengths.items():
        ratio = sum(values) / len(values) / (mmspec[topic] / 8)
        assert 0.7 < ratio < 1.4, (topic, ratio)


def test_synthetic_bad_per_topic() -> None:
    with pytest.raises(WorkloadError, match="per_topic"):
        synthetic_suite(per_topic=0)


# --- registry -----------------------------------------------------------------------------------


def test_builtin_synthetic_workload() -> None:
    assert "synthetic" in builtin_workloads()
    spec = WorkloadSpec(builtin="synthetic")
    assert spec.name == "synthetic"
    assert len(load_workload(spec)) == 60
    spread = load_workload(WorkloadSpec(builtin="synthetic", limit=12))
    assert Counter(s.topic for s in spread) == {t: 2 for t in TOPICS}
    # the same samples as spreading the limit over the full default suite
    full = synthetic_suite()
    assert spread == [s for s in full if s.id.endswith(("_000", "_001"))]
    # a limit above the default draws more per topic
    big = load_workload(WorkloadSpec(builtin="synthetic", limit=90, topics=("text vqa",)))
    assert len(big) == 90 and {s.topic for s in big} == {"text vqa"}


def test_unknown_builtin_lists_known() -> None:
    with pytest.raises(WorkloadError, match=r"unknown builtin workload 'nope'.*'synthetic'"):
        WorkloadSpec(builtin="nope")


def test_spec_validation() -> None:
    with pytest.raises(WorkloadError, match="exactly one"):
        WorkloadSpec()
    with pytest.raises(WorkloadError, match="exactly one"):
        WorkloadSpec(builtin="synthetic", path="/data")
    with pytest.raises(WorkloadError, match="limit"):
        WorkloadSpec(builtin="synthetic", limit=0)
    with pytest.raises(WorkloadError, match="topics is empty"):
        WorkloadSpec(builtin="synthetic", topics=())
    with pytest.raises(WorkloadError, match="unknown topic 'nope'"):
        load_workload(WorkloadSpec(builtin="synthetic", topics=("nope",)))
    assert WorkloadSpec(builtin="synthetic", topics=["text vqa"]).topics == ("text vqa",)


def test_spec_name_and_relative_path(tmp_path: Path) -> None:
    split = _balanced(tmp_path / "mysplit", per_topic=1)
    assert WorkloadSpec(path=str(split) + "/").name == "mysplit"
    assert WorkloadSpec(path=str(split / "mmspec.jsonl")).name == "mysplit"
    samples = load_workload(WorkloadSpec(path="mysplit", limit=3), base_dir=tmp_path)
    assert len(samples) == 3


@needs_testmini
def test_copied_real_records(tmp_path: Path) -> None:
    """A couple of real records and images copied into a fresh split load the same way."""
    lines = (TESTMINI_SPLIT / "mmspec.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    split = tmp_path / "copy"
    (split / "images").mkdir(parents=True)
    (split / "mmspec.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in lines:
        image = json.loads(line)["image"]
        shutil.copy(TESTMINI_SPLIT / "images" / image, split / "images" / image)
    copied = load_mmspec(split)
    original = load_mmspec(TESTMINI_SPLIT)[:2]
    assert [(s.id, s.turns, s.image_bytes) for s in copied] == [
        (s.id, s.turns, s.image_bytes) for s in original
    ]
