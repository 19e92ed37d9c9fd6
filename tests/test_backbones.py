import pytest
import timm
import torch
from safetensors.torch import save_file

from rgsd_lightning.backbones import EmbeddingNet, FeatureExtractor, load_embedding_net, save_embedding_net


def test_export_round_trip_reproduces_embeddings(tmp_path):
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", neck="bnneck", embedding_dim=16)
    net.train()
    net(torch.randn(8, 3, 32, 16))  # move BN running stats away from their init
    net.eval()
    x = torch.randn(4, 3, 32, 16)
    save_embedding_net(net, tmp_path / "exp", input_size=(32, 16), mean=[0.5] * 3, std=[0.5] * 3)
    loaded, cfg = load_embedding_net(tmp_path / "exp")
    assert cfg["feature_dim"] == 16 and cfg["input_size"] == [32, 16]
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert not loaded.neck.bias.requires_grad  # BNNeck bias stays frozen


def test_pretrained_weights_come_from_a_local_file_only(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    net = EmbeddingNet("test_resnet", pretrained_path=str(path), neck="none")
    ref = source.state_dict()
    for name, value in net.backbone.state_dict().items():
        torch.testing.assert_close(value, ref[name])  # classifier dropped, everything else loaded
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        EmbeddingNet("test_resnet", pretrained_path=str(tmp_path / "missing.safetensors"))


def test_feature_extractor_is_frozen_normalised_and_stays_in_eval(tmp_path):
    net = EmbeddingNet("test_resnet", neck="bnneck")
    save_embedding_net(
        net, tmp_path, input_size=(32, 16), mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )
    fx = FeatureExtractor.from_export(tmp_path)
    fx.train()
    assert not fx.net.training
    assert all(not p.requires_grad for p in fx.parameters())
    feats = fx(torch.rand(3, 1, 16, 16) * 2 - 1)  # grayscale square generator output
    assert feats.shape == (3, net.feature_dim)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))


def test_bad_export_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a recognizer export"):
        load_embedding_net(tmp_path)
    with pytest.raises(ValueError, match="neck"):
        EmbeddingNet("test_resnet", neck="weird")
