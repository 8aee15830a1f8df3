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


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_any_transformers_vision_model_from_a_folder(tmp_path, kind):
    """VisionModelFeatures: a ViT (pooled output) and a ConvNeXt (pooled feature map) saved
    locally, loaded through the Auto classes, embed images reproducibly."""
    transformers = pytest.importorskip("transformers")
    from genunc.features import VisionModelFeatures

    torch.manual_seed(0)
    if kind == "vit":
        config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8)
        transformers.ViTModel(config).save_pretrained(tmp_path)
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
        width = 32
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        transformers.ConvNextModel(config).save_pretrained(tmp_path)
        transformers.ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(tmp_path)
        width = 16
    features = VisionModelFeatures(tmp_path)
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    out = features(images)
    assert out.shape == (3, width) and torch.isfinite(out).all()
    torch.testing.assert_close(features(images), out)
    assert not torch.allclose(out[0], out[1])


def test_vision_features_need_a_folder(tmp_path):
    from genunc.errors import GenuncError
    from genunc.features import VisionModelFeatures

    with pytest.raises(GenuncError, match="no model folder"):
        VisionModelFeatures(tmp_path / "missing")
