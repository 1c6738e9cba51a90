"""Evaluators (ECCV, uni-modal, STS, retrieval): the same numbers as the metric functions, run by the trainer during
training and by the evaluation recipe."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from gapclip.data import StsPairs, TextCollator
from gapclip.evaluation import (
    ECCVEvaluator,
    EmbeddedCaptions,
    EvaluationContext,
    Evaluator,
    RetrievalEvaluator,
    STSEvaluator,
    UniModalEvaluator,
    build_positive_sets,
    eccv_metrics,
    modality_gap,
    retrieval_metrics,
    run_evaluators,
    sts_spearman,
    unimodal_recall_at_k,
)

from .conftest import DEMO_SIZES
from .test_recipes import load_recipe
from .test_trainer import make_trainer, tiny_model, training_args


def context(model=None, processor=None, **columns) -> EvaluationContext:
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 5])
    texts = torch.nn.functional.normalize(images[text_to_image] + 0.8 * torch.randn(9, 5, generator=g), dim=-1)
    dataset = Dataset.from_dict({"image_id": [str(100 + i) for i in range(6)], **columns})
    return EvaluationContext(
        model=model, processor=processor, dataset=dataset, embedded=EmbeddedCaptions(images, texts, text_to_image),
        chunk_size=4,
    )


def test_retrieval_evaluator_is_retrieval_metrics_plus_the_gap():
    ctx = context()
    embedded = ctx.embedded
    expected = retrieval_metrics(embedded.image_embeds, embedded.text_embeds, embedded.text_to_image)
    expected["modality_gap"] = modality_gap(
        embedded.image_embeds, embedded.text_embeds, text_to_image=embedded.text_to_image, num_pairs=3
    )
    assert RetrievalEvaluator(gap_pairs=3)(ctx) == expected
    from gapclip.inference import retrieval_report

    assert retrieval_report(embedded, gap_pairs=3, chunk_size=2) == expected  # the same on embeddings alone


def test_eccv_evaluator_merges_extra_positives_by_image_id(tmp_path):
    ctx = context()
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"image_id": 101, "caption_index": 0}\n{"image_id": "105", "caption_index": 3}\n')
    got = ECCVEvaluator(extra)(ctx)
    i2t, t2i = build_positive_sets(
        ctx.embedded.text_to_image, 6, extra_pairs=[("101", 0), ("105", 3)], image_ids=[str(100 + i) for i in range(6)]
    )
    assert i2t[1] == [0, 2] and t2i[3] == [2, 5]  # JSON's integer id 101 is the dataset's "101"
    assert got == eccv_metrics(ctx.embedded.image_embeds, ctx.embedded.text_embeds, i2t, t2i)
    plain = ECCVEvaluator()(ctx)
    assert plain["eccv_i2t_num_queries"] == 6 and plain != got


def test_unimodal_evaluator_reads_the_label_column():
    labels = ["cat", "dog", "cat", "bird", "dog", "cat"]
    ctx = context(label=labels)
    expected = unimodal_recall_at_k(ctx.embedded.image_embeds, torch.tensor([0, 1, 0, 2, 1, 0]), ks=(1, 3))
    assert UniModalEvaluator("label", ks=(1, 3))(ctx) == {f"image_{k}": v for k, v in expected.items()}
    with pytest.raises(ValueError, match=r"label column 'class' is not a column of the evaluated split; it has"):
        UniModalEvaluator("class")(ctx)


def test_sts_evaluator_uses_the_text_tower(tiny_demo_processor, tmp_path):
    model = tiny_model(tiny_demo_processor).eval()
    pairs = StsPairs(
        ["a red circle", "a blue star", "two squares", "a small green cross", "a large white diamond"],
        ["a red square", "a star", "two circles", "a green cross", "a black triangle"], [4.0, 2.5, 1.0, 4.5, 0.5],
    )
    got = STSEvaluator(pairs)(context(model=model, processor=tiny_demo_processor))
    collate = TextCollator(tiny_demo_processor)

    def embed(texts):
        batch = collate(texts)
        with torch.no_grad():
            return model.get_text_features(batch["input_ids"], batch["attention_mask"])

    expected = sts_spearman(embed(pairs.sentence1), embed(pairs.sentence2), pairs.scores)
    assert -100 <= expected <= 100 and got == {"sts_spearman": pytest.approx(expected)}
    file = tmp_path / "sts.csv"
    file.write_text("sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in zip(*pairs)))
    assert STSEvaluator(file).pairs == pairs


def test_two_evaluators_with_the_same_metric_are_an_error():
    class Constant(Evaluator):
        def __call__(self, context):
            return {"rsum": 1.0}

    with pytest.raises(ValueError, match=r"both return the metric 'rsum'"):
        run_evaluators([RetrievalEvaluator(), Constant()], context())


def test_trainer_runs_the_evaluators_and_selects_on_their_metrics(tiny_demo_processor, tiny_demo_datasets, tmp_path):
    """ECCV, uni-modal and STS metrics during training, not only in the evaluation recipe."""
    validation = tiny_demo_datasets["validation"]
    validation = validation.add_column("shape", [i % 3 for i in range(len(validation))])
    pairs = StsPairs(["a red circle", "a blue star"], ["a red square", "a star"], [4.0, 1.0])
    args = training_args(
        tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
        metric_for_best_model="image_r1", load_best_model_at_end=True,
    )
    trainer = make_trainer(tiny_demo_processor, {**tiny_demo_datasets, "validation": validation}, args)
    trainer.evaluators = [ECCVEvaluator(), UniModalEvaluator("shape"), STSEvaluator(pairs)]
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_rsum" in entry]
    assert len(evaluations) == 2
    for entry in evaluations:
        expected = {"eval_eccv_i2t_map_at_r", "eval_eccv_t2i_r_precision", "eval_image_r1", "eval_sts_spearman"}
        assert expected <= set(entry)
    best = max(evaluations, key=lambda entry: (entry["eval_image_r1"], -entry["step"]))
    assert trainer.state.best_metric == best["eval_image_r1"]


def test_training_and_evaluation_recipes_take_the_evaluation_flags(tiny_demo_root, tmp_path, capsys):
    from .test_recipes import tiny_flags

    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image_id": str(i), "label": i % 4}) + "\n" for i in range(80)))
    sts = tmp_path / "sts.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n"
                           for a, b, s in [("a red circle", "a red square", 3), ("a star", "two stars", 2),
                                           ("a blue cross", "a green circle", 0.5)]))
    flags = ["--extra_columns", str(labels), "--label_column", "label", "--eccv", "--sts_file", str(sts)]
    out = tmp_path / "out"
    result = load_recipe("train_clip_lgmgc").main(tiny_flags(out, "--max_steps", "2", *flags))
    for row in result["rows"].values():
        assert {"image_r1", "eccv_i2t_map_at_r", "sts_spearman", "rsum"} <= set(row)
    metrics = load_recipe("evaluate_retrieval").main([
        "--model_name_or_path", str(out), "--dataset", "demo", "--demo_train", str(DEMO_SIZES["num_train"]),
        "--demo_val", str(DEMO_SIZES["num_val"]), "--demo_test", str(DEMO_SIZES["num_test"]), "--demo_image_size",
        str(DEMO_SIZES["image_size"]), *flags,
    ])
    assert metrics["image_r1"] == pytest.approx(result["rows"]["after training"]["image_r1"])
    assert metrics["sts_spearman"] == pytest.approx(result["rows"]["after training"]["sts_spearman"])
