"""The pretrained start's digest, under which every run of a study is cached, follows the weights' content."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from gapclip.study.context import start_digest


def _saved_start(folder, make_clip_model):
    make_clip_model(seed=0).backbone.save_pretrained(folder)
    return folder


def _nudge_one_weight(file):
    """The same tensors, one value moved by one float32 step: the file keeps its size, as a start remade on
    another CPU does."""
    tensors = load_file(file)
    name = sorted(tensors)[0]
    flat = tensors[name].flatten().clone()
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    tensors[name] = flat.view_as(tensors[name])
    size = file.stat().st_size
    save_file(tensors, file, metadata={"format": "pt"})
    assert file.stat().st_size == size


def test_a_start_remade_with_weights_that_differ_by_rounding_gets_another_digest(tmp_path, make_clip_model):
    first = _saved_start(tmp_path / "first", make_clip_model)
    remade = tmp_path / "remade"
    shutil.copytree(first, remade)
    digest = start_digest(first)
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert start_digest(remade) == digest  # content, not the folder's name
    _nudge_one_weight(remade / "model.safetensors")
    assert start_digest(remade) != digest


def test_every_weight_file_and_the_config_count(tmp_path, make_clip_model):
    start = _saved_start(tmp_path / "start", make_clip_model)
    digest = start_digest(start)
    (start / "README.md").write_text("a model card is not part of the start")
    assert start_digest(start) == digest
    # a sharded checkpoint: a change in its second shard changes the digest
    tensors = load_file(start / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    (start / "model.safetensors").unlink()
    for number, part in ((1, names[:half]), (2, names[half:])):
        shard = start / f"model-0000{number}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, shard, metadata={"format": "pt"})
    sharded = start_digest(start)
    _nudge_one_weight(start / "model-00002-of-00002.safetensors")
    assert start_digest(start) != sharded
    config = (start / "config.json").read_text()
    changed = start_digest(start)
    (start / "config.json").write_text(config.replace("{", '{\n  "note": 1,', 1))
    assert start_digest(start) != changed
