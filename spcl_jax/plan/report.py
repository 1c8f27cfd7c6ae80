"""A `Plan` as a summary (the JSON object `--json` prints) and as markdown tables.

Times are lower bounds: each program's FLOPs at the chip's peak bfloat16 rate or its bytes at full memory
bandwidth, whichever is longer, summed over the calls of a run. They promise nothing: a real step also waits for
collectives, the host, launch latency and kernels far from peak.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spcl_jax.plan.planner import Plan

GIB = 1 << 30
# Host CPU to decode one image of the prepared records (both views' boxes and uniforms included): BENCHMARKS.md,
# input pipeline (python -m bench.input_pipeline, 2026-12-04, Intel Xeon, idle: 0.465 ms in process, 0.686 ms in a
# loader worker process, which is how runs decode). Image folders cost 2.3 ms per image in a worker.
HOST_MS_PER_IMAGE = 0.686


def summary(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-able dict (the keys README's "Plan before you pay" lists)."""
    target, parts, chip = plan.target, plan.parts, plan.target.chip
    training, architecture = parts.training, parts.architecture
    progs = {name: _program(m, plan) for name, m in plan.programs.items()}
    step = plan.programs.get("train_step")
    step_s = step.least_seconds(chip) if step else None
    steps_per_epoch = step.calls // max(training.n_epochs, 1) if step else 0
    clustering_s = _clustering_seconds(plan)
    epoch_s = steps_per_epoch * step_s + clustering_s if step_s is not None else None
    clusterings = plan.programs["kmeans"].calls if "kmeans" in plan.programs else 0
    eval_s = _evaluation_seconds(plan)
    run_s = (training.n_epochs * steps_per_epoch * step_s + clusterings * clustering_s + eval_s
             if step_s is not None else None)
    images_per_step = training.batch_size * len(parts.method.image_sets)
    feed = images_per_step / step_s if step_s else None
    out = {
        "target": target.name, "platform": target.platform, "devices": target.chips, "hosts": target.hosts,
        "slices": target.slices, "device_kind": chip.device_kind, "device_memory_bytes": chip.memory_bytes,
        "usable_memory_bytes": plan.usable_memory, "peak_bf16_flops": chip.peak_bf16_flops,
        "memory_bandwidth": chip.memory_bandwidth, "chip_facts": chip.source,
        "config": {"dataset": parts.dataset, "model": architecture.model,
                   "width_multiplier": architecture.width_multiplier, "image_size": architecture.image_size,
                   "dtype": architecture.dtype, "method": parts.method.name, "global_batch": training.batch_size,
                   "remat": architecture.remat, "n_epochs": training.n_epochs},
        "examples": {"pretrain": plan.sizes.pretrain, "train": plan.sizes.train, "valid": plan.sizes.valid,
                     "test": plan.sizes.test, "nominal": plan.sizes.nominal},
        "programs": progs,
        "fits": all(p["fits"] for p in progs.values()),
        "max_global_batch": None if plan.max_batch is None else {
            remat: (answer or {}).get("global_batch") for remat, answer in plan.max_batch.items()},
        "max_global_batch_detail": plan.max_batch,
        "remat_comparison": _remat_comparison(plan),
        "steps_per_epoch": steps_per_epoch,
        "least_step_seconds": step_s,
        "least_clustering_seconds": clustering_s,
        "least_epoch_seconds": epoch_s,
        "least_evaluation_seconds": eval_s,
        "least_run_seconds": run_s,
        "host_images_per_second": feed,
        "host_images_per_second_per_host": feed / target.hosts if feed else None,
        "host_cores_per_host": (feed / target.hosts * HOST_MS_PER_IMAGE / 1000
                                if feed and not plan.sizes.in_memory else None),
    }
    return out


def _program(m, plan):
    chip = plan.target.chip
    least = m.least_seconds(chip)
    return {"what": m.what, "bytes_per_device": m.bytes_per_device, "fits": m.bytes_per_device <= plan.usable_memory,
            "headroom_bytes": plan.usable_memory - m.bytes_per_device, "arguments": m.arguments,
            "outputs": m.outputs, "temporaries": m.temporaries, "code": m.code, "aliased": m.aliased,
            "resident": m.resident, "flops_per_device": m.flops, "bytes_accessed_per_device": m.bytes_accessed,
            "cost_source": m.cost_source, "least_seconds": least, "bound_by": m.bound_by(chip) if least else None,
            "calls_per_run": m.calls,
            "collectives": {k: {"count": c, "bytes": b} for k, (c, b) in m.collectives.items()},
            "collective_bytes_per_device": sum(b for _, b in m.collectives.values()),
            "compile_seconds": m.compile_seconds}


def _least(plan, name):
    m = plan.programs.get(name)
    return (m.least_seconds(plan.target.chip) or 0.0) if m else 0.0


def _clustering_seconds(plan):
    """One clustering: the feature pass's calls, PCA-whitening's two device programs (not its host
    eigendecomposition: a D x D eigh, about a second on a CPU for D = 2048) and k-means."""
    if "kmeans" not in plan.programs:
        return 0.0
    clusterings = max(plan.programs["kmeans"].calls, 1)
    passes = plan.programs["feature_pass"].calls // clusterings
    return (passes * _least(plan, "feature_pass") + _least(plan, "pca_statistics") + _least(plan, "pca_projection")
            + _least(plan, "kmeans"))


def _evaluation_seconds(plan):
    """The linear head's steps, the kNN calls and the evaluation features (train, valid and test through the
    encoder, at the feature pass's cost per image)."""
    training = plan.parts.training
    seconds = 0.0
    for name in ("linear_eval_step", "knn"):
        if name in plan.programs:
            seconds += plan.programs[name].calls * _least(plan, name)
    if "feature_pass" in plan.programs and training.evaluate_after_pretrain:
        sizes = plan.sizes
        seconds += _least(plan, "feature_pass") / training.batch_size * (sizes.train + sizes.valid + sizes.test)
    return seconds


def _remat_comparison(plan):
    """{remat: {bytes_per_device, temporaries, flops_per_device}} of the steps compiled at the config's batch."""
    out = {}
    for remat, steps in plan.steps.items():
        m = steps.get(plan.parts.training.batch_size)
        if m is not None:
            out[remat] = {"bytes_per_device": m.bytes_per_device, "temporaries": m.temporaries,
                          "flops_per_device": m.flops}
    return out


def _gib(n):
    return "–" if n is None else f"{n / GIB:.2f}"


def seconds_text(s: float | None) -> str:
    if s is None:
        return "unknown"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 3 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 3 * 86400 else f"{s / 86400:.1f} days"


def _tflop(f):
    return "–" if f is None else f"{f / 1e12:.3g}"


NOMINAL = " (nominal sizes: the data is not on this machine)"


def markdown(summary: dict[str, Any]) -> str:
    """The plan's tables and notes."""
    s = summary
    c = s["config"]
    lines = [
        f"# Plan: {c['dataset']} {c['model']} (x{c['width_multiplier']:g}, {c['image_size']} px, {c['dtype']}), "
        f"{c['method']}, global batch {c['global_batch']}, remat={c['remat']} on {s['target']}",
        "",
        f"{s['devices']} x {s['device_kind']} ({s['hosts']} host{'s' if s['hosts'] > 1 else ''}); "
        f"{_gib(s['device_memory_bytes'])} GiB per device, {_gib(s['usable_memory_bytes'])} GiB usable; peak "
        f"{s['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bfloat16, {s['memory_bandwidth'] / 1e9:,.0f} GB/s "
        f"({s['chip_facts']}). Examples: {s['examples']['pretrain']:,} pretrain, {s['examples']['train']:,} train, "
        f"{s['examples']['test']:,} test{NOMINAL if s['examples']['nominal'] else ''}.",
        "",
        "| program | GiB per device | fits | headroom GiB | arguments | outputs | temporaries | code | aliased | "
        "resident | TFLOP per call | GB accessed per call | least per call | calls per run | collectives per call |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, p in s["programs"].items():
        coll = ", ".join(f"{k} {v['count']} x, {v['bytes'] / 1e6:,.1f} MB"
                         for k, v in p["collectives"].items()) or "none"
        accessed = "–" if p["bytes_accessed_per_device"] is None else f"{p['bytes_accessed_per_device'] / 1e9:,.2f}"
        lines.append(
            f"| {name} | {_gib(p['bytes_per_device'])} | {'yes' if p['fits'] else '**no**'} | "
            f"{_gib(p['headroom_bytes'])} | {_gib(p['arguments'])} | {_gib(p['outputs'])} | "
            f"{_gib(p['temporaries'])} | {_gib(p['code'])} | {_gib(p['aliased'])} | {_gib(p['resident'])} | "
            f"{_tflop(p['flops_per_device'])}{'' if p['cost_source'] == 'xla' else ' (counted)'} | {accessed} | "
            f"{seconds_text(p['least_seconds'])} ({p['bound_by'] or '?'}) | {p['calls_per_run']:,} | {coll} |")
    lines += ["", f"**Fits: {'yes' if s['fits'] else 'no'}.** Least step {seconds_text(s['least_step_seconds'])}, "
              f"epoch {seconds_text(s['least_epoch_seconds'])} ({s['steps_per_epoch']:,} steps and one clustering of "
              f"{seconds_text(s['least_clustering_seconds'])}), run {seconds_text(s['least_run_seconds'])} "
              f"({c['n_epochs']} epochs and the evaluation, {seconds_text(s['least_evaluation_seconds'])})."]
    if s["host_images_per_second"]:
        cores = s["host_cores_per_host"]
        lines.append(
            f"At that speed the hosts decode {s['host_images_per_second']:,.0f} images/s "
            f"({s['host_images_per_second_per_host']:,.0f} per host"
            + (f", {cores:,.1f} cores per host at {HOST_MS_PER_IMAGE} ms per image of prepared records)."
               if cores is not None else "; in memory: gathered, not decoded)."))
    if s["remat_comparison"] and len(s["remat_comparison"]) > 1:
        r = s["remat_comparison"]
        none, block = r.get("none"), r.get("block")
        if none and block and none["flops_per_device"] and block["flops_per_device"]:
            lines.append(
                f"remat=block at this batch: temporaries {_gib(none['temporaries'])} -> "
                f"{_gib(block['temporaries'])} GiB "
                f"({100 * (block['temporaries'] / none['temporaries'] - 1):+.0f}%), FLOPs "
                f"{100 * (block['flops_per_device'] / none['flops_per_device'] - 1):+.0f}%.")
    if s["max_global_batch_detail"]:
        for remat, answer in s["max_global_batch_detail"].items():
            if answer is None:
                lines.append(f"Largest global batch, remat={remat}: none fits.")
            else:
                lines.append(f"Largest global batch, remat={remat}: **{answer['global_batch']:,}** "
                             f"({answer['global_batch'] // s['devices']:,} per device, "
                             f"{_gib(answer['bytes_per_device'])} GiB; the next multiple of {s['devices']} "
                             f"{answer['next_over']} not to fit).")
    lines.append("Times are lower bounds from peak rates (FLOPs at peak or bytes at full bandwidth), not measurements.")
    return "\n".join(lines)
