"""Unit tests: data discovery and loading, splits, U-Net, loss, metrics, checkpoints."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC_COUNTS
from PIL import Image

import checkpoints
import evaluation
import image_io
import inference
import metrics
import splitting
import tensor_cache
import utils
from losses import BCEDiceLoss, presence_loss, soft_dice_loss, total_loss
from unet import UNet, UNetEnsemble


# ------------------------------------------------------------------------------------------------------------------
# Discovery and loading
# ------------------------------------------------------------------------------------------------------------------
def test_discovery_pairs_images_with_all_masks_and_ignores_litter(busi_dir):
    root, facts = busi_dir
    samples = image_io.discover_samples(root)
    expected = dict(SYNTHETIC_COUNTS)
    expected["malignant"] += 1  # the planted duplicate
    assert {c: sum(s.label == c for s in samples) for c in utils.CLASSES} == expected
    by_name = {s.image: s for s in samples}
    assert by_name["benign/benign (5).png"].masks == [
        "benign/benign (5)_mask.png", "benign/benign (5)_mask_1.png", "benign/benign (5)_mask_2.png"]
    assert sorted(s.image for s in samples if len(s.masks) > 1) == sorted(facts["multi_mask"])
    assert not any("DS_Store" in s.image or "Thumbs" in s.image or "notes" in s.image for s in samples)


@pytest.mark.parametrize("rel", ["benign/benign (5).png", "benign/benign (2).png", "malignant/malignant (3).png",
                                 "benign/benign (4).png", "normal/normal (1).png"])
def test_masks_are_or_merged_from_1bit_rgb_rgba_and_l(busi_dir, rel):
    root, facts = busi_dir
    sample = next(s for s in image_io.discover_samples(root) if s.image == rel)
    image, mask = image_io.load_sample(root, sample)
    assert image.dtype == np.uint8 and image.ndim == 2
    assert mask.dtype == bool and mask.shape == image.shape
    np.testing.assert_array_equal(mask, facts["masks"][rel])


def test_rgba_mask_with_transparent_white_background_is_background(tmp_path):
    m = np.zeros((10, 12), dtype=np.uint8)
    m[2:5, 3:7] = 255
    rgba = np.dstack([np.full_like(m, 255)] * 3 + [m])  # white everywhere, opaque only on the lesion
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert image_io.load_mask([tmp_path / "a.png"]).sum() == 12


def test_sixteen_bit_and_palette_images_load_as_grey(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    grey = image_io.load_image(tmp_path / "a.png")
    assert grey.dtype == np.uint8 and grey.max() == round(63000 / 65535 * 255)
    Image.fromarray(np.full((5, 5), 200, np.uint8)).convert("P").save(tmp_path / "p.png")
    assert image_io.load_image(tmp_path / "p.png").mean() == pytest.approx(200, abs=1)


def _error(fn, *args):
    with pytest.raises(utils.DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_data_dir_and_class_folder(tmp_path, fresh_busi_dir):
    assert "data dir not found" in _error(image_io.discover_samples, tmp_path / "nope")
    root, _ = fresh_busi_dir
    shutil.rmtree(root / "normal")  # a source without normal scans (BUS-BRA's layout) is a data folder
    assert {s.label for s in image_io.discover_samples(root)} == {"benign", "malignant"}
    empty = tmp_path / "empty"
    (empty / "unrelated").mkdir(parents=True)
    assert "no class folder" in _error(image_io.discover_samples, empty)
    (root / "normal").mkdir()
    (root / "normal" / ".DS_Store").write_bytes(b"x")
    assert "no images" in _error(image_io.discover_samples, root)


def test_image_without_mask_is_named(fresh_busi_dir):
    root, _ = fresh_busi_dir
    (root / "benign" / "benign (3)_mask.png").unlink()
    assert "image without a mask" in (msg := _error(image_io.discover_samples, root)) and "benign (3).png" in msg


def test_mask_of_other_size_is_named(fresh_busi_dir):
    root, _ = fresh_busi_dir
    Image.new("1", (7, 9)).save(root / "benign" / "benign (3)_mask.png")
    sample = next(s for s in image_io.discover_samples(root) if s.image == "benign/benign (3).png")
    msg = _error(image_io.load_sample, root, sample)
    assert "differs from its image" in msg and "benign (3)_mask.png" in msg


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_unreadable_images_are_named(fresh_busi_dir, damage):
    root, _ = fresh_busi_dir
    path = root / "malignant" / "malignant (2).png"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"hello, not a PNG"}[damage])
    msg = _error(image_io.load_image, path)
    assert "malignant (2).png" in msg


# ------------------------------------------------------------------------------------------------------------------
# Near-duplicates and splits
# ------------------------------------------------------------------------------------------------------------------
def test_perceptual_hash_groups_the_planted_duplicate_only(busi_dir):
    root, facts = busi_dir
    split = splitting.compute_split(root, progress=False)
    assert facts["duplicate_pair"] in split["duplicate_groups"]
    assert all(len(g) >= 2 for g in split["duplicate_groups"])
    where = {n: k for k in ("train", "val", "test") for n in split[k]}
    assert where[facts["duplicate_pair"][0]] == where[facts["duplicate_pair"][1]]


def test_split_is_deterministic_stratified_and_complete(busi_dir):
    root, _ = busi_dir
    samples = image_io.discover_samples(root)
    a = splitting.compute_split(root, samples, progress=False)
    b = splitting.compute_split(root, samples, progress=False)
    assert a == b
    names = a["train"] + a["val"] + a["test"]
    assert sorted(names) == sorted(s.image for s in samples) and len(set(names)) == len(names)
    for label in utils.CLASSES:
        n = sum(s.label == label for s in samples)
        train = sum(x.startswith(label) for x in a["train"])
        assert abs(train - 0.7 * n) <= 1.5  # stratified: each class ~70% in train
    assert splitting.compute_split(root, samples, seed=1, progress=False)["train"] != a["train"]


def test_make_split_keeps_groups_together():
    samples = [image_io.Sample(f"benign/b{i}.png", label="benign") for i in range(40)]
    groups = [[f"benign/b{i}.png" for i in range(k, k + 4)] for k in range(0, 40, 8)]
    split = splitting.make_split(samples, groups)
    where = {n: k for k in ("train", "val", "test") for n in split[k]}
    for g in groups:
        assert len({where[n] for n in g}) == 1
    assert [len(split[k]) for k in ("train", "val", "test")] == [28, 6, 6]


def test_split_file_round_trip_and_errors(tmp_path, busi_dir):
    root, _ = busi_dir
    samples = image_io.discover_samples(root)
    split = splitting.compute_split(root, samples, progress=False)
    splitting.write_split(split, tmp_path / "s.json")
    assert splitting.read_split(tmp_path / "s.json", samples) == split
    assert splitting.split_matches(split, samples)
    (tmp_path / "bad.json").write_text("{not json")
    assert "not valid JSON" in _error(splitting.read_split, tmp_path / "bad.json")
    split["test"].append("benign/ghost.png")
    splitting.write_split(split, tmp_path / "ghost.json")
    assert "ghost.png" in _error(splitting.read_split, tmp_path / "ghost.json", samples)
    assert "not found" in _error(splitting.read_split, tmp_path / "missing.json")


def test_cache_is_written_once_and_reloaded_identically(tmp_path, busi_dir):
    root, facts = busi_dir
    samples = image_io.discover_samples(root)
    first = tensor_cache.build_cache(root, samples, 32, tmp_path, progress=False)
    files = list(tmp_path.glob("busi_32_*.pt"))
    assert len(files) == 1
    second = tensor_cache.build_cache(root, samples, 32, tmp_path, progress=False)
    assert torch.equal(first["images"], second["images"]) and torch.equal(first["masks"], second["masks"])
    assert first["images"].shape == (len(samples), 1, 32, 32) and first["images"].dtype == torch.uint8
    i = first["names"].index("benign/benign (5).png")
    full = tensor_cache.unpack_mask(first["full_masks"][i], first["full_sizes"][i])
    np.testing.assert_array_equal(full.numpy(), facts["masks"]["benign/benign (5).png"])
    assert set(first["masks"].unique().tolist()) <= {0, 1}


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,size", [(1, (6, 10)), (2, (32, 48)), (4, (64, 64)), (4, (128, 96))])
def test_unet_output_shapes(depth, size):
    model = UNet(1, 1, base_channels=4, depth=depth, num_classes=3).eval()
    seg, cls = model(torch.rand(2, 1, *size))
    assert seg.shape == (2, 1, *size) and cls.shape == (2, 3)
    assert UNet(1, 2, base_channels=4, depth=depth)(torch.rand(1, 1, *size))[1] is None


def test_deep_supervision_heads_give_coarser_logits_only_when_asked():
    plain = UNet(1, 1, base_channels=4, depth=3, num_classes=3)
    assert "deep_supervision" not in plain.config and plain.aux_heads is None  # old checkpoints' configs match
    assert plain(torch.rand(1, 1, 32, 32), with_aux=True)[2] == []
    torch.manual_seed(0)
    model = UNet(1, 1, base_channels=4, depth=3, num_classes=3, deep_supervision=True).eval()
    assert model.config["deep_supervision"] is True
    x = torch.rand(2, 1, 32, 48)
    seg, cls, aux = model(x, with_aux=True)
    assert [tuple(a.shape) for a in aux] == [(2, 1, 8, 12), (2, 1, 16, 24)]  # 1/4, 1/2: coarsest first
    seg2, cls2 = model(x)  # inference: the usual pair, same mask
    assert torch.equal(seg, seg2) and torch.equal(cls, cls2)
    rebuilt = UNet(**model.config)
    rebuilt.load_state_dict(model.state_dict())  # the config alone rebuilds the aux heads too


def test_unet_refuses_sizes_it_cannot_take():
    with pytest.raises(ValueError, match="multiple of 16"):
        UNet(base_channels=4, depth=4)(torch.rand(1, 1, 40, 64))


def test_unet_is_built_from_named_blocks():
    model = UNet(base_channels=8, depth=3)
    names = {type(m).__name__ for m in model.modules()}
    assert {"DoubleConv", "Down", "Up"} <= names
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules()) == 3
    assert model.head.kernel_size == (1, 1)


# ------------------------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------------------------
def test_bce_dice_hand_computed():
    target = torch.zeros(1, 1, 2, 2)
    target[..., 0, :] = 1  # 2 of 4 pixels
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    # BCE = ln 2; soft Dice = (2*1 + 1) / (2 + 2 + 1) = 0.6, so Dice loss = 0.4
    assert BCEDiceLoss(1, 0)(logits, target).item() == pytest.approx(math.log(2), rel=1e-6)
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.4, rel=1e-6)
    assert BCEDiceLoss(0.5, 2.0)(logits, target).item() == pytest.approx(0.5 * math.log(2) + 0.8, rel=1e-6)


def test_dice_per_image_is_the_mean_of_each_images_own_dice_loss():
    target = torch.zeros(2, 1, 2, 2)
    target[0, :, 0, :] = 1  # image 0: 2 of 4 pixels; image 1: empty (a normal image)
    logits = torch.zeros(2, 1, 2, 2)  # p = 0.5 everywhere
    # image 0: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4; image 1: 1 - (0 + 1) / (2 + 0 + 1) = 2/3
    assert soft_dice_loss(logits, target, per_image=True).item() == pytest.approx((0.4 + 2 / 3) / 2, rel=1e-6)
    # pooled over the batch: 1 - (2*1 + 1) / (4 + 2 + 1) = 4/7
    assert soft_dice_loss(logits, target).item() == pytest.approx(4 / 7, rel=1e-6)
    assert BCEDiceLoss(0, 1, dice_per_image=True)(logits, target).item() == pytest.approx((0.4 + 2 / 3) / 2,
                                                                                          rel=1e-6)


def test_loss_on_empty_masks_is_finite_and_rewards_empty_predictions():
    target = torch.zeros(2, 1, 8, 8)
    quiet, noisy = torch.full((2, 1, 8, 8), -12.0), torch.full((2, 1, 8, 8), 3.0)
    loss = BCEDiceLoss()
    assert loss(quiet, target).item() < 1e-3
    assert loss(noisy, target).item() > 1.0


def test_presence_loss_asks_each_masks_peak_whether_the_image_has_a_lesion():
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:4, 2:4] = 1  # image 0 has a lesion, image 1 is normal
    logits = torch.full((2, 1, 8, 8), -5.0)
    logits[0, 0, 3, 3], logits[1, 0, 6, 6] = 2.0, 1.0  # one confident pixel each: right on 0, a false positive on 1
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2  # BCE of the peaks 2.0 and 1.0
    assert presence_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    logits.requires_grad_(True)
    presence_loss(logits, target).backward()
    touched = logits.grad.flatten(1).ne(0).sum(1)
    assert touched.tolist() == [1, 1] and logits.grad[1, 0, 6, 6] > 0  # only the peaks; the FP is pushed down
    seg = BCEDiceLoss()
    base = total_loss(seg, (logits, None), target, torch.tensor([0, 2])).item()
    both = total_loss(seg, (logits, None), target, torch.tensor([0, 2]), presence_weight=0.5).item()
    assert both == pytest.approx(base + 0.5 * expected, rel=1e-5)


def test_loss_is_float32_under_low_precision_inputs():
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    logits = torch.randn(2, 1, 8, 8)
    out = BCEDiceLoss()(logits.bfloat16(), target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(BCEDiceLoss()(logits.bfloat16().float(), target).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------------
def test_dice_iou_hand_computed_and_empty_conventions():
    pred = torch.zeros(4, 4, dtype=torch.bool)
    gt = torch.zeros(4, 4, dtype=torch.bool)
    pred[0, :4] = True          # 4 pixels
    gt[0, 1:4] = True           # 3 shared
    gt[1, :3] = True            # 6 in all
    assert metrics.dice_iou(pred, gt) == pytest.approx((6 / 10, 3 / 7))
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert metrics.dice_iou(empty, empty) == (1.0, 1.0)
    assert metrics.dice_iou(pred, empty) == (0.0, 0.0)
    assert metrics.dice_iou(empty, gt) == (0.0, 0.0)


def test_summary_means_over_lesion_images_and_fp_rate_over_normals():
    records = [
        {"label": "benign", "dice": 0.8, "iou": 0.6, "pred_pixels": 10, "gt_pixels": 10, "inter": 8},
        {"label": "malignant", "dice": 0.4, "iou": 0.25, "pred_pixels": 30, "gt_pixels": 10, "inter": 8},
        {"label": "normal", "dice": 1.0, "iou": 1.0, "pred_pixels": 0, "gt_pixels": 0, "inter": 0},
        {"label": "normal", "dice": 0.0, "iou": 0.0, "pred_pixels": 5, "gt_pixels": 0, "inter": 0},
    ]
    s = metrics.summarize(records)
    assert s["lesion_dice"] == pytest.approx(0.6) and s["lesion_iou"] == pytest.approx(0.425)
    assert s["lesion_pooled_dice"] == pytest.approx(2 * 16 / 60)
    assert s["normal_fp_rate"] == 0.5 and s["all_dice"] == pytest.approx(2.2 / 4)
    assert s["per_class"]["malignant"] == {"n": 1, "dice": 0.4, "iou": 0.25}


def test_roc_auc_hand_computed():
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert metrics.roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert math.isnan(metrics.roc_auc([0.5], [1]))


def test_roc_curve_hand_computed_and_its_area_is_roc_auc():
    fpr, tpr = metrics.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40) / 5  # many ties
    positives = rng.random(40) < 0.4
    fpr, tpr = metrics.roc_curve(scores, positives)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(metrics.roc_auc(scores, positives))


def test_evaluate_scores_at_original_resolution(busi_dir):
    """A model that predicts exactly the resized mask scores the Dice of that mask resized back, per image."""
    root, facts = busi_dir
    samples = image_io.discover_samples(root)
    cache = tensor_cache.build_cache(root, samples, 32, None, progress=False)

    class Oracle(torch.nn.Module):  # returns +-20 logits from the cached low-res mask of each image in turn
        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, x):
            m = cache["masks"][self.i:self.i + len(x)].float()
            self.i += len(x)
            return m * 40 - 20, None

    summary, records = evaluation.evaluate(Oracle(), cache, torch.device("cpu"), batch_size=4)
    for r in records:
        gt = torch.from_numpy(facts["masks"][r["file"]])
        assert r["gt_pixels"] == int(gt.sum())  # ground truth at the original size, not 32x32
    lesion = [r for r in records if r["label"] != "normal"]
    assert 0.7 < np.mean([r["dice"] for r in lesion]) < 1.0  # resampling costs a little, never all
    assert summary["normal_fp_rate"] == 0.0


def test_evaluate_thresholds_match_dice_iou_on_each_resized_prediction(busi_dir):
    """The batched, sync-free counting gives, per image and threshold, exactly metrics.dice_iou of the prediction
    resized to the original size; the class probabilities come through per image."""
    root, facts = busi_dir
    samples = image_io.discover_samples(root)
    cache = tensor_cache.build_cache(root, samples, 32, None, progress=False)
    torch.manual_seed(0)
    model = UNet(1, 1, base_channels=4, depth=2, num_classes=3).eval()
    thresholds = [0.3, 0.5, 0.7]
    results = evaluation.evaluate_thresholds(model, cache, torch.device("cpu"), None, thresholds, batch_size=3)
    probs = torch.cat([b.seg for b in inference.predict_batches(model, cache["images"], torch.device("cpu"))])
    cls = torch.cat([b.cls for b in inference.predict_batches(model, cache["images"], torch.device("cpu"))])
    for t in thresholds:
        summary, records = results[t]
        assert [r["file"] for r in records] == cache["names"]
        for i, r in enumerate(records):
            gt = torch.from_numpy(facts["masks"][r["file"]])
            pred = inference.probs_to_original(probs[i], *gt.shape) > t
            assert (r["dice"], r["iou"]) == metrics.dice_iou(pred, gt)
            assert r["pred_pixels"] == int(pred.sum()) and r["gt_pixels"] == int(gt.sum())
            assert r["class_probs"] == pytest.approx(cls[i].tolist())
        assert summary["all_dice"] == pytest.approx(np.mean([r["dice"] for r in records]))
    assert results[0.3][0]["lesion_pooled_dice"] != results[0.7][0]["lesion_pooled_dice"]  # thresholds differ


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------
def _tiny_checkpoint(path, **config):
    model = UNet(1, 1, base_channels=4, depth=2, num_classes=3)
    checkpoints.save_checkpoint({"format": checkpoints.CHECKPOINT_FORMAT, "model": model.state_dict(),
                           "model_config": model.config, "config": config}, path)
    return model


def test_checkpoint_round_trip_and_export(tmp_path):
    model = _tiny_checkpoint(tmp_path / "a.pt", image_size=32)
    loaded = checkpoints.load_model(tmp_path / "a.pt").model
    x = torch.rand(1, 1, 32, 32)
    model.eval()
    assert torch.allclose(loaded(x)[0], model(x)[0])
    checkpoints.export_checkpoint(tmp_path / "a.pt", tmp_path / "slim.pt")
    slim = checkpoints.load_model(tmp_path / "slim.pt").model
    assert torch.allclose(slim(x)[0], model(x)[0], atol=0.05)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


class _Planted:
    """Unpickling this would create a file: the hostile-checkpoint probe."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_hostile_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": {}, "payload": _Planted(str(target))},
               tmp_path / "evil.pt")
    with pytest.raises(checkpoints.CheckpointError, match="refusing to load"):
        checkpoints.load_checkpoint(tmp_path / "evil.pt")
    assert not target.exists()


def test_wrong_checkpoints_name_the_problem(tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(checkpoints.CheckpointError, match="not a PyTorch checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "random.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(checkpoints.CheckpointError, match="not a checkpoint of this project"):
        checkpoints.load_checkpoint(tmp_path / "foreign.pt")
    _tiny_checkpoint(tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    state["model_config"] = dict(state["model_config"], base_channels=8)
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(checkpoints.CheckpointError, match="shape of"):
        checkpoints.load_model(tmp_path / "wide.pt")
    with pytest.raises(checkpoints.CheckpointError, match="not found"):
        checkpoints.load_checkpoint(tmp_path / "none.pt")


def test_ensemble_checkpoint_is_the_mean_of_its_members_and_loads_like_one_model(tmp_path):
    torch.manual_seed(0)
    members = [_tiny_checkpoint(tmp_path / f"m{i}.pt", image_size=32, threshold=0.5) for i in range(3)]
    slim = checkpoints.export_checkpoint([tmp_path / f"m{i}.pt" for i in range(3)], tmp_path / "ens.pt")
    assert slim["model_config"]["members"] == 3 and len(slim["members"]) == 3
    loaded_ = checkpoints.load_model(tmp_path / "ens.pt")
    ensemble, state = loaded_.model, loaded_.state
    assert isinstance(ensemble, UNetEnsemble) and state["config"]["image_size"] == 32
    assert ensemble.config == dict(members[0].config, members=3) and ensemble.size_multiple == 4
    x = torch.rand(2, 1, 32, 32)
    for i in range(3):  # each member exported alone: the same fp16-rounded weights as inside the ensemble
        checkpoints.export_checkpoint(tmp_path / f"m{i}.pt", tmp_path / f"s{i}.pt")
    singles = [checkpoints.load_model(tmp_path / f"s{i}.pt").model(x) for i in range(3)]
    seg, cls = ensemble(x)
    assert torch.allclose(seg, torch.stack([s for s, _ in singles]).mean(0), atol=1e-6)
    assert torch.allclose(cls, torch.stack([c for _, c in singles]).mean(0), atol=1e-6)
    assert not torch.allclose(singles[0][0], singles[1][0])  # the members differ, so the mean means something
    with pytest.raises(ValueError, match="for inference"):
        ensemble(x, with_aux=True)


def test_ensemble_export_refuses_members_that_do_not_fit_together(tmp_path):
    _tiny_checkpoint(tmp_path / "a.pt", image_size=32, threshold=0.5)
    _tiny_checkpoint(tmp_path / "b.pt", image_size=64, threshold=0.5)
    with pytest.raises(checkpoints.CheckpointError, match="image_size differ"):
        checkpoints.export_checkpoint([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "e.pt")
    model = UNet(1, 1, base_channels=8, depth=2, num_classes=3)
    checkpoints.save_checkpoint({"format": checkpoints.CHECKPOINT_FORMAT, "model": model.state_dict(),
                           "model_config": model.config, "config": {"image_size": 32, "threshold": 0.5}},
                          tmp_path / "wide.pt")
    with pytest.raises(checkpoints.CheckpointError, match="model_config differ"):
        checkpoints.export_checkpoint([tmp_path / "a.pt", tmp_path / "wide.pt"], tmp_path / "e.pt")
    assert not (tmp_path / "e.pt").exists()
    checkpoints.export_checkpoint([tmp_path / "a.pt", tmp_path / "a.pt"], tmp_path / "e.pt")
    with pytest.raises(checkpoints.CheckpointError, match="ensemble already"):
        checkpoints.export_checkpoint([tmp_path / "e.pt", tmp_path / "a.pt"], tmp_path / "ee.pt")
    checkpoints.export_checkpoint(tmp_path / "e.pt", tmp_path / "e2.pt")  # re-exporting one ensemble keeps it whole
    loaded_ = checkpoints.load_model(tmp_path / "e2.pt")
    model, state = loaded_.model, loaded_.state
    assert isinstance(model, UNetEnsemble) and len(state["members"]) == 2
    state = torch.load(tmp_path / "e.pt", weights_only=True)
    state["model_config"]["members"] = 0
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(checkpoints.CheckpointError, match="members must be a positive integer"):
        checkpoints.load_model(tmp_path / "bad.pt")


def test_save_checkpoint_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    checkpoints.save_checkpoint({"format": checkpoints.CHECKPOINT_FORMAT, "model": {}, "v": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint({"format": checkpoints.CHECKPOINT_FORMAT, "model": {}, "v": 2}, path)
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_seeding_is_reproducible():
    utils.seed_everything(3)
    a = (torch.rand(3), np.random.rand(3))
    utils.seed_everything(3)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert utils.pick_device("cpu").type == "cpu"
    cpu = torch.device("cpu")
    assert utils.amp_dtype(cpu, enabled=False) is None
    assert utils.amp_dtype(cpu) == (torch.bfloat16 if utils.cpu_has_native_bf16() else None)


def test_committed_split_file_is_well_formed():
    split = json.loads(utils.DEFAULT_SPLIT_FILE.read_text())
    assert {"train", "val", "test", "duplicate_groups"} <= set(split)
    for k in ("train", "val", "test"):
        assert split[k] == sorted(split[k])
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 780
