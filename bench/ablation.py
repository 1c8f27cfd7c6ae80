"""The paper's ablation on the embedded data: every method, and SPCL as the original wrote it, on digits.

    python -m bench.ablation --out RESULTS.md          # 6 variants x 3 seeds of configs/digits.py, about an hour on 2 cores
    python -m bench.ablation --seeds 1 --epochs 2 --variants spcl,simclr   # a smoke run

Each run is `launch.py --config configs/digits.py --config.seed=<s>` with only the method (and, for
`spcl-as-written`, the as-written switches) changed: the same network, data, epochs, batch and
evaluation for every variant. Reported per variant, mean ± std over the seeds: linear-probe and kNN
test top-1 of the trained encoder (the digits config's `fast` linear protocol: a linear head trained
on features of the centre-cropped images computed once; kNN k=20, T=0.1), the same for the encoder at
random initialisation (the seed's init, before any training), and the NMI between the last k-means
pseudo labels and the ground truth (methods that cluster).
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench import common
from spcl_jax.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# SPCL with every switch that reproduces the original's as-written behaviour and runs at the digits config's
# K = 30 > 10 classes (prototype_classifier_width=n_classes needs K <= classes: left out). DIFFERENCES.md.
AS_WRITTEN = ["--config.rebuild_member_table=False", "--config.feature_pass_order=sampler",
              "--config.encoder_bn_mode=frozen_init_stats", "--config.lars_mode=as_written",
              "--config.epoch0_zero_lr=True", "--config.pair_sampling=bernoulli",
              "--config.pretrain_sampling=weighted_replacement", "--config.eval_metric_weighting=batch",
              "--config.pca_eigen_floor=0"]
VARIANTS = {
    "spcl": ["--config.method=spcl"],
    "simclr": ["--config.method=simclr"],
    "cluster": ["--config.method=cluster"],
    "metric": ["--config.method=metric"],
    "supervised": ["--config.method=supervised"],
    "spcl-as-written": ["--config.method=spcl", *AS_WRITTEN],
}
METRICS = [("linear_eval/test_top1", "linear probe top-1 %"), ("knn/test_top1", "kNN top-1 %"),
           ("linear_eval/random_init_test_top1", "random init: linear %"),
           ("knn/random_init_test_top1", "random init: kNN %"), ("kmeans/nmi", "last pseudo-label NMI")]


def run(variant, seed, epochs, workdir):
    """The final metrics of one run: {metric: value} (NMI from the last clustering)."""
    command = [sys.executable, os.path.join(ROOT, "launch.py"), "--config", "configs/digits.py",
               f"--workdir={workdir}", f"--config.seed={seed}", *VARIANTS[variant]]
    if epochs:
        command += [f"--config.n_epochs={epochs}", f"--config.warmup_epochs={min(epochs, 5)}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = read_metrics(workdir)
    final = records[-1]
    clusterings = [r["kmeans/nmi"] for r in records if "kmeans/nmi" in r]
    return {key: (clusterings[-1] if key == "kmeans/nmi" and clusterings else final.get(key)) for key, _ in METRICS}


def cell(values, percent):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale = 100 if percent else 1
    mean = statistics.mean(values) * scale
    spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {spread:.2f}" if percent else f"{mean:.3f} ± {spread:.3f}"


def report(rows, args, started, seconds, note):
    header = "| variant | " + " | ".join(title for _, title in METRICS) + " |"
    lines = [header, "|---|" + "---|" * len(METRICS)]
    for variant, results in rows.items():
        cells = [cell([r[key] for r in results], key != "kmeans/nmi") for key, _ in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    command = "python -m bench.ablation " + " ".join(args.argv)
    return "\n".join([
        "# Results: the ablation on the embedded digits data", "",
        f"Command: `{command.strip()}`, started {started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.0f} min.",
        "```", note, "```", "",
        f"Seeds {', '.join(map(str, args.seeds))}; mean ± std over them. configs/digits.py"
        + (f" with {args.epochs} epochs" if args.epochs else "") + " for every variant, only the method changed;"
        " `spcl-as-written` adds the as-written switches of DIFFERENCES.md that run at K = 30 > 10 classes: "
        + ", ".join(f"`{a.removeprefix('--config.')}`" for a in AS_WRITTEN) + ".", "",
        "Protocol: test top-1 on the 450 held-out digits. Linear probe: the digits config's `fast` protocol (a "
        "linear head, 100 epochs of SGD, on frozen features of the centre-cropped images computed once); kNN: "
        "weighted vote of the 20 nearest training features (cosine), T = 0.1. Random init: the same evaluation "
        "of the seed's encoder before training. NMI: the last k-means pseudo labels against the ground truth.",
        "", *lines, ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=common.positive_ints, default="1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=common.positive(int), help="override the digits config's 50 epochs")
    parser.add_argument("--out", help="write the report here (RESULTS.md), rewritten after every run")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants {unknown[0]!r}; valid: {', '.join(VARIANTS)}")
    note = common.machine_note("child")  # "child": the launch.py processes need the accelerator
    print(note, flush=True)
    started, began = datetime.datetime.now(datetime.timezone.utc), datetime.datetime.now()
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in variants:
            for seed in args.seeds:
                result = run(variant, seed, args.epochs, os.path.join(folder, f"{variant}-{seed}"))
                rows.setdefault(variant, []).append(result)
                print(f"{variant} seed {seed}: {json.dumps(result)}", flush=True)
                text = report(rows, args, started, (datetime.datetime.now() - began).total_seconds(), note)
                common.save(args.out, text)
    print(text)
    print(common.load_after())


if __name__ == "__main__":
    main()
