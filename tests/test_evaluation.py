"""Tests of gapclip.evaluation against hand-computed cases and naive full-matrix references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gapclip.evaluation import (
    build_positive_sets,
    coco_1k_metrics,
    eccv_metrics,
    format_retrieval_table,
    metrics_from_ranks,
    modality_gap,
    retrieval_metrics,
    retrieval_ranks,
    sts_spearman,
    unimodal_recall_at_k,
)


# ---------------------------------------------------------------------------------------------------------------------
# Naive references: full similarity matrix + lexicographic sort (score desc, positives first among ties)
# ---------------------------------------------------------------------------------------------------------------------


def _ranking(scores_row: np.ndarray, positive_row: np.ndarray) -> np.ndarray:
    """Gallery order for one query: by score descending, positives before tied negatives (optimistic ties)."""
    return np.lexsort((~positive_row, -scores_row))


def naive_ranks(images, texts, text_to_image, normalize=True):
    """0-based rank of each query's best positive, from full sorts."""
    if normalize:
        images = torch.nn.functional.normalize(images, dim=-1)
        texts = torch.nn.functional.normalize(texts, dim=-1)
    sims = (images @ texts.T).double().numpy()
    t2i_index = np.asarray(text_to_image)
    n, m = sims.shape
    i2t_ranks, t2i_ranks = [], []
    for i in range(n):
        positive = t2i_index == i
        order = _ranking(sims[i], positive)
        i2t_ranks.append(int(np.nonzero(positive[order])[0][0]))
    for j in range(m):
        positive = np.arange(n) == t2i_index[j]
        order = _ranking(sims[:, j], positive)
        t2i_ranks.append(int(np.nonzero(positive[order])[0][0]))
    return np.array(i2t_ranks), np.array(t2i_ranks)


def naive_retrieval(images, texts, text_to_image, ks=(1, 5, 10), normalize=True):
    i2t_ranks, t2i_ranks = naive_ranks(images, texts, text_to_image, normalize)
    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * np.mean(ranks < k)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    out["i2t_medr"] = np.floor(np.median(i2t_ranks)) + 1
    out["t2i_medr"] = np.floor(np.median(t2i_ranks)) + 1
    out["i2t_meanr"] = i2t_ranks.mean() + 1
    out["t2i_meanr"] = t2i_ranks.mean() + 1
    return out


def naive_map_at_r(sims: np.ndarray, positives: dict[int, list[int]]):
    maps, rps, r1s = [], [], []
    for query, pos in positives.items():
        positive = np.zeros(sims.shape[1], dtype=bool)
        positive[pos] = True
        rel = positive[_ranking(sims[query], positive)]
        r = len(pos)
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        maps.append((precision[:r] * rel[:r]).sum() / r)
        rps.append(rel[:r].sum() / r)
        r1s.append(float(rel[0]))
    return 100 * np.mean(maps), 100 * np.mean(rps), 100 * np.mean(r1s)


def assert_metrics_close(got: dict, expected: dict):
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def random_setup(num_images=23, captions=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, dim, generator=g)
    text_to_image = torch.arange(num_images).repeat_interleave(captions)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=g)]
    texts = images[text_to_image] + 1.5 * torch.randn(len(text_to_image), dim, generator=g)
    return images, texts, text_to_image


# ---------------------------------------------------------------------------------------------------------------------
# retrieval_metrics
# ---------------------------------------------------------------------------------------------------------------------


def test_retrieval_ranks_are_each_querys_best_positive_rank():
    images, texts, text_to_image = random_setup(seed=3)
    expected_i2t, expected_t2i = naive_ranks(images, texts, text_to_image)
    for chunk_size in (1, 5, 1024):
        i2t, t2i = retrieval_ranks(images, texts, text_to_image, chunk_size=chunk_size)
        assert i2t.dtype == t2i.dtype == torch.long and i2t.shape == (23,) and t2i.shape == (69,)
        assert i2t.tolist() == expected_i2t.tolist() and t2i.tolist() == expected_t2i.tolist()
    assert metrics_from_ranks(i2t, t2i) == retrieval_metrics(images, texts, text_to_image)


def test_hand_checked_three_images_two_captions():
    # Unnormalised dot products on one-hot-ish vectors so every rank is known by hand.
    images = torch.eye(3)
    # captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
    texts = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # cap0: best image 0 (rank 0)
            [0.0, 0.9, 0.0],  # cap1: best image 1, image 0 scores 0 -> ties with image 2; rank = 1 (optimistic)
            [0.0, 1.0, 0.0],  # cap2: image 1 first (rank 0)
            [0.5, 0.4, 0.3],  # cap3: image 0 > image 1 -> rank 1
            [0.9, 0.8, 0.1],  # cap4: image 2 is third -> rank 2
            [0.2, 0.7, 0.0],  # cap5: images 1, 0 above image 2 (score 0) -> rank 2
        ]
    )
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    m = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 5), normalize=False)
    # t2i ranks: [0, 1, 0, 1, 2, 2] -> R@1 2/6, R@2 4/6, R@5 6/6
    assert m["t2i_r1"] == pytest.approx(100 * 2 / 6)
    assert m["t2i_r2"] == pytest.approx(100 * 4 / 6)
    assert m["t2i_r5"] == pytest.approx(100.0)
    # image 0 scores captions: [1, 0, 0, .5, .9, .2] -> best positive cap0 (1.0) ranks first: rank 0.
    # image 1: [0, .9, 1, .4, .8, .7] -> cap2 (1.0) first: rank 0.
    # image 2: [0, 0, 0, .3, .1, 0] -> best positive cap4 (0.1); cap3 (0.3) above -> rank 1.
    assert m["i2t_r1"] == pytest.approx(100 * 2 / 3)
    assert m["i2t_r2"] == pytest.approx(100.0)
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 2, 5)))
    assert m["i2t_medr"] == 1.0 and m["i2t_meanr"] == pytest.approx(1 + 1 / 3)
    assert m["t2i_medr"] == 2.0  # floor(median([0,0,1,1,2,2]) = 1) + 1
    assert m["t2i_meanr"] == pytest.approx(1 + 1.0)
    assert set(retrieval_metrics(images, texts, text_to_image)) == {
        "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
        "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr",
    }  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
def test_matches_naive_reference_random(chunk_size):
    images, texts, text_to_image = random_setup()
    got = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk_size=chunk_size)
    assert_metrics_close(got, naive_retrieval(images, texts, text_to_image))
    assert 0 < got["rsum"] < 600


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_matches_naive_reference_with_ties(chunk_size):
    # Small integer vectors, raw dot products: many exact ties, resolved optimistically on both sides.
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 2, (9, 3), generator=g).double()
    text_to_image = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 3, 5, 8, 8])
    texts = torch.randint(0, 2, (len(text_to_image), 3), generator=g).double()
    got = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 3), chunk_size=chunk_size, normalize=False)
    assert_metrics_close(got, naive_retrieval(images, texts, text_to_image, ks=(1, 2, 3), normalize=False))


def test_all_tied_scores_are_perfect_under_optimistic_ties():
    images = torch.ones(4, 2)
    texts = torch.ones(8, 2)
    m = retrieval_metrics(images, texts, torch.arange(4).repeat(2))
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0


def test_joint_permutation_invariance():
    images, texts, text_to_image = random_setup(seed=3)
    base = retrieval_metrics(images, texts, text_to_image, chunk_size=5)
    g = torch.Generator().manual_seed(7)
    image_perm = torch.randperm(len(images), generator=g)
    text_perm = torch.randperm(len(texts), generator=g)
    inverse = torch.empty_like(image_perm)
    inverse[image_perm] = torch.arange(len(image_perm))
    permuted = retrieval_metrics(images[image_perm], texts[text_perm], inverse[text_to_image[text_perm]], chunk_size=5)
    assert_metrics_close(permuted, base)


def test_half_precision_and_unnormalised_inputs_accepted():
    images, texts, text_to_image = random_setup(seed=4)
    m32 = retrieval_metrics(images, texts, text_to_image)
    m16 = retrieval_metrics(images.half(), texts.half(), text_to_image)
    assert abs(m16["rsum"] - m32["rsum"]) < 50  # fp16 inputs rounded; scored in fp32
    # normalize=True is invariant to per-row scaling
    scaled = retrieval_metrics(images * 3.0, texts * torch.rand(len(texts), 1).add(0.5), text_to_image)
    assert scaled["rsum"] == pytest.approx(m32["rsum"])


def test_bad_inputs_raise_clear_errors():
    images, texts, text_to_image = random_setup(num_images=4, captions=2)
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(images, texts[:, :5], text_to_image)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        retrieval_metrics(images, texts, torch.where(text_to_image == 0, 4, text_to_image))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        retrieval_metrics(images, texts, torch.where(text_to_image == 0, -1, text_to_image))
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(images, texts, text_to_image[:-1])
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(images[:0], texts, text_to_image)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(images[0], texts, text_to_image)
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(images, texts, torch.where(text_to_image == 3, 0, text_to_image))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(images, texts, text_to_image, chunk_size=0)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(images, texts, text_to_image, ks=())
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(images, texts, text_to_image.float())


# ---------------------------------------------------------------------------------------------------------------------
# COCO 1K
# ---------------------------------------------------------------------------------------------------------------------


def test_coco_1k_equals_manual_fold_mean():
    images, texts, text_to_image = random_setup(num_images=20, captions=2, seed=5)
    got = coco_1k_metrics(images, texts, text_to_image, num_folds=5, chunk_size=3)
    folds = []
    for f in range(5):
        keep = (text_to_image >= 4 * f) & (text_to_image < 4 * f + 4)
        folds.append(naive_retrieval(images[4 * f : 4 * f + 4], texts[keep], text_to_image[keep] - 4 * f))
    assert_metrics_close(got, {key: np.mean([fold[key] for fold in folds]) for key in folds[0]})
    # one fold = the full protocol
    single = coco_1k_metrics(images, texts, text_to_image, num_folds=1)
    assert_metrics_close(single, naive_retrieval(images, texts, text_to_image))


def test_coco_1k_rejects_indivisible_image_count():
    images, texts, text_to_image = random_setup(num_images=12, captions=1)
    with pytest.raises(ValueError, match="multiple of `num_folds`"):
        coco_1k_metrics(images, texts, text_to_image, num_folds=5)
    with pytest.raises(ValueError, match="num_folds"):
        coco_1k_metrics(images, texts, text_to_image, num_folds=0)


# ---------------------------------------------------------------------------------------------------------------------
# Modality gap
# ---------------------------------------------------------------------------------------------------------------------


def test_modality_gap_hand_built():
    images = torch.tensor([[2.0, 0.0, 0.0]]).repeat(5, 1)  # normalised to e1
    texts = torch.tensor([[0.0, 3.0, 0.0]]).repeat(5, 1)  # normalised to e2
    assert modality_gap(images, texts) == pytest.approx(math.sqrt(2))
    assert modality_gap(images, images * 4) == pytest.approx(0.0)
    assert modality_gap(images, -images) == pytest.approx(2.0)


def test_modality_gap_first_pairs_and_text_to_image():
    images = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(3, 1), torch.tensor([[0.0, 1.0]]).repeat(3, 1)])
    aligned = images.clone()
    # Only the first 3 pairs (all e1 vs e1) -> 0; all 6 -> still 0; shift texts of the last 3 images.
    aligned[3:] = torch.tensor([1.0, 0.0])
    assert modality_gap(images, aligned, num_pairs=3) == pytest.approx(0.0)
    assert modality_gap(images, aligned, num_pairs=None) == pytest.approx(math.sqrt(0.5**2 + 0.5**2))
    # text_to_image: the FIRST caption of each image is used; captions stored out of order.
    captions = torch.tensor([[0.0, -1.0], [1.0, 0.0], [5.0, 5.0]])
    text_to_image = torch.tensor([1, 0, 1])  # image 0 -> caption 1, image 1 -> caption 0 (first), caption 2 ignored
    two_images = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    assert modality_gap(two_images, captions, text_to_image=text_to_image) == pytest.approx(0.0)
    # seeded random subset of all pairs == all pairs when num_pairs covers everything
    assert modality_gap(images, aligned, num_pairs=6, seed=0) == pytest.approx(
        modality_gap(images, aligned, num_pairs=None)
    )


def test_modality_gap_errors():
    with pytest.raises(ValueError, match="one caption per image"):
        modality_gap(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="num_pairs"):
        modality_gap(torch.randn(4, 3), torch.randn(4, 3), num_pairs=0)
    with pytest.raises(ValueError, match="dim"):
        modality_gap(torch.randn(4, 3), torch.randn(4, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------------


def test_format_retrieval_table():
    rows = {
        "CLIP": {"i2t_r1": 80.04, "i2t_r5": 95.0, "i2t_r10": 98.0, "t2i_r1": 60.0, "t2i_r5": 85.55, "t2i_r10": 91.0,
                 "modality_gap": 0.8412},
        "Ours": {"i2t_r1": 81.0, "i2t_r5": 96.0, "i2t_r10": 98.5, "t2i_r1": 62.0, "t2i_r5": 86.0, "t2i_r10": 92.0,
                 "rsum": 515.5},
    }  # fmt: skip
    table = format_retrieval_table(rows, title="Flickr30K 1K test")
    lines = table.splitlines()
    assert lines[0] == "Flickr30K 1K test" and lines[1] == ""
    header = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert header == ["Method", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "RSUM", "Gap"]
    assert set(lines[3]) <= set("|-:")
    clip = [cell.strip() for cell in lines[4].strip("|").split("|")]
    assert clip == ["CLIP", "80.0", "95.0", "98.0", "60.0", "85.5", "91.0", "509.6", "0.841"]
    ours = [cell.strip() for cell in lines[5].strip("|").split("|")]
    assert ours[-2:] == ["515.5", "-"]
    # no gap column when no row has it
    assert "Gap" not in format_retrieval_table({"Ours": rows["Ours"]})
    assert len({len(line) for line in lines[2:]}) == 1  # aligned columns


# ---------------------------------------------------------------------------------------------------------------------
# ECCV Caption mAP@R / R-Precision
# ---------------------------------------------------------------------------------------------------------------------


def test_map_at_r_known_ranks():
    # One image query; 4 captions scored 1.0, 0.9, 0.8, 0.7 (raw dot products); positives at ranks 1 and 3.
    image = torch.tensor([[1.0]])
    texts = torch.tensor([[1.0], [0.9], [0.8], [0.7]])
    m = eccv_metrics(image, texts, {0: [0, 2]}, {}, normalize=False)
    assert m["eccv_i2t_map_at_r"] == pytest.approx(50.0)  # (1/2)(1/1 + 0)
    assert m["eccv_i2t_r_precision"] == pytest.approx(50.0)
    assert m["eccv_i2t_r1"] == 100.0 and m["eccv_i2t_num_queries"] == 1
    assert math.isnan(m["eccv_t2i_map_at_r"]) and m["eccv_t2i_num_queries"] == 0
    # positives at ranks 2 and 3 with R=3 (ranks 2,3,4 -> positions 2,3 within R): (1/3)(1/2 + 2/3)
    m = eccv_metrics(image, texts, {0: [1, 2, 3]}, {}, normalize=False)
    assert m["eccv_i2t_map_at_r"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 3)
    assert m["eccv_i2t_r_precision"] == pytest.approx(100 * 2 / 3)
    assert m["eccv_i2t_r1"] == 0.0


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_eccv_matches_naive_reference(chunk_size):
    images, texts, text_to_image = random_setup(num_images=15, captions=2, seed=8)
    g = torch.Generator().manual_seed(9)
    extra_images, extra_captions = torch.randint(0, 15, (12,), generator=g), torch.randint(0, 30, (12,), generator=g)
    extra = list(zip(extra_images.tolist(), extra_captions.tolist()))
    i2t, t2i = build_positive_sets(text_to_image, 15, extra_pairs=extra)
    i2t = {q: v for q, v in i2t.items() if q % 3 != 0}  # evaluate a subset of queries, as ECCV Caption does
    got = eccv_metrics(images, texts, i2t, t2i, chunk_size=chunk_size)
    normalize = torch.nn.functional.normalize
    sims = (normalize(images, dim=-1) @ normalize(texts, dim=-1).T).double().numpy()
    for name, s, positives in (("i2t", sims, i2t), ("t2i", sims.T, t2i)):
        expected = naive_map_at_r(s, positives)
        assert got[f"eccv_{name}_map_at_r"] == pytest.approx(expected[0])
        assert got[f"eccv_{name}_r_precision"] == pytest.approx(expected[1])
        assert got[f"eccv_{name}_r1"] == pytest.approx(expected[2])
        assert got[f"eccv_{name}_num_queries"] == len(positives)


def test_eccv_ties_and_sequence_positives():
    images = torch.randint(0, 2, (6, 2)).double()
    texts = torch.randint(0, 2, (9, 2)).double()
    i2t = [[0, 1], [2], [], [3, 4, 5], [6], [7, 8]]
    t2i = [[0], [0, 1], [1], [3], [3], [3], [4], [5], [5, 2]]
    got = eccv_metrics(images, texts, i2t, t2i, normalize=False, chunk_size=2)
    sims = (images @ texts.T).numpy()
    expected_i2t = naive_map_at_r(sims, {q: p for q, p in enumerate(i2t) if p})
    expected_t2i = naive_map_at_r(sims.T, dict(enumerate(t2i)))
    assert got["eccv_i2t_map_at_r"] == pytest.approx(expected_i2t[0]) and got["eccv_i2t_num_queries"] == 5
    assert got["eccv_t2i_r_precision"] == pytest.approx(expected_t2i[1])
    with pytest.raises(ValueError, match="one entry per query"):
        eccv_metrics(images, texts, i2t[:-1], t2i)
    with pytest.raises(ValueError, match="gallery index 9"):
        eccv_metrics(images, texts, {0: [9]}, t2i)


def test_extra_positives_merge_with_the_datasets_own():
    pairs = [(100, 3), (300, 0)]  # as load_extra_positives reads them (tests/data/test_evaluation_files.py)
    i2t, t2i = build_positive_sets(torch.tensor([0, 0, 1, 2]), 3, extra_pairs=pairs, image_ids=[100, 200, 300])
    assert i2t == {0: [0, 1, 3], 1: [2], 2: [0, 3]}
    assert t2i == {0: [0, 2], 1: [0], 2: [1], 3: [0, 2]}
    with pytest.raises(ValueError, match="not in `image_ids`"):
        build_positive_sets(torch.tensor([0]), 1, extra_pairs=[(5, 0)], image_ids=[1])


# ---------------------------------------------------------------------------------------------------------------------
# Uni-modal retrieval
# ---------------------------------------------------------------------------------------------------------------------


def test_unimodal_recall_excludes_self():
    embeds = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 1, 1, 0])
    # NN (self excluded): 0->4 (hit), 1->4 (miss), 2->3 (hit), 3->2 (hit), 4->0 (hit)  => 80%
    assert unimodal_recall_at_k(embeds, labels)["r1"] == pytest.approx(80.0)
    assert unimodal_recall_at_k(embeds, labels, chunk_size=1)["r1"] == pytest.approx(80.0)
    # item 1's neighbours: 4, 0 (label 0), then 3 (label 1) -> a hit only from K=3
    r = unimodal_recall_at_k(embeds, labels, ks=(1, 2, 3), chunk_size=2)
    assert r == {"r1": pytest.approx(80.0), "r2": pytest.approx(80.0), "r3": pytest.approx(100.0)}
    # without self-exclusion every query would find itself: the gallery form shows the difference
    assert unimodal_recall_at_k(embeds, labels, gallery_embeds=embeds, gallery_labels=labels)["r1"] == 100.0


def test_unimodal_recall_matches_naive_and_singletons_miss():
    g = torch.Generator().manual_seed(11)
    embeds = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 8, (40,), generator=g)
    labels[0] = 99  # a singleton class: never a hit
    sims = torch.nn.functional.normalize(embeds, dim=-1) @ torch.nn.functional.normalize(embeds, dim=-1).T
    sims.fill_diagonal_(-float("inf"))
    expected = {}
    for k in (1, 4):
        top = sims.topk(k, dim=1).indices
        expected[f"r{k}"] = 100 * (labels[top] == labels[:, None]).any(1).double().mean().item()
    for chunk_size in (1, 7, 64):
        got = unimodal_recall_at_k(embeds, labels, ks=(1, 4), chunk_size=chunk_size)
        assert got == {key: pytest.approx(value) for key, value in expected.items()}
    # query/gallery split (In-Shop): nothing excluded, an exact duplicate in the gallery is a hit
    assert unimodal_recall_at_k(embeds[:5], labels[:5], gallery_embeds=embeds, gallery_labels=labels)["r1"] == 100.0
    with pytest.raises(ValueError, match="both"):
        unimodal_recall_at_k(embeds, labels, gallery_embeds=embeds)["r1"]
    with pytest.raises(ValueError, match="one per item"):
        unimodal_recall_at_k(embeds, labels[:-1])["r1"]


# ---------------------------------------------------------------------------------------------------------------------
# STS
# ---------------------------------------------------------------------------------------------------------------------


def test_sts_spearman_monotone_and_reversed():
    angles = torch.linspace(0.1, 1.4, 7)
    emb1 = torch.tensor([[1.0, 0.0]]).repeat(7, 1)
    emb2 = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # cosine decreases with angle
    gold = (5 - angles * 2).tolist()
    assert sts_spearman(emb1, emb2, gold) == pytest.approx(100.0)
    assert sts_spearman(emb1, emb2, [-s for s in gold]) == pytest.approx(-100.0)
    with pytest.raises(ValueError, match="same length"):
        sts_spearman(emb1, emb2, gold[:-1])
