"""GapClipConfig and the gap-term registry: clear errors on bad specs, save/load round trip, Auto* registration."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import pytest
import torch
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, CLIPConfig, SiglipConfig

from gapclip import GapClipConfig, GapClipModel, GapTerm, register_term
from gapclip.losses import TERM_REGISTRY, describe_terms, validate_term_specs
from gapclip.testing import tiny_bert_config, tiny_clip_config, tiny_siglip_config

TEST_TERM = "_test_config_term"


@pytest.fixture
def test_term():
    """A throwaway term registered for one test (the real terms are developed elsewhere) and removed afterwards."""

    class _ConfigTestTerm(GapTerm):
        """A test term.

        Args:
            alpha: scale of the term.
            mode: how rows are reduced: mean or sum.
        """

        name: ClassVar[str] = TEST_TERM

        def __init__(self, embed_dim: int, *, alpha: float = 0.5, mode: Literal["mean", "sum"] = "mean"):
            super().__init__(embed_dim)
            self.alpha, self.mode = alpha, mode

        def forward(self, batch):
            return (batch.image_embeds * batch.text_embeds).sum(-1).mean() * self.alpha

    register_term(_ConfigTestTerm)
    yield _ConfigTestTerm
    TERM_REGISTRY.pop(TEST_TERM, None)


# ---------------------------------------------------------------------------------------------------- gap-term specs
def test_unknown_term_lists_the_valid_ones(test_term):
    with pytest.raises(ValueError) as info:
        GapClipConfig(tiny_clip_config(), gap_terms=[{"name": "no_such_term"}])
    message = str(info.value)
    assert "'no_such_term'" in message
    assert "Valid terms" in message and TEST_TERM in message


@pytest.mark.parametrize("weight", [-0.5, -1])
def test_negative_weight_is_rejected(test_term, weight):
    with pytest.raises(ValueError, match=rf"Weight of gap term '{TEST_TERM}' must be finite and >= 0, got {float(weight)}"):
        GapClipConfig(tiny_clip_config(), gap_terms=[{"name": TEST_TERM, "weight": weight}])


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, "nan"])
def test_non_finite_weight_is_rejected(test_term, weight):
    with pytest.raises(ValueError, match=rf"Weight of gap term '{TEST_TERM}' must be finite"):
        GapClipConfig(tiny_clip_config(), gap_terms=[{"name": TEST_TERM, "weight": weight}])


def test_non_numeric_weight_is_rejected(test_term):
    with pytest.raises(ValueError, match="must be a number, got 'heavy'"):
        validate_term_specs([{"name": TEST_TERM, "weight": "heavy"}])


def test_unknown_option_lists_the_terms_options(test_term):
    with pytest.raises(ValueError) as info:
        GapClipConfig(tiny_clip_config(), gap_terms=[{"name": TEST_TERM, "options": {"beta": 1, "alpha": 2}}])
    message = str(info.value)
    assert f"Gap term '{TEST_TERM}' does not take option(s) ['beta']" in message
    assert "['alpha', 'mode']" in message


def test_duplicate_term_is_rejected(test_term):
    with pytest.raises(ValueError, match=f"'{TEST_TERM}' is declared twice"):
        GapClipConfig(tiny_clip_config(), gap_terms=[{"name": TEST_TERM}, {"name": TEST_TERM, "weight": 2.0}])


def test_unknown_spec_key_is_rejected(test_term):
    with pytest.raises(ValueError, match=r"unknown keys \['wieght'\]"):
        GapClipConfig(tiny_clip_config(), gap_terms=[{"name": TEST_TERM, "wieght": 2.0}])


def test_specs_are_normalised(test_term):
    specs = validate_term_specs([TEST_TERM])
    assert specs == [{"name": TEST_TERM, "weight": 1.0, "options": {}}]
    assert validate_term_specs(None) == []


def test_options_are_read_from_the_signature(test_term):
    assert test_term.default_options == {"alpha": 0.5, "mode": "mean"}
    specs = test_term.option_specs()
    assert specs["mode"].choices == ("mean", "sum") and specs["alpha"].choices is None
    assert specs["alpha"].help == "scale of the term." and specs["mode"].help.startswith("how rows are reduced")
    listing = describe_terms()[TEST_TERM]
    assert listing["options"] == {"alpha": 0.5, "mode": "mean"} and listing["choices"] == {"mode": ["mean", "sum"]}
    assert listing["summary"] == "A test term." and listing["inputs"] == []
    term = test_term(8, alpha=2, mode="sum")  # an int for a float option is read as a float
    assert term.get_config_dict() == {"alpha": 2.0, "mode": "sum"} and isinstance(term.alpha, float)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"mode": "max"}, rf"term '{TEST_TERM}': option mode='max' is not valid; accepted values are \['mean', 'sum'"),
        ({"alpha": "big"}, r"option alpha must be a number, got 'big'"),
        ({"alpha": True}, r"option alpha must be a number, got True"),
    ],
)
def test_option_values_are_checked_against_their_annotations(test_term, options, match):
    with pytest.raises(ValueError, match=match):
        GapClipConfig(tiny_clip_config(), gap_terms=[{"name": TEST_TERM, "options": options}])
    with pytest.raises(ValueError, match=match):
        test_term(8, **options)


def test_bool_int_and_str_options_are_checked():
    class _Typed(GapTerm):
        name: ClassVar[str] = "_typed"

        def __init__(
            self, embed_dim: int, *, flag: bool = True, count: int = 3, label: str = "x", cap: int | None = None
        ):
            super().__init__(embed_dim)
            self.flag, self.count, self.label, self.cap = flag, count, label, cap

    assert _Typed(4, cap=None).options == {"flag": True, "count": 3, "label": "x", "cap": None}
    for options, match in [
        ({"flag": 1}, "option flag must be true or false, got 1"),
        ({"count": 2.5}, "option count must be an integer, got 2.5"),
        ({"count": False}, "option count must be an integer, got False"),
        ({"label": 3}, "option label must be a string, got 3"),
        ({"cap": "7"}, "option cap must be an integer, got '7'"),
    ]:
        with pytest.raises(ValueError, match=match):
            _Typed(4, **options)


def test_options_must_be_keyword_arguments_with_defaults():
    with pytest.raises(TypeError, match=r"'k' is not"):
        class _Positional(GapTerm):  # noqa: F841
            name: ClassVar[str] = "_positional"

            def __init__(self, embed_dim: int, k: int = 4):
                super().__init__(embed_dim)

    with pytest.raises(TypeError, match=r"'k' is not"):
        class _NoDefault(GapTerm):  # noqa: F841
            name: ClassVar[str] = "_no_default"

            def __init__(self, embed_dim: int, *, k: int):
                super().__init__(embed_dim)

    with pytest.raises(TypeError, match="declare the options as keyword-only arguments"):
        class _Legacy(GapTerm):  # noqa: F841
            name: ClassVar[str] = "_legacy"
            default_options: ClassVar[dict] = {"k": 4}


def test_an_option_not_stored_under_its_name_is_named():
    class _Forgetful(GapTerm):
        name: ClassVar[str] = "_forgetful"

        def __init__(self, embed_dim: int, *, k: int = 4):
            super().__init__(embed_dim)

    with pytest.raises(TypeError, match=r"does not store its option 'k' as self.k"):
        _Forgetful(4).get_config_dict()


def test_a_redefinition_of_a_registered_class_replaces_it(test_term):
    """Importing a module again (a notebook cell run twice, --term_module of a recipe's own file) is no clash."""
    redefined = type(test_term.__name__, (test_term,), {"__module__": test_term.__module__,
                                                         "__qualname__": test_term.__qualname__})
    assert register_term(redefined) is redefined and TERM_REGISTRY[TEST_TERM] is redefined
    register_term(test_term)


def test_registering_another_class_under_a_taken_name_fails(test_term):
    class _Clash(GapTerm):
        name: ClassVar[str] = TEST_TERM

    with pytest.raises(ValueError, match=f"'{TEST_TERM}' is already registered"):
        register_term(_Clash)
    assert TERM_REGISTRY[TEST_TERM] is test_term
    register_term(test_term)  # re-registering the same class is a no-op


# ---------------------------------------------------------------------------------------------------- config fields
def test_unknown_base_loss_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        GapClipConfig(tiny_clip_config(), base_loss="hinge")
    assert "'hinge'" in str(info.value)
    for name in ("auto", "infonce", "sigmoid", "triplet"):
        assert name in str(info.value)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_bad_logit_scale_max_is_rejected(value):
    with pytest.raises(ValueError, match="logit_scale_max must be finite and > 0"):
        GapClipConfig(tiny_clip_config(), logit_scale_max=value)


def test_non_dual_encoder_backbone_config_names_the_model_type():
    with pytest.raises(ValueError, match="'bert' is not a supported image-text dual encoder"):
        GapClipConfig(BertConfig())
    with pytest.raises(ValueError, match="'bert' is not a supported image-text dual encoder"):
        GapClipConfig({"model_type": "bert"})


def test_backbone_config_dict_needs_a_known_model_type():
    with pytest.raises(ValueError, match="needs a known 'model_type', got None"):
        GapClipConfig({"projection_dim": 16})
    with pytest.raises(TypeError, match="must be a dict or PretrainedConfig, got int"):
        GapClipConfig(3)


def test_default_backbone_and_resolved_base_loss():
    config = GapClipConfig()
    assert isinstance(config.backbone_config, CLIPConfig)
    assert config.resolved_base_loss == "infonce"
    assert GapClipConfig(tiny_siglip_config()).resolved_base_loss == "sigmoid"
    assert GapClipConfig(tiny_siglip_config(), base_loss="triplet").resolved_base_loss == "triplet"


def test_from_backbone_on_a_bert_folder_is_a_clear_error(tmp_path):
    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError) as info:
        GapClipModel.from_backbone(str(tmp_path / "bert"))
    assert "'bert'" in str(info.value) and "not a supported image-text dual encoder" in str(info.value)
    assert str(tmp_path / "bert") in str(info.value)


def test_from_backbone_on_a_gapclip_checkpoint_points_to_from_pretrained(tmp_path, make_clip_model):
    make_clip_model().save_pretrained(tmp_path / "gap")
    with pytest.raises(ValueError, match="already a gapclip checkpoint"):
        GapClipModel.from_backbone(str(tmp_path / "gap"))


# ---------------------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip_keeps_backbone_config_and_terms(tmp_path, test_term):
    terms = [{"name": TEST_TERM, "weight": 0.25, "options": {"alpha": 2.0}}]
    config = GapClipConfig(
        tiny_siglip_config(), base_loss="triplet", gap_terms=terms, triplet_margin=0.3, triplet_mining="sum",
        gather_with_grad=False, logit_scale_max=50.0,
    )
    config.save_pretrained(tmp_path)
    loaded = GapClipConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.backbone_config, SiglipConfig)
    assert loaded.backbone_config.to_dict() == config.backbone_config.to_dict()
    assert loaded.gap_terms == terms
    assert loaded.term_weights == {TEST_TERM: 0.25}
    assert (loaded.base_loss, loaded.triplet_margin, loaded.triplet_mining) == ("triplet", 0.3, "sum")
    assert (loaded.gather_with_grad, loaded.logit_scale_max) == (False, 50.0)
    auto = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(auto, GapClipConfig)
    assert auto.to_diff_dict() == loaded.to_diff_dict()


def test_lora_settings_are_declared_fields():
    assert GapClipConfig().lora is None and GapClipConfig().merged_lora is None
    settings = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}
    config = GapClipConfig(tiny_clip_config(), lora=settings)
    assert GapClipConfig.from_dict(config.to_dict()).lora == settings
    assert GapClipConfig(tiny_clip_config()).to_dict()["lora"] is None
    with pytest.raises(TypeError, match="lora must be a dict of LoRA settings or None, got int"):
        GapClipConfig(lora=4)


def test_training_run_is_a_declared_field(tmp_path):
    """What a recipe records about its run (hyper-parameters, training data) survives save/load for the card."""
    assert GapClipConfig().training_run is None
    run = {"hyperparameters": {"learning_rate": 5e-4}, "training_data": {"name": "demo", "images": 64}}
    config = GapClipConfig(tiny_clip_config(), training_run=run)
    config.save_pretrained(tmp_path)
    assert GapClipConfig.from_pretrained(tmp_path).training_run == run
    with pytest.raises(TypeError, match="training_run must be a dict or None, got str"):
        GapClipConfig(training_run="demo")


def test_auto_classes_are_registered(tmp_path, test_term):
    torch.manual_seed(0)
    config = GapClipConfig(tiny_clip_config(), gap_terms=[{"name": TEST_TERM, "weight": 0.5}])
    assert isinstance(AutoConfig.for_model("gapclip"), GapClipConfig)
    model = AutoModel.from_config(config)
    assert isinstance(model, GapClipModel)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is GapClipModel
    assert list(loaded.gap_terms) == [TEST_TERM]
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(p, q, msg=name)
