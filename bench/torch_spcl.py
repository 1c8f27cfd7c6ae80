"""The original's SPCL train step in PyTorch (DIFFERENCES.md: one SPCL epoch, losses, LARS, model), timed on the same rows as bench/train_step.py.

    pip install -r bench/requirements.txt        # torch, a benchmark-only dependency
    python -m bench.torch_spcl --preset cpu      # or --preset gpu (CUDA when available); --help: sizes

The step: four separate encoder calls (hand-written torchvision-style ResNet, CIFAR or ImageNet stem,
channels_last on CUDA), four projection-head calls (Linear D->D, BN, ReLU, Linear D->128, BN), NT-Xent within
each image's two views, prototype CE of a Linear(D, K) classifier on the four views (own SGD), the
siamese metric head Linear(D, 1) on |h_x - h_y| with its six BCE terms, then the original's LARS as
written. autocast bf16 for dtype=bfloat16. Inputs are random, already-augmented tensors on the device:
augmentation is NOT timed here (our step in train_step.py includes it). Module names follow the
original so that LARS's 'bn'/'bias' name filter picks the same parameters.
"""
import argparse
import json
import time
from collections import OrderedDict

try:
    import torch
except ImportError:
    raise SystemExit("bench/torch_spcl.py needs torch, a benchmark-only dependency: "
                     "pip install -r bench/requirements.txt") from None
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench import common

TEMPERATURE, LR, WEIGHT_DECAY = 0.5, 1.0, 1e-6  # config.conf


def conv(cin, cout, k, stride):
    return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False)


def shortcut(cin, cout, stride):
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, 1), nn.BatchNorm2d(planes)
        self.downsample = shortcut(cin, planes, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, planes, 1, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv(planes, 4 * planes, 1, 1), nn.BatchNorm2d(4 * planes)
        self.downsample = shortcut(cin, 4 * planes, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.downsample(x))


class ResNet(nn.Module):
    """Encoder without fc: images -> (B, D) pooled features (DIFFERENCES.md, model)."""

    def __init__(self, model, width):
        super().__init__()
        block, depths = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}[model]
        planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        if model == "resnet18":  # CIFAR stem: 3x3 stride 1, no max-pool
            stem = [("conv0", conv(3, planes[0], 3, 1)), ("BN1", nn.BatchNorm2d(planes[0])), ("relu", nn.ReLU())]
        else:
            stem = [("conv0", conv(3, planes[0], 7, 2)), ("BN1", nn.BatchNorm2d(planes[0])), ("relu", nn.ReLU()),
                    ("maxpool", nn.MaxPool2d(3, 2, 1))]
        self.stem = nn.Sequential(OrderedDict(stem))
        cin = planes[0]
        for i, (p, n, s) in enumerate(zip(planes, depths, (1, 2, 2, 2))):
            layer = []
            for b in range(n):
                layer.append(block(cin, p, s if b == 0 else 1))
                cin = p * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ProjectionMLP(nn.Module):
    """Projection head plus the metric learner it owns (DIFFERENCES.md, model); Linear init N(0, 0.01²), zero bias."""

    def __init__(self, dim, proj_dim=128):
        super().__init__()
        self.W1, self.BN1 = nn.Linear(dim, dim), nn.BatchNorm1d(dim)
        self.W2, self.BN2 = nn.Linear(dim, proj_dim), nn.BatchNorm1d(proj_dim)
        self.metric_learner = nn.Linear(dim, 1)
        for m in (self.W1, self.W2, self.metric_learner):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

    def forward(self, h):
        return self.BN2(self.W2(F.relu(self.BN1(self.W1(h)))))


class LARS(torch.optim.Optimizer):
    """optimisers.py LARS as written (DIFFERENCES.md, LARS): the first `len_reduced` parameters get g + wd·w; every
    parameter gets the trust ratio eta·‖w‖/‖g‖ (no zero guard); lr inside the Nesterov momentum buffer."""

    def __init__(self, params, lr, len_reduced, weight_decay=WEIGHT_DECAY, eta=1e-3, momentum=0.9):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        self.len_reduced, self.weight_decay, self.eta = len_reduced, weight_decay, eta

    @torch.no_grad()
    def step(self):
        counter = 0
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad.add(w, alpha=self.weight_decay) if counter < self.len_reduced else w.grad
                counter += 1
                a = group["lr"] * self.eta * torch.norm(w) / torch.norm(g)
                if "momentum_buffer" not in self.state[w]:
                    self.state[w]["momentum_buffer"] = torch.zeros_like(w)
                v = self.state[w]["momentum_buffer"]
                v.mul_(group["momentum"]).add_(a * g)
                w.sub_(group["momentum"] * v + a * g)


def nt_xent(a, b):
    """SimCLR NT-Xent over 2B anchors (DIFFERENCES.md, losses; numerically the same as the original's (2B, 2B-1) logits)."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = (z @ z.T / TEMPERATURE).masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def build(row, width, device, num_prototypes=common.NUM_PROTOTYPES):
    """The models, both optimisers and one SPCL step closure over random on-device inputs.

    channels_last on CUDA only: on CPU torch 2.13 hangs or aborts ('double free') in the backward of the
    1/16-wide ResNet-18 in channels_last, and it gains nothing there.
    """
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    encoder = ResNet(row.model, width).to(device, memory_format=layout)
    mlp = ProjectionMLP(encoder.dim).to(device)
    classifier = nn.Linear(encoder.dim, num_prototypes).to(device)
    nn.init.normal_(classifier.weight, 0, 0.01)
    nn.init.zeros_(classifier.bias)
    named = [(f"encoder.{n}", p) for n, p in encoder.named_parameters()] + list(mlp.named_parameters())
    reduced = [p for n, p in named if "bn" not in n and "bias" not in n]
    removed = [p for n, p in named if "bn" in n or "bias" in n]
    optimiser = LARS(reduced + removed, lr=LR * row.batch / 256, len_reduced=len(reduced))
    classifier_optimiser = torch.optim.SGD(classifier.parameters(), lr=LR * row.batch / 256, weight_decay=WEIGHT_DECAY)

    b = row.batch
    views = [torch.randn(b, 3, row.px, row.px, device=device).contiguous(memory_format=layout)
             for _ in range(common.VIEWS_PER_PAIR)]
    labels_a, labels_b = (torch.randint(num_prototypes, (b,), device=device) for _ in range(2))
    similarity = torch.randint(2, (b, 1), device=device).float()
    same = torch.ones_like(similarity)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=row.dtype == "bfloat16")

    def step():
        optimiser.zero_grad()
        classifier_optimiser.zero_grad()
        with autocast:
            h_i, h_j, v_i, v_j = h = [encoder(x) for x in views]
            z = [mlp(x) for x in h]
            y = [classifier(x) for x in h]
            contrastive = nt_xent(z[0], z[1]) + nt_xent(z[2], z[3])
            prototype = sum(F.cross_entropy(logits, labels)
                            for logits, labels in zip(y, (labels_a, labels_a, labels_b, labels_b)))
            metric = sum(F.binary_cross_entropy_with_logits(mlp.metric_learner((x1 - x2).abs()), target)
                         for x1, x2, target in ((h_i, h_j, same), (v_i, v_j, same), (h_i, v_i, similarity),
                                              (h_i, v_j, similarity), (h_j, v_i, similarity), (h_j, v_j, similarity)))
            loss = contrastive + metric + prototype
        loss.backward()
        optimiser.step()
        classifier_optimiser.step()

    return step


def prepare(row, width, device, num_prototypes=common.NUM_PROTOTYPES):
    """(one step run to completion, setup seconds: build + 2 warm-up steps, FLOPs of one step)."""
    torch.backends.cudnn.benchmark = True  # faster than the original's deterministic / no-benchmark setting
    torch.set_float32_matmul_precision("high")  # TF32 like JAX's default GPU precision (cuDNN convs use it anyway)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    start = time.perf_counter()
    step = build(row, width, device, num_prototypes)
    for _ in range(2):  # warm-up (cudnn autotuning, allocator)
        step()
    sync()
    setup_s = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        step()
    sync()

    def run():
        step()
        sync()

    return run, setup_s, counter.get_total_flops()


def device_name(device):
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


def run(args):
    """Results of every row of the chosen sizes (a failed row, e.g. out of memory, is reported and skipped)."""
    width, steps, rows = common.sizes(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for row in rows:
        try:
            step, setup_s, flops = prepare(row, width, device, args.num_prototypes)
            seconds = common.interleaved({"torch": step}, steps, warmup=0)["torch"]  # prepare warmed up
        except RuntimeError as e:  # e.g. CUDA out of memory: report and go on with the next row
            print(f"torch {row}: failed: {str(e).splitlines()[0]}", flush=True)
        else:
            results.append(common.result(row, seconds, setup_s, flops, device_name(device)))
            print(f"torch {row}: {results[-1]['ms_spread']} ms/step", flush=True)
    return results


def note():
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return (f"PyTorch {torch.__version__} on {device}: the original's step without augmentation (random inputs "
            f"already on the device); cudnn.benchmark on, TF32 allowed; {common.SPREAD} step time of the rounds; "
            "TFLOP/s from torch's FlopCounterMode (convolutions and matmuls of one step).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_size_flags(parser)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(common.machine_note(f"{device_name(device)} (torch {device.type}, {torch.get_num_threads()} CPU threads)"),
          flush=True)
    results = run(args)
    print(common.markdown(results))
    print(note())
    print(common.load_after())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, note=note()), f)


if __name__ == "__main__":
    main()
