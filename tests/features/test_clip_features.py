"""ClipFeatures on a tiny randomly initialised CLIP vision model saved to a temp dir."""

import pytest
import torch


def test_clip_features_load_locally_and_embed(tmp_path):
    transformers = pytest.importorskip("transformers")
    from genunc.features import ClipFeatures

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8,
                                           projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    features = ClipFeatures(tmp_path)
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    out = features(images)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    torch.testing.assert_close(features(images), out)
    assert not torch.allclose(out[0], out[1])
