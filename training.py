"""The training machinery that train_unet_busi.py and bench_busi.py share: the optimisation step, the schedule,
validation, stop requests, non-finite-loss bookkeeping, the exact training state in a checkpoint, the curves."""
from __future__ import annotations

import copy
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import augment
import checkpoints
import dataset
import evaluation
import reports
import utils
from augment import AugmentConfig
from losses import BCEDiceLoss, total_loss

MAX_BAD_STEPS = 5  # stop after this many non-finite losses in a row (checked every 10 steps)
MAX_BAD_EPOCHS = 3  # stop after this many epochs in a row whose validation loss or outputs are not finite
# latest.pt (about 56 MB with the optimizer state) at most this often, and at the end, a pause or a stop: a run of
# one-second epochs would otherwise write gigabytes. A killed run resumes from it and replays the epochs since.
LATEST_EVERY_S = 60


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                   encoder_lr: float = 1.0):
    """AdamW, fused where PyTorch has the fused kernel (CUDA and CPU): one kernel over all parameters instead of
    a Python loop over them (several times faster per step on CPU; on CUDA, far fewer kernel launches). A
    pretrained encoder (`model.encoder`) learns at `encoder_lr` times `lr`; at 0 its weights are frozen (no
    gradients: the backward pass stops at the decoder), while its BatchNorm statistics still follow the data."""
    fused = device.type in ("cuda", "cpu")
    encoder = getattr(model, "encoder", None)
    if encoder is not None and encoder_lr == 0:
        encoder.requires_grad_(False)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay, fused=fused)
    if encoder is None or encoder_lr == 1.0:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
    own = {id(p) for p in encoder.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in own]},
              {"params": list(encoder.parameters()), "lr": lr * encoder_lr}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=dtype == torch.float16)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Batches per epoch. BatchNorm cannot train on a batch of one image (at a 1x1 bottleneck it fails
    outright), so a lone last image of a shuffled epoch sits that epoch out."""
    steps = math.ceil(n_images / batch_size)
    return steps - 1 if n_images % batch_size == 1 and steps > 1 else steps


def repeat_index(labels: list[str], sources: list[str], spec: str, seed: int) -> torch.Tensor:
    """The training images' indices as each epoch draws them under the `repeat` hyperparameter (utils.parse_repeat):
    an image whose class and source factors multiply to f appears floor(f) times, plus once more for a fixed share
    frac(f) of such images (drawn once per run from `seed`, so a resumed run sees the same epochs)."""
    factors = utils.parse_repeat(spec)
    unknown = set(factors) - set(labels) - set(sources) - set(utils.CLASSES)
    if unknown:
        raise ValueError(f"--repeat names {', '.join(sorted(unknown))}: neither a class nor a source of this run "
                         f"(sources: {', '.join(sorted(set(sources)))})")
    f = torch.tensor([factors.get(c, 1.0) * factors.get(s, 1.0) for c, s in zip(labels, sources)], dtype=torch.float64)
    if len(f) and float(f.max()) > utils.MAX_REPEAT:  # a class factor times a source factor
        raise ValueError(f"--repeat {spec!r} draws some images {float(f.max()):g} times an epoch (class and source "
                         f"factors multiply): at most {utils.MAX_REPEAT}")
    extra = torch.rand(len(f), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < f - f.floor()
    counts = f.floor().long() + extra.long()
    if int(counts.sum()) < 2:  # BatchNorm trains on 2 images at least; 0 would end in a division by zero
        raise ValueError(f"--repeat {spec!r} leaves {int(counts.sum())} of {len(f)} training images per epoch: "
                         f"raise its fractions")
    return torch.repeat_interleave(torch.arange(len(f)), counts)


def epoch_set(train: dict, repeat: str, seed: int, device: torch.device) -> dict:
    """The training split as each epoch draws it (`repeat_index`): images, masks and labels on `device`."""
    drawn = repeat_index([utils.CLASSES[k] for k in train["labels"].tolist()], train["sources"], repeat, seed)
    if repeat:
        print(f"sampling {repeat!r}: {len(drawn)} training images per epoch ({len(train['names'])} distinct)",
              flush=True)
    return {k: train[k][drawn].to(device) for k in ("images", "masks", "labels")}


class TrainStep:
    """One optimisation step of the project's pipeline, shared by the training loop and bench_busi.py.

    uint8 batch already on the device -> batched augmentation -> channels_last -> autocast forward ->
    float32 loss -> backward -> fused optimizer step. Returns `(loss, finite)`, two 0-dim tensors on the device.
    Nothing is read back to the host, so the CPU can queue the next steps while the GPU works. A non-finite
    loss still skips the step completely, decided on the device: the fused AdamW kernel takes a `found_inf`
    flag (the same input GradScaler uses) and leaves weights and optimizer state alone, and the BatchNorm
    running statistics, which the forward pass changes before the loss is known, are restored from a snapshot
    (a few KB).
    """

    def __init__(self, model, optimizer, scaler, seg_loss, cls_weight, device, dtype, compile=False, ds_weight=0.0,
                 presence_weight=0.0):
        self.model, self.optimizer, self.scaler, self.seg_loss = model, optimizer, scaler, seg_loss
        self.cls_weight, self.ds_weight, self.device, self.dtype = cls_weight, ds_weight, device, dtype
        self.presence_weight = presence_weight
        self.with_aux = bool(ds_weight)  # a deep-supervision model resumed with weight 0 skips its aux heads
        self.forward = model
        if compile:
            try:
                self.forward = torch.compile(model)
            except Exception as exc:  # noqa: BLE001 - any backend problem: run eagerly
                print(f"warning: torch.compile unavailable ({exc}); running eagerly", file=sys.stderr)
        self.buffers = list(model.buffers())  # BatchNorm running mean/var and num_batches_tracked
        self.snapshot = [b.clone() for b in self.buffers]
        self.skips_on_device = bool(optimizer.defaults.get("fused"))

    def __call__(self, images, masks, labels, aug_cfg, param_gen, noise_gen):
        x, y = augment.augment_batch(images, masks, aug_cfg, param_gen, noise_gen)
        x = x.contiguous(memory_format=torch.channels_last)
        torch._foreach_copy_(self.snapshot, self.buffers)
        with utils.autocast(self.device, self.dtype):
            try:
                outputs = self.forward(x, with_aux=self.with_aux)
            except Exception as exc:  # noqa: BLE001 - torch.compile fails lazily, at the first call
                if self.forward is self.model:
                    raise
                print(f"warning: torch.compile failed ({type(exc).__name__}); running eagerly", file=sys.stderr)
                self.forward = self.model
                torch._foreach_copy_(self.buffers, self.snapshot)
                outputs = self.model(x, with_aux=self.with_aux)
        loss = total_loss(self.seg_loss, outputs, y, labels, self.cls_weight, self.ds_weight, self.presence_weight)
        finite = torch.isfinite(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # fp16: GradScaler sees the inf/NaN gradients and skips the step itself
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.skips_on_device:
            loss.backward()
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif bool(finite):  # an unfused optimizer (MPS) cannot skip on the device: one host sync
            loss.backward()
            self.optimizer.step()
        torch._foreach_copy_(self.buffers, [torch.where(finite, b, s) for b, s in zip(self.buffers, self.snapshot)])
        return loss.detach(), finite


def validate(model, data, seg_loss, hp, device, dtype) -> tuple[dict, float]:
    """One pass over the validation split: its summary at the original resolution (evaluation.evaluate) and the
    training objective (deep supervision included, no augmentation) at the training size, from the same
    forward passes, so that the two loss curves compare like with like. The loss is NaN when any mask logit
    is not finite (a diverged model: its thresholded masks would be empty and score 1 on normal images)."""
    total = torch.zeros((), device=device)  # summed on the device: one host sync at the end, not per batch
    masks, labels = data["masks"].to(device), data["labels"].to(device)  # no copy where already on the device

    def add_loss(start, outputs):
        nonlocal total
        n = outputs[0].shape[0]
        loss = total_loss(seg_loss, outputs, masks[start:start + n], labels[start:start + n], hp.cls_weight,
                          hp.deep_supervision, hp.presence_weight)
        finite = torch.isfinite(outputs[0]).all()
        total = total + torch.where(finite, loss.float() * n, torch.nan)

    summary, _ = evaluation.evaluate(model, data, device, dtype, hp.threshold, hp.eval_batch_size, hp.tta,
                                     on_logits=add_loss, with_aux=bool(hp.deep_supervision))
    return summary, float(total) / max(1, len(data["names"]))


def on_device(part: dict, device) -> dict:
    """A part with its images and masks on `device` (uint8 and bool: small enough for the whole run)."""
    return {**part, "images": part["images"].to(device), "masks": part["masks"].to(device)}


def select(parts: dict, select_on: str, names: list[str], device, repeat: str = "") -> tuple[dict, dict[str, dict]]:
    """The parts of the sources whose validation chooses best.pt (the `select_on` hyperparameter; '' = all of
    them), and each other source's validation part on `device`, to be scored as held out."""
    chosen = utils.source_names(select_on) or list(names)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"--select-on names {', '.join(unknown)}: not a source of this run (sources: "
                         f"{', '.join(names)})")
    untrained = [n for n in chosen if utils.parse_repeat(repeat).get(n) == 0]
    if untrained:
        raise ValueError(f"--repeat {repeat!r} trains on none of {', '.join(untrained)}, which --select-on lets "
                         f"choose best.pt: name the sources it trains on, or give them a factor above 0")
    own = {k: dataset.of_sources(v, chosen) for k, v in parts.items()}
    return own, {n: on_device(dataset.of_sources(parts["val"], [n]), device) for n in names if n not in chosen}


def score_held_out(model, held: dict[str, dict], hp, device, dtype) -> dict[str, dict]:
    """Each held-out source's validation summary: scored every epoch for the record, it chooses nothing."""
    return {source: evaluation.evaluate(model, part, device, dtype, hp.threshold, hp.eval_batch_size, hp.tta)[0]
            for source, part in held.items()}


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second Ctrl-C aborts at once."""

    def __init__(self, what: str = "stopping after this step and saving latest.pt"):
        self.requested, self.what = False, what
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: {self.what} (press Ctrl-C again to abort without "
              f"saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class BadSteps:
    """Non-finite losses counted on the device (the current streak, the longest, the total), read every 10 steps:
    a warning names new skips, a streak of MAX_BAD_STEPS stops the run."""

    def __init__(self, device):
        self.run, self.longest, self.total = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
        self.reported = 0

    def add(self, finite: torch.Tensor) -> None:
        self.run = torch.where(finite, 0, self.run + 1)
        self.longest = torch.maximum(self.longest, self.run)
        self.total += ~finite

    def check(self, epoch: int, step: int, run_dir) -> None:
        total, longest = torch.stack([self.total, self.longest]).tolist()
        if total > self.reported:
            print(f"warning: {total - self.reported} non-finite loss(es) by epoch {epoch + 1} step {step + 1}: "
                  f"each step skipped, nothing updated (longest streak {longest})", file=sys.stderr, flush=True)
            self.reported = total
            if longest >= MAX_BAD_STEPS:
                raise FloatingPointError(
                    f"training diverged: the loss was non-finite {longest} steps in a row (epoch {epoch + 1}); "
                    f"stopping. The last good "
                    f"checkpoints in {run_dir} are untouched; try a lower --lr or --no-amp")


class Trainer:
    """The model's optimiser, schedule, generators and progress (epoch, step, batch order, best score, history),
    with the exact state a checkpoint needs to continue a run bit for bit."""

    def __init__(self, model, hp, device, dtype, n_train: int, compile: bool = False):
        self.model, self.hp, self.device = model, hp, device
        self.steps = steps_per_epoch(n_train, hp.batch_size)
        self.n_train = n_train
        total, warmup = self.steps * hp.epochs, max(1, round(hp.warmup_epochs * self.steps))
        self.optimizer = make_optimizer(model, hp.lr, hp.weight_decay, device, hp.encoder_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total, warmup))
        self.scaler = make_grad_scaler(device, dtype)
        self.seg_loss = BCEDiceLoss(hp.bce_weight, hp.dice_weight, dice_per_image=hp.dice_per_image)
        self.aug_cfg = AugmentConfig().scaled(hp.augment).with_scanner(hp.scanner_augment)
        self.param_gen = torch.Generator().manual_seed(hp.seed)
        self.noise_gen = torch.Generator(device=device).manual_seed(hp.seed + 1) if device.type != "mps" else None
        self.step_fn = TrainStep(model, self.optimizer, self.scaler, self.seg_loss, hp.cls_weight, device, dtype,
                                 compile, ds_weight=hp.deep_supervision, presence_weight=hp.presence_weight)
        self.bad = BadSteps(device)
        self.epoch, self.step, self.perm, self.history = 0, 0, None, []
        self.best_score, self.best_epoch, self.best_val = -1.0, None, None
        self.best_found = False  # whether the best epoch found any validation lesion (see end_epoch)
        self.bad_epochs = 0  # epochs in a row with a non-finite validation loss (not saved, see end_epoch)
        self.partial = {"loss_sum": 0.0, "good_seen": 0, "seen": 0, "seconds": 0.0}  # of an epoch stopped mid-way
        self.carried_seconds = 0.0  # the current epoch's seconds before a resume
        # SWA: the running mean of the weights at the ends of the epochs from `swa_from` (0-based) on
        self.swa_from = hp.epochs - min(hp.swa_epochs, hp.epochs) if getattr(hp, "swa_epochs", 0) else None
        self.average, self.averaged, self.average_model = None, 0, None

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's training state."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.perm = state["epoch"], state.get("step", 0), state.get("epoch_perm")
        self.partial = state.get("epoch_partial", self.partial)
        self.history = list(state.get("history", []))
        self.best_score, self.best_epoch, self.best_val = state["best_score"], state["best_epoch"], state.get("best_val")
        self.best_found = state.get("best_found_lesion", True)  # runs saved before the rule ranked by score alone
        if "train_model" in state:  # an SWA run: "model" holds the average, "train_model" the weights trained on
            saved = state.get("swa_from", self.swa_from)
            if saved != self.swa_from:
                raise ValueError(f"the run averages its weights from epoch {saved + 1} on (--swa-epochs), and that "
                                 f"average has begun: resume it with its own --epochs and --swa-epochs "
                                 f"({state['config'].get('epochs')} and {state['config'].get('swa_epochs')}), or "
                                 f"start a new run")
            self.model.load_state_dict(state["train_model"])
            self.average = {k: v.to(self.device) for k, v in state["model"].items()}
            self.averaged = state["swa_averaged"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.param_gen.set_state(rng["param_gen"])
        if self.noise_gen is not None and "noise_gen" in rng:
            self.noise_gen.set_state(rng["noise_gen"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def state(self, config: dict) -> dict:
        """Everything `restore` needs, plus the weights and the run's config."""
        rng = {"torch": torch.get_rng_state(), "param_gen": self.param_gen.get_state()}
        if self.noise_gen is not None:
            rng["noise_gen"] = self.noise_gen.get_state()
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        swa = ({"train_model": self.model.state_dict(), "swa_averaged": self.averaged, "swa_from": self.swa_from}
               if self.average is not None else {})
        return {"format": checkpoints.CHECKPOINT_FORMAT, "model": self.model.state_dict() if self.average is None
                else self.average, **swa,
                "model_config": self.model.config,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step, "epoch_perm": self.perm,
                "epoch_partial": self.partial,
                "best_score": self.best_score, "best_epoch": self.best_epoch, "best_val": self.best_val,
                "best_found_lesion": self.best_found,
                "config": config, "history": self.history, "rng": rng}

    def train_epoch(self, data: dict, stop: StopRequest, run_dir) -> tuple[float, float, int] | None:
        """Train the rest of the current epoch on `data` (uint8 tensors on the device). Returns (mean loss of
        the finite steps, seconds, images seen), or None when a stop request ended it early (then `state()`
        holds the position inside the epoch)."""
        self.model.train()
        if self.perm is None:
            self.perm = torch.randperm(self.n_train, generator=self.param_gen)
        # an epoch resumed mid-way goes on from the sums saved with its position: its row covers all of it
        carried = self.partial if self.step else {"loss_sum": 0.0, "good_seen": 0, "seen": 0, "seconds": 0.0}
        self.carried_seconds = carried["seconds"]
        t0, seen = time.perf_counter() - carried["seconds"], carried["seen"]
        loss_sum = torch.tensor(float(carried["loss_sum"]), device=self.device)
        good_seen = torch.tensor(int(carried["good_seen"]), dtype=torch.long, device=self.device)
        bs = self.hp.batch_size
        bar = tqdm(range(self.step, self.steps), desc=f"epoch {self.epoch + 1}/{self.hp.epochs}", leave=False,
                   disable=not utils.interactive(),
                   dynamic_ncols=True, initial=self.step, total=self.steps)
        for step in bar:
            idx = self.perm[step * bs:(step + 1) * bs].to(self.device)
            loss, finite = self.step_fn(data["images"][idx], data["masks"][idx], data["labels"][idx], self.aug_cfg,
                                        self.param_gen, self.noise_gen)
            self.scheduler.step()
            self.bad.add(finite)  # bookkeeping stays on the device: no host sync per step
            loss_sum += torch.where(finite, loss, 0) * len(idx)
            good_seen += finite * len(idx)
            seen += len(idx)
            if step % 10 == 0 or step == self.steps - 1:  # the one read-back every 10 steps
                bar.set_postfix(loss=f"{loss.item():.4f}")
                self.bad.check(self.epoch, step, run_dir)
            if stop.requested and step + 1 < self.steps:  # (a complete epoch is finished normally)
                bar.close()
                self.step = step + 1
                self.partial = {"loss_sum": float(loss_sum), "good_seen": int(good_seen), "seen": seen,
                                "seconds": time.perf_counter() - t0}
                return None
        bar.close()
        self.step, self.perm = 0, None
        return float(loss_sum) / max(1, int(good_seen)), time.perf_counter() - t0, seen

    def scored_model(self) -> torch.nn.Module:
        """The model a finished epoch is validated and saved as: its weights, or from the first SWA epoch on the
        running mean of the weights at the epochs' ends (BatchNorm statistics averaged alike, not re-estimated:
        at the end of the cosine schedule the weights barely move). Call once per finished epoch."""
        if self.swa_from is None or self.epoch < self.swa_from:
            return self.model
        weights = self.model.state_dict()
        self.averaged += 1
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in weights.items()}
        for k, v in weights.items():
            if v.is_floating_point():
                self.average[k] += (v.detach() - self.average[k]) / self.averaged
            else:  # (BatchNorm's step counters)
                self.average[k].copy_(v)
        if self.average_model is None:
            self.average_model = copy.deepcopy(self.model)
        self.average_model.load_state_dict(self.average)
        return self.average_model

    def end_epoch(self, train_loss: float, train_seconds: float, seen: int, val_summary: dict, val_loss: float,
                  seconds: float, held_out: dict | None = None) -> tuple[dict, bool]:
        """Record the finished epoch in the history; returns its row and whether it is the best so far.

        An epoch whose validation loss is not finite (its outputs overflowed) is never the best; MAX_BAD_EPOCHS
        of them in a row stop the run (FloatingPointError) before anything of theirs is saved."""
        self.epoch += 1
        seconds += self.carried_seconds  # the part of the epoch run before a resume
        fp = val_summary["normal_fp_rate"]
        row = {"epoch": self.epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
               "val_lesion_dice": round(val_summary["lesion_dice"], 5),
               "val_lesion_iou": round(val_summary["lesion_iou"], 5),
               "val_normal_fp_rate": round(fp, 5) if not math.isnan(fp) else "",
               "val_score": round(val_summary.get("score", val_summary["all_dice"]), 5),
               "lr": self.optimizer.param_groups[0]["lr"],
               "seconds": round(seconds, 2), "train_img_per_s": round(seen / max(train_seconds, 1e-9), 1)}
        if "malignancy_auc" in val_summary:
            row["val_malignancy_auc"] = round(val_summary["malignancy_auc"], 5)
        for source, s in val_summary.get("per_source", {}).items():  # each hospital's own figures
            fp_s = s["normal_fp_rate"]
            row.update({f"{source}:val_lesion_dice": round(s["lesion_dice"], 5),
                        f"{source}:val_normal_fp_rate": round(fp_s, 5) if not math.isnan(fp_s) else "",
                        f"{source}:val_missed": s["missed_lesions"], f"{source}:val_score": round(s["all_dice"], 5)})
            if "malignancy_auc" in s:
                row[f"{source}:val_malignancy_auc"] = round(s["malignancy_auc"], 5)
        for source, s in (held_out or {}).items():  # scored for the record (score_held_out): they choose nothing
            fp_s = s["normal_fp_rate"]
            row.update({f"{source}:held_out_lesion_dice": round(s["lesion_dice"], 5),
                        f"{source}:held_out_missed": s["missed_lesions"],
                        f"{source}:held_out_normal_fp_rate": round(fp_s, 5) if not math.isnan(fp_s) else "",
                        f"{source}:held_out_score": round(s["all_dice"], 5)})
            if "malignancy_auc" in s:
                row[f"{source}:held_out_malignancy_auc"] = round(s["malignancy_auc"], 5)
        self.history.append(row)
        if self.swa_from is not None and self.epoch == self.swa_from + 1:  # the first average: from now on best.pt
            self.best_score, self.best_epoch, self.best_val, self.best_found = -1.0, None, None, False  # is one
        # An epoch that predicts nothing on every validation lesion scores 1 on each normal image: on a small
        # validation split that alone can win. Such an epoch is best only until one that finds a lesion comes.
        found = val_summary["n_lesion"] == 0 or val_summary["missed_lesions"] < val_summary["n_lesion"]
        self.bad_epochs = 0 if math.isfinite(val_loss) else self.bad_epochs + 1
        score = val_summary.get("score", val_summary["all_dice"])  # the mean of the sources' (evaluation.summarize)
        improved = not self.bad_epochs and (found, score) > (self.best_found, self.best_score)
        if improved:
            self.best_score, self.best_epoch, self.best_val = score, self.epoch, val_summary
            self.best_found = found
        return row, improved


def epoch_line(row: dict, improved: bool, bad: int, epochs: int, best_before: float, left: int = 0) -> str:
    """The log line of a finished epoch (* marks a new best.pt, with the reason when its score is lower); with
    `left` epochs still to run, how long they will take at this epoch's pace."""
    head = f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f}"
    if bad:
        return f"{head} | validation outputs not finite: epoch not saved"
    star = " *" if improved else "  "
    why = " (best: the first epoch to find a validation lesion)" if improved and row["val_score"] < best_before else ""
    sources = "".join(f" | {k.split(':')[0]} {row[k]:.4f}" for k in row if k.endswith(":val_score"))
    sources += "".join(f" | held out {k.split(':')[0]} Dice {row[k]:.4f} ({row[k[:-11] + 'missed']} missed)"
                       for k in row if k.endswith(":held_out_lesion_dice"))
    return (f"{head} | val Dice {row['val_lesion_dice']:.4f} | val IoU {row['val_lesion_iou']:.4f} | val score "
            f"{row['val_score']:.4f}{star}{sources} | lr {row['lr']:.2e} | {row['seconds']:.1f} s | "
            f"{row['train_img_per_s']:.0f} img/s{why}"
            + (f" | about {utils.duration(row['seconds'] * left)} for the {left} epochs left" if left else ""))


def save_epoch(trainer: Trainer, config: dict, run_dir: Path, improved: bool, latest: dict,
               force: bool) -> int:
    """best.pt (when improved), latest.pt (when `force`d or LATEST_EVERY_S after the last one; `latest` keeps its
    epoch and time) and the history; returns the epoch latest.pt holds. An epoch whose validation outputs were
    not finite saves no checkpoint; MAX_BAD_EPOCHS of them in a row end the run."""
    if not trainer.bad_epochs:
        state = trainer.state(config)
        if improved:
            checkpoints.save_checkpoint(state, run_dir / "best.pt")
        if force or time.monotonic() - latest["time"] >= LATEST_EVERY_S:
            checkpoints.save_checkpoint(state, run_dir / "latest.pt")
            latest.update(epoch=trainer.epoch, time=time.monotonic())
    reports.write_history(run_dir, trainer.history, trainer.best_epoch)
    saved = latest["epoch"]
    if trainer.bad_epochs >= MAX_BAD_EPOCHS:
        kept = f"latest.pt holds epoch {saved}, best.pt epoch {trainer.best_epoch}" if saved else "nothing was saved"
        raise FloatingPointError(f"training diverged: validation outputs were not finite for {trainer.bad_epochs} "
                                 f"epochs in a row; stopping ({kept}). Try a lower --lr")
    return saved
