"""End-of-run report: metrics.json and a loss-curve PNG in the output directory."""
from __future__ import annotations

import json
import os


def loss_history(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    return train, evals


def plot_loss(log_history: list[dict], path: str, title: str = "loss") -> bool:
    train, evals = loss_history(log_history)
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(output_dir: str, metrics: dict, log_history: list[dict], title: str) -> dict:
    """Write metrics.json (+ loss_curve.png); return the metrics written."""
    train, evals = loss_history(log_history)
    metrics = dict(metrics)
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
