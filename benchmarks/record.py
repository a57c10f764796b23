"""Builds BENCHMARKS.md, the current benchmark record, from the results files in benchmarks/results/.

Nothing else goes in: one short section per question, each table and plot made from one results file
(``common.write_results``), printed with that file's CPU, date, commit and exact command. A section
whose file is missing says which command makes it.

    .venv/bin/python benchmarks/record.py                   # from the results files as they are
    .venv/bin/python benchmarks/record.py --run [NAME...]   # run the benchmarks first (`make bench`: all)

Beside every figure measured with more ranks than cores it says so: ranks then share cores, and every
contender's ranks (each runs Horovod's background thread, ours too) compete for them, which a cluster
with a core per rank does not; the one-rank-per-core figures are the fair ones.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from common import RESULTS, ROOT, read_results

DOC = ROOT / "BENCHMARKS.md"
PY = ".venv/bin/python"
CROWDED = ("**More ranks than cores** ({ranks} ranks on {cores} cores): ranks share cores, and every contender's "
           "ranks (each with Horovod's background thread, ours too) compete for them, which a cluster with a core "
           "per rank does not; the figures with one rank per core are the fair ones.")
#: why compression wins by a large factor where it does, said beside every such table
LINK_BOUND = ("Where a link is slow the step is bound by its bytes: a ratio far above 1 comes from sending about "
              "32x fewer bytes (the bytes columns), not from faster computing, and is an upper bound for models "
              "whose compute hides more of the exchange.")
#: what the 10 Gbit/s emulated links are on 2 shared cores
TCP_BOUND = ("At 10 Gbit/s the emulated link is not the bottleneck on this machine: the TCP stack of 2 shared "
             "cores moves a few Gbit/s, so these rows measure the CPU's network path as much as the link.")
#: what the shaper lets through at the veth's speed
BURST = ("The shaper's token bucket lets a burst of {burst} pass at the veth's speed: a message smaller than that "
         "(the compressed payloads at 1M parameters) is not held to the link's rate, so at 1M the steps measure "
         "CPU and synchronization more than bytes. Only `opt.step()` is timed, with gradients set by hand: no "
         "forward or backward to hide an exchange behind (stock Horovod's overlap with backward, and ours with "
         "`overlap=True`, are measured end to end below).")


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def provenance(name: str, meta: dict) -> str:
    env = ", ".join(f"{k}={v}" for k, v in meta.get("env", {}).items()) or "none set"
    return (f"Results file `benchmarks/results/{name}.json`: {meta['cpu']} ({', '.join(meta.get('cpu_flags', []))}), "
            f"{meta['cores']} cores; {meta['date']}; commit `{meta['commit'][:12]}`; command `{meta['command']}`; "
            f"environment: {env}.")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


def bytes_cell(value: float, source: str) -> str:
    return f"{value:,.0f}" + ("" if source == "measured" else f" [{source}]")


# --- fused kernel ---------------------------------------------------------------------------------------
def kernels(data: dict) -> str:
    rows = data["results"]
    t = table(["d", "threads", "copy GB/s", "fused GB/s (12 B/elem)", "share of the copy's limit", "vs torch path",
               "vs GRACE-style"],
              [[f"{r['d']:.0e}", r["threads"], f"{r['copy_gbs']:.1f}", f"{r['fused_gbs']:.1f}",
                f"{100 * r['fused_fraction_of_limit']:.0f}%", f"{r['speedup_vs_torch']:.1f}x",
                f"{r['speedup_vs_grace']:.1f}x"] for r in rows])
    plt = _pyplot()
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4.2), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], threads):
        mine = [r for r in rows if r["threads"] == n]
        for key, label in (("copy_s", "memory copy"), ("fused_s", "fused (cpp_ops)"), ("torch_s", "torch path"),
                           ("grace_s", "GRACE-style unfused")):
            ax.loglog([r["d"] for r in mine], [r[key] for r in mine], marker="o", label=label)
        ax.set_title(f"{n} thread(s)")
        ax.set_xlabel("elements d")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("median seconds per worker step")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "kernels.png", dpi=110)
    plt.close(fig)
    return t + "\n\n![kernels](benchmarks/results/kernels.png)"


# --- one step ------------------------------------------------------------------------------------------
def step(data: dict) -> str:
    rows = []
    for r in data["results"]:
        s = r["stock_sgd_step"]
        rows.append([r["threads"], f"{1000 * s['median_s']:.1f} ms ({1000 * s['min_s']:.1f}-{1000 * s['max_s']:.1f})",
                     f"{1000 * r['ps_blocksign_step']['median_s']:.1f} ms", f"{r['ratio_to_stock']:.2f}x",
                     f"{r['worker_ratio_to_stock']:.2f}x", f"{r['ratio_to_grace_worker']:.2f}x",
                     f"{r['worker_one_pass_s'] / r['worker_two_passes_s']:.2f}x" if "worker_one_pass_s" in r else ""])
    r = data["results"][0]
    return (f"{r['params'] / 1e6:.1f}M float32 parameters in {r['tensors']} tensors (ResNet-50's larger layers), "
            "gradients present, one rank, no network; the contenders in turn within each repeat.\n\n" + table(
                ["threads", "stock torch.optim.SGD step (median, range)", "ps + blocksign step", "vs stock",
                 "without the server step (a rank that is not the server) vs stock",
                 "vs GRACE-style worker half", "worker side: one pass vs two"], rows))


def step_paths(data: dict) -> str:
    res = data["results"]
    ranks = res["ranks"] > 1
    rows = [[r["path"], f"{r['ms']:.1f} ms", f"{r['stock_ms']:.1f} ms", f"{r['ratio']:.2f}x",
             f"{r['copies']:.1f} / {r['stock_copies']:.1f}"]
            + ([f"{r.get('raw_exchange_ms', 0):.1f} ms", f"{r['ratio_to_horovod']:.2f}x"] if ranks else [])
            + [r["target"], f"{r['target_ms']:.1f} ms", "yes" if r["met"] else "**no**"] for r in res["paths"]]
    met = sum(r["met"] for r in res["paths"])
    typical = statistics.median(r["stock_ms"] for r in res["paths"])
    odd = [r["path"] for r in res["paths"] if r["stock_ms"] > 1.8 * typical]
    doubt = (f" **Not to be trusted:** stock SGD, the same step on the same parameters in every row, took more than "
             f"1.8x its median time ({typical:.1f} ms) beside {', '.join(odd)}; that comparison flatters or hurts "
             "the path by the same factor, and its cause is not yet understood." if odd else "")
    return (f"`{res['model']}`: {res['params'] / 1e6:.1f}M float32 parameters in {res['tensors']} tensors, "
            f"{res['ranks']} rank(s), {res['threads']} thread(s) each; {met} of {len(rows)} paths meet their "
            "target. \"Copies\": each step in memory copies of the fused vector (ours / stock): stock SGD works "
            "tensor by tensor, from cache where a tensor fits, while a step on the fused vector streams it from "
            "memory pass after pass."
            + (" At 2 ranks the exchange is real: the target adds the raw exchange these topologies make of the "
               "float32 gradient, and stock Horovod's whole step (its allreduce, then SGD) is timed in turn too."
               if ranks else "") + doubt + "\n\n" + table(
                ["path (topology:compression)", "ours", "stock SGD", "vs stock", "copies (ours / stock)"]
                + (["raw exchange", "vs stock Horovod's step"] if ranks else []) + ["target", "target time", "met"],
                rows))


# --- waiting in MPI --------------------------------------------------------------------------------------
def mpi_wait(data: dict) -> str:
    res = data["results"]
    rows = [[f"{r['horovod_cycle_ms']:g} ms", f"{r['blocking_ms']:.2f} ms", f"{r['polled_ms']:.2f} ms",
             f"{r['none_ms']:.2f} ms"] for r in res["rows"]]
    return (f"Per iteration: a gather and a broadcast of {res['payload_bytes']} bytes (the demo's payload) between "
            "about a millisecond of Python compute, 2 ranks on this machine; medians of the rounds.\n\n"
            + table(["Horovod's cycle", "MPI's blocking calls", "ours (nonblocking, polled)", "no communication"],
                    rows))


# --- step on emulated links -----------------------------------------------------------------------------
def netem_step(data: dict) -> str:
    res = data["results"]
    records, parts = res["records"], []
    clusters = {(c["rate"], c["ranks"]): c for c in res["clusters"]}
    for rate, params in sorted({(r["rate"], r["params"]) for r in records}, key=lambda k: (-_rate(k[0]), k[1])):
        mine = [r for r in records if r["rate"] == rate and r["params"] == params]
        rows = []
        for ranks in sorted({r["ranks"] for r in mine}):
            at = [r for r in mine if r["ranks"] == ranks]
            base = next((r for r in at if r["topology"] == "horovod"), None)
            for r in at:
                rows.append([ranks, r["topology"], r["compression"], ms(r["step_time_median_s"]),
                             "" if base is None else f"{r['step_time_median_s'] / base['step_time_median_s']:.2f}x",
                             bytes_cell(r["busiest_bytes_per_step"], r["bytes_source"]),
                             "" if base is None else f"{base['busiest_bytes_per_step'] / r['busiest_bytes_per_step']:.1f}x"])
        plot = f"netem_step_{rate}_{params / 1e6:g}M.png"
        _lines({t: sorted((r["ranks"], r["step_time_median_s"]) for r in mine if r["topology"] == t)
                for t in dict.fromkeys(r["topology"] for r in mine)}, "ranks", "median step time (s, log)",
               f"{params / 1e6:g}M parameters, {rate} links", RESULTS / plot, log=True)
        crowded = sorted({r["ranks"] for r in mine if clusters.get((rate, r["ranks"]), {}).get("oversubscribed")})
        note = "\n\n" + CROWDED.format(ranks=", ".join(map(str, crowded)), cores=data["meta"]["cores"]) if crowded else ""
        note += "\n\n" + (TCP_BOUND if _rate(rate) >= 1e10 else LINK_BOUND)
        burst = next((c["burst_bytes"] for (r, _), c in clusters.items() if r == rate and "burst_bytes" in c), None)
        if burst:
            note += "\n\n" + BURST.format(burst=f"{burst:,} bytes")
        parts.append(f"**{rate} links, {params / 1e6:g}M parameters**\n\n" + table(
            ["ranks", "contender", "compression", "step (median, slowest rank)", "vs horovod",
             "sent+received/step, busiest rank", "busiest rank's bytes cut vs horovod"], rows)
            + note + f"\n\n![{plot}](benchmarks/results/{plot})")
    return "\n\n".join(parts)


def netem_nodes(data: dict) -> str:
    """Nodes of several ranks: the step, and what crossed each node's link (its interface's counters)."""
    res = data["results"]
    rows = []
    for (rate, ranks, params) in sorted({(r["rate"], r["ranks"], r["params"]) for r in res["records"]},
                                        key=lambda k: (-_rate(k[0]), k[1], k[2])):
        at = [r for r in res["records"] if (r["rate"], r["ranks"], r["params"]) == (rate, ranks, params)]
        base = next((r for r in at if r["topology"] == "horovod"), None)
        flat = next((r for r in at if r["topology"] == "sharded"), None)
        for r in at:
            link = max(sent + received for sent, received in r["node_link_bytes_per_step"])
            flat_link = None if flat is None else max(s + rc for s, rc in flat["node_link_bytes_per_step"])
            rows.append([rate, f"{ranks // r['ranks_per_node']} x {r['ranks_per_node']}", f"{params / 1e6:g}M",
                         r["topology"], ms(r["step_time_median_s"]),
                         "" if base is None else f"{r['step_time_median_s'] / base['step_time_median_s']:.2f}x",
                         f"{link:,.0f}", "" if not flat_link else f"{link / flat_link:.2f}x"])
    crowded = [c for c in res["clusters"] if c["oversubscribed"]]
    note = ("\n\n" + CROWDED.format(ranks=", ".join(sorted({str(c["ranks"]) for c in crowded})),
                                    cores=data["meta"]["cores"])) if crowded else ""
    one_node = all(c.get("ranks_per_node") == c["ranks"] for c in res["clusters"])
    where = ("Every rank on one node (one network namespace): no link is crossed, the \"link\" column names "
             "the unused link's rate, and every contender's messages go through shared memory. " if one_node else
             "Nodes of consecutive ranks (one network namespace each; shared memory inside, the shaped link "
             "between nodes). ")
    burst = next((c["burst_bytes"] for c in res["clusters"] if "burst_bytes" in c), None)
    if burst and not one_node:
        note += "\n\n" + BURST.format(burst=f"{burst:,} bytes")
    return (where + "`hierarchical` with `local_size` = ranks per node; `hierarchical-leaders` is its "
            "`node_path=\"leaders\"`. The link's bytes are the node "
            "interface's counters over the timed steps, sent + received, busiest node: TCP/IP headers, MPI's and "
            "Horovod's control messages and the timing collectives included.\n\n"
            + table(["link", "nodes x ranks", "parameters", "contender", "step (median, slowest rank)",
                     "vs horovod", "bytes on the busiest node's link per step", "vs flat sharded"], rows) + note
            + "\n\n" + _nodes_verdict(res["records"]))


def _nodes_verdict(records: List[dict]) -> str:
    """What the nodes table says of ``hierarchical``, from its figures: its link bytes and step against flat
    ``sharded`` and the best flat topology, and its two data paths against each other."""
    lines = []
    for (rate, ranks, params) in sorted({(r["rate"], r["ranks"], r["params"]) for r in records},
                                        key=lambda k: (-_rate(k[0]), k[1], k[2])):
        at = {r["topology"]: r for r in records if (r["rate"], r["ranks"], r["params"]) == (rate, ranks, params)}
        mine = at.get("hierarchical")
        flat = [r for t, r in at.items() if t in ("ps", "sharded")]
        if mine is None or not flat:
            continue
        best = min(flat, key=lambda r: r["step_time_median_s"])
        link = max(s + rc for s, rc in mine["node_link_bytes_per_step"])
        where = f"{ranks // mine['ranks_per_node']} x {mine['ranks_per_node']}, {params / 1e6:g}M"
        text = (f"{where}: its step {mine['step_time_median_s'] / best['step_time_median_s']:.2f}x the best flat "
                f"topology's (`{best['topology']}`)")
        if "sharded" in at and link:
            text += (f", {link / max(s + rc for s, rc in at['sharded']['node_link_bytes_per_step']):.2f}x flat "
                     f"`sharded`'s bytes on the node's link")
        if "hierarchical-leaders" in at:
            text += (f"; the leaders' path {at['hierarchical-leaders']['step_time_median_s'] / mine['step_time_median_s']:.2f}x "
                     f"the slices' step")
        lines.append(f"- {text}.")
    if not lines:
        return ""
    return ("`hierarchical` (`node_path=\"slices\"`, the default) against the flat topologies, and its data paths "
            "inside a node (`hierarchical-leaders`: local rank 0 sums, compresses and exchanges the whole vector):\n\n"
            + "\n".join(lines))


def _rate(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    return next(float(rate[:-len(u)]) * s for u, s in units.items() if rate.endswith(u))


def _lines(series: Dict[str, List[tuple]], xlabel: str, ylabel: str, title: str, path: Path,
           log: bool = False, hline: Optional[float] = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in series.items():
        if points:
            ax.plot(*zip(*points), marker=".", label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", label=f"target {hline:g}%")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- end to end ---------------------------------------------------------------------------------------
def time_to(record: dict, target: float) -> Optional[float]:
    """Training time (s) at the first evaluation with test accuracy >= target; None if never."""
    return next((p["train_time_s"] for p in record["curve"] if p["test_accuracy"] >= target), None)


def e2e(data: dict) -> str:
    res = data["results"]
    target, parts = res["target"], []
    for c in res["clusters"]:
        mine = [r for r in res["records"] if r["rate"] == c["rate"] and r["ranks"] == c["ranks"]]
        if not mine:
            continue
        base = next(r for r in mine if r["label"] == "horovod")
        per_node = c.get("ranks_per_node", 1)
        rows = []
        for r in mine:
            ttt, base_ttt = time_to(r, target), time_to(base, target)
            rows.append([r["label"], ms(r["step_time_median_s"]),
                         f"{r['step_time_median_s'] / base['step_time_median_s']:.2f}x",
                         "never" if ttt is None else f"{ttt:.1f} s",
                         f"{ttt / base_ttt:.2f}x" if ttt is not None and base_ttt else "",
                         f"{100 * r['final_accuracy']:.1f}%", bytes_cell(r["busiest_bytes_per_step"], r["bytes_source"]),
                         "" if per_node > 1 else f"{base['busiest_bytes_per_step'] / r['busiest_bytes_per_step']:.1f}x"])
        nodes = f" ({c['ranks'] // per_node} nodes x {per_node})" if per_node > 1 else ""
        plot = f"e2e_{c['rate']}_M{c['ranks']}{f'_L{per_node}' if per_node > 1 else ''}.png"
        _lines({r["label"]: [(0, 10)] + [(p["train_time_s"], 100 * p["test_accuracy"]) for p in r["curve"]]
                for r in mine}, "training time (s, sum of slowest-rank steps)", "test accuracy (%)",
               f"{mine[0]['model']} on {mine[0]['data']}, M = {c['ranks']}{nodes}, {c['rate']} links", RESULTS / plot,
               hline=100 * target)
        note = ("\n\n" + CROWDED.format(ranks=c["ranks"], cores=c["cores"])) if c["oversubscribed"] else ""
        if per_node > 1:
            note += ("\n\nWith several ranks a node, a rank's bytes are not its node link's: Horovod's ring formula "
                     "counts the hops inside a node too, and a `hierarchical` rank carries 1/L of its node's payload "
                     "across (its d_i goes through shared memory, counted apart), so no ratio of them is shown; the "
                     "node links' own counters are in \"Nodes: raw inside, compressed across\".")
        parts.append(f"**{c['rate']} links, M = {c['ranks']}{nodes}**\n\n" + table(
            ["method", "median step", "vs horovod", f"time to {100 * target:g}%", "vs horovod", "final accuracy",
             "sent+received/step, busiest rank", "busiest rank's bytes cut vs horovod"], rows) + note + f"\n\n![{plot}](benchmarks/results/{plot})")
    head = (f"Flags of every method: `{res['train_args']}`, {res['epochs']} epochs; methods: "
            + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in res["methods"].items()) + ". "
            "An illustration of one seed, not a verdict on accuracy: each method trains at its CLI default lr "
            "(not tuned on one grid), the test set has 1,000 images (one evaluation moves by about a point), "
            "and a time to the target can hinge on one evaluation; EXPERIMENTS.md compares accuracy with paired "
            "seeds and tuned lr. " + LINK_BOUND)
    return "\n\n".join([head, *parts])


# --- synthetic benchmark ----------------------------------------------------------------------------------
def _resolved(ratios: List[float]) -> str:
    """The median of per-round ratios, or "not resolved" where the rounds fall on both sides of 1."""
    median = f"{statistics.median(ratios):.2f}x"
    return f"not resolved ({median})" if min(ratios) < 1 < max(ratios) else median
def synthetic_ratios(records: List[dict], label: str, where: str, ranks: int, base: str = "horovod") -> List[float]:
    """Per round: ``label``'s images per second over ``base``'s in the same round."""
    by_round = {(r["label"], r["round"]): r["img_per_s"] for r in records if r["where"] == where and r["ranks"] == ranks}
    return [v / by_round[(base, i)] for (lab, i), v in sorted(by_round.items()) if lab == label and (base, i) in by_round]


def synthetic(data: dict) -> str:
    res = data["results"]
    parts = []
    for p in res["places"]:
        mine = [r for r in res["records"] if r["where"] == p["where"] and r["ranks"] == p["ranks"]]
        if not mine:
            continue
        rows = []
        for label in res["contenders"]:
            values = [r["img_per_s"] for r in mine if r["label"] == label]
            ratios = synthetic_ratios(mine, label, p["where"], p["ranks"])
            rows.append([label, f"{statistics.median(values):.1f}",
                         _resolved(ratios) if label != "horovod" else "1",
                         ", ".join(f"{x:.2f}" for x in ratios) if label != "horovod" else ""])
        where = "this machine (plain mpirun)" if p["where"] == "local" else f"{p['where']} links"
        note = ("\n\n" + CROWDED.format(ranks=p["ranks"], cores=p["cores"])) if p["oversubscribed"] else ""
        parts.append(f"**{where}, M = {p['ranks']}**\n\n" + table(
            ["contender", "img/s (median over rounds)", "vs horovod (median of per-round ratios)", "per round"],
            rows) + note)
    head = (f"Script flags: `{' '.join(res['script_args'])}`; contenders: "
            + "; ".join(f"{k}: `{' '.join(v) or '(stock)'}`" for k, v in res["contenders"].items()) + ". "
            "Every contender's script imports hvd_distef, which sets Open MPI's `mpi_yield_when_idle` before MPI "
            "starts: stock Horovod here runs with it too. Small images and batches (flags above) make the step "
            "link-bound by choice. " + LINK_BOUND)
    return "\n\n".join([head, *parts])


def overlap(data: dict) -> str:
    """The overlapped step against the plain one, from the synthetic benchmark's two ps contenders."""
    res = data["results"]
    rows = []
    for p in res["places"]:
        ratios = synthetic_ratios(res["records"], "ef-blocksgdm-ps", p["where"], p["ranks"],
                                  base="ef-blocksgdm-ps-overlap")
        if ratios:  # plain img/s over overlapped img/s = overlapped step time over plain step time
            rows.append(["this machine" if p["where"] == "local" else f"{p['where']} links", p["ranks"],
                         _resolved(ratios), ", ".join(f"{x:.2f}" for x in ratios),
                         "yes" if p["oversubscribed"] else ""])
    return (f"ResNet-18 as in the synthetic benchmark above, buckets of {res['bucket_cap_mb']:g} MiB: the overlapped "
            "step's time over the plain one's (below 1: overlap pays).\n\n"
            + table(["where", "ranks", "overlapped / plain step (median)", "per round", "more ranks than cores"], rows))


def plan_validation(data: dict) -> str:
    """The step-time model's predictions beside the emulated cluster's measured medians."""
    res = data["results"]
    rows = [[r["file"], r["contender"], r["ranks"], r["ranks_per_node"], f"{r['params'] / 1e6:g}M", r["rate"],
             ms(r["measured_s"]), f"{r['spread_pct']:.0f}%", ms(r["predicted_s"]), f"{r['error_pct']:+.0f}%",
             r["role"]] for r in res["rows"]]
    s, loop = res["summary"], res.get("loopback_pingpong", {})
    counts = "; ".join(f"{part}: {c['within_target']} of {c['configurations']}" for part, c in s.items())
    spread = statistics.median(r["spread_pct"] for r in res["rows"])
    return (f"The device profile is measured here per parameter count; the link's rate is netem's; two constants of "
            f"this machine's network path are fitted on the {res['fit_on_params'] / 1e6:g}M-parameter rows only "
            f"(alpha {1e6 * res['alpha_s']:.0f} us per message, network stack {res['transport_gbs']:.2f} GB/s per "
            f"core; loopback ping-pong here: alpha {loop.get('alpha_us', float('nan')):.0f} us, "
            f"{loop.get('bandwidth_gbs', float('nan')):.2f} GB/s); every other row is held out. Rows within "
            f"{100 * res['target']:.0f}% of the measured median: {counts}. \"spread\": (slowest − fastest) / median "
            f"of the configuration's own timed steps (median over rows: {spread:.0f}%).\n\n"
            + table(["file", "contender", "ranks", "ranks/node", "parameters", "link", "measured", "spread",
                     "predicted", "error", "role"], rows)
            + "\n\n![plan_validation.png](benchmarks/results/plan_validation.png)")


#: (title, question, results file, the command that makes it, renderer)
SECTIONS = [
    ("Fused worker kernel against a memory copy",
     "How close does the one-pass worker step (p = d + r·e, per-block L1 scales, packed sign bits, e = p − C(p)) "
     "come to the memory bandwidth, and how does it compare with the torch path and a GRACE-style unfused "
     "baseline (per tensor, several torch passes, a byte per sign)? It reads d and e and writes e and the bits: "
     "about 12 bytes per element, so its limit is 1.5x the time of a copy (8 bytes per element) in the same run.",
     "kernels", f"{PY} benchmarks/kernels.py --threads 1 2 --repeats 7", kernels),
    ("One step against stock SGD and GRACE-style EF-sign",
     "What does one `opt.step()` of the paper's scheme (`ps` + blocksign) cost on one rank against a stock "
     "`torch.optim.SGD` step on the same parameters, and against the worker half of GRACE-style EF-sign code?",
     "step", f"{PY} benchmarks/step.py --threads 1 2", step),
    ("Every path a user can reach, one step",
     "Does every topology and compressor a user can name (Horovod's own `hvd.Compression` classes included) "
     "keep one step within 1.5x a stock SGD step (plus the compressor's own cost, for compressors that are "
     "costly in themselves: topk, randomk, qsgd)?",
     "step_paths", f"{PY} benchmarks/step_paths.py", step_paths),
    ("Every path at 2 ranks",
     "With a real exchange (2 ranks on this machine), does a step of ours cost at most the raw exchange of its "
     "topology plus 1.5x a stock SGD step, and how does it compare with stock Horovod's step?",
     "step_paths_np2", f"mpirun -np 2 --oversubscribe {PY} benchmarks/step_paths.py", step_paths),
    ("Waiting in MPI beside Horovod's background thread",
     "Horovod's background thread makes an MPI call every cycle (1 ms by default), idle or not. What does that "
     "cost a collective of ours waiting in MPI's blocking wait (Open MPI hands progress between the waiting "
     "threads), against ours, which starts nonblocking and polls `MPI_Test` (`Comm.complete`)?",
     "mpi_wait", f"{PY} benchmarks/mpi_wait.py", mpi_wait),
    ("Step on emulated links",
     "How long does one optimizer step take per contender on a network, with synthetic gradients (so that compute "
     "does not hide the link), against stock Horovod in float32 and fp16?",
     "netem_step", f"{PY} benchmarks/netem/run.py", netem_step),
    ("Nodes: raw inside, compressed across",
     "With several ranks per node, does `hierarchical` (one compressed payload per node across the network) cut "
     "what crosses the nodes' links against flat `sharded`, and what does its step cost against the flat "
     "topologies and stock Horovod?",
     "netem_nodes", f"{PY} benchmarks/netem/run.py --ranks 4 8 --ranks-per-node 2 --params 1e6 2.5e7 --rates 1gbit "
     "--contenders horovod horovod-fp16 ps sharded hierarchical hierarchical-leaders --name netem_nodes", netem_nodes),
    ("One node: shared memory alone",
     "With every rank on one node (no network between them), what do `hierarchical`'s two data paths inside a node "
     "cost against the flat topologies and stock Horovod, where no rank shares a core (2 ranks on 2 cores) and "
     "where they do?",
     "netem_one_node", f"{PY} benchmarks/netem/run.py --ranks 2 4 8 --ranks-per-node all --params 1e6 2.5e7 "
     "--rates 1gbit --contenders horovod horovod-fp16 ps sharded hierarchical hierarchical-leaders "
     "--name netem_one_node", netem_nodes),
    ("End to end to a target accuracy",
     "How long does real training take to reach the target accuracy, per method, against stock Horovod, with every "
     "method training from the same weights on the same batches, interleaved in one job?",
     "e2e", f"{PY} benchmarks/netem/run_train.py", e2e),
    ("End to end on nodes",
     "With nodes of two ranks (shared memory inside, the shaped link between nodes), how long does the same "
     "training take per method, `hierarchical` beside flat `sharded` and stock Horovod?",
     "e2e_nodes", f"{PY} benchmarks/netem/run_train.py --clusters 1gbit:4:2 --methods horovod horovod-fp16 "
     "ef-blocksgdm-sharded ef-blocksgdm-hierarchical --name e2e_nodes", e2e),
    ("Horovod's synthetic benchmark as ported",
     "What does a user get who takes Horovod's own pytorch_synthetic_benchmark.py and swaps only the optimizer "
     "class (keeping `hvd.Compression.none`), or also picks blocksign, against stock Horovod?",
     "synthetic", f"{PY} benchmarks/netem/synthetic.py", synthetic),
    ("Overlap", "Does exchanging buckets during backward (`overlap=True`) shorten the step?",
     "synthetic", f"{PY} benchmarks/netem/synthetic.py", overlap),
    ("The step-time model against the emulated cluster",
     "Does `python -m hvd_distef.plan`'s model, calibrated on this machine, predict the measured median step of "
     "every contender on the emulated cluster within 25%?",
     "plan_validation", f"{PY} benchmarks/plan_validation.py",
     plan_validation),
]
def section(title: str, question: str, name: str, command: str, render: Callable[[dict], str]) -> str:
    data = read_results(name)
    if data is None:
        return f"## {title}\n\n{question}\n\nNot measured yet: `{command}`."
    return f"## {title}\n\n{question}\n\n    {command}\n\n{provenance(name, data['meta'])}\n\n{render(data)}"


def build() -> str:
    intro = ("# Benchmarks\n\nThe current record, generated by `benchmarks/record.py` from the results files in "
             "`benchmarks/results/` (`make bench` runs every benchmark, then this; each section names its own "
             "command). Do not edit by hand: history lives in git. Each results file holds its CPU, date, commit "
             "and exact command, printed under its section. Every contender of one comparison runs with the same "
             "launcher, environment and settings (SPEC §5b). Performance claims are ratios within one run: our "
             "machines differ (AMD EPYC with or without AVX-512, Intel Xeon), and absolute times on 2 shared "
             "cores are not a cluster's. The emulated links are network namespaces on one machine with token-bucket "
             "shaping (benchmarks/netem/cluster.py), rank i bound to core i mod the cores here.")
    return "\n\n".join([intro, *(section(*s) for s in SECTIONS)]) + "\n"


def main() -> int:
    names = list(dict.fromkeys(name for _, _, name, _, _ in SECTIONS))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs="*", choices=names, metavar="NAME",
                    help=f"run these benchmarks first (none named: all of {', '.join(names)})")
    args = ap.parse_args()
    commands = {name: command for _, _, name, command, _ in SECTIONS}
    for name in (args.run or names) if args.run is not None else []:
        print(f"== {name}: {commands[name]}", flush=True)
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if subprocess.run(shlex.split(commands[name]), cwd=ROOT, env=env).returncode:
            print(f"record.py: {name} failed; BENCHMARKS.md keeps the results files as they are", file=sys.stderr)
            return 1
    DOC.write_text(build())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
