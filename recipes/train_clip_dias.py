#!/usr/bin/env python
"""Train a dual encoder with DIAS: dimension-information alignment (L_dim, Eq. 6) and sparse inter/intra spatial
constraints (L_inter Eq. 8/15, L_intra Eq. 10/16) on top of the triplet loss (Eq. 3), with K-means neighbour
batches (Sec. 3.5).

Weights default to the paper's (Sec. 4.4 / Fig. 7): ω_dim = 10, ω_inter = 0.05, ω_intra = 0.1; the base loss is
the triplet loss with distance-weighted negatives (Eq. 3) unless `--base_loss` says otherwise, summed over the batch
(`--triplet_reduction sum`, the VSE++/SCAN convention the paper's ω are set against).

    accelerate launch recipes/train_clip_dias.py                          # offline demo
    accelerate launch recipes/train_clip_dias.py --model_name_or_path openai/clip-vit-base-patch16 \\
        --dataset karpathy --karpathy_json dataset_flickr30k.json --image_root flickr30k-images --output_dir out
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safetensors.torch import load_file

from gapclip.argument_checks import check_declared_choices, check_non_negative
from gapclip.cli import parse_args, run_training, term_option_field
from gapclip.console import run_recipe
from gapclip.data.kmeans_sampler import KMeansBatchSampler, KMeansRefreshCallback
from gapclip.inference import embed_images


@dataclass
class DIASArguments:
    dias_dim: bool = field(default=True, metadata={"help": "Use L_dim (--no_dias_dim to drop)."})
    dim_weight: float = field(default=10.0, metadata={"help": "ω_dim (paper: 10)."})
    dias_inter: bool = field(default=True, metadata={"help": "Use L_inter (--no_dias_inter to drop)."})
    inter_weight: float = field(default=0.05, metadata={"help": "ω_inter (paper: 0.05)."})
    dias_intra: bool = field(default=True, metadata={"help": "Use L_intra (--no_dias_intra to drop)."})
    intra_weight: float = field(default=0.1, metadata={"help": "ω_intra (paper: 0.1)."})
    sparse: bool = term_option_field(
        "dias_inter", "sparse", help="sparse correlation mask (Eq. 11–14); --no_sparse: dense (Eq. 8/10)"
    )
    mask: str = term_option_field("dias_inter", "mask")
    selection: str = term_option_field("dias_inter", "selection")
    neighbour_batches: bool = field(default=True, metadata={"help": "K-means neighbour batches (--no_neighbour_batches)."})
    images_per_cluster: int = field(default=4, metadata={"help": "P: images drawn from each cluster per batch."})
    num_clusters: int | None = field(default=None, metadata={"help": "K of K-means (default: about 4 chunks each)."})
    cluster_features: str | None = field(
        default=None, metadata={"help": "safetensors with 'image_embeds' [N, d] to cluster (default: the model's)."}
    )
    recluster_every: int = field(default=1, metadata={"help": "Re-embed and re-cluster every N epochs."})

    def __post_init__(self):
        check_declared_choices(self)  # the terms' own choices (term_option_field), for config files too
        for flag, weight in (("--dim_weight", self.dim_weight), ("--inter_weight", self.inter_weight),
                             ("--intra_weight", self.intra_weight)):
            check_non_negative(flag, weight)
        counts = {"--images_per_cluster": self.images_per_cluster, "--recluster_every": self.recluster_every,
                  "--num_clusters": 1 if self.num_clusters is None else self.num_clusters}
        for flag, count in counts.items():
            if count < 1:
                raise ValueError(f"{flag} must be >= 1, got {count}.")

    def gap_terms(self) -> list[dict]:
        spatial = {"sparse": self.sparse, "mask": self.mask, "selection": self.selection}
        terms = []
        if self.dias_dim:
            terms.append({"name": "dias_dim", "weight": self.dim_weight})
        if self.dias_inter:
            terms.append({"name": "dias_inter", "weight": self.inter_weight, "options": dict(spatial)})
        if self.dias_intra:
            terms.append({"name": "dias_intra", "weight": self.intra_weight, "options": dict(spatial)})
        return terms

    def batch_sampler_factory(self, pair_mode: str):
        if not self.neighbour_batches:
            return None
        if pair_mode != "one_per_image":
            raise ValueError("--neighbour_batches needs --pair_mode one_per_image (the sampler draws images).")

        def factory(train, model, processor, training_args):
            global_batch = training_args.per_device_train_batch_size * training_args.world_size
            if global_batch % self.images_per_cluster:
                raise ValueError(
                    f"The global batch ({global_batch}) must be a multiple of --images_per_cluster "
                    f"({self.images_per_cluster}) for neighbour batches."
                )

            def embed(current_model):
                return embed_images(current_model, train, processor, batch_size=training_args.per_device_eval_batch_size)

            features = load_file(self.cluster_features)["image_embeds"] if self.cluster_features else embed(model)
            if len(features) != len(train):
                raise ValueError(
                    f"--cluster_features has {len(features)} rows but the training split has {len(train)} images."
                )
            sampler = KMeansBatchSampler(
                features, clusters_per_batch=global_batch // self.images_per_cluster,
                images_per_cluster=self.images_per_cluster, num_clusters=self.num_clusters, seed=training_args.seed,
                drop_last=training_args.dataloader_drop_last,
            )
            callbacks = [] if self.cluster_features else [KMeansRefreshCallback(sampler, embed, self.recluster_every)]
            return sampler, callbacks

        return factory


def use_paper_base_loss(model_args) -> None:
    """``--base_loss auto`` means DIAS's own: the triplet loss with distance-weighted negatives (Eq. 3). Unless
    ``--triplet_reduction`` says otherwise it is *summed* over the batch, as in the VSE++/SCAN code DIAS builds on:
    the paper's ω are set against that scale."""
    if model_args.base_loss == "auto":
        model_args.base_loss = "triplet"
        if model_args.triplet_mining == "hardest":
            model_args.triplet_mining = "distance_weighted"
    if model_args.triplet_reduction is None:
        model_args.triplet_reduction = "sum"


def main(argv: list[str] | None = None):
    model_args, data_args, method, lora_args, training_args = parse_args(DIASArguments, argv)
    use_paper_base_loss(model_args)
    return run_training(
        model_args, data_args, training_args, method.gap_terms(), lora_args=lora_args,
        batch_sampler_factory=method.batch_sampler_factory(data_args.pair_mode),
    )


if __name__ == "__main__":
    run_recipe(main)
