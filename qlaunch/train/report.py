"""End-of-run report: metrics.json and a loss-curve PNG in the output directory."""
from __future__ import annotations

import json
import os


def loss_history(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    return train, evals


def plot_loss(log_history: list[dict], path: str, title: str = "loss") -> bool:
    fig = loss_figure(log_history, title)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return True


def loss_figure(log_history: list[dict], title: str = "loss"):
    """Train and eval loss per step; the learning rate on a second axis. None without losses."""
    train, evals = loss_history(log_history)
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    rates = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "step" in h]
    if rates:
        lr_axis = ax.twinx()
        lr_axis.plot(*zip(*rates), color="tab:gray", linestyle="--", linewidth=1.0, label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        more_lines, more_labels = lr_axis.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    ax.legend(lines, labels, loc="upper right")
    fig.tight_layout()
    return fig


def throughput_title(name: str, run: dict) -> str:
    parts = [name]
    if run.get("real_tokens_per_second"):
        parts.append(f"{run['real_tokens_per_second']:,.0f} real tok/s "
                     f"({run.get('trained_tokens_per_second') or 0:,.0f} trained)")
    if run.get("peak_memory_gib") is not None:
        parts.append(f"peak {run['peak_memory_gib']:.2f} GiB")
    return " · ".join(parts)


def write_report(output_dir: str, metrics: dict, log_history: list[dict], title: str, run: dict | None = None) -> dict:
    """Write metrics.json (+ loss_curve.png); return the metrics written. `run`: run_metrics()."""
    train, evals = loss_history(log_history)
    metrics = {**dict(metrics), **(run or {})}
    title = throughput_title(title, run or {})
    if train:
        metrics["first_loss"], metrics["last_loss"] = train[0][1], train[-1][1]
    if evals:
        metrics["last_eval_loss"] = evals[-1][1]
    metrics["loss_history"] = [{"step": s, "loss": v} for s, v in train]
    if plot_loss(log_history, os.path.join(output_dir, "loss_curve.png"), title):
        metrics["loss_curve"] = "loss_curve.png"
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
