"""Neighbour batch sampling by K-means (DIAS Sec. 3.5): batches of M clusters × P images.

DIAS "appl[ies] K-means clustering on the local image embeddings, then randomly select[s] M clusters and
choose[s] P images from each cluster", so that the in-batch negatives of Eq. 3 and the spatial constraints of
Eq. 8/10 compare neighbours. :class:`KMeansBatchSampler` does this over dataset indices (one embedding row per
dataset row; rows showing the same image share an embedding and so a cluster), and
:class:`KMeansRefreshCallback` re-embeds and re-clusters at the start of every epoch of a ``Trainer`` run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.utils import logging

from ..distributed import distributed_info

logger = logging.get_logger(__name__)

ALGORITHMS = ("kmeans", "minibatch")


def _as_numpy(embeddings: Any) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().float().cpu().numpy()
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [num_samples, dim] array, got shape {array.shape}.")
    return array


class KMeansBatchSampler(Sampler[list[int]]):
    """Yields cluster-coherent batches of dataset indices: ``clusters_per_batch`` (M) chunks of
    ``images_per_cluster`` (P) indices of one cluster each, so a global batch holds ``M·P`` indices.

    Epoch plan (deterministic in ``seed``, ``epoch`` and the cluster assignment):

    1. every cluster's members are shuffled and cut into chunks of P; the full chunks of all clusters are pooled;
    2. leftovers (each cluster's last < P members) are laid out cluster by cluster, largest cluster first, and cut
       into chunks of P, so a leftover chunk spans as few clusters as possible; these join the pool, except a
       final chunk shorter than P, which goes last;
    3. the pool is shuffled and consecutive M chunks form a global batch, so each index appears exactly once per
       epoch and all global batches but the last have ``M·P`` indices (``drop_last`` drops a short last one).

    Distributed: each global batch is split into ``num_replicas`` contiguous, (near-)equal slices and rank r
    yields slice r, so the processes see distinct indices and together every index once per epoch (the gathered
    global batch of gapclip's losses is then the cluster-coherent batch, in rank order). ``M·P`` must be divisible
    by ``num_replicas``; a last global batch with fewer than ``num_replicas`` indices is merged into the previous
    one so that no rank gets an empty batch. When a launcher shards the DataLoader itself (accelerate's
    ``BatchSamplerShard``), build the sampler with ``num_replicas=1`` instead.

    Args:
        embeddings: ``[num_samples, dim]`` features to cluster (tensor or array), one per dataset index: the
            current model's image embeddings or precomputed features (DIAS clusters local image embeddings; mean
            pooled patch tokens or the global embedding are both fine).
        clusters_per_batch: M.
        images_per_cluster: P.
        num_clusters: K of K-means; default ``max(M, num_samples // (4·P))`` (clusters of about 4 chunks), capped at
            ``num_samples``.
        algorithm: ``"kmeans"`` (scikit-learn ``KMeans``) or ``"minibatch"`` (``MiniBatchKMeans``, for large sets).
        seed: seeds the clustering and every epoch's shuffle.
        drop_last: drop a last global batch shorter than ``M·P``.
        num_replicas / rank: default from ``torch.distributed`` when initialised, else 1 / 0.

    Example::

        >>> sampler = KMeansBatchSampler(image_features, clusters_per_batch=16, images_per_cluster=8)
        >>> loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for batch in loader: ...
    """

    def __init__(
        self,
        embeddings: Any,
        clusters_per_batch: int,
        images_per_cluster: int,
        *,
        num_clusters: int | None = None,
        algorithm: str = "kmeans",
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        for option, value in (("clusters_per_batch", clusters_per_batch), ("images_per_cluster", images_per_cluster)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be an int >= 1, got {value!r}.")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}.")
        if num_replicas is None or rank is None:
            running_rank, running_world_size = distributed_info()
            num_replicas = running_world_size if num_replicas is None else num_replicas
            rank = running_rank if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas); got rank={rank}, num_replicas={num_replicas}.")
        self.clusters_per_batch = clusters_per_batch
        self.images_per_cluster = images_per_cluster
        self.global_batch_size = clusters_per_batch * images_per_cluster
        if self.global_batch_size % num_replicas:
            raise ValueError(
                f"clusters_per_batch × images_per_cluster = {self.global_batch_size} must be divisible by "
                f"num_replicas={num_replicas} (global batches are split evenly between ranks)."
            )
        self.num_clusters_option = num_clusters
        self.algorithm = algorithm
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.clustered_epoch = 0  # the epoch whose start produced the current labels (the initial ones serve 0)
        self.labels: np.ndarray = np.zeros(0, dtype=np.int64)
        self.update_embeddings(embeddings)

    # ------------------------------------------------------------------ clustering
    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def _num_clusters(self, num_samples: int) -> int:
        k = self.num_clusters_option
        if k is None:
            k = max(self.clusters_per_batch, num_samples // (4 * self.images_per_cluster))
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"num_clusters must be an int >= 1, got {k!r}.")
        return min(k, num_samples)

    def update_embeddings(self, embeddings: Any) -> np.ndarray:
        """Re-cluster from new features (same number of samples as before, if any); returns the labels."""
        from sklearn.cluster import KMeans, MiniBatchKMeans

        features = _as_numpy(embeddings)
        if self.num_samples and features.shape[0] != self.num_samples:
            raise ValueError(
                f"update_embeddings got {features.shape[0]} rows but the sampler covers {self.num_samples} samples."
            )
        if features.shape[0] < self.num_replicas:
            raise ValueError(f"{features.shape[0]} samples cannot be split between {self.num_replicas} replicas.")
        k = self._num_clusters(features.shape[0])
        if self.algorithm == "kmeans":
            model = KMeans(n_clusters=k, random_state=self.seed, n_init=1)
        else:
            model = MiniBatchKMeans(n_clusters=k, random_state=self.seed, n_init=3, batch_size=1024)
        self.labels = model.fit_predict(features).astype(np.int64)
        return self.labels

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (call before iterating, on every rank)."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (identical on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        p, m = self.images_per_cluster, self.clusters_per_batch
        chunks: list[list[int]] = []
        leftovers: list[np.ndarray] = []
        for cluster in np.unique(self.labels):
            members = rng.permutation(np.flatnonzero(self.labels == cluster))
            full = len(members) // p * p
            chunks.extend(members[i : i + p].tolist() for i in range(0, full, p))
            if full < len(members):
                leftovers.append(members[full:])
        leftovers.sort(key=len, reverse=True)  # stable: equal lengths stay in cluster order
        rest = np.concatenate(leftovers).tolist() if leftovers else []
        tail_chunk = None
        for i in range(0, len(rest), p):
            piece = rest[i : i + p]
            if len(piece) == p:
                chunks.append(piece)
            else:
                tail_chunk = piece
        order = rng.permutation(len(chunks))
        chunks = [chunks[i] for i in order]
        if tail_chunk is not None:
            chunks.append(tail_chunk)
        batches = [sum(chunks[i : i + m], []) for i in range(0, len(chunks), m)]
        if batches and len(batches[-1]) < self.global_batch_size:
            if self.drop_last:
                batches.pop()
            elif len(batches[-1]) < self.num_replicas and len(batches) > 1:
                batches[-2].extend(batches.pop())
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield np.array_split(np.asarray(batch, dtype=np.int64), self.num_replicas)[self.rank].tolist()

    def __len__(self) -> int:
        n, b = self.num_samples, self.global_batch_size
        if self.drop_last:
            return n // b
        full, rest = divmod(n, b)
        if rest == 0:
            return full
        return full if (rest < self.num_replicas and full > 0) else full + 1

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to reproduce the current epoch exactly: epoch, seed and cluster assignment (and the
        epoch it was computed for, so that a run resumed mid-epoch does not re-cluster)."""
        return {
            "epoch": self.epoch, "seed": self.seed, "clustered_epoch": self.clustered_epoch,
            "labels": self.labels.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        labels = np.asarray(state["labels"], dtype=np.int64)
        if self.num_samples and labels.shape[0] != self.num_samples:
            raise ValueError(f"state_dict has {labels.shape[0]} labels but the sampler covers {self.num_samples}.")
        self.labels = labels
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.clustered_epoch = int(state.get("clustered_epoch", self.epoch))


class KMeansRefreshCallback(TrainerCallback):
    """Re-embed the training images with the current model and re-cluster at the start of every epoch.

    ``embed_fn(model)`` must return the ``[num_samples, dim]`` features in dataset order, identical on every rank
    (K-means is seeded, so identical features give identical clusters everywhere). The Trainer calls
    ``on_epoch_begin`` before it iterates the epoch, so the new clusters serve that epoch; it also calls the
    sampler's ``set_epoch`` when it can reach it, otherwise call it yourself.

    The epoch is read from the Trainer's ``state.epoch``, and an epoch whose clusters the sampler already holds
    (``sampler.clustered_epoch``, restored from a checkpoint by :class:`~gapclip.GapClipTrainer`) is not
    re-clustered: a run resumed mid-epoch keeps that epoch's clusters, one resumed at an epoch boundary
    re-clusters with the checkpoint's weights, exactly as the uninterrupted run did.

    Args:
        sampler: the :class:`KMeansBatchSampler` of the training DataLoader.
        embed_fn: ``model -> features`` (e.g. ``lambda model: encode_all_images(model, dataset)``).
        every_n_epochs: refresh period (default 1); the first epoch keeps the sampler's initial clusters.
    """

    def __init__(
        self, sampler: KMeansBatchSampler, embed_fn: Callable[[Any], Any], every_n_epochs: int = 1
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.sampler = sampler
        self.embed_fn = embed_fn
        self.every_n_epochs = every_n_epochs
        self.epochs_seen = 0

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        # The Trainer's epoch, so that a resumed run counts from where it stopped (a bare call counts calls).
        epoch = int(math.floor(state.epoch or 0)) if state is not None else self.epochs_seen
        self.epochs_seen = epoch + 1
        if epoch == 0 or epoch % self.every_n_epochs or self.sampler.clustered_epoch == epoch:
            return control
        was_training = getattr(model, "training", False)
        if model is not None:
            model.eval()
        with torch.no_grad():
            features = self.embed_fn(model)
        if was_training:
            model.train()
        self.sampler.update_embeddings(features)
        self.sampler.clustered_epoch = epoch
        logger.info("KMeansBatchSampler re-clustered %d samples (epoch %d).", self.sampler.num_samples, epoch)
        return control


__all__ = ["KMeansBatchSampler", "KMeansRefreshCallback"]
