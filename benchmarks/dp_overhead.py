"""Cost of DP-SGD: training samples/s without DP vs with Opacus, and where the time goes.

For the default model (configs/demo.yaml: small CNN 64x64 + hashed bag over a fixed random table +
tabular MLP, attention fusion) and for DenseNet121 at 128x128, one fixed random batch (default 32) is trained for a few
steps after warm-up, on ``--threads`` CPU threads, with:

- ``non-DP``: forward, loss, backward, Adam step;
- ``hooks``: Opacus GradSampleModule hooks (the trainer's mode) + DPOptimizer;
- ``ew``: Opacus expanded weights, where the model supports it.

Each step is split with manual timers into forward (incl. loss), backward, per-sample gradient
computation (the per-layer grad samplers of hooks mode, timed inside backward; ``ew`` computes
them inside backward and they are not separable), clipping (per-sample norms + clipped sum),
noise, and the optimizer update. ``grad-share log`` is the extra pass the trainer makes over the
per-sample gradients to log each encoder's share of the gradient norm. With ``--profile``, a
torch.profiler table of the top operators of one DP step is printed too.

    python benchmarks/dp_overhead.py [--steps 5] [--warmup 2] [--batch 32] [--threads 2] [--skip-densenet]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from clinfuse.config import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def model_config(name: str, trainable_text_embedding: bool = False):
    raw = load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")
    if trainable_text_embedding:
        raw["model"]["text_encoder"]["trainable_embedding"] = True
    if name == "densenet121-128":
        raw["data"]["image"]["size"] = [128, 128]
        raw["model"]["image_encoder"] = {"name": "densenet121"}
    return config_from_dict(raw, source=f"benchmarks/dp_overhead.py ({name})")


def random_batch(cfg, batch: int, seed: int = 0):
    from clinfuse.data.tabular import tabular_dim

    g = torch.Generator().manual_seed(seed)
    h, w = cfg.data.image.size
    image = torch.randn(batch, 1, h, w, generator=g)
    text = torch.randint(1, cfg.data.text.hash_buckets, (batch, cfg.data.text.max_tokens), generator=g)
    text[:, cfg.data.text.max_tokens // 2:] = 0  # padded half, like real notes
    tabular = torch.rand(batch, tabular_dim(cfg.data.tabular), generator=g)
    mask = torch.ones(batch, 3)
    label = torch.randint(0, cfg.n_classes, (batch,), generator=g)
    return image, text, tabular, mask, label


class Timers:
    def __init__(self):
        self.total = defaultdict(float)

    def add(self, key: str, seconds: float) -> None:
        self.total[key] += seconds


def timed_samplers(timers: Timers):
    """Wrap Opacus's per-layer grad samplers with timers; returns a function that restores them."""
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    original = dict(GradSampleModule.GRAD_SAMPLERS)

    def wrap(fn, layer: str):
        def inner(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent = time.perf_counter() - t
            timers.add("per-sample grads", spent)
            timers.add(f"layer:{layer}", spent)
            return out
        return inner

    for key, fn in original.items():
        GradSampleModule.GRAD_SAMPLERS[key] = wrap(fn, getattr(key, "__name__", str(key)))

    def restore():
        GradSampleModule.GRAD_SAMPLERS.clear()
        GradSampleModule.GRAD_SAMPLERS.update(original)
    return restore


def run(cfg, mode: str, args) -> dict:
    """Train ``args.warmup + args.steps`` steps; returns samples/s and seconds per step by phase."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from clinfuse.training.balance import AuxLossWeights, multimodal_loss
    from clinfuse.training.checkpoint import build_model_for

    torch.manual_seed(0)
    batch = random_batch(cfg, args.batch)
    model = build_model_for(cfg)
    model.train()
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    weights = AuxLossWeights(cfg.balance.aux_weights)
    timers = Timers()
    restore = None
    if mode != "non-DP":
        loader = DataLoader(TensorDataset(*batch), batch_size=args.batch)
        engine = PrivacyEngine()
        model, optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode=mode)
        if mode == "hooks":
            restore = timed_samplers(timers)

    def step(record: bool):
        local = Timers()
        t0 = time.perf_counter()
        out = model(*batch[:4])
        loss = multimodal_loss(out, batch[4], batch[3], weights)[0].mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        local.add("forward", t1 - t0)
        local.add("backward", t2 - t1)
        if mode == "non-DP":
            optimizer.step()
            local.add("optimizer", time.perf_counter() - t2)
        else:
            t = time.perf_counter()
            sq = 0.0
            for p in model.parameters():  # what LocalTrainer._group_sq_norms does each step
                if getattr(p, "grad_sample", None) is not None:
                    sq += float(p.grad_sample.detach().float().pow(2).sum())
            local.add("grad-share log", time.perf_counter() - t)
            t = time.perf_counter()
            optimizer.clip_and_accumulate()
            local.add("clipping", time.perf_counter() - t)
            t = time.perf_counter()
            optimizer.add_noise()
            optimizer.scale_grad()
            local.add("noise", time.perf_counter() - t)
            t = time.perf_counter()
            optimizer.original_optimizer.step()
            local.add("optimizer", time.perf_counter() - t)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        local.add("zero_grad", time.perf_counter() - t)
        if record:
            for k, v in local.total.items():
                timers.add(k, v)

    try:
        for _ in range(args.warmup):
            step(False)
        timers.total.clear()
        started = time.perf_counter()
        for _ in range(args.steps):
            step(True)
        elapsed = time.perf_counter() - started
        if args.profile and mode == "hooks":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(False)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    finally:
        if restore:
            restore()
    per_step = {k: v / args.steps for k, v in timers.total.items()}
    if "per-sample grads" in per_step:
        # grad samplers run inside backward: report backward without them separately
        per_step["backward"] -= per_step["per-sample grads"]
    return {"samples_s": args.batch * args.steps / elapsed, "step_s": elapsed / args.steps, "phases": per_step}


PHASES = ("forward", "backward", "per-sample grads", "grad-share log", "clipping", "noise", "optimizer", "zero_grad")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["hooks", "ew"])
    p.add_argument("--skip-densenet", action="store_true")
    p.add_argument("--densenet-steps", type=int, default=3)
    p.add_argument("--trainable-text-embedding", action="store_true",
                   help="what-if: the hashed bag with a learned embedding table (the former default: "
                        "dense per-sample grads for the whole table) instead of the fixed random one")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one hooks step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    models = ["default (demo.yaml)"] + ([] if args.skip_densenet else ["densenet121-128"])
    summary = []
    for name in models:
        cfg = model_config(name, args.trainable_text_embedding)
        run_args = argparse.Namespace(**vars(args))
        if name.startswith("densenet"):
            run_args.steps, run_args.warmup = args.densenet_steps, 1
        text = cfg.model.text_encoder
        print(f"\n== {name}: text encoder {text.name} (trainable_embedding={text.trainable_embedding}, "
              f"embedding_dim {text.embedding_dim}); batch {args.batch}, {args.threads} threads, {run_args.steps} steps after "
              f"{run_args.warmup} warm-up", flush=True)
        results = {}
        for mode in ["non-DP", *args.modes]:
            try:
                results[mode] = run(cfg, mode, run_args)
            except Exception as exc:  # noqa: BLE001 - a mode the model does not support is reported, not fatal
                print(f"  {mode}: not supported here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
                continue
            print(f"  {mode}: {results[mode]['samples_s']:.1f} samples/s", flush=True)
        base = results["non-DP"]["samples_s"]
        print("\n| mode | samples/s | slowdown | ms/step | " + " | ".join(PHASES) + " |")
        print("| --- " * (4 + len(PHASES)) + "|")
        for mode, r in results.items():
            ph = r["phases"]
            cells = " | ".join(f"{1000 * ph[k]:.1f}" if k in ph else "-" for k in PHASES)
            print(f"| {mode} | {r['samples_s']:.1f} | {base / r['samples_s']:.2f}x | {1000 * r['step_s']:.1f} | {cells} |")
            if mode != "non-DP":
                summary.append((name, mode, base, r["samples_s"]))
            layers = sorted(((k[6:], v) for k, v in ph.items() if k.startswith("layer:")), key=lambda kv: -kv[1])
            if layers:
                print("|   per-sample grads by layer type (ms/step): "
                      + ", ".join(f"{k} {1000 * v:.1f}" for k, v in layers) + " |")
    print("\nsummary (samples/s non-DP -> DP, slowdown):")
    for name, mode, base, dp in summary:
        print(f"  {name:<20} {mode:<6} {base:8.1f} -> {dp:8.1f}  {base / dp:.2f}x")
    default = [base / dp for name, mode, base, dp in summary if name.startswith("default")]
    if default:
        best = min(default)
        print(f"{'PASS' if best <= 1.5 else 'FAIL'}: best DP slowdown on the default model {best:.2f}x "
              f"(target <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
