"""Cost of DP-SGD: training samples/s without DP vs with DP, and where the DP time goes.

For the default model (configs/demo.yaml: small CNN 64x64 + hashed bag over a fixed random table +
tabular MLP, attention fusion), for DenseNet121 at 128x128, for the 3-D encoder alone (a study of
one volume modality: ``small_cnn3d`` on 32x64x64, the goal <= 1.5x as for 2-D) and for the
five-modality study of configs/rich.yaml, one fixed random batch (default 32) is trained on
``--threads`` CPU threads in each of these setups:

- ``non-DP``: forward, loss, backward, Adam step;
- ``auto``: what ``LocalTrainer`` runs under DP with ``privacy.grad_sample_mode: auto`` — the mode
  :func:`clinfuse.training.dp_engine.choose_grad_sample_mode` picks for the model (printed: ``ew``
  for both models here), through :class:`~clinfuse.training.dp_engine.DPEngine` (flat-vector
  clipping and noise, empty-batch-safe expanded weights, convolution and group-norm per-sample
  gradients from :mod:`clinfuse.training.per_sample_grads`);
- ``hooks``: the same engine forced to Opacus' hooks mode (``privacy.grad_sample_mode: hooks``);
- ``opacus-hooks``: plain ``opacus.PrivacyEngine`` in hooks mode with ``DPOptimizer`` (what the
  trainer ran before).

Like the trainer on a CPU, the script first calls
:func:`clinfuse.training.cpu_memory.keep_freed_memory_for_reuse` (glibc keeps freed blocks for
reuse instead of unmapping them; it applies to every setup, non-DP included);
``--no-allocator-tuning`` leaves glibc's defaults, as before.

The setups are built first and then stepped in turn (one step of each, repeated), so a CPU shared
with other work slows them alike; samples/s comes from the median step time. Each step is split
with timers into forward (incl. loss), backward, per-sample gradients (hooks modes: Opacus' layer
samplers, timed inside backward and taken out of "backward"; ``ew`` computes them inside backward,
where they are not separable: its "backward" includes them), the grad-share log (the trainer's
pass over the per-sample gradients to log each encoder's share of the gradient norm, made every
``GRAD_SHARE_EVERY`` steps as in the trainer, so its column is the per-step average), clipping
(per-sample norms + clipped sum), noise (noise + scaling by the expected batch size), the Adam
update and zero_grad. Phase columns are per-step medians (the grad-share log: its mean). With
``--profile``, a torch.profiler table of the top operators of one ``auto`` step is printed too; it
shows which operators run, not their share of an ordinary step: under the profiler the grouped
convolution backward of ``per_sample_grads`` runs several times slower than without it.

    python benchmarks/dp_overhead.py [--steps 30] [--warmup 2] [--batch 32] [--threads 2] [--skip-densenet]
        [--models default densenet121-128 volume-3d rich] [--setups auto hooks opacus-hooks]
        [--no-allocator-tuning] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from clinfuse.config import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
TARGET_SLOWDOWN = 1.5  # the goal for the default model (auto mode)


MODELS = ("default", "densenet121-128", "volume-3d", "rich")


def model_config(name: str, trainable_text_embedding: bool = False):
    if name in ("volume-3d", "rich"):
        raw = load_config(REPO / "configs" / "rich.yaml").model_dump(mode="json")
        if name == "volume-3d":  # the 3-D encoder alone: a study of one volume modality
            ct = next(m for m in raw["modalities"] if m["kind"] == "volume")
            raw["modalities"] = [{**ct, "size": [32, 64, 64]}]
            raw["balance"]["modality_dropout"] = {}
        return config_from_dict(raw, source=f"benchmarks/dp_overhead.py ({name})")
    raw = load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    if trainable_text_embedding:
        raw["model"]["text_encoder"]["trainable_embedding"] = True
    if name == "densenet121-128":
        raw["data"]["image"]["size"] = [128, 128]
        raw["model"]["image_encoder"] = {"name": "densenet121"}
    return config_from_dict(raw, source=f"benchmarks/dp_overhead.py ({name})")


def random_batch(cfg, batch: int, seed: int = 0) -> dict:
    """A batch dict of random inputs for every modality of ``cfg`` (all present)."""
    from clinfuse.data.dataset import input_shape

    g = torch.Generator().manual_seed(seed)
    out: dict = {"instances": {}}
    for spec in cfg.modalities:
        shape = (batch, *input_shape(spec))
        if spec.kind == "text":
            ids = torch.randint(1, spec.hash_buckets, shape, generator=g)
            ids[:, spec.max_tokens // 2:] = 0  # padded half, like real notes
            out[spec.name] = ids
        else:
            out[spec.name] = torch.rand(shape, generator=g) if spec.kind == "tabular" else torch.randn(shape, generator=g)
    out["mask"] = torch.ones(batch, len(cfg.modalities))
    out["label"] = torch.randint(0, cfg.n_classes, (batch,), generator=g)
    return out


class SamplerTimer:
    """Times Opacus' per-layer grad samplers (hooks mode) into whichever setup is stepping now."""

    def __init__(self):
        self.current: dict[str, float] | None = None

    def install(self):
        """Wrap every registered grad sampler; returns a function that restores them."""
        from opacus.grad_sample.grad_sample_module import GradSampleModule

        original = dict(GradSampleModule.GRAD_SAMPLERS)

        def wrap(fn, layer: str):
            def timed(*a, **k):
                t = time.perf_counter()
                out = fn(*a, **k)
                if self.current is not None:
                    spent = time.perf_counter() - t
                    self.current["per-sample grads"] += spent
                    self.current[f"layer:{layer}"] += spent
                return out
            return timed

        for key, fn in original.items():
            GradSampleModule.GRAD_SAMPLERS[key] = wrap(fn, getattr(key, "__name__", str(key)))

        def restore():
            GradSampleModule.GRAD_SAMPLERS.clear()
            GradSampleModule.GRAD_SAMPLERS.update(original)
        return restore


class Setup:
    """One way of training the model on ``batch``: ``step()`` runs one step and returns its phase times."""

    def __init__(self, cfg, setup: str, batch, args, sampler_timer: SamplerTimer):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        from clinfuse.training.balance import AuxLossWeights
        from clinfuse.training.checkpoint import build_model_for
        from clinfuse.training.dp_engine import DPEngine, choose_grad_sample_mode
        from clinfuse.training.trainer import GRAD_SHARE_EVERY

        torch.manual_seed(0)
        self.name, self.batch, self.timer = setup, batch, sampler_timer
        self.model = build_model_for(cfg)
        self.model.train()
        self.optimizer = torch.optim.Adam([q for q in self.model.parameters() if q.requires_grad], lr=1e-3)
        self.weights = AuxLossWeights(cfg.balance.aux_weights, cfg.modality_names)
        self.dp = setup != "non-DP"
        self.grad_share_every = GRAD_SHARE_EVERY
        self.steps = 0
        self.mode = "-"
        if self.dp:
            if setup == "opacus-hooks":
                engine, self.mode = PrivacyEngine(), "hooks"
            else:
                engine = DPEngine()
                self.mode = choose_grad_sample_mode(self.model, "auto" if setup == "auto" else setup)
            loader = DataLoader(list(range(args.batch)), batch_size=args.batch)  # only sizes the sample rate
            self.model, self.optimizer, _ = engine.make_private(
                module=self.model, optimizer=self.optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=self.mode)

    def step(self) -> dict[str, float]:
        from clinfuse.training.balance import multimodal_loss

        phases: dict[str, float] = defaultdict(float)
        self.timer.current = phases if self.mode == "hooks" else None
        t0 = time.perf_counter()
        out = self.model(self.batch)
        loss = multimodal_loss(out, self.batch["label"], self.batch["mask"], self.weights)[0].mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.timer.current = None
        phases["forward"] = t1 - t0
        phases["backward"] = t2 - t1 - phases["per-sample grads"]  # samplers ran inside backward
        if not self.dp:
            self.optimizer.step()
            phases["optimizer"] = time.perf_counter() - t2
        else:
            t = time.perf_counter()
            if self.steps % self.grad_share_every == 0:  # what LocalTrainer._group_sq_norms reads
                total = 0.0
                for p in self.model.parameters():
                    if getattr(p, "grad_sample", None) is not None:
                        total += float(p.grad_sample.detach().float().pow(2).sum())
            phases["grad-share log"] = time.perf_counter() - t
            t = time.perf_counter()
            self.optimizer.clip_and_accumulate()
            phases["clipping"] = time.perf_counter() - t
            t = time.perf_counter()
            self.optimizer.add_noise()
            self.optimizer.scale_grad()
            phases["noise"] = time.perf_counter() - t
            t = time.perf_counter()
            self.optimizer.original_optimizer.step()
            phases["optimizer"] = time.perf_counter() - t
        t = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        phases["zero_grad"] = time.perf_counter() - t
        phases["step"] = time.perf_counter() - t0
        self.steps += 1
        return phases


def run_interleaved(cfg, setups: list[str], args) -> dict[str, dict]:
    """Build every setup, warm each up, then step them in turn ``args.steps`` times.

    Returns ``{setup: {"mode", "samples_s", "step_s", "phases"}}`` with median seconds per phase.
    """
    timer = SamplerTimer()
    restore = timer.install()
    try:
        batch = random_batch(cfg, args.batch)
        built, results = {}, {}
        for name in setups:
            try:
                built[name] = Setup(cfg, name, batch, args, timer)
                for _ in range(args.warmup):
                    built[name].step()
            except Exception as exc:  # noqa: BLE001 - a setup the model does not support is reported, not fatal
                print(f"  {name}: not supported here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                built.pop(name, None)
        records: dict[str, list[dict]] = {name: [] for name in built}
        for _ in range(args.steps):
            for name, setup in built.items():
                records[name].append(setup.step())
        for name, steps in records.items():
            keys = set().union(*steps)
            # The grad-share log runs on some steps only: its mean is its cost per step.
            phases = {k: (statistics.mean if k == "grad-share log" else statistics.median)(
                [s.get(k, 0.0) for s in steps]) for k in keys}
            step_s = phases.pop("step")
            results[name] = {"mode": built[name].mode, "samples_s": args.batch / step_s, "step_s": step_s,
                             "phases": phases}
        if args.profile and "auto" in built:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                built["auto"].step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
            print("(operators of one step under the profiler, which slows the grouped convolution backward "
                  "several times: the phase columns below are the timings of ordinary steps)")
        return results
    finally:
        restore()


PHASES = ("forward", "backward", "per-sample grads", "grad-share log", "clipping", "noise", "optimizer", "zero_grad")


def print_table(results: dict[str, dict]) -> None:
    base = results["non-DP"]
    print("\n| setup | mode | samples/s | slowdown | ms/step | " + " | ".join(PHASES) + " |")
    print("| --- " * (5 + len(PHASES)) + "|")
    for name, r in results.items():
        ph = r["phases"]
        cells = " | ".join(f"{1000 * ph[k]:.1f}" if ph.get(k) else "-" for k in PHASES)
        print(f"| {name} | {r['mode']} | {r['samples_s']:.1f} | {base['samples_s'] / r['samples_s']:.2f}x | "
              f"{1000 * r['step_s']:.1f} | {cells} |")
    for name, r in results.items():
        layers = sorted(((k[6:], v) for k, v in r["phases"].items() if k.startswith("layer:") and v),
                        key=lambda kv: -kv[1])
        if layers:
            print(f"  {name}: per-sample grads by layer type (ms/step): "
                  + ", ".join(f"{k} {1000 * v:.1f}" for k, v in layers))
    print("\nwhere the DP time goes (ms/step over non-DP, by phase):")
    for name, r in results.items():
        if name == "non-DP":
            continue
        extra = {k: r["phases"].get(k, 0.0) - base["phases"].get(k, 0.0) for k in PHASES}
        note = " (ew: per-sample grads are inside backward)" if r["mode"] == "ew" else ""
        print(f"  {name}: +{1000 * (r['step_s'] - base['step_s']):.1f} total = "
              + ", ".join(f"{k} {1000 * v:+.1f}" for k, v in extra.items() if abs(v) >= 5e-5) + note)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps per setup (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--setups", nargs="+", default=["auto", "hooks", "opacus-hooks"],
                   choices=["auto", "hooks", "ew", "functorch", "opacus-hooks"],
                   help="DP setups to compare with non-DP")
    p.add_argument("--skip-densenet", action="store_true")
    p.add_argument("--models", nargs="+", choices=MODELS, default=None,
                   help=f"models to measure (default: all of {', '.join(MODELS)}; --skip-densenet drops it)")
    p.add_argument("--densenet-steps", type=int, default=3)
    p.add_argument("--trainable-text-embedding", action="store_true",
                   help="what-if: the hashed bag with a learned embedding table (the former default: "
                        "dense per-sample grads for the whole table) instead of the fixed random one")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one auto step")
    p.add_argument("--no-allocator-tuning", action="store_true",
                   help="keep glibc's malloc thresholds (the trainer raises them on a CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.no_allocator_tuning:
        from clinfuse.training.cpu_memory import keep_freed_memory_for_reuse

        print(f"allocator tuning (glibc keeps freed memory for reuse): "
              f"{'on' if keep_freed_memory_for_reuse() else 'not available here'}")
    import warnings

    warnings.filterwarnings("ignore")
    models = list(args.models or MODELS)
    if args.skip_densenet and "densenet121-128" in models:
        models.remove("densenet121-128")
    summary = []
    for name in models:
        cfg = model_config(name, args.trainable_text_embedding)
        run_args = argparse.Namespace(**vars(args))
        if name.startswith("densenet"):
            run_args.steps, run_args.warmup = args.densenet_steps, 1
            run_args.setups = [s for s in args.setups if s in ("auto", "opacus-hooks")] or args.setups[:1]
        encoders = ", ".join(f"{m.name} {m.kind} {getattr(m.encoder, 'name', 'mlp')}"
                             + (f" {'x'.join(map(str, m.size))}" if hasattr(m, "size") else "") for m in cfg.modalities)
        print(f"\n== {name}: {encoders}; batch {args.batch}, {args.threads} threads, "
              f"{run_args.steps} interleaved steps after {run_args.warmup} warm-up", flush=True)
        results = run_interleaved(cfg, ["non-DP", *run_args.setups], run_args)
        print_table(results)
        base = results["non-DP"]["samples_s"]
        summary += [(name, setup, r["mode"], base, r["samples_s"]) for setup, r in results.items() if setup != "non-DP"]
    print("\nsummary (samples/s non-DP -> DP, slowdown):")
    for name, setup, mode, base, dp in summary:
        print(f"  {name:<20} {setup:<13} ({mode:<5}) {base:8.1f} -> {dp:8.1f}  {base / dp:.2f}x")
    for model in ("default", "volume-3d"):
        auto = [base / dp for name, setup, _, base, dp in summary if name == model and setup == "auto"]
        if auto:
            what = "default model" if model == "default" else "3-D encoder (small_cnn3d 32x64x64)"
            print(f"{'PASS' if auto[0] <= TARGET_SLOWDOWN else 'FAIL'}: DP slowdown of the trainer's auto mode on the "
                  f"{what} {auto[0]:.2f}x (target <= {TARGET_SLOWDOWN}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
