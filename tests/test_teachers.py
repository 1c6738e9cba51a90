"""Teacher precompute (CUSA): file layout, normalisation, resume after interruption, coverage, caption-mean images."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage
from safetensors import safe_open
from transformers import ViTConfig, ViTImageProcessor, ViTModel

import gapclip.teachers as teachers
from gapclip.teachers import TeacherStore, caption_id, check_coverage, precompute_teachers

from .test_recipes import saved_clip  # noqa: F401  (a fixture)

torch.set_num_threads(1)

FEATURES = Features({"image_id": Value("string"), "image": Image(), "captions": List(Value("string"))})
WORDS = ["a dog", "a red car", "two cats", "a man", "the beach", "a green tree", "snowy hills"]


def tiny_dataset(n: int, *, start: int = 0) -> Dataset:
    rows = {"image_id": [], "image": [], "captions": []}
    for i in range(start, start + n):
        rows["image_id"].append(f"img{i}")
        rows["image"].append(PILImage.new("RGB", (32, 32), (30 * i % 256, 90, 200 - 10 * i % 200)))
        rows["captions"].append([f"{WORDS[(i + k) % len(WORDS)]} number {i}" for k in range(1 + i % 3)])
    return Dataset.from_dict(rows, features=FEATURES)


@pytest.fixture(scope="module")
def dataset() -> DatasetDict:
    return DatasetDict({"train": tiny_dataset(5), "test": tiny_dataset(2, start=5)})


@pytest.fixture(scope="module")
def vit_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit")
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=16)
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def captions_file(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("captions-teacher")
    return precompute_teachers(dataset, output_dir=out, batch_size=4, shard_size=3, show_progress=False)


def test_captions_teacher_file_layout_and_normalisation(captions_file, dataset):
    with safe_open(str(captions_file), framework="pt") as handle:
        meta = handle.metadata()
        image_embeds, text_embeds = handle.get_tensor("image_embeds"), handle.get_tensor("text_embeds")
    num_captions = sum(len(c) for split in dataset.values() for c in split["captions"])
    assert image_embeds.shape == (7, 384) and text_embeds.shape == (num_captions, 384)  # MiniLM: 384
    assert image_embeds.dtype == text_embeds.dtype == torch.float32
    torch.testing.assert_close(image_embeds.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(text_embeds.norm(dim=1), torch.ones(num_captions))
    assert json.loads(meta["image_ids"]) == [f"img{i}" for i in range(7)]
    assert json.loads(meta["caption_counts"]) == [1 + i % 3 for i in range(7)]
    assert meta["image_teacher"] == "captions" and "MiniLM" in meta["text_teacher"]
    assert (meta["image_dim"], meta["text_dim"], meta["num_captions"]) == ("384", "384", str(num_captions))
    assert not (captions_file.parent / teachers.SHARDS_DIRNAME).exists()  # shards removed after consolidation


def test_captions_image_teacher_is_mean_of_caption_embeddings(captions_file, dataset):
    from sentence_transformers import SentenceTransformer

    from gapclip.testing import minilm_path

    store = TeacherStore.load(captions_file.parent)
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    caps = dataset["train"][2]["captions"]  # img2 has 3 captions
    direct = model.encode(caps, convert_to_tensor=True, normalize_embeddings=True)
    stored = store.get_text_embeds([caption_id("img2", k) for k in range(3)])
    torch.testing.assert_close(stored, direct, atol=1e-5, rtol=1e-4)
    expected = F.normalize(stored.mean(dim=0), dim=0)
    torch.testing.assert_close(store.get_image_embeds(["img2"])[0], expected)


def test_store_lookup(captions_file):
    store = TeacherStore.load(captions_file)
    assert len(store) == 7 and store.caption_ids[:3] == ["img0#0", "img1#0", "img1#1"]
    kwargs = store.lookup(["img1", "img6", "img1"], [1, 0, 0])
    assert kwargs["teacher_image_embeds"].shape == (3, 384)
    torch.testing.assert_close(kwargs["teacher_image_embeds"][0], kwargs["teacher_image_embeds"][2])
    torch.testing.assert_close(kwargs["teacher_text_embeds"][0], store.get_text_embeds(["img1#1"])[0])
    with pytest.raises(KeyError, match="img1#2"):
        store.get_text_embeds(["img1#2"])  # img1 has 2 captions
    with pytest.raises(KeyError, match="nope"):
        store.get_image_embeds(["nope"])
    assert "7 images" in repr(store)


def test_coverage_error_lists_counts_and_examples(captions_file, dataset):
    store = TeacherStore.load(captions_file)
    assert check_coverage(store, dataset) == {"num_images": 7, "num_captions": 13}
    bigger = DatasetDict({"train": tiny_dataset(9)})  # img7, img8 unknown; img5 has 3 captions, stored 3
    more_captions = tiny_dataset(1, start=3).map(lambda row: {"captions": row["captions"] + ["extra caption"]})
    with pytest.raises(ValueError, match=r"missing 2 of 9 images \(e\.g\. \['img7', 'img8'\]\) and 5 of 18 captions"):
        check_coverage(store, bigger)
    with pytest.raises(ValueError, match=r"1 of 2 captions \(e\.g\. \['img3#1'\]\)"):
        check_coverage(store, more_captions)


def test_resume_after_interruption_is_byte_identical(dataset, vit_path, tmp_path, monkeypatch):
    kwargs = dict(text_teacher=None, image_teacher=str(vit_path), batch_size=2, shard_size=2, show_progress=False)
    reference = precompute_teachers(dataset, output_dir=tmp_path / "full", **kwargs).read_bytes()

    calls = {"n": 0}
    real = teachers._encode_shard

    def crash_on_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kw)

    monkeypatch.setattr(teachers, "_encode_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        precompute_teachers(dataset, output_dir=tmp_path / "resumed", **kwargs)
    shard_dir = tmp_path / "resumed" / teachers.SHARDS_DIRNAME
    assert sorted(p.name for p in shard_dir.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (tmp_path / "resumed" / "teachers.safetensors").exists()

    calls["n"] = -100  # no more crashes; count what the resumed run encodes
    resumed = precompute_teachers(dataset, output_dir=tmp_path / "resumed", **kwargs)
    assert calls["n"] == -100 + 2  # 4 shards of 2 images (7 images): only the last two are encoded again
    assert resumed.read_bytes() == reference

    store = TeacherStore.load(resumed)
    assert store.image_dim == 16 and store.text_dim == 384 and store.image_teacher == str(vit_path)
    torch.testing.assert_close(store.image_embeds.norm(dim=1), torch.ones(7))
    # The image teacher's pooled output, computed directly for one image.
    processor, vit = ViTImageProcessor.from_pretrained(vit_path), ViTModel.from_pretrained(vit_path).eval()
    with torch.no_grad():
        pooled = vit(**processor(images=[dataset["test"][0]["image"]], return_tensors="pt")).pooler_output
    torch.testing.assert_close(store.get_image_embeds(["img5"]), F.normalize(pooled, dim=-1), atol=1e-5, rtol=1e-4)

    # A finished file is reused without encoding anything.
    calls["n"] = 0
    precompute_teachers(dataset, output_dir=tmp_path / "resumed", **kwargs)
    assert calls["n"] == 0


def test_cls_pooling_and_bad_inputs(dataset, vit_path, tmp_path):
    path = precompute_teachers(dataset["test"], output_dir=tmp_path, image_teacher=str(vit_path), image_pooling="cls",
                               batch_size=2, show_progress=False)
    store = TeacherStore.load(path)
    processor, vit = ViTImageProcessor.from_pretrained(vit_path), ViTModel.from_pretrained(vit_path).eval()
    with torch.no_grad():
        cls = vit(**processor(images=[dataset["test"][1]["image"]], return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(store.get_image_embeds(["img6"]), F.normalize(cls, dim=-1), atol=1e-5, rtol=1e-4)

    with pytest.raises(ValueError, match="image_pooling"):
        precompute_teachers(dataset, output_dir=tmp_path, image_pooling="max")
    duplicated = DatasetDict({"train": tiny_dataset(2), "test": tiny_dataset(1)})
    with pytest.raises(ValueError, match="duplicate image id"):
        precompute_teachers(duplicated, output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['captions'\]"):
        precompute_teachers(dataset["test"].remove_columns("captions"), output_dir=tmp_path)


def test_recipe_takes_the_training_flags_and_writes_where_cusa_looks(tmp_path, capsys):
    from gapclip.cli import DataArguments, default_teacher_dir
    from recipes.precompute_teachers import main

    demo = ["--dataset", "demo", "--demo_train", "3", "--demo_val", "1", "--demo_test", "2", "--demo_image_size", "32"]
    path = main([*demo, "--batch_size", "8", "--device", "cpu"])
    expected = default_teacher_dir(DataArguments(dataset="demo", demo_train=3, demo_val=1, demo_test=2,
                                                 demo_image_size=32))
    assert path == expected / "teachers.safetensors"  # train_clip_cusa.py finds it with the same flags
    assert f"Teacher embeddings ready: {path.resolve()}\n  covers:   6 images," in capsys.readouterr().out
    assert len(TeacherStore.load(path)) == 6
    only_test = main([*demo, "--splits", "test", "--output_dir", str(tmp_path / "t"), "--device", "cpu"])
    assert len(TeacherStore.load(only_test)) == 2
    with pytest.raises(ValueError, match=r"--splits 'tset': no split\(s\) \['tset'\]; the dataset has"):
        main([*demo, "--splits", "tset", "--output_dir", str(tmp_path / "u")])
    with pytest.raises(ValueError, match="--dataset karpathy needs --karpathy_json FILE and --image_root FOLDER"):
        main(["--dataset", "karpathy"])


def test_default_teacher_dir_per_source(tmp_path, gapclip_cache):
    from gapclip.cli import DataArguments, default_teacher_dir

    json_file = tmp_path / "dataset_flickr30k.json"
    karpathy = DataArguments(dataset="karpathy", karpathy_json=str(json_file), image_root=str(tmp_path))
    assert default_teacher_dir(karpathy) == tmp_path / "teachers"
    saved = tmp_path / "saved"
    saved.mkdir()
    assert default_teacher_dir(DataArguments(dataset="hub", dataset_name=str(saved))) == saved / "teachers"
    by_name = DataArguments(dataset="hub", dataset_name="org/captions")
    assert default_teacher_dir(by_name) == gapclip_cache / "teachers" / "org__captions"


# ------------------------------------------------------------------------------------------------------ stale teachers
def _edit_captions(dataset: DatasetDict, ids: set[str]) -> DatasetDict:
    return DatasetDict({
        split: ds.map(lambda row: {"captions": [c.replace("number", "no.") for c in row["captions"]]}
                      if row["image_id"] in ids else {})
        for split, ds in dataset.items()
    })


def test_stale_captions_under_the_same_ids_are_an_error(captions_file, dataset):
    store = TeacherStore.load(captions_file)
    check_coverage(store, dataset)  # the data they were computed from: fine
    with pytest.raises(ValueError) as info:
        check_coverage(store, _edit_captions(dataset, {"img1", "img6"}))
    message = str(info.value)
    assert "are stale for this dataset" in message
    assert "the captions of 2 of 7 images changed (e.g. image_id(s) ['img1', 'img6'])" in message
    assert "recipes/precompute_teachers.py" in message and "delete the file" in message
    with pytest.raises(ValueError, match=r"the captions of 7 of 7 images changed"):  # every caption text changed
        check_coverage(store, _edit_captions(dataset, {f"img{i}" for i in range(7)}))


def test_stale_check_of_a_file_without_per_image_digests(captions_file, dataset):
    """Files written before the digests carry only the whole-dataset fingerprint: compared when the ids match."""
    store = TeacherStore.load(captions_file)
    legacy = {k: v for k, v in store.metadata.items() if k not in ("caption_digests", "image_digests")}
    image_ids, captions = teachers._ids_and_captions(list(dataset.values()))
    legacy["dataset_fingerprint"] = teachers._legacy_fingerprint(image_ids, captions)
    old = TeacherStore(store.image_embeds, store.text_embeds, legacy, store.path)
    check_coverage(old, dataset)
    with pytest.raises(ValueError, match="caption texts differ from those they were computed from"):
        check_coverage(old, _edit_captions(dataset, {"img3"}))


def test_replaced_image_files_are_stale_for_an_image_teacher(vit_path, tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        PILImage.new("RGB", (32, 32), (40 * i, 90, 200)).save(paths[-1])
    split = Dataset.from_dict({"image_id": ["a", "b", "c"], "image": paths, "captions": [["x"], ["y"], ["z"]]},
                              features=FEATURES)
    file = precompute_teachers(split, output_dir=tmp_path / "t", image_teacher=str(vit_path), batch_size=2,
                               show_progress=False)
    store = TeacherStore.load(file)
    check_coverage(store, split)
    PILImage.effect_noise((32, 32), 60).convert("RGB").save(paths[1])  # another picture under the same name
    with pytest.raises(ValueError, match=r"the image files of 1 of 3 images changed \(e\.g\. image_id\(s\) \['b'\]\)"):
        check_coverage(store, split)


def test_cusa_recipe_refuses_teachers_of_edited_captions(tmp_path, saved_clip):
    from .test_recipes import load_recipe

    (tmp_path / "images").mkdir()
    lines = ["image,caption,split"]
    for i, split in enumerate(["train"] * 4 + ["validation", "test"]):
        PILImage.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / "images" / f"{i}.png")
        lines += [f"{i}.png,a red circle number {i},{split}", f"{i}.png,a blue square number {i},{split}"]
    data = tmp_path / "captions.csv"
    data.write_text("\n".join(lines) + "\n")
    flags = ["--dataset", "csv", "--data_file", str(data), "--image_root", str(tmp_path / "images"),
             "--model_name_or_path", str(saved_clip), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
             "--per_device_train_batch_size", "2", "--report_to", "none", "--no_usa"]
    from recipes.precompute_teachers import main as precompute

    precompute(["--dataset", "csv", "--data_file", str(data), "--image_root", str(tmp_path / "images"),
                "--batch_size", "8", "--device", "cpu"])
    data.write_text(data.read_text().replace("a blue square number 2", "a green star number 2"))
    cusa = load_recipe("train_clip_cusa")
    with pytest.raises(ValueError) as info:
        cusa.main(flags)
    assert "the captions of 1 of 6 images changed (e.g. image_id(s) ['2.png'])" in str(info.value)
    assert str(tmp_path / "teachers" / "teachers.safetensors") in str(info.value)
