"""KMeansBatchSampler (DIAS Sec. 3.5 neighbour sampling) and its Trainer refresh callback."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gapclip.data.kmeans_sampler import KMeansBatchSampler, KMeansRefreshCallback

torch.set_num_threads(1)


def blobs(sizes=(13, 11, 9, 7), dim=4, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs; returns (features, true blob id)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 100.0
    features = np.concatenate([c + rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    truth = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    return features.astype(np.float32), truth


def test_every_sample_once_per_epoch_and_batch_sizes():
    features, _ = blobs()
    sampler = KMeansBatchSampler(features, clusters_per_batch=2, images_per_cluster=3, num_clusters=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(40))
        assert [len(b) for b in batches] == [6] * 6 + [4]
        assert len(batches) == len(sampler)


def test_drop_last():
    features, _ = blobs()
    sampler = KMeansBatchSampler(features, 2, 3, num_clusters=4, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 and all(len(b) == 6 for b in batches)
    assert len({i for b in batches for i in b}) == 36


def test_batches_are_cluster_coherent_on_blobs():
    features, truth = blobs(sizes=(12, 12, 12, 12))
    sampler = KMeansBatchSampler(features, clusters_per_batch=2, images_per_cluster=4, num_clusters=4, seed=1)
    batches = list(sampler)
    for batch in batches:
        # each chunk of P = 4 consecutive indices comes from one blob, so a batch spans at most M = 2 blobs
        for start in range(0, len(batch), 4):
            assert len(set(truth[batch[start : start + 4]])) == 1
        assert len(set(truth[batch])) <= 2
    # and the learned clusters are the blobs
    assert all(len(set(sampler.labels[truth == k])) == 1 for k in range(4))


def test_leftovers_fill_batches_with_few_clusters_per_chunk():
    features, truth = blobs(sizes=(10, 7, 5))  # leftovers with P = 4: 2, 3, 1
    sampler = KMeansBatchSampler(features, clusters_per_batch=1, images_per_cluster=4, num_clusters=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(22))
    mixed = [b for b in batches if len(set(truth[b])) > 1]
    assert len(mixed) <= 2  # 6 leftover indices → at most one full + one tail chunk


def test_deterministic_per_seed_and_epoch():
    features, _ = blobs()
    a = KMeansBatchSampler(features, 2, 3, num_clusters=4, seed=5)
    b = KMeansBatchSampler(features, 2, 3, num_clusters=4, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    c = KMeansBatchSampler(features, 2, 3, num_clusters=4, seed=6)
    assert list(c) != list(b)


@pytest.mark.parametrize("num_clusters,size", [(4, 40), (3, 25)])
def test_two_simulated_replicas_partition_each_global_batch(num_clusters, size):
    features, _ = blobs(sizes=(size - 20, 20))
    replicas = [
        KMeansBatchSampler(features, 2, 4, num_clusters=num_clusters, num_replicas=2, rank=r) for r in range(2)
    ]
    single = KMeansBatchSampler(features, 2, 4, num_clusters=num_clusters)
    for epoch in (0, 3):
        for s in (*replicas, single):
            s.set_epoch(epoch)
        per_rank = [list(s) for s in replicas]
        assert len(per_rank[0]) == len(per_rank[1]) == len(replicas[0])
        assert all(len(batch) > 0 for batches in per_rank for batch in batches)
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert sorted(seen) == list(range(size)) and set(seen.values()) == {1}
        # rank 0's slice followed by rank 1's slice is the global batch; without a merged tail (40 = 5 × 8) the
        # global batches are exactly the single-process ones
        if size % 8 == 0:
            assert single.global_batches() == replicas[1].global_batches()
        for g, (b0, b1) in zip(replicas[1].global_batches(), zip(*per_rank)):
            assert b0 + b1 == g
            assert abs(len(b0) - len(b1)) <= 1


def test_tiny_tail_is_merged_so_no_rank_is_empty():
    features = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)  # 9 = 8 + 1 with M·P = 8
    ranks = [KMeansBatchSampler(features, 2, 4, num_clusters=2, num_replicas=2, rank=r) for r in range(2)]
    batches = [list(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == 1 == len(ranks[0])
    assert sorted(batches[0][0] + batches[1][0]) == list(range(9))


def test_state_dict_round_trip():
    features, _ = blobs()
    sampler = KMeansBatchSampler(features, 2, 3, num_clusters=4, seed=2)
    sampler.set_epoch(4)
    state = sampler.state_dict()
    expected = list(sampler)
    other_features, _ = blobs(seed=9)
    resumed = KMeansBatchSampler(other_features, 2, 3, num_clusters=5, seed=0)
    resumed.load_state_dict(state)
    assert resumed.epoch == 4 and list(resumed) == expected
    with pytest.raises(ValueError, match="labels"):
        resumed.load_state_dict({**state, "labels": state["labels"][:-1]})


def test_update_embeddings_reclusters():
    features, truth = blobs(sizes=(10, 10))
    sampler = KMeansBatchSampler(features, 1, 5, num_clusters=2)
    swapped = np.concatenate([features[10:], features[:10]])
    sampler.update_embeddings(torch.from_numpy(swapped))
    assert len(set(sampler.labels[:10])) == 1 and sampler.labels[0] != sampler.labels[10]
    assert sorted(i for b in sampler for i in b) == list(range(20))
    with pytest.raises(ValueError, match="rows"):
        sampler.update_embeddings(features[:5])


def test_minibatch_algorithm_and_invalid_options():
    features, _ = blobs()
    sampler = KMeansBatchSampler(features, 2, 3, num_clusters=4, algorithm="minibatch")
    assert sorted(i for b in sampler for i in b) == list(range(40))
    with pytest.raises(ValueError, match="algorithm"):
        KMeansBatchSampler(features, 2, 3, algorithm="dbscan")
    with pytest.raises(ValueError, match="divisible"):
        KMeansBatchSampler(features, 1, 3, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="images_per_cluster"):
        KMeansBatchSampler(features, 2, 0)


def test_dataloader_and_gradient_accumulation_semantics():
    """Batches are plain index lists: a DataLoader yields them, accumulation groups them; nothing is lost."""
    features, _ = blobs()
    data = torch.arange(40)
    sampler = KMeansBatchSampler(features, 2, 3, num_clusters=4)
    loader = DataLoader(data, batch_sampler=sampler)
    micro = [b.tolist() for b in loader]
    assert micro == list(sampler)
    accumulation = 3
    steps = [micro[i : i + accumulation] for i in range(0, len(micro), accumulation)]
    assert sorted(i for step in steps for b in step for i in b) == list(range(40))
    assert len(steps) == -(-len(sampler) // accumulation)


def test_refresh_callback_reclusters_from_embed_fn():
    features, _ = blobs(sizes=(10, 10))
    sampler = KMeansBatchSampler(features, 1, 5, num_clusters=2)
    calls = []
    model = torch.nn.Linear(2, 2)
    model.train()

    def embed_fn(m):
        calls.append(m.training)
        return blobs(sizes=(5, 15))[0]

    callback = KMeansRefreshCallback(sampler, embed_fn)
    before = sampler.labels.copy()
    callback.on_epoch_begin(None, None, None, model=model)  # first epoch keeps the initial clusters
    assert calls == [] and np.array_equal(sampler.labels, before)
    callback.on_epoch_begin(None, None, None, model=model)
    assert calls == [False] and model.training
    assert before[0] == before[5]
    assert len(set(sampler.labels[:5])) == 1 and len(set(sampler.labels[5:])) == 1
    assert sampler.labels[0] != sampler.labels[5]
