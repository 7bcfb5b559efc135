"""AdamW forms bitwise equal to torch.optim.AdamW(foreach=False), timed over bench_ppo.py's models (policy and value
model: vocabulary 16,384, 4 layers of 256, intermediate 688, a 256 -> 1 score head; 18.9M parameters, two groups).
Gradients as a PPO minibatch makes them: the two token embeddings' only in the 1,000 rows of the batch's tokens (the
other rows 0, so their second moments stay 0), every other gradient dense.

Each form takes 3 steps on the same gradients and LRs and is compared bit for bit with torch's single-tensor AdamW;
then the forms step in turn, --repeats rounds. Time: CPU time per step (process_time: waits for a core on a shared
machine don't count), median; ratio: median of form / (a) over rounds; wall time beside. 1 thread: ~1 min.
"""

import argparse
import shlex
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from common import machine_line, ratio, table

from minirlhf.optim import AdamW, param_groups, set_lr

V, H, LAYERS, INTER = 16384, 256, 4, 688
B1, B2, EPS, WD = 0.9, 0.95, 1e-8, 0.1


def bench_params() -> list[torch.nn.Parameter]:
    trunk = [(H, H)] * 4 * LAYERS + [(INTER, H), (INTER, H), (H, INTER)] * LAYERS + [(H,)] * (2 * LAYERS + 1)
    shapes = [(V, H), *trunk, (V, H)] + [(V, H), *trunk, (1, H)]  # policy + lm_head, value model + score head
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def bench_grads(params: list[torch.nn.Parameter], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for embedding in (grads[0], grads[len(params) // 2]):  # the policy's and the value model's
        embedding[torch.randperm(V, generator=g)[1000:]] = 0
    return grads


def update_(p, g, m, v, denom, lr, wd, step):
    """torch's single-tensor AdamW on one tensor (or chunk); the denominator in `denom`, or fresh if None."""
    p.mul_(1 - lr * wd)  # in the no-decay group too: times 1.0 is exact, and its 1-D tensors are tiny
    m.lerp_(g, 1 - B1)
    v.mul_(B2).addcmul_(g, g, value=1 - B2)
    denom = v.sqrt() if denom is None else torch.sqrt(v, out=denom)
    denom.div_((1 - B2**step) ** 0.5).add_(EPS)
    p.addcdiv_(m, denom, value=-lr / (1 - B1**step))


class Form:  # per-parameter state as minirlhf.optim.AdamW keeps it; `step`: (a), (b) with `reuse`, (e) with `chunk`
    def __init__(self, params, chunk: int | None = None, reuse: bool = False):
        self.groups = [(g["params"], g["weight_decay"]) for g in param_groups(torch.nn.ParameterList(params), WD)]
        self.state = {p: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)} for p in params}
        self.chunk, self.t = chunk, 0
        size = chunk or (max(p.numel() for p in params) if reuse else None)  # chunks: a chunk's 5 tensors in cache
        self.denom = None if size is None else torch.empty(size)

    def step(self, lr):  # every parameter has a gradient here: one step count
        self.t += 1
        for params, wd in self.groups:
            for p in params:
                tensors = (p, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"])
                for pc, gc, mc, vc in zip(*(t.view(-1).split(self.chunk or p.numel()) for t in tensors), strict=True):
                    denom = None if self.denom is None else self.denom[: pc.numel()]
                    update_(pc, gc, mc, vc, denom, lr, wd, self.t)


class FlatMoments(Form):  # (c) one flat buffer per group for the moments, the gradients (copied in) and denom
    def __init__(self, params):
        super().__init__(params)
        self.flat = []  # per group: params, weight decay, flat m, v, g, denom, denom's per-parameter views
        for params_, wd in self.groups:
            sizes = [p.numel() for p in params_]
            m, v, g, d = (torch.zeros(sum(sizes)) for _ in range(4))
            for p, pm, pv in zip(params_, m.split(sizes), v.split(sizes), strict=True):  # state: views into m, v
                self.state[p].update(exp_avg=pm.view_as(p), exp_avg_sq=pv.view_as(p))
            self.flat.append((params_, wd, m, v, g, d, d.split(sizes)))

    def step(self, lr):
        self.t += 1
        for params, wd, m, v, g, d, denoms in self.flat:
            torch.cat([p.grad.view(-1) for p in params], out=g)
            m.lerp_(g, 1 - B1)
            v.mul_(B2).addcmul_(g, g, value=1 - B2)
            torch.sqrt(v, out=d).div_((1 - B2**self.t) ** 0.5).add_(EPS)
            for p, denom in zip(params, denoms, strict=True):
                p.mul_(1 - lr * wd)
                p.addcdiv_(self.state[p]["exp_avg"], denom.view_as(p), value=-lr / (1 - B1**self.t))


class Foreach(Form):  # (d) torch._foreach_* in the single-tensor op order
    def step(self, lr):
        self.t += 1
        for params, wd in self.groups:
            grads = [p.grad for p in params]
            ms, vs = [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(params, 1 - lr * wd)  # times 1.0 in the no-decay group: exact
            torch._foreach_lerp_(ms, grads, 1 - B1)
            torch._foreach_mul_(vs, B2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - B2)
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_div_(denoms, (1 - B2**self.t) ** 0.5)
            torch._foreach_add_(denoms, EPS)
            torch._foreach_addcdiv_(params, ms, denoms, value=-lr / (1 - B1**self.t))


def optimizer(cls, **kwargs):  # a torch.optim.Optimizer (ours or torch's) behind the forms' `step(lr)`
    def make(params):
        opt = cls(param_groups(torch.nn.ParameterList(params), WD), lr=1e-3, betas=(B1, B2), eps=EPS, **kwargs)
        return SimpleNamespace(step=lambda lr: (set_lr(opt, lr), opt.step()))
    return make


FORMS = {
    "(a) per-parameter loop, a fresh denominator each": Form,
    "(b) (a), the denominator in one reused buffer": lambda params: Form(params, reuse=True),
    "(f) (b), moments under the smallest normal raised to it first (minirlhf now)": optimizer(AdamW),
    "(e) (b) in cache-sized chunks of 256K elements": lambda params: Form(params, chunk=1 << 18),
    "(c) flat moments + gradients per group": FlatMoments,
    "(d) torch._foreach_*, same op order": Foreach,
    "torch.optim.AdamW(foreach=False)": optimizer(torch.optim.AdamW, foreach=False),
    "torch.optim.AdamW(fused=True)": optimizer(torch.optim.AdamW, fused=True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # the forms update parameters in place
    print(f"$ python {shlex.join(sys.argv)}\n{machine_line()}")
    grads = [bench_grads(bench_params(), seed) for seed in range(3)]
    opts, params = {}, {}
    for name, make in FORMS.items():  # 3 steps each, then bit for bit against torch's single-tensor AdamW
        params[name] = bench_params()
        opts[name] = make(params[name])
        for i, lr in enumerate([1e-3, 3e-3, 2e-3]):
            for p, g in zip(params[name], grads[i], strict=True):
                p.grad = g
            opts[name].step(lr)
    cpu, wall, names = {n: [] for n in FORMS}, {n: [] for n in FORMS}, list(FORMS)  # CPU and wall seconds
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # interleaved, the order rotated
            c, w = time.process_time(), time.perf_counter()
            opts[name].step(1e-3)
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    oracle = params["torch.optim.AdamW(foreach=False)"]
    print(f"\n{sum(p.numel() for p in oracle) / 1e6:.1f}M fp32 parameters in {len(oracle)} tensors, "
          f"{args.threads} thread(s), {args.repeats} rounds\n")
    rows = [[name, f"{statistics.median(cpu[name]) * 1e3:.1f}", f"{statistics.median(wall[name]) * 1e3:.1f}",
             ratio(cpu[name], cpu[names[0]]), "yes" if all(map(torch.equal, params[name], oracle)) else "no"]
            for name in names]
    print(table(["form", "CPU ms/step", "wall ms/step", "CPU time / (a)", "bitwise = foreach=False"], rows))


if __name__ == "__main__":
    main()
