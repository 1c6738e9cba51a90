"""Release export (gapclip.hub): native backbone loads without gapclip, model card metadata, push path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from gapclip import GapClipConfig, GapClipModel
from gapclip.data.demo import make_demo_dataset, make_demo_processor
from gapclip.hub import TRAINING_CONFIG_NAME, export_backbone, push_exported
from gapclip.lora import apply_lora, is_lora_model
from gapclip.testing import tiny_clip_config, tiny_vision_text_dual_encoder

from .test_lora import randomise_adapters, vtde_batch

pytest.importorskip("peft")

TERMS = [{"name": "lsc", "weight": 0.5, "options": {"k": 2}}, {"name": "dias_inter", "weight": 0.25}]
METRICS = {
    "test_i2t_r1": 41.5, "test_i2t_r5": 70.25, "test_i2t_r10": 80.0, "test_t2i_r1": 30.0, "test_t2i_r5": 60.0,
    "test_t2i_r10": 72.5, "test_rsum": 354.25, "test_modality_gap": 0.4321, "test_runtime": 1.2, "test_loss_lsc": 3.0,
}

# Runs in a fresh interpreter where `import gapclip` fails: the export must stand on plain transformers.
LOAD_WITHOUT_GAPCLIP = textwrap.dedent(
    """
    import sys
    sys.modules["gapclip"] = None
    import torch
    from transformers import AutoModel, AutoProcessor
    folder, inputs_path, out_path = sys.argv[1:4]
    try:
        import gapclip  # noqa: F401
        raise SystemExit("gapclip should not be importable here")
    except ImportError:
        pass
    model = AutoModel.from_pretrained(folder).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    result = {"image": image, "text": text, "class": type(model).__name__,
              "logit_scale": model.logit_scale.detach().clone()}
    if len(sys.argv) > 4:
        processor = AutoProcessor.from_pretrained(folder)
        result["tokens"] = processor.tokenizer(["a red circle"], return_tensors="pt")["input_ids"]
    torch.save(result, out_path)
    """
)


def load_without_gapclip(folder: Path, inputs: dict, tmp_path: Path, *, with_processor: bool = False) -> dict:
    inputs_path, out_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, inputs_path)
    args = [sys.executable, "-c", LOAD_WITHOUT_GAPCLIP, str(folder), str(inputs_path), str(out_path)]
    if with_processor:
        args.append("processor")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(out_path)


def gapclip_features(model: GapClipModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (
            model.get_image_features(inputs["pixel_values"]),
            model.get_text_features(inputs["input_ids"], inputs["attention_mask"]),
        )


@pytest.fixture(scope="module")
def demo_processor(tmp_path_factory):
    root = make_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=8, num_val=4, num_test=4, image_size=32)
    return make_demo_processor(root)


def demo_clip_model(processor, gap_terms=TERMS) -> GapClipModel:
    tokenizer = processor.tokenizer
    config = tiny_clip_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return GapClipModel(GapClipConfig(config, gap_terms=gap_terms)).eval()


def demo_inputs(processor) -> dict:
    from PIL import Image

    images = [Image.new("RGB", (32, 32), colour) for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    captions = ["a red circle in the top left", "a green square", "a blue star at the bottom right of the image"]
    batch = processor(text=captions, images=images, return_tensors="pt", padding=True)
    return {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}


# ------------------------------------------------------------------------------------------------------ export
def test_export_plain_clip_loads_without_gapclip(tmp_path, demo_processor):
    model = demo_clip_model(demo_processor)
    inputs = demo_inputs(demo_processor)
    out = export_backbone(
        model, tmp_path / "export", processor=demo_processor, eval_results={"gapclip-demo": METRICS},
        eval_split="test", training_args={"learning_rate": 1e-3, "num_train_epochs": 2},
    )
    files = sorted(path.name for path in out.iterdir())
    assert {"config.json", "model.safetensors", "README.md", TRAINING_CONFIG_NAME, "tokenizer.json"} <= set(files)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    assert "gapclip" not in json.dumps(config)

    loaded = load_without_gapclip(out, inputs, tmp_path, with_processor=True)
    assert loaded["class"] == "CLIPModel"
    image, text = gapclip_features(model, inputs)
    torch.testing.assert_close(loaded["image"], image, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["text"], text, rtol=0, atol=1e-5)
    assert torch.equal(loaded["tokens"], demo_processor.tokenizer(["a red circle"], return_tensors="pt")["input_ids"])

    training = json.loads((out / TRAINING_CONFIG_NAME).read_text())
    assert training["base_loss"] == "infonce"
    assert [(t["name"], t["weight"]) for t in training["gap_terms"]] == [("lsc", 0.5), ("dias_inter", 0.25)]
    assert training["gap_terms"][0]["options"]["k"] == 2 and training["gap_terms"][0]["class"] == "LSCLoss"
    assert training["training"] == {"learning_rate": 1e-3, "num_train_epochs": 2}
    assert training["lora"] is None and training["backbone"]["model_type"] == "clip"


def test_export_lora_checkpoint_merges_and_matches(tmp_path, demo_processor):
    model = apply_lora(demo_clip_model(demo_processor), r=4, alpha=8)
    randomise_adapters(model)
    inputs = demo_inputs(demo_processor)
    image, text = gapclip_features(model, inputs)
    model.save_pretrained(tmp_path / "ckpt")
    demo_processor.save_pretrained(tmp_path / "ckpt")  # as the Trainer does (processing_class)

    out = export_backbone(tmp_path / "ckpt", tmp_path / "export")  # from the checkpoint folder
    assert is_lora_model(model)  # exporting a model does not merge it in place
    assert (out / "processor_config.json").is_file()
    assert not any("lora" in key for key in _safetensors_keys(out / "model.safetensors"))
    loaded = load_without_gapclip(out, inputs, tmp_path)
    torch.testing.assert_close(loaded["image"], image, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["text"], text, rtol=0, atol=1e-5)
    training = json.loads((out / TRAINING_CONFIG_NAME).read_text())
    assert training["lora"]["r"] == 4 and training["lora_merged"] is True
    assert "r=4, alpha=8" in (out / "README.md").read_text()


def test_export_lora_vision_text_dual_encoder(tmp_path):
    backbone = tiny_vision_text_dual_encoder()
    torch.manual_seed(0)
    model = apply_lora(GapClipModel(GapClipConfig(backbone.config), backbone=backbone).eval(), r=4)
    randomise_adapters(model)
    inputs = vtde_batch()
    image, text = gapclip_features(model, inputs)
    out = export_backbone(model, tmp_path / "export")
    loaded = load_without_gapclip(out, inputs, tmp_path)
    assert loaded["class"] == "VisionTextDualEncoderModel"
    torch.testing.assert_close(loaded["image"], image, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["text"], text, rtol=0, atol=1e-5)


def test_export_keep_lora_writes_peft_adapter(tmp_path, demo_processor):
    model = apply_lora(demo_clip_model(demo_processor, []), r=2)
    out = export_backbone(model, tmp_path / "export", merge_lora=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / TRAINING_CONFIG_NAME).read_text())["lora_merged"] is False


def test_gapclip_checkpoint_loads_with_automodel_after_import(tmp_path, demo_processor):
    from transformers import AutoModel

    model = demo_clip_model(demo_processor)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GapClipModel) and loaded.config.term_weights == {"lsc": 0.5, "dias_inter": 0.25}
    inputs = demo_inputs(demo_processor)
    for ours, theirs in zip(gapclip_features(model, inputs), gapclip_features(loaded, inputs)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


# ------------------------------------------------------------------------------------------------------ model card
def test_card_metadata_round_trip(tmp_path, demo_processor):
    model = demo_clip_model(demo_processor)
    model.backbone.config._name_or_path = "openai/clip-vit-base-patch16"  # as after from_backbone(<repo id>)
    other = {"i2t_r1": 10.0, "i2t_r5": 20.0, "i2t_r10": 30.0, "t2i_r1": 5.0, "t2i_r5": 15.0, "t2i_r10": 25.0,
             "rsum": 105.0, "modality_gap": 0.9}
    out = export_backbone(
        model, tmp_path / "export", processor=demo_processor, eval_split="test",
        eval_results={"flickr30k": METRICS, "coco-5k": other}, repo_id="me/clip-lgmgc",
        card_data={"datasets": ["nlphuji/flickr30k"], "license": "mit"},
    )
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == "openai/clip-vit-base-patch16" and data.license == "mit"
    assert data.library_name == "transformers" and data.datasets == ["nlphuji/flickr30k"]
    assert data.model_name == "clip-lgmgc"
    results = {(r.dataset_name, r.metric_type): r for r in data.eval_results}
    assert len(results) == 2 * 8  # 8 metrics per dataset, runtime/loss dropped
    assert results[("flickr30k", "i2t_r1")].metric_value == 41.5
    assert results[("flickr30k", "rsum")].metric_value == 354.25
    assert results[("flickr30k", "modality_gap")].metric_value == 0.4321
    assert results[("coco-5k", "t2i_r10")].metric_value == 25.0
    assert all(r.task_type == "image-text-retrieval" and r.dataset_split == "test" for r in data.eval_results)
    text = card.text
    assert 'AutoModel.from_pretrained("me/clip-lgmgc")' in text and "AutoProcessor" in text
    assert "| `lsc` | 0.5 | `k=2`" in text and "| `dias_inter` | 0.25 |" in text
    assert "| flickr30k | 41.50 | 70.25 | 80.00 | 30.00 | 60.00 | 72.50 | 354.25 | 0.4321 |" in text
    from gapclip.losses.contrastive import CLIP_CITATION
    from gapclip.losses.cusa import CUSA_CITATION
    from gapclip.losses.dias import DIAS_CITATION
    from gapclip.losses.lgmgc import LGMGC_CITATION

    # the BibTeX of what the model was trained with (base loss, lsc, dias_inter), each term's own, verbatim and once
    for citation in (CLIP_CITATION, LGMGC_CITATION, DIAS_CITATION):
        assert text.count(f"```bibtex\n{citation}\n```") == 1
    assert "ma2024dias" in text and "Local and Generative-driven Modality Gap Correction" in text
    assert CUSA_CITATION not in text and "huang2024cusa" not in text  # not trained with CUSA: not cited
    # the metadata block is valid YAML that huggingface_hub turns back into the same model-index
    from huggingface_hub.repocard_data import eval_results_to_model_index

    index = eval_results_to_model_index("clip-lgmgc", data.eval_results)
    assert index[0]["results"][0]["task"]["type"] == "image-text-retrieval"


def test_card_without_results_or_base_model(tmp_path, demo_processor):
    out = export_backbone(demo_clip_model(demo_processor, []), tmp_path / "release")
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and card.data.base_model is None
    assert "trained from scratch" in card.text and "No evaluation results" in card.text


@pytest.mark.parametrize(
    "terms,base_loss,cited",
    [
        ([], "auto", ["radford2021clip"]),
        ([{"name": "csa"}, {"name": "usa", "weight": 0.5}], "auto", ["radford2021clip", "huang2024cusa"]),
        ([{"name": "dias_dim", "weight": 10.0}], "triplet", ["faghri2018vsepp", "ma2024dias"]),
    ],
    ids=["base-only", "cusa", "dias"],
)
def test_card_cites_only_what_the_model_was_trained_with(tmp_path, demo_processor, terms, base_loss, cited):
    from gapclip.hub import objective_citations, render_model_card, training_config

    tokenizer = demo_processor.tokenizer
    config = tiny_clip_config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GapClipModel(GapClipConfig(config, gap_terms=terms, base_loss=base_loss)).eval()
    text = ModelCard.load(export_backbone(model, tmp_path / "release") / "README.md").text
    keys = re.findall(r"```bibtex\n@\w+\{(\w+),", text)
    assert keys == cited
    # from the config alone (the terms looked up in the registry), the same entries
    assert render_model_card(model.backbone, training_config(model)).text.count("```bibtex") == len(cited)
    assert len(objective_citations(model)) == len(cited)


# ------------------------------------------------------------------------------------------------------ push
class FakeHub:
    """Records what `push_exported` asks of the Hub API; nothing leaves the machine."""

    def __init__(self, monkeypatch):
        self.repos: list[dict] = []
        self.uploads: list[dict] = []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append({"repo_id": repo_id, **kwargs})

            class Url(str):
                pass

            url = Url(f"model/{repo_id}")
            url.repo_id = repo_id
            return url

        def upload_folder(api, *, folder_path, repo_id, **kwargs):
            files = sorted(
                str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file()
            )
            hub.uploads.append({"folder_path": folder_path, "repo_id": repo_id, "files": files, **kwargs})
            return "commit"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_exported_sends_exactly_the_export(tmp_path, monkeypatch, demo_processor):
    hub = FakeHub(monkeypatch)
    out = export_backbone(demo_clip_model(demo_processor), tmp_path / "export", processor=demo_processor)
    push_exported(out, "me/clip-lgmgc", token="hf_test", private=True)
    assert hub.repos == [{"repo_id": "me/clip-lgmgc", "private": True, "exist_ok": True, "repo_type": "model"}]
    (upload,) = hub.uploads
    assert Path(upload["folder_path"]) == out and upload["repo_id"] == "me/clip-lgmgc"
    assert upload["files"] == sorted(path.name for path in out.iterdir())
    with pytest.raises(ValueError, match="not an exported model folder"):
        push_exported(tmp_path, "me/x")


def test_training_recipe_with_lora_exports_and_pushes_the_backbone(tmp_path, monkeypatch):
    """--lora_r + --push_to_hub: LoRA training, resume, export to output_dir/export, push of that folder only."""
    from recipes.train_clip_lgmgc import main

    monkeypatch.setenv("GAPCLIP_CACHE", str(tmp_path / "cache"))
    hub = FakeHub(monkeypatch)
    output_dir = tmp_path / "run"
    argv = [
        "--output_dir", str(output_dir), "--demo_train", "8", "--demo_val", "4", "--demo_test", "4",
        "--demo_image_size", "32", "--scratch_width", "32", "--scratch_layers", "1", "--no_gst",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--eval_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "2", "--load_best_model_at_end", "False", "--logging_steps", "1",
        "--report_to", "none", "--lora_r", "4", "--lora_alpha", "8", "--push_to_hub", "--hub_model_id",
        "me/tiny-lgmgc", "--dataloader_num_workers", "0", "--skip_initial_eval",
    ]
    first = main([*argv, "--max_steps", "2"])
    trainer = first["trainer"]
    assert is_lora_model(trainer.model) and trainer.args.push_to_hub  # restored after our push
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n} == {
        "backbone.base_model.model.logit_scale"
    }
    export_dir = output_dir / "export"
    (upload,) = hub.uploads
    assert Path(upload["folder_path"]) == export_dir and upload["repo_id"] == "me/tiny-lgmgc"
    assert upload["files"] == sorted(path.name for path in export_dir.iterdir())
    assert "model.safetensors" in upload["files"] and "README.md" in upload["files"]
    assert json.loads((export_dir / "config.json").read_text())["architectures"] == ["CLIPModel"]
    card = ModelCard.load(export_dir / "README.md")
    rsum = {r.metric_type: r.metric_value for r in card.data.eval_results}["rsum"]
    assert rsum == pytest.approx(first["rows"]["after training"]["rsum"], abs=1e-4)
    assert json.loads((export_dir / TRAINING_CONFIG_NAME).read_text())["training"]["max_steps"] == 2

    # resume from checkpoint-2 with the same LoRA settings, train 2 more steps, merge at the end
    from gapclip.trainer import GapClipTrainer

    resumed, load_results = [], []
    original_train, original_warn = GapClipTrainer.train, GapClipTrainer._issue_warnings_after_load

    def train(self, resume_from_checkpoint=None, **kwargs):
        resumed.append(resume_from_checkpoint)
        return original_train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def issue_warnings_after_load(self, load_result):
        load_results.append(load_result)
        return original_warn(self, load_result)

    monkeypatch.setattr(GapClipTrainer, "train", train)
    monkeypatch.setattr(GapClipTrainer, "_issue_warnings_after_load", issue_warnings_after_load)
    # (explicit: run_training's automatic resume is gated on do_train, which defaults to False)
    checkpoint = str(output_dir / "checkpoint-2")
    second = main([*argv, "--max_steps", "4", "--merge_lora", "--resume_from_checkpoint", checkpoint])
    assert resumed == [checkpoint]
    (load_result,) = load_results  # the LoRA checkpoint loaded into the LoRA model, key for key
    assert not load_result.missing_keys and not load_result.unexpected_keys
    assert second["trainer"].state.global_step == 4
    assert not is_lora_model(second["trainer"].model)
    final_config = json.loads((output_dir / "config.json").read_text())
    assert final_config.get("lora") is None and final_config["merged_lora"]["r"] == 4  # lora: a declared field
    assert len(hub.uploads) == 2


def test_export_recipe_from_checkpoint_with_results_and_push(tmp_path, monkeypatch, demo_processor):
    from recipes.export import main

    hub = FakeHub(monkeypatch)
    model = apply_lora(demo_clip_model(demo_processor), r=2)
    model.save_pretrained(tmp_path / "ckpt")
    demo_processor.save_pretrained(tmp_path / "ckpt")
    results = tmp_path / "retrieval.json"  # as written by a training recipe
    results.write_text(json.dumps({"before training": {"rsum": 1.0}, "after training": {"rsum": 123.5, "i2t_r1": 7.0}}))
    out = main([
        str(tmp_path / "ckpt"), str(tmp_path / "release"), "--eval_results", str(results), "--eval_dataset_name",
        "flickr30k", "--push_to_hub", "--hub_model_id", "me/release",
    ])
    assert out == tmp_path / "release"
    values = {r.metric_type: r.metric_value for r in ModelCard.load(out / "README.md").data.eval_results}
    assert values == {"rsum": 123.5, "i2t_r1": 7.0}
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/release" and upload["files"] == sorted(p.name for p in out.iterdir())


# ------------------------------------------------------------------------------------------------------ issue 15
def test_a_failed_push_keeps_the_export_and_says_how_to_push_it(tmp_path, monkeypatch):
    """No network (or no token, no rights): the run's export stays complete on disk, and the message gives the
    recipes/export.py command that pushes it as it is."""
    from gapclip.hub import PushToHubError
    from gapclip.run_state import RUN_RECORD_NAME
    from recipes.export import main as export_main
    from recipes.train_clip_lgmgc import main

    monkeypatch.setenv("GAPCLIP_CACHE", str(tmp_path / "cache"))
    hub = FakeHub(monkeypatch)

    def unreachable(api, repo_id, **kwargs):
        raise ConnectionError("Failed to resolve the Hub's address")

    working = HfApi.create_repo
    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    output_dir = tmp_path / "run"
    argv = [
        "--output_dir", str(output_dir), "--demo_train", "8", "--demo_val", "4", "--demo_test", "4",
        "--demo_image_size", "32", "--scratch_width", "32", "--scratch_layers", "1", "--no_lsc", "--no_gst",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--eval_strategy", "no",
        "--save_strategy", "no", "--load_best_model_at_end", "False", "--report_to", "none", "--max_steps", "1",
        "--push_to_hub", "--hub_model_id", "me/tiny", "--skip_initial_eval",
    ]
    with pytest.raises(PushToHubError) as info:
        main(argv)
    export_dir = (output_dir / "export").resolve()
    message = str(info.value)
    assert "Could not push to the Hub repository 'me/tiny' (ConnectionError: Failed to resolve" in message
    assert f"The export is complete on disk at {export_dir}" in message
    files = {p.name for p in export_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", TRAINING_CONFIG_NAME} <= files
    assert json.loads((output_dir / RUN_RECORD_NAME).read_text())["status"] == "finished"
    assert not hub.uploads

    command = message.split("push it later with: ")[1].split()
    assert command[:3] == ["python", "recipes/export.py", str(export_dir)]
    monkeypatch.setattr(HfApi, "create_repo", working)
    export_main(command[2:])  # the command as given, now with a network
    (upload,) = hub.uploads
    assert Path(upload["folder_path"]) == export_dir and upload["repo_id"] == "me/tiny"
    assert upload["files"] == sorted(p.name for p in export_dir.iterdir())


def test_keep_lora_adapter_is_portable_and_complete(tmp_path, demo_processor, monkeypatch):
    """The adapter names its base by absolute path (given relative at training time), loads from any working
    directory with transformers + peft alone, and carries the trained logit_scale and the terms' parameters."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from gapclip.hub import TERMS_WEIGHTS_NAME

    base_dir = tmp_path / "models" / "base"
    config = demo_clip_model(demo_processor, []).backbone.config
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(base_dir)
    monkeypatch.chdir(tmp_path / "models")
    model = GapClipModel.from_backbone("base", gap_terms=[{"name": "dias_inter", "weight": 0.5}]).eval()
    assert model.backbone.config.name_or_path == "base"  # relative, as typed
    apply_lora(model, r=4)
    randomise_adapters(model)
    with torch.no_grad():
        model.backbone.base_model.model.logit_scale.fill_(2.5)  # "trained"
        for parameter in model.gap_terms.parameters():
            parameter.add_(0.25)
    out = export_backbone(model, tmp_path / "export", merge_lora=False, processor=demo_processor)

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)
    inputs = demo_inputs(demo_processor)
    assert not (tmp_path / "base").exists()
    loaded = load_without_gapclip(out, inputs, tmp_path)  # another cwd: "base" does not resolve there
    image, text = gapclip_features(model, inputs)
    torch.testing.assert_close(loaded["image"], image, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["text"], text, rtol=0, atol=1e-5)
    assert loaded["logit_scale"].item() == 2.5
    terms = load_file(str(out / TERMS_WEIGHTS_NAME))
    expected = {f"gap_terms.{k}": v for k, v in model.gap_terms.state_dict().items()}
    assert sorted(terms) == sorted(expected) and all(torch.equal(terms[k], expected[k]) for k in expected)
    card = (out / "README.md").read_text()
    assert f"This folder holds a **LoRA adapter** (peft format) for `{base_dir}`" in card
    assert "also holds the trained `logit_scale`" in card and f"`{TERMS_WEIGHTS_NAME}` holds the gap terms'" in card


def test_keep_lora_without_a_base_to_refer_to_ships_the_base_weights(tmp_path, demo_processor):
    model = apply_lora(demo_clip_model(demo_processor, []), r=2)  # trained from scratch: no base anywhere
    randomise_adapters(model)
    out = export_backbone(model, tmp_path / "export", merge_lora=False)
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((out / "base_model").resolve()) and (out / "base_model" / "model.safetensors").is_file()
    assert not any("lora" in key for key in _safetensors_keys(out / "base_model" / "model.safetensors"))
    (tmp_path / "elsewhere").mkdir()
    inputs = demo_inputs(demo_processor)
    loaded = load_without_gapclip(out, inputs, tmp_path / "elsewhere")
    torch.testing.assert_close(loaded["image"], gapclip_features(model, inputs)[0], rtol=0, atol=1e-5)


def test_card_of_a_training_run_and_of_a_standalone_export(tmp_path, monkeypatch):
    """Plain strings for enums, a title from base + method, model details as sentence-transformers' cards give
    them, framework versions; recipes/export.py on the checkpoint writes the same hyper-parameters and data."""
    import transformers
    from huggingface_hub.repocard_data import eval_results_to_model_index

    from recipes.export import main as export_main
    from recipes.train_clip_lgmgc import main

    monkeypatch.setenv("GAPCLIP_CACHE", str(tmp_path / "cache"))
    output_dir = tmp_path / "run"
    main([
        "--output_dir", str(output_dir), "--demo_train", "8", "--demo_val", "4", "--demo_test", "4",
        "--demo_image_size", "32", "--scratch_width", "32", "--scratch_layers", "1", "--per_device_train_batch_size",
        "4", "--per_device_eval_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "False", "--report_to", "none", "--max_steps", "1", "--skip_initial_eval",
    ])
    export_dir = output_dir / "export"
    card = ModelCard.load(export_dir / "README.md")
    text = card.text
    assert "SchedulerType" not in text and "| lr_scheduler_type | cosine |" in text
    assert card.data.model_name == "clip-scratch-lgmgc" and text.lstrip().startswith("# clip-scratch-lgmgc")
    assert eval_results_to_model_index(card.data.model_name, card.data.eval_results)[0]["name"] == "clip-scratch-lgmgc"
    assert "is a CLIP dual encoder trained from scratch with LG-MGC" in text
    for line in ("- **Training method:** LG-MGC (base loss `infonce`, `lsc`, `gst`)",
                 "- **Embedding dimension:** 32", "- **Maximum sequence length:** 32 tokens",
                 "- **Image size:** 32 × 32 px",
                 "- **Training data:** the offline synthetic gapclip demo set (coloured shapes with generated "
                 "captions): 8 images, 40 captions; one caption per image per epoch, with generated image "
                 "translations (LG-MGC GST)",
                 f"- Transformers: {transformers.__version__}", f"- PyTorch: {torch.__version__}"):
        assert line in text, line

    release = export_main([str(output_dir), str(tmp_path / "release")])
    ours, theirs = (json.loads((folder / TRAINING_CONFIG_NAME).read_text()) for folder in (export_dir, release))
    assert theirs["training"] == ours["training"] and theirs["training"]["lr_scheduler_type"] == "cosine"
    assert theirs["training"]["learning_rate"] == 1e-3 and theirs["training_data"] == ours["training_data"]
    assert "| learning_rate | 0.001 |" in (release / "README.md").read_text()


def test_card_names_the_base_model_it_was_fine_tuned_from(tmp_path, demo_processor):
    model = demo_clip_model(demo_processor)  # terms lsc + dias_inter
    model.backbone.config._name_or_path = "openai/clip-vit-base-patch16"
    card = ModelCard.load(export_backbone(model, tmp_path / "export") / "README.md")
    assert card.data.model_name == "clip-vit-base-patch16-lgmgc+dias"
    assert card.data.base_model == "openai/clip-vit-base-patch16"
    assert "fine-tuned from `openai/clip-vit-base-patch16` with LG-MGC+DIAS" in card.text
    local = tmp_path / "my-clip"
    local.mkdir()
    model.backbone.config._name_or_path = str(local)  # a local base: named in the text, not in the Hub metadata
    card = ModelCard.load(export_backbone(model, tmp_path / "export2") / "README.md")
    assert card.data.base_model is None and card.data.model_name == "my-clip-lgmgc+dias"
    assert "fine-tuned from the local model `my-clip` with LG-MGC+DIAS" in card.text and str(local) not in card.text
    assert "- **Base model:** the local model `my-clip`" in card.text
