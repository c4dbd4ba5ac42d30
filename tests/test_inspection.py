"""The inspector's list without its window (inspection.Browser): filter, sort by Dice and by trust, list lines,
the figures of a list, and a new model forgetting the old one's predictions. Real items of a BUSI-layout folder,
real predictions of a checkpoint; no display needed."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_predict import save_tiny_checkpoint

import checkpoints
import dicom_io
import inference
import inspection
import metrics


@pytest.fixture()
def browser(busi_dir, tmp_path):
    root, _ = busi_dir
    items, note = inspection.dataset_items(root, "all")
    assert len(items) > 6 and "all" in note
    save_tiny_checkpoint(tmp_path / "m.pt")
    loaded = checkpoints.load_model(tmp_path / "m.pt")
    browser = inspection.Browser(items)
    browser.arrange()
    images = [item.load() for item in items]
    predictions = inference.predict_scans(loaded, [dicom_io.Scan(image, None) for image, _ in images],
                                          torch.device("cpu"), None, 4)
    for item, (_, truth), prediction in zip(items, images, predictions):
        browser.store(item, dataclasses.replace(prediction, probability=prediction.probability.astype(np.float16)),
                      truth)
    return browser, images


def test_a_sort_by_dice_lists_the_worst_first_at_the_threshold(browser):
    browser, images = browser
    assert browser.visible == list(range(len(browser.items)))  # by name: the items' order
    browser.sort_mode = "dice"
    order = browser.arrange()
    dice = [browser.dice_of(i) for i in order]
    assert dice == sorted(dice) and None not in dice  # every item of a data folder has ground truth
    # the figure is the prediction's mask at the threshold against the ground truth, as metrics computes it
    i = order[0]
    mask = browser.cache[browser.items[i].key].mask_at(browser.threshold)
    expected = metrics.dice_iou(torch.from_numpy(mask), torch.from_numpy(images[i][1]))[0]
    assert dice[0] == pytest.approx(expected)
    assert "worst first" in browser.title() and f"{dice[0]:.3f}" in browser.entry(i)
    browser.threshold = 0.9  # another threshold: other masks, other figures
    assert [browser.dice_of(i) for i in order] != dice


def test_the_class_filter_and_the_trust_order(browser):
    browser, _ = browser
    browser.class_filter = "normal"
    browser.sort_mode = "trust"
    order = browser.arrange()
    assert order and all(browser.items[i].label == "normal" for i in order)
    trust = [browser.cache[browser.items[i].key].trust for i in order]
    assert trust == sorted(trust) and "trust, lowest first" in browser.title() and "(normal)" in browser.title()
    assert " | normal FP " in browser.summary() and "lesion Dice" not in browser.summary()
    assert browser.flagged() == sum(bool(browser.cache[browser.items[i].key].review) for i in order)


def test_a_new_model_forgets_the_old_predictions(browser):
    browser, _ = browser
    assert browser.unpredicted("dice") == []
    browser.forget()
    assert browser.unpredicted("dice") == browser.visible and browser.dice_of(0) is None
    assert browser.entry(0) == browser.items[0].name  # not predicted: the name alone
