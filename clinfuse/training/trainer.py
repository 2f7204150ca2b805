"""Local training: one loop for DP-SGD (Opacus) and non-private training.

Differential privacy here means record-level DP with the *patient* as the unit:

- the training set is a :class:`~clinfuse.data.dataset.MultimodalDataset`, one item per patient
  (their rows pooled), sampled with Poisson sampling at rate ``q = 1 / ceil(n_patients / batch_size)``;
- the noise multiplier is planned once for the whole horizon (all epochs, or all federated rounds)
  from the target epsilon, through :mod:`clinfuse.privacy.accountant`, and kept fixed;
- the site's accountant is loaded before training and saved after every epoch, so a resumed run
  or a new process continues the same accountant and epsilon is never under-reported.

Everything that changes gradients (auxiliary-loss weights, modality dropout on the mask) happens
in the forward/loss, before Opacus clips; the FedProx pull towards the global model is applied
after the optimizer step, as data-independent post-processing.
"""

from __future__ import annotations

import contextlib
import math
import random
import secrets
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from clinfuse.config import Config
from clinfuse.data.dataset import MultimodalDataset, move_batch
from clinfuse.environment import resolve_device
from clinfuse.privacy.plan import PrivacyPlan


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:
        return None
    return float(roc_auc_score(labels, probs, multi_class="ovr"))


BatchTransform = Callable[[dict], dict]

# The per-encoder gradient-norm share (an imbalance log) is measured every this many steps.
GRAD_SHARE_EVERY = 5


@torch.no_grad()
def predict_outputs(model, dataset, *, batch_size: int = 64, device="cpu",
                    transform: BatchTransform | None = None) -> dict[str, np.ndarray]:
    """Run the model over a dataset (one row per item, i.e. per patient). Returns ``probs`` [N,C],
    ``aux`` {modality: [N,C]} (the model's modalities, in order), ``labels`` [N] and ``masks`` [N, M].

    ``transform(batch) -> batch`` is applied to each collated batch first (e.g. to remove a
    modality at test time). ``dataset`` items follow the batch contract of
    :mod:`clinfuse.data.dataset`; its ``collate`` (when it has one) stacks them.
    """
    from clinfuse.models.fusion import modality_names_of

    was_training = model.training
    model.eval()
    probs, labels, masks = [], [], []
    aux = {m: [] for m in modality_names_of(model)}
    collate = getattr(dataset, "collate", None)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        if transform is not None:
            batch = transform(batch)
        batch = move_batch(batch, device)
        out = model(batch)
        probs.append(torch.softmax(out["logits"].float(), -1).cpu())
        for m, parts in aux.items():
            parts.append(torch.softmax(out["aux"][m].float(), -1).cpu())
        labels.append(batch["label"].cpu())
        masks.append(batch["mask"].cpu())
    model.train(was_training)
    cat = (lambda xs: torch.cat(xs).numpy())
    if not labels:
        raise ValueError("predict_outputs: the dataset is empty")
    return {"probs": cat(probs), "aux": {m: cat(v) for m, v in aux.items()}, "labels": cat(labels),
            "masks": cat(masks)}


def predict_proba(model, dataset, *, batch_size: int = 64, device="cpu",
                  transform: BatchTransform | None = None) -> np.ndarray:
    """Class probabilities ``[N, C]`` for every item of ``dataset`` (in order)."""
    return predict_outputs(model, dataset, batch_size=batch_size, device=device, transform=transform)["probs"]


def validation_metrics(model, dataset, *, device="cpu") -> dict:
    """Loss and AUROC of the fused head and of each modality's auxiliary head (on samples that have it)."""
    out = predict_outputs(model, dataset, device=device)
    labels = out["labels"]
    eps = 1e-7
    metrics = {
        "val_loss": float(-np.log(out["probs"][np.arange(len(labels)), labels] + eps).mean()),
        "val_auroc": _auroc(labels, out["probs"]),
        "val_examples": len(labels),
    }
    head_losses = {"main": metrics["val_loss"]}
    for i, m in enumerate(out["aux"]):
        has = out["masks"][:, i] > 0
        metrics[f"val_aux_auroc_{m}"] = _auroc(labels[has], out["aux"][m][has])
        picked = out["aux"][m][has][np.arange(int(has.sum())), labels[has]]
        head_losses[m] = float(-np.log(picked + eps).mean()) if has.any() else float("nan")
    metrics["val_head_losses"] = head_losses
    metrics["val_predicted_classes"] = len(np.unique(out["probs"].argmax(1)))
    return metrics


#: A training loss at or above this share of ln(number of classes) is "at chance".
CHANCE_LOSS_SHARE = 0.98
#: A validation AUROC above this says the model ranks patients: small logits (early DP rounds
#: move slowly) then give a loss near chance and one predicted class without any collapse.
INFORMATIVE_AUROC = 0.6


def collapse_flags(train_main_loss: float | None, predicted_classes: int | None, n_classes: int,
                   val_auroc: float | None = None) -> dict:
    """Signs of a model that learned nothing: ``{"val_single_class", "loss_at_chance", "collapsed"}``
    (0/1 each).

    ``train_main_loss``: the fused head's mean training cross-entropy (``None``/NaN: unknown);
    ``predicted_classes``: how many classes the model predicts on the validation rows (``None``:
    no validation rows); ``val_auroc``: its validation AUROC (``None``: undefined or no rows).
    ``collapsed`` is set when either sign shows and the validation rows do not show the model
    ranking patients (AUROC above :data:`INFORMATIVE_AUROC`). One predicted class counts only
    where the validation rows hold every class (AUROC defined): on rows of one label it may be right.
    """
    single = int(predicted_classes is not None and predicted_classes < 2 and val_auroc is not None)
    chance = int(train_main_loss is not None and math.isfinite(train_main_loss)
                 and train_main_loss >= CHANCE_LOSS_SHARE * math.log(n_classes))
    ranks = val_auroc is not None and val_auroc > INFORMATIVE_AUROC
    return {"val_single_class": single, "loss_at_chance": chance, "collapsed": int((single or chance) and not ranks)}


def describe_collapse(flags: dict) -> str | None:
    """A warning line for :func:`collapse_flags` output, ``None`` when nothing collapsed."""
    if not flags.get("collapsed"):
        return None
    why = [w for k, w in (("val_single_class", "it predicts a single class on the validation rows"),
                          ("loss_at_chance", ("its training loss stays at chance (about ln of the number "
                                             "of classes)"))) if flags.get(k)]
    return ("WARNING: the model collapsed: " + " and ".join(why) + ". Under DP this usually means the noise "
            "drowns the signal; see the plan's utility forecast (clinfuse site check / audit plan)")


class LocalTrainer:
    """Trains a fusion model on one site's data, privately (``plan`` given) or not.

    Parameters
    ----------
    cfg: study configuration (train, balance and privacy sections are read).
    model: a model from :func:`clinfuse.training.checkpoint.build_model_for`.
    train_set: the site's training records as a :class:`MultimodalDataset`.
    val_set: optional validation dataset, evaluated after every epoch.
    plan: a :class:`PrivacyPlan` for DP-SGD, or ``None`` for non-private training.
    accountant: the site's :class:`clinfuse.privacy.accountant.SiteAccountant` (required with ``plan``);
        it is saved after every epoch.
    frozen_groups: parameter groups (modality names, ``fusion``) not to train, e.g. the encoder of
        a modality this site does not have.
    prox_anchor / prox_mu: FedProx pull towards the global weights.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, train_set: MultimodalDataset, *,
                 val_set: MultimodalDataset | None = None, plan: PrivacyPlan | None = None,
                 accountant=None, frozen_groups=(), device: torch.device | None = None,
                 prox_anchor: dict[str, torch.Tensor] | None = None, prox_mu: float = 0.0,
                 progress: bool = True):
        from clinfuse.models.fusion import parameter_groups
        from clinfuse.training.balance import AuxLossWeights, ModalityDropout

        if plan is not None and accountant is None:
            raise ValueError("DP training needs the site's accountant")
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        self.model = model.to(self.device)
        self.train_set, self.val_set = train_set, val_set
        self.plan, self.accountant = plan, accountant
        self.progress = progress
        self.groups = parameter_groups(model)
        self.frozen_groups = tuple(frozen_groups)
        for group in self.frozen_groups:
            names = set(self.groups[group])
            for name, p in model.named_parameters():
                if name in names:
                    p.requires_grad_(False)
        self.modality_dropout = ModalityDropout(cfg.balance.modality_dropout, cfg.modality_names)
        aux_cfg = cfg.balance.aux_weights
        if not getattr(model, "trains_aux_heads", True):
            from clinfuse.config import AuxWeightsConfig

            aux_cfg = AuxWeightsConfig(mode="none")
        self.aux_weights = AuxLossWeights(aux_cfg, cfg.modality_names)
        if self.aux_weights.mode == "gblend" and plan is not None:
            from clinfuse.errors import InputError
            # G-Blend weights are fitted on train/validation losses that DP-SGD does not cover.
            raise InputError("aux_weights mode 'gblend' fits weights on private losses outside the DP "
                             "guarantee; use 'fixed' or 'uncertainty' with DP", key="balance.aux_weights.mode")
        if self.aux_weights.learned:
            model.attach_loss_weights(self.aux_weights)
        self._head_losses: tuple[dict, dict] | None = None
        self.prox_mu = prox_mu
        self.prox_anchor = ({k: v.to(self.device) for k, v in prox_anchor.items()}
                            if prox_anchor is not None and prox_mu > 0 else None)
        self.history: list[dict] = []
        self.steps = 0
        self._prepared = False
        self.settings = self._settings()
        self._ema: dict[str, torch.Tensor] | None = None
        self._ema_steps = 0

    def _settings(self) -> dict:
        """Optimiser, lr, momentum, batch size and EMA decay: the user's config values where set,
        else the plan's (DP) or the head's non-DP defaults (:mod:`clinfuse.privacy.recipe`)."""
        from clinfuse.privacy.recipe import non_dp_settings

        if self.plan is None:
            return non_dp_settings(self.cfg)
        t, p = self.cfg.train, self.plan
        return {"head": p.head, "optimizer": t.optimizer or p.optimizer, "lr": t.lr if t.lr is not None else p.lr,
                "momentum": t.momentum if t.momentum is not None else p.momentum, "batch_size": p.batch_size,
                "ema_decay": t.ema_decay if t.ema_decay is not None else p.ema_decay}

    # -- iterate averaging ---------------------------------------------------------------------
    def _trainable_named(self):
        module = getattr(self.model, "_module", self.model)
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def _update_ema(self) -> None:
        """EMA of the iterates with De et al.'s warm-up: decay ``min(d, (1 + t) / (10 + t))``."""
        decay = self.settings["ema_decay"]
        if not decay:
            return
        self._ema_steps += 1
        t = self._ema_steps
        d = min(decay, t / (9.0 + t))
        if self._ema is None:
            self._ema = {n: p.detach().clone() for n, p in self._trainable_named()}
            return
        for n, p in self._trainable_named():
            self._ema[n].mul_(d).add_(p.detach(), alpha=1.0 - d)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within the block the model holds the averaged iterates (no-op without averaging)."""
        if self._ema is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self._trainable_named()}
        self._swap(self._ema)
        try:
            yield
        finally:
            self._swap(saved)

    @torch.no_grad()
    def _swap(self, values: dict) -> None:
        for n, p in self._trainable_named():
            p.copy_(values[n])

    # -- setup ---------------------------------------------------------------------------------
    def _trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _clipping(self):
        if not self.cfg.balance.clip_groups.enabled:
            return "flat", self.plan.max_grad_norm
        from clinfuse.training.balance import clip_group_norms
        return "per_layer", clip_group_norms(self.model, self.plan.max_grad_norm,
                                             self.cfg.balance.clip_groups.shares(self.cfg.modalities))

    def _grad_sample_mode(self) -> str:
        """The Opacus grad-sample mode: ``auto`` picks expanded weights (``ew``, the fastest on the
        CPU: no module hooks, no discarded batch weight gradient) when it covers every trainable
        layer of the model, ``hooks`` otherwise."""
        from clinfuse.training.dp_engine import choose_grad_sample_mode

        return choose_grad_sample_mode(self.model, self.cfg.privacy.grad_sample_mode)

    def _prepare(self) -> None:
        if self._prepared:
            return
        params = self._trainable()
        if not params:
            raise ValueError("every parameter group is frozen: nothing to train")
        if self.device.type == "cpu":
            from clinfuse.training.cpu_memory import keep_freed_memory_for_reuse

            keep_freed_memory_for_reuse()
        s = self.settings
        if s["optimizer"] == "adam":
            self.optimizer = torch.optim.Adam(params, lr=s["lr"], weight_decay=self.cfg.train.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"],
                                             weight_decay=self.cfg.train.weight_decay)
        if self.plan is None:
            generator = torch.Generator().manual_seed(self.cfg.train.seed)
        else:
            # DP's guarantee needs sampling and noise nobody can reproduce: the config seed is
            # shared with the server and every site, so both draw from OS entropy instead.
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        if self.plan is None:
            self.loader = DataLoader(self.train_set, batch_size=self.settings["batch_size"], shuffle=True,
                                     generator=generator, drop_last=False, collate_fn=self.train_set.collate)
            self.clipping, self.norms = None, None
        else:
            from clinfuse.training.dp_engine import DPEngine

            # One item per patient: the unit the sample rate and the clipping refer to.
            if len(self.train_set) != self.plan.n_patients:
                raise ValueError(f"plan was made for {self.plan.n_patients} patients, data has "
                                 f"{len(self.train_set)}")
            loader = DataLoader(self.train_set, batch_size=self.plan.batch_size, generator=generator,
                                collate_fn=self.train_set.collate)
            engine = DPEngine(accountant=self.plan.accountant)
            # The site's persistent accountant records every step: one accountant across rounds and restarts.
            engine.accountant = self.accountant.accountant
            self.clipping, self.norms = self._clipping()
            self.model, self.optimizer, self.loader = engine.make_private(
                module=self.model, optimizer=self.optimizer, data_loader=loader,
                noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.norms,
                poisson_sampling=True, clipping=self.clipping, grad_sample_mode=self._grad_sample_mode(),
                noise_generator=torch.Generator(device=self.device).manual_seed(secrets.randbits(63)))
            # Opacus' own empty-batch collate copies the first batch it saw, and has none when the
            # first Poisson batch is empty; the dataset's collate builds one of the right shapes.
            self.loader.collate_fn = self.train_set.collate
            if not math.isclose(self.loader.sample_rate, self.plan.sample_rate, rel_tol=1e-9):
                raise RuntimeError(f"sample rate {self.loader.sample_rate} differs from the plan's "
                                   f"{self.plan.sample_rate}: refusing to train with an unplanned mechanism")
        self._prepared = True

    # -- training ------------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.train.amp and self.plan is None:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _group_sq_norms(self) -> dict[str, float]:
        """Squared gradient norm per parameter group for this step (per-sample grads under DP)."""
        module = getattr(self.model, "_module", self.model)
        out = {}
        for group, names in self.groups.items():
            names = set(names)
            total = 0.0
            for name, p in module.named_parameters():
                if name not in names or not p.requires_grad:
                    continue
                g = getattr(p, "grad_sample", None)
                if g is not None:
                    total += float(g.detach().float().pow(2).sum())
                elif p.grad is not None:
                    total += float(p.grad.detach().float().pow(2).sum())
            out[group] = total
        return out

    def _prox_step(self) -> None:
        if self.prox_anchor is None:
            return
        lr = self.settings["lr"]
        module = getattr(self.model, "_module", self.model)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.requires_grad and name in self.prox_anchor:
                    p.sub_(lr * self.prox_mu * (p - self.prox_anchor[name]))

    def fit(self, epochs: int, *, desc: str = "training", on_epoch=None) -> list[dict]:
        """Train for ``epochs`` epochs; returns one metrics dict per epoch (also kept in ``history``).
        ``on_epoch(record)``, if given, is called with each epoch's dict as soon as it is complete."""
        from clinfuse.progress import Progress
        from clinfuse.training.balance import HeadLossMeter, multimodal_loss

        self._prepare()
        records = []
        for epoch in range(epochs):
            self.model.train()
            total_loss, total_items, group_norms = 0.0, 0, dict.fromkeys(self.groups, 0.0)
            head_losses = HeadLossMeter(self.cfg.modality_names)
            if self.plan is not None:
                # Written before the first step: a crash mid-epoch still counts the epoch's steps.
                self.accountant.reserve(self.plan.noise_multiplier, self.plan.sample_rate, len(self.loader))
            bar = Progress(len(self.loader), f"{desc} epoch {len(self.history) + 1}", "batch",
                           enabled=self.progress)
            for batch in bar.track(self.loader):
                batch = move_batch(batch, self.device)
                label = batch["label"]
                mask = batch["mask"] = self.modality_dropout(batch["mask"])
                self.optimizer.zero_grad(set_to_none=True)
                with self._autocast():
                    output = self.model(batch)
                    per_sample, parts = multimodal_loss(output, label, mask, self.aux_weights)
                loss = per_sample.mean() if len(label) else per_sample.sum()
                loss.backward()
                if self.steps % GRAD_SHARE_EVERY == 0:
                    # A full extra pass over every per-sample gradient: sampled, not run every step.
                    for group, value in self._group_sq_norms().items():
                        group_norms[group] += value
                self.optimizer.step()
                self._prox_step()
                self._update_ema()
                self.steps += 1
                head_losses.update(parts, mask)
                total_loss += float(per_sample.detach().sum())
                total_items += len(label)
                bar.set_postfix(loss=f"{total_loss / max(total_items, 1):.3f}")
            record = {"epoch": len(self.history) + 1, "train_loss": total_loss / max(total_items, 1),
                      "train_main_loss": head_losses.means().get("main", math.nan), "steps": self.steps}
            norm_total = sum(group_norms.values()) or 1.0
            record.update({f"grad_share_{g}": v / norm_total for g, v in group_norms.items()})
            if self.plan is not None:
                if self.accountant.state_path is not None:
                    self.accountant.save()
                record["epsilon"] = self.accountant.epsilon(self.plan.delta)
            record.update({f"aux_weight_{h}": w for h, w in self.aux_weights.current().items()})
            if self.val_set is not None and len(self.val_set):
                with self.averaged_weights():
                    record.update(validation_metrics(self.model, self.val_set, device=self.device))
                if self.aux_weights.mode == "gblend":
                    self._update_gblend(head_losses.means(), record["val_head_losses"])
            self.history.append(record)
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
        if self._ema is not None:
            # What is evaluated, checkpointed and released is the average; the next fit goes on from it.
            self._swap(self._ema)
        return records

    def _update_gblend(self, train_losses: dict, val_losses: dict) -> None:
        """G-Blending: re-weight heads from the change in train/val loss since the last epoch."""
        if self._head_losses is not None:
            self.aux_weights.update_from_losses(*self._head_losses, train_losses, val_losses)
        self._head_losses = (train_losses, val_losses)

    def epsilon(self) -> float | None:
        return self.accountant.epsilon(self.plan.delta) if self.plan is not None else None

    def privacy_summary(self) -> dict:
        if self.plan is None:
            return {"enabled": False, "epsilon": None}
        return {"enabled": True, "epsilon": self.epsilon(), "delta": self.plan.delta,
                "noise_multiplier": self.plan.noise_multiplier, "sample_rate": self.plan.sample_rate,
                "steps": self.accountant.steps, "max_grad_norm": self.norms, "clipping": self.clipping,
                "poisson": True, "privacy_unit": "patient", "accountant": self.plan.accountant,
                "target_epsilon": self.plan.target_epsilon, "horizon_steps": self.plan.horizon_steps}
