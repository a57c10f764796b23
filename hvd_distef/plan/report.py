"""The plan's table (text) and plot (matplotlib, ``--plot FILE``) from predictions."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .model import Breakdown

HEAD = ("method", "step ms", "compute", "cpu", "link MB", "wire", "stack", "latency", "hidden", "vs horovod")


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def rows(breakdowns: Sequence[Breakdown]) -> List[List[str]]:
    """One row per method: step, compute, compression/update CPU, bytes and time on the busiest link,
    the network stack's CPU, latency terms, what hid behind backward (ms), and the step's speed-up over
    stock Horovod."""
    base = next((b.total for b in breakdowns if b.method == "horovod"), None)
    return [[b.method, _ms(b.total), _ms(b.compute), _ms(b.cpu), f"{b.link_bytes / 1e6:.1f}", _ms(b.wire),
             _ms(b.stack), _ms(b.latency), _ms(b.hidden), "" if base is None else f"{base / b.total:.2f}x"]
            for b in breakdowns]


def text_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def crossover_line(ranks: int, stock: str, bandwidth: Optional[float], compressed_wins_low: bool) -> str:
    if bandwidth is None:
        side = "pays at every bandwidth from 1 Mbit/s to 10 Tbit/s" if compressed_wins_low else \
            "does not pay at any bandwidth from 1 Mbit/s to 10 Tbit/s"
        return f"M={ranks}: against {stock}, compression {side}"
    return (f"M={ranks}: against {stock}, compression stops paying above {8 * bandwidth / 1e9:.3g} Gbit/s "
            f"per node link")


def plot(series: Dict[str, Dict[str, List[tuple]]], title: str, path: str) -> None:
    """Predicted step time against ranks, one panel per link, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 4), squeeze=False, sharey=True)
    for ax, (link, methods) in zip(axes[0], series.items()):
        for method, points in methods.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="ranks", title=f"{link} links")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("predicted step time (s)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
