"""How far to trust each prediction, and calibrated class probabilities: tensor maths only (no I/O, no model).

A trust score is "the probability that this image's outline is right" (lesion Dice >= 0.5, or an empty mask on a
normal scan), predicted from what one forward pass and its left-right flipped twin already give: how sure and
how stable the mask is, how sure the class head is that there is a lesion, and how far the scan's deepest
features sit from the training split's. A logistic regression, fitted on the VALIDATION split only, turns those
into one number in [0, 1]; scans below a threshold chosen there are flagged for review. The statistics and the
regression are stored in the checkpoint under "trust", so one file carries everything.

Calibration: two temperatures, fitted on validation, rescale the class head's lesion-vs-normal and
malignant-vs-benign logits (temperature scaling: Guo et al., On Calibration of Modern Neural Networks, ICML 2017).
"""
from __future__ import annotations

import math

TRUST_FORMAT = 1
# An empty mask is right exactly when the scan has no lesion, an outline when it fits one: two questions, so the
# outline's features count only where there is an outline, and the empty mask has features of its own.
OUTLINE_FEATURES = ("max_probability", "flip_agreement", "flip_change", "mean_inside", "uncertain_band",
                    "lesion_probability", "feature_distance", "log_area")
EMPTY_FEATURES = ("empty_mask", "empty_mask_x_max_probability", "empty_mask_x_lesion_probability",
                  "empty_mask_x_feature_distance")
FEATURES = OUTLINE_FEATURES + EMPTY_FEATURES
PCA_COMPONENTS = 16  # directions of the training features that the distance is measured along
RIDGE = 1.0  # L2 penalty of the regression on standardised features
SHIFTED_COPIES = 3  # copies of the validation split under the scanner transforms that the regression also sees
ALL_FLAGGED = 2.0  # the review cut that flags every scan (scores lie in [0, 1])
NO_RIGHT_OUTLINE = ("the trust score was fitted on validation outlines that were all wrong (an undertrained "
                    "model?): every scan is flagged for review")



import numpy as np
import torch

import metrics


# --------------------------------------------------------------------------------------------------------------
# Per-image features and the score
# --------------------------------------------------------------------------------------------------------------
def image_features(seg: torch.Tensor, flipped: torch.Tensor, cls: torch.Tensor | None, deep: torch.Tensor,
                   threshold: float, stats: dict | None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """[B, len(FEATURES)] float32 (`FEATURES`) from one batch: `seg` and `flipped` are the probability maps
    [B,1,S,S] of the image and of its flipped twin (flipped back), `cls` the raw class probabilities [B,3]
    (benign, malignant, normal) or None, `deep` the pooled deepest features [B,C], `stats` the training
    features' statistics (None: distance 0), `gate` [B] bool the scans whose mask the "no lesion" gate empties
    (their features are an empty mask's)."""
    p, q = seg[:, 0].float(), flipped[:, 0].float()
    m, mq = p > threshold, q > threshold
    area, area_q = m.sum((1, 2)).float(), mq.sum((1, 2)).float()
    inter = (m & mq).sum((1, 2)).float()
    both = area + area_q
    agreement = torch.where(both > 0, 2 * inter / both.clamp_min(1), torch.ones_like(both))
    change = (p - q).abs().sum((1, 2)) / (p.sum((1, 2)) + q.sum((1, 2)) + 1.0)
    mean_inside = torch.where(area > 0, (p * m).sum((1, 2)) / area.clamp_min(1), torch.zeros_like(area))
    band = ((p > 0.1) & (p < 0.9)).sum((1, 2)).float()
    pixels = p.shape[-1] * p.shape[-2]
    lesion = 1 - cls[:, 2].float() if cls is not None else torch.full_like(area, 0.5)
    distance = feature_distance(deep, stats) if stats is not None else torch.zeros_like(area)
    max_prob = p.flatten(1).amax(1)
    outline = torch.stack([max_prob, agreement, change, mean_inside, torch.log((band + 1) / (area + 1)), lesion,
                           distance, torch.log(area / pixels + 1e-4)], 1)
    empty = (area == 0) if gate is None else (area == 0) | gate.to(area.device)
    empty = empty.float()
    return torch.cat([outline * (1 - empty)[:, None],
                      torch.stack([empty, empty * max_prob, empty * lesion, empty * distance], 1)], 1)


# --------------------------------------------------------------------------------------------------------------
# "No lesion": an image-level decision that empties the mask of a scan judged free of lesions
# --------------------------------------------------------------------------------------------------------------
PRESENCE_CANDIDATES = ("max_probability", "class_head", "combined")
PRESENCE_BOOTSTRAP = 1000  # resamples of the validation split for the interval of the normal FP rate


def presence_inputs(seg: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
    """[B,2]: the logit of the mask's maximum probability and the class head's lesion-vs-normal logit (0 without a
    head), from the unflipped pass's probabilities `seg` [B,1,S,S] and raw class probabilities `cls` [B,3]."""
    p = seg.flatten(1).amax(1).float().clamp(1e-6, 1 - 1e-6)
    lesion = class_logits(cls)[0] if cls is not None else torch.zeros_like(p)
    return torch.stack([torch.log(p / (1 - p)), lesion.float().clamp(-30, 30)], 1)


def presence_probability(inputs: torch.Tensor, presence: dict) -> torch.Tensor:
    """[B] the fitted probability that a lesion is present (the chosen candidate's score)."""
    x = inputs.float()
    return torch.sigmoid(x @ presence["weights"].to(x) + presence["bias"])


def gated(probability: torch.Tensor, presence: dict | None) -> torch.Tensor:
    """[B] bool: the scans whose mask the "no lesion" gate empties."""
    if presence is None:
        return torch.zeros(probability.shape, dtype=torch.bool, device=probability.device)
    return probability < presence["cut"]


def presence_curve(scores: np.ndarray, lesion: np.ndarray, outlined: np.ndarray) -> list[list[float]]:
    """[[cut, missed lesion rate, normal FP rate], ...] for every cut of `scores`: a lesion scan is missed when its
    mask is empty or the gate empties it, a normal scan is a false positive when it keeps an outline."""
    out = []
    for cut in np.r_[-np.inf, np.unique(scores)]:
        keep = scores >= cut
        out.append([float(cut), float((~(keep & outlined))[lesion].mean()) if lesion.any() else math.nan,
                    float((keep & outlined)[~lesion].mean()) if (~lesion).any() else math.nan])
    return out


def presence_cut(scores: np.ndarray, lesion: np.ndarray, keep: float) -> float:
    """A cut that keeps at least `keep` of the lesion scans (scores >= cut) and gates as many scans as it can: the
    midpoint between the lowest lesion score kept and the next lower score (0 below the lowest), as
    review_threshold does. Never on a score: applied in float32 (torch, onnxruntime), a cut on a validation scan's
    float64 score would gate that scan on one backend and keep it on another. -inf for keep 0."""
    if keep <= 0 or not lesion.any():
        return -math.inf
    ranked = np.sort(scores[lesion])
    kept = ranked[int(math.floor((1 - keep) * len(ranked) + 1e-9))]
    below = scores[scores < kept]
    return float((kept + (below.max() if below.size else 0.0)) / 2)


def fit_presence(inputs: np.ndarray, lesion: np.ndarray, outlined: np.ndarray, keep: float, source: str,
                 seed: int = 0) -> dict | None:
    """The "no lesion" gate, fitted on the VALIDATION split: three candidate scores (the mask's maximum
    probability, the class head's lesion probability, and a logistic regression on both), each cut where it keeps
    `keep` of the lesion scans; the one with the fewest normal scans left outlined wins (ties: the simpler). With
    the validation curves of all three, and a bootstrap interval of the winner's normal FP rate (cut refitted in
    every resample). None when `keep` is 0, the split lacks lesion or normal scans, or no candidate leaves fewer
    validation normal scans outlined than no gate at all."""
    if keep <= 0 or not lesion.any() or lesion.all():
        return None
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6
    w_comb, b_comb = fit_logistic((inputs - mean) / std, lesion.astype(float))
    params = {"max_probability": (np.array([1.0, 0.0]), 0.0), "class_head": (np.array([0.0, 1.0]), 0.0),
              "combined": (w_comb / std, float(b_comb - (w_comb / std) @ mean))}
    found = {}
    for name, (w, b) in params.items():
        scores = 1 / (1 + np.exp(-np.clip(inputs @ w + b, -30, 30)))
        cut = presence_cut(scores, lesion, keep)
        keep_mask = scores >= cut
        found[name] = {"weights": w, "bias": b, "cut": cut, "scores": scores,
                       "normal_fp_rate": float((keep_mask & outlined)[~lesion].mean()),
                       "missed_rate": float((~(keep_mask & outlined))[lesion].mean()),
                       "curve": presence_curve(scores, lesion, outlined)}
    best = min(PRESENCE_CANDIDATES, key=lambda n: (found[n]["normal_fp_rate"], PRESENCE_CANDIDATES.index(n)))
    if found[best]["normal_fp_rate"] >= float(outlined[~lesion].mean()):
        return None  # no candidate leaves fewer normal scans outlined than no gate: it would only cost lesions
    rng, chosen, fps = np.random.default_rng(seed), found[best], []
    for _ in range(PRESENCE_BOOTSTRAP):
        i = rng.integers(0, len(lesion), len(lesion))
        if lesion[i].any() and not lesion[i].all():
            cut = presence_cut(chosen["scores"][i], lesion[i], keep)
            fps.append(((chosen["scores"][i] >= cut) & outlined[i])[~lesion[i]].mean())
    return {"candidate": best, "weights": torch.tensor(chosen["weights"], dtype=torch.float32),
            "bias": float(chosen["bias"]), "cut": float(chosen["cut"]), "keep": float(keep), "fitted_on": source,
            "n_lesion": int(lesion.sum()), "n_normal": int((~lesion).sum()),
            "normal_fp_rate": chosen["normal_fp_rate"], "missed_rate": chosen["missed_rate"],
            "normal_fp_rate_interval": [float(np.percentile(fps, 2.5)), float(np.percentile(fps, 97.5))],
            "no_gate": {"normal_fp_rate": float(outlined[~lesion].mean()),
                        "missed_rate": float((~outlined)[lesion].mean())},
            "candidates": {n: {k: found[n][k] for k in ("cut", "normal_fp_rate", "missed_rate", "curve")}
                           for n in PRESENCE_CANDIDATES}}


def presence_problem(presence) -> str | None:
    """What is wrong with a trust entry's "presence" part (None: usable)."""
    if not isinstance(presence, dict):
        return "its presence gate is not a dict"
    w = presence.get("weights")
    if not isinstance(w, torch.Tensor) or w.shape != (2,) or not bool(torch.isfinite(w).all()):
        return "its presence gate's weights should be 2 finite numbers"
    for key in ("bias", "cut"):
        value = presence.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or \
                (key == "bias" and not math.isfinite(value)):
            return f"its presence gate's {key} should be a number"
    return None


def feature_statistics(deep: torch.Tensor, k: int = PCA_COMPONENTS) -> dict:
    """The training split's pooled deepest features [N,C] summarised for `feature_distance`: their mean, the k
    leading principal directions with their variances, and the mean squared residual outside them."""
    deep = deep.double()
    mean = deep.mean(0)
    centred = deep - mean
    k = max(1, min(k, deep.shape[0] - 1, deep.shape[1]))
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    components = vt[:k]
    variances = (s[:k] ** 2 / max(1, deep.shape[0] - 1)).clamp_min(1e-8)
    residual = centred - (centred @ components.T) @ components
    return {"mean": mean.float(), "components": components.float(), "variances": variances.float(),
            "residual": float((residual ** 2).sum(1).mean().clamp_min(1e-8))}


def feature_distance(deep: torch.Tensor, stats: dict) -> torch.Tensor:
    """log of (the squared Mahalanobis distance along the leading directions per direction + the squared residual
    relative to training's): about log 2 for a typical training scan (each term averages 1 there), larger the less
    the scan looks like them."""
    mean, components = stats["mean"].to(deep), stats["components"].to(deep)
    centred = deep.float() - mean
    z = centred @ components.T
    residual = ((centred - z @ components) ** 2).sum(1) / stats["residual"]
    return torch.log((z ** 2 / stats["variances"].to(deep)).mean(1) + residual + 1e-6)


# --------------------------------------------------------------------------------------------------------------
# Familiarity: is this scan like the training hospitals' scans at all?
# --------------------------------------------------------------------------------------------------------------
# The deepest features describe lesions, and an echo loop or a CT slice lands among the training scans there; the
# stride-4 encoder features (speckle, edges, grey levels) tell breast ultrasound from everything else tried
# (RESULTS.md, "Familiarity"). Their per-channel mean and spread over the scan, z-scored, with a shrunk covariance.
FAMILIARITY_QUANTILE = 0.99  # the share of each training source's validation scans inside the range
FAMILIARITY_SHRINK = 0.2  # covariance shrinkage towards the identity (48 dimensions from ~1700 scans)
FAMILIARITY_FORMAT = 1


def texture_statistics(feature_map: torch.Tensor) -> torch.Tensor:
    """[B,2C] float32: each channel's mean and standard deviation over the scan, from a [B,C,H,W] map (a [B,2C]
    tensor is taken as already pooled: the ONNX graph pools it itself)."""
    if feature_map.dim() == 2:
        return feature_map.float()
    f = feature_map.float().flatten(2)
    return torch.cat([f.mean(2), f.std(2)], 1)


def familiarity_distance(texture: torch.Tensor, familiar: dict) -> torch.Tensor:
    """[B] the squared Mahalanobis distance of pooled texture statistics from the fitted scans', per dimension
    (about 1 for a typical one)."""
    z = (texture.float() - familiar["mean"].to(texture)) / familiar["std"].to(texture)
    return ((z @ familiar["precision"].to(texture)) * z).sum(1) / z.shape[1]


def familiarity(texture: torch.Tensor, familiar: dict) -> torch.Tensor:
    """[B] familiarity: the distance relative to the range (<= 1: in range, > 1: unlike the scans it was fitted
    on)."""
    return familiarity_distance(texture, familiar) / familiar["cut"]


def fit_familiarity(train: torch.Tensor, val: torch.Tensor, val_sources: list[str], source: str) -> dict:
    """The "familiarity" entry: statistics of the texture features `train` [N,2C] (mean, spread, shrunk
    precision), and the range: the distance that keeps FAMILIARITY_QUANTILE of every source's validation scans
    `val` (the largest of the sources' quantiles, so that no source falls below it)."""
    train = train.double()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    z = (train - mean) / std
    cov = z.T @ z / max(1, len(z) - 1)
    cov = (1 - FAMILIARITY_SHRINK) * cov + FAMILIARITY_SHRINK * torch.eye(len(cov), dtype=cov.dtype)
    familiar = {"format": FAMILIARITY_FORMAT, "mean": mean.float(), "std": std.float(),
                "precision": torch.linalg.inv(cov).float(), "cut": 1.0}
    d = familiarity_distance(val, familiar).double().numpy()
    names = np.array(val_sources)
    cuts = {s: float(np.quantile(d[names == s], FAMILIARITY_QUANTILE)) for s in sorted(set(val_sources))}
    familiar["cut"] = max(cuts.values())
    familiar.update(quantile=FAMILIARITY_QUANTILE, fitted_on=source, n_train=int(len(train)), n_val=int(len(val)),
                    in_range={s: float((d[names == s] <= familiar["cut"]).mean()) for s in cuts})
    return familiar


def familiarity_problem(familiar) -> str | None:
    """What is wrong with a trust entry's "familiarity" part (None: usable)."""
    if not isinstance(familiar, dict) or familiar.get("format") != FAMILIARITY_FORMAT:
        return "its familiarity entry is not of this version"
    mean, std, precision = (familiar.get(k) for k in ("mean", "std", "precision"))
    if not all(isinstance(t, torch.Tensor) for t in (mean, std, precision)) or mean.dim() != 1 or \
            std.shape != mean.shape or precision.shape != (len(mean), len(mean)):
        return "its familiarity statistics do not fit together"
    if not all(bool(torch.isfinite(t).all()) for t in (mean, std, precision)) or not bool((std > 0).all()):
        return "its familiarity statistics hold NaN, infinite or zero values"
    cut = familiar.get("cut")
    if not isinstance(cut, float) or not math.isfinite(cut) or cut <= 0:
        return "its familiarity range should be a finite positive number"
    return None


# --------------------------------------------------------------------------------------------------------------
# Where the "no lesion" gate may empty a mask
# --------------------------------------------------------------------------------------------------------------
GATE_MODES = ("auto", "apply", "mark")
SITE_GATE = "site"  # trust["gate_scope"] when the gate was fitted on the scans' own site (fit_trust.py, a site run)


def site_entry(fitted: dict, before: dict | None) -> dict:
    """A trust entry fitted on a site's own labelled scans: its gate applies there (SITE_GATE). The familiarity
    range stays the one `before` (the entry of the checkpoint it came from) had: a few labelled patients are far
    too few to estimate 48-dimensional texture statistics (refitted on 11-27 scans, it put 5-96 % of the same
    site's validation scans out of range in the simulation); adapt.py fits it on the site's unlabelled scans."""
    out = {**fitted, "gate_scope": SITE_GATE}
    out.pop("familiarity", None)
    if isinstance(before, dict) and before.get("familiarity") is not None:
        out["familiarity"] = before["familiarity"]
    return out


def gate_applies(fitted: dict | None, mode: str = "auto") -> bool:
    """Whether the "no lesion" gate empties masks: "apply" always, "mark" never (the scan is only marked likely
    lesion-free), "auto" only where the gate was fitted on the scans' own site: fitted at the training hospitals,
    it emptied more lesions than normal scans elsewhere (docs/prediction.md)."""
    if mode not in GATE_MODES:
        raise ValueError(f"unknown gate mode {mode!r}: choose one of {', '.join(GATE_MODES)}")
    return bool(fitted and fitted.get("presence")) and (mode == "apply" or (
        mode == "auto" and fitted.get("gate_scope") == SITE_GATE))


def score(features: torch.Tensor, trust: dict) -> torch.Tensor:
    """[B] trust in [0, 1]: the fitted probability that each outline is right."""
    z = (features.float() - trust["feature_mean"].to(features)) / trust["feature_std"].to(features)
    return torch.sigmoid(z @ trust["weights"].to(features) + trust["bias"])


def calibrated(cls: torch.Tensor, trust: dict | None) -> torch.Tensor:
    """Class probabilities [B,3] (benign, malignant, normal) with the fitted temperatures applied: P(lesion) =
    sigmoid(lesion logit / T_lesion), P(malignant | lesion) = sigmoid(malignancy logit / T_malignancy), where the
    logits are log((pb+pm)/pn) and log(pm/pb). Unchanged without a fit."""
    if trust is None or "temperatures" not in trust:
        return cls
    lesion_logit, malignancy_logit = class_logits(cls)
    t_lesion, t_malignancy = trust["temperatures"]
    p_lesion = torch.sigmoid(lesion_logit / t_lesion)
    p_malignant = torch.sigmoid(malignancy_logit / t_malignancy)
    return torch.stack([p_lesion * (1 - p_malignant), p_lesion * p_malignant, 1 - p_lesion], -1)


def class_logits(cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lesion-vs-normal, malignant-vs-benign) logits from 3-way probabilities (benign, malignant, normal)."""
    p = cls.float().clamp_min(1e-12)  # float32: MPS has no float64
    return torch.log((p[..., 0] + p[..., 1]) / p[..., 2]), torch.log(p[..., 1] / p[..., 0])


# --------------------------------------------------------------------------------------------------------------
# Fitting on the validation split
# --------------------------------------------------------------------------------------------------------------
def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE, steps: int = 100) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method (the bias unpenalised): (weights, bias)."""
    n, d = x.shape
    a = np.c_[x, np.ones(n)]
    w = np.zeros(d + 1)
    penalty = np.r_[np.full(d, ridge), 0.0]
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (p - y) + penalty * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w[:-1], float(w[-1])


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the binary log-loss of sigmoid(logit / T) (a grid, then a finer one: robust
    with few images); 1 when there is nothing to fit."""
    logits, labels = np.asarray(logits, float), np.asarray(labels, float)
    if len(logits) == 0 or labels.min() == labels.max():
        return 1.0

    def loss(t):
        z = logits / t
        return float(np.mean(np.logaddexp(0, z) - labels * z))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 200))
    best = grid[int(np.argmin([loss(t) for t in grid]))]
    fine = np.linspace(best / 1.05, best * 1.05, 41)
    return float(fine[int(np.argmin([loss(t) for t in fine]))])


def fit(train_deep: torch.Tensor, inputs: dict, fit_records: list[dict], val_records: list[dict],
        threshold: float, source: str, gate: torch.Tensor | None = None, presence: dict | None = None) -> dict:
    """The "trust" entry of a checkpoint. `train_deep`: the training split's pooled deepest features; `inputs`:
    the tensors `image_features` takes (seg, flipped, cls, deep), one row per record of `fit_records` (dice,
    pred_pixels, label), whose first rows are `val_records` (the validation split as it is, with class_probs):
    the temperatures are fitted on those. The features are computed at `threshold`, the mask threshold the
    score describes (stored: the tools score at it whatever threshold they cut their masks at). `presence`, the
    "no lesion" gate (`fit_presence`), is stored with it; `gate` marks the rows whose mask it empties (the records
    already say so)."""
    stats = feature_statistics(train_deep)
    x = image_features(inputs["seg"], inputs["flipped"], inputs["cls"], inputs["deep"], threshold, stats, gate)
    x = x.double().numpy()
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0  # a constant feature (no class head, no empty mask) gets no weight
    right = ~metrics.failures(fit_records)
    weights, bias = fit_logistic((x - mean) / std, right.astype(float))
    trust = {"format": TRUST_FORMAT, "features": list(FEATURES), "statistics": stats, "threshold": float(threshold),
             "feature_mean": torch.tensor(mean, dtype=torch.float32),
             "feature_std": torch.tensor(std, dtype=torch.float32),
             "weights": torch.tensor(weights, dtype=torch.float32), "bias": bias, "fitted_on": source,
             "n_fit": int(len(right)), "n_failures": int((~right).sum()), "presence": presence}
    scores = score(torch.tensor(x, dtype=torch.float32), trust).numpy()
    trust["review_below"] = review_threshold(scores, ~right)
    trust["no_right_outline"] = bool(not right.any())
    if "class_probs" in val_records[0]:  # as the tools report them (flip-averaged under --tta)
        lesion_logit, malignancy_logit = (v.numpy() for v in class_logits(
            torch.tensor([r["class_probs"] for r in val_records])))
        has_lesion = np.array([r["label"] != "normal" for r in val_records])
        malignant = np.array([r["label"] == "malignant" for r in val_records])
        trust["temperatures"] = [fit_temperature(lesion_logit, has_lesion),
                                 fit_temperature(malignancy_logit[has_lesion], malignant[has_lesion])]
    return trust


def review_threshold(scores: np.ndarray, failed: np.ndarray) -> float:
    """The score below which a scan is flagged: the cut with the largest (failures caught - others flagged), as
    fractions (Youden's J), on the scores it is fitted on; 0 (flag none) when nothing failed, and ALL_FLAGGED
    (flag every scan) when every outline failed: a score fitted without one right outline vouches for none."""
    if failed.all():
        return ALL_FLAGGED
    if not failed.any():
        return 0.0
    cuts = np.unique(scores)
    j = [(scores[failed] < c).mean() - (scores[~failed] < c).mean() for c in cuts]
    k = int(np.argmax(j))
    return float((cuts[k] + cuts[k - 1]) / 2 if k > 0 else cuts[0])


def trust_problem(trust) -> str | None:
    """What is wrong with a checkpoint's "trust" entry (None: usable)."""
    if not isinstance(trust, dict) or trust.get("format") != TRUST_FORMAT:
        return "not a trust entry of this version"
    if list(trust.get("features", [])) != list(FEATURES):
        return f"fitted on other features ({trust.get('features')})"
    for key in ("feature_mean", "feature_std", "weights"):
        if not isinstance(trust.get(key), torch.Tensor) or trust[key].shape != (len(FEATURES),):
            return f"{key} should be {len(FEATURES)} numbers"
        if not bool(torch.isfinite(trust[key]).all()):
            return f"{key} holds NaN or infinite values"
    if not bool((trust["feature_std"] > 0).all()):
        return "feature_std should be > 0 (a spread of 0 divides by zero)"
    for key in ("bias", "review_below", "threshold"):
        if not isinstance(trust.get(key), (int, float)) or isinstance(trust.get(key), bool) or \
                not math.isfinite(trust[key]):
            return f"{key} should be a finite number"
    stats = trust.get("statistics")
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), torch.Tensor)
                                              for k in ("mean", "components", "variances")) \
            or not isinstance(stats.get("residual"), float):
        return "its feature statistics are incomplete"
    if not all(bool(torch.isfinite(stats[k]).all()) for k in ("mean", "components", "variances")) or \
            not math.isfinite(stats["residual"]):
        return "its feature statistics hold NaN or infinite values"
    if not bool((stats["variances"] > 0).all()) or not stats["residual"] > 0:
        return "its feature statistics' variances should be > 0"
    width = stats["mean"].shape
    components = stats["components"]
    if len(width) != 1 or components.shape[1:] != width or stats["variances"].shape != components.shape[:1]:
        return "its feature statistics do not fit together"
    if trust.get("presence") is not None and presence_problem(trust["presence"]):
        return presence_problem(trust["presence"])
    if trust.get("familiarity") is not None and familiarity_problem(trust["familiarity"]):
        return familiarity_problem(trust["familiarity"])
    temperatures = trust.get("temperatures", [1.0, 1.0])
    if not (isinstance(temperatures, list) and len(temperatures) == 2 and
            all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in temperatures)):
        return "temperatures should be two finite positive numbers"
    return None
