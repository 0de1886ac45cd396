"""How far can batching three restarts go? One attack step's gradient, computed several ways.

``benchmarks/attack_speed.py`` measures the engine end to end; this script isolates the part that
batching can change: the gradient of the matching objective (matching loss + TV) with respect to the
candidates, for R = 3 candidates against three R = 1 evaluations, on the same model and image as
``attack_speed.py`` (``ig`` preset's objective, random weights, ``photos`` image 3). Each variant
computes the same numbers (checked against the engine's to 1e-4 relative before timing):

* ``vmap``: what the engine does, ``vmap(grad_and_value(objective))`` over the (3, C, H, W) batch;
* ``vmap, channels_last``: the same with the batch stored channels-last (oneDNN's native layout);
* ``vmap, oneDNN off``: the same with PyTorch's native convolution kernels;
* ``no vmap``: per-candidate weight gradients assembled by hand from one batched backward pass
  (forward hooks add zero "probes" to every layer's output; the gradient of the summed loss with
  respect to a probe is that layer's per-candidate backpropagated error; convolution weight gradients
  then come from unfolded inputs and a batched matrix product), so none of ``vmap``'s batching
  rules and layout moves run;
* ``2 threads x vmap``: candidates 0-1 (vmap) and 2 on two Python threads, one intra-op thread each,
  each thread with its own copy of the model (``functional_call`` is not thread-safe on one module);
* ``compiled`` (``--compile``, about two minutes): ``torch.compile`` of the R = 1 and the vmap
  function, compared with each other.

For every intra-op thread count in ``--threads`` it prints the best time per call over the repeats
and the ratio 3 x (R = 1 time) / (R = 3 time): the throughput gain of batching, the quantity the
engine's 2x target is about. Run from the repository root::

    python benchmarks/batching_limits.py [--archs lenet,resnet8] [--threads 1,2] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, grad_and_value, vmap  # noqa: E402

from lavp_core.attacks import AttackRun, preset_config, total_variation  # noqa: E402
from lavp_core.gradients import EvalBatchNorm, GradientOracle, client_update  # noqa: E402
from lavp_core.scenario import ScenarioConfig, build_scenario  # noqa: E402

R = 3


def engine_objective(oracle: GradientOracle, update, info):
    """The engine's per-candidate objective x (C, H, W) -> (total, matching) for the ``ig`` preset."""
    config = preset_config("ig", restarts=R)
    run = AttackRun(oracle, update, config, info, generator=torch.Generator().manual_seed(0))
    return run._objective(), run.loss, run.g_star, config.tv_weight  # the engine's own objective


class ProbeGradients:
    """Per-candidate weight gradients (R, n) of a batch without vmap (conv, linear, eval batch norm)."""

    def __init__(self, oracle: GradientOracle, label: int, image_shape: tuple[int, int, int]):
        self.module = copy.deepcopy(oracle.module)
        self.params, self.buffers, self.layout, self.label = oracle.params, oracle.buffers, oracle.layout, label
        self.layers = {m: name for name, m in self.module.named_modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear, EvalBatchNorm))}
        owned = {f"{name}.{p}" for m, name in self.layers.items() for p, _ in m.named_parameters(recurse=False)}
        if owned != set(self.layout.names):
            raise ValueError("the model has parameters outside conv, linear and batch-norm layers")
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.probes: dict[nn.Module, torch.Tensor] = {}
        self.shapes: dict[nn.Module, tuple[int, ...]] = {}
        for m in self.layers:
            m.register_forward_hook(self._hook)
        with torch.no_grad():
            functional_call(self.module, (self.params, self.buffers), (torch.zeros(1, *image_shape),))

    def _hook(self, module, inputs, output):
        self.shapes[module] = tuple(output.shape[1:])
        self.inputs[module] = inputs[0]
        probe = self.probes.get(module)
        return output if probe is None else output + probe

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (R, C, H, W) -> (R, n)
        r = x.shape[0]
        target = torch.full((r,), self.label, dtype=torch.long)

        def summed_loss(probes):
            self.probes, self.inputs = probes, {}
            logits = functional_call(self.module, (self.params, self.buffers), (x,))
            return F.cross_entropy(logits, target, reduction="sum"), dict(self.inputs)

        zeros = {m: torch.zeros(r, *self.shapes[m]) for m in self.layers}
        errors, inputs = grad(summed_loss, has_aux=True)(zeros)
        self.probes = {}
        parts = {}
        for m, name in self.layers.items():
            d, a = errors[m], inputs[m]
            if isinstance(m, nn.Linear):
                parts[name + ".weight"] = d.unsqueeze(2) * a.unsqueeze(1)  # (R, out, in)
                bias = d
            elif isinstance(m, nn.Conv2d):
                cols = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (R, in k k / g * g, L)
                g = m.groups
                dd = d.flatten(2).view(r, g, -1, d.shape[2] * d.shape[3])  # (R, g, out / g, L)
                cc = cols.view(r, g, -1, cols.shape[-1])  # (R, g, in k k / g, L)
                parts[name + ".weight"] = torch.matmul(dd, cc.transpose(2, 3)).reshape(r, *m.weight.shape)
                bias = d.sum((2, 3))
            else:
                inv = torch.rsqrt(m.running_var + m.eps).view(1, -1, 1, 1)
                parts[name + ".weight"] = (d * (a - m.running_mean.view(1, -1, 1, 1)) * inv).sum((2, 3))
                bias = d.sum((2, 3))
            if name + ".bias" in self.layout.names:
                parts[name + ".bias"] = bias
        return torch.cat([parts[n].reshape(r, -1) for n in self.layout.names], dim=1)


def best_ms(fn, calls: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - tic) / calls * 1e3)
    return best


def variants(arch: str, with_compile: bool):
    """(name, function of the (R, C, H, W) batch) pairs, plus the R = 1 function and the batch."""
    scenario = build_scenario(ScenarioConfig(dataset="photos", index=3, arch=arch))
    oracles = [GradientOracle(scenario.model) for _ in range(2)]
    update = client_update(oracles[0], scenario.image, scenario.label)
    objectives = []
    for oracle in oracles:
        objective, loss, g_star, tv = engine_objective(oracle, update, scenario.info)
        objectives.append(grad_and_value(objective, has_aux=True))
    single, batched = objectives[0], vmap(objectives[0])
    x = torch.randn((R, *update.image_shape), generator=torch.Generator().manual_seed(1))
    probe = ProbeGradients(oracles[0], update.label, update.image_shape)

    def no_vmap(xs):
        def summed(xs):
            gs = probe(xs)
            matching = torch.stack([loss(gs[i], g_star, oracles[0].layout) for i in range(xs.shape[0])])
            total = matching + tv * torch.stack([total_variation(xs[i]) for i in range(xs.shape[0])])
            return total.sum(), (total.detach(), matching.detach())

        return grad(summed, has_aux=True)(xs)

    x_cl = x.contiguous(memory_format=torch.channels_last)
    def two_threads(xs):
        out = {}
        worker = threading.Thread(target=lambda: out.update(b=objectives[1](xs[2])))
        worker.start()
        a = batched(xs[:2])
        worker.join()
        return torch.cat([a[0], out["b"][0].unsqueeze(0)])

    def onednn_off(xs):
        with torch.backends.mkldnn.flags(enabled=False):
            return batched(xs)

    found = [("vmap (the engine)", batched), ("vmap, channels_last", lambda xs: batched(x_cl)),
             ("vmap, oneDNN off", onednn_off), ("no vmap (probes)", no_vmap), ("2 threads x vmap", two_threads)]
    compiled = None
    if with_compile:
        compiled = (torch.compile(single, dynamic=False), torch.compile(batched, dynamic=False))
    reference = batched(x)[0]
    checked = list(found)
    if compiled is not None:
        checked += [("compiled R=1", lambda xs: torch.stack([compiled[0](xi)[0] for xi in xs])),
                    ("compiled vmap", compiled[1])]
    for name, fn in checked:
        value = fn(x)
        value = value[0] if isinstance(value, tuple) else value
        err = float((value - reference).norm() / reference.norm())
        if err > 1e-4:
            raise AssertionError(f"{name} computes another gradient (relative difference {err:.1e})")
    return single, found, compiled, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="lenet,resnet8")
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; gradient of the ig objective for {R} candidates; best of "
          f"{args.repeats} x {args.calls} calls; ratio = 3 x (R=1 ms) / (R=3 ms)")
    print()
    print("| arch | threads | R=1 ms | variant | R=3 ms | ratio |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        single, found, compiled, x = variants(arch, args.compile)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            one = best_ms(lambda single=single, x=x: single(x[0]), args.calls, args.repeats)
            for name, fn in found:
                if name.startswith("2 threads") and threads != 1:
                    continue  # one intra-op thread per worker thread, or the two oversubscribe the cores
                ms = best_ms(lambda fn=fn, x=x: fn(x), args.calls, args.repeats)
                print(f"| {arch} | {threads} | {one:.2f} | {name} | {ms:.2f} | {3 * one / ms:.2f}x |")
            if compiled is not None:
                c1 = best_ms(lambda c=compiled[0], x=x: c(x[0]), args.calls, args.repeats)
                c3 = best_ms(lambda c=compiled[1], x=x: c(x), args.calls, args.repeats)
                print(f"| {arch} | {threads} | {c1:.2f} (compiled) | vmap, compiled | {c3:.2f} | {3 * c1 / c3:.2f}x |")


if __name__ == "__main__":
    main()
