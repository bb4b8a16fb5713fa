"""What a training run writes and prints: metrics.jsonl, the PNG of its
curves, summary.json and the closing summary table."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Dict, List, Optional, Sequence


class MetricsLog:
    """metrics.jsonl on the main rank (a no-op elsewhere); every record is
    also kept in memory."""

    def __init__(self, path: Optional[Path], append: bool = False) -> None:
        self.records: List[Dict] = []
        self._file = None
        self.open(path, append)

    def open(self, path: Optional[Path], append: bool = False) -> None:
        """Writes to ``path`` from now on (appending, or starting it afresh),
        or nowhere when None."""
        self.close()
        self._file = open(path, "a" if append else "w") if path is not None else None

    def write(self, record: Dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def trim_after(self, step: int) -> None:
        """A resume from ``step``: the history after it (steps trained past
        the checkpoint, then lost) is dropped; the history before stays."""
        if self._file is None:
            return
        path = Path(self._file.name)
        self.close()
        kept = [r for r in read_records(path) if int(r.get("step", 0)) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self._file = open(path, "a")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(path: Path) -> List[Dict]:
    """The records of a metrics.jsonl (its whole history, whoever wrote it)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return records


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def plot_training(records: Sequence[Dict], teacher_auc: Optional[float], path: Path) -> Optional[Path]:
    """Training loss and evaluation AUC over steps, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training log loss (mean over log interval)")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)
    ax_auc.plot([r["step"] for r in eval_records], [r["auc"] for r in eval_records], "o-", color="tab:green", label="model")
    if teacher_auc is not None:
        ax_auc.axhline(teacher_auc, color="tab:red", linestyle="--", label=f"teacher (ceiling) {teacher_auc:.4f}")
    ax_auc.set_xlabel("step")
    ax_auc.set_ylabel("evaluation AUC")
    ax_auc.set_title("Evaluation AUC")
    ax_auc.grid(alpha=0.3)
    ax_auc.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(config, env, result, plot_path: Optional[Path], failures: Sequence[Dict] = ()) -> Dict:
    """The run's figures as plain data (summary.json)."""
    summary = dict(
        processes=env.world_size,
        backend=env.backend or "none",
        device=str(env.device),
        batch_size_per_process=config.train.batch_size,
        global_batch_size=config.train.batch_size * env.world_size,
        steps=result.steps,
        examples=result.examples,
        train_seconds=round(result.train_seconds, 2),
        examples_per_second=round(result.examples_per_second, 1),
        teacher_auc=result.teacher_auc,
        metrics=str(result.output_dir / "metrics.jsonl") if result.output_dir else None,
        plot=str(plot_path) if plot_path else None,
        max_rss_gib_rank0=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    )
    if result.final_eval is not None:
        summary["eval"] = result.final_eval.as_dict()
    if failures:
        summary["failures"] = [
            {k: f.get(k) for k in ("recovery", "failure_step", "replaced", "back", "seconds_to_first_step", "restore_seconds",
                                   "restored_bytes", "lost_samples", "lost_fraction", "checkpoint_step")}
            for f in failures
        ]  # fmt: skip
        weighted = sum(f["lost_samples"] * f.get("lost_fraction", 0.0) for f in failures)
        summary["lost_samples"] = sum(f["lost_samples"] for f in failures)
        summary["portion_of_lost_samples"] = weighted / max(result.examples, 1)
    return summary


def summary_table(s: Dict) -> str:
    rows = [
        ("processes", f"{s['processes']} ({s['backend']}, {s['device']})"),
        ("global batch", f"{s['global_batch_size']:,} ({s['batch_size_per_process']:,} per process)"),
        ("steps", f"{s['steps']:,} ({s['examples']:,} examples)"),
        ("training time", f"{s['train_seconds']:.1f} s"),
        ("throughput", f"{s['examples_per_second']:,.0f} examples/s (after the first log interval)"),
    ]
    sync = s.get("dense_sync")
    if sync:
        rows.append(("dense replicas", f"{sync['dense']} in the {sync['mode']}: {sync['rounds']:,} rounds "
                                       f"({sync['rounds_per_step']:.2f} per step, {sync['seconds_in_rounds']:.1f} s)"))  # fmt: skip
    sync = s.get("embedding_sync")
    if sync:
        moved = f", {sync['rows_per_round']:.1%} of the rows each" if "rows_per_round" in sync else ""
        rows.append(("2D replicas", f"averaged in the background: {sync['rounds']:,} rounds "
                                    f"({sync['rounds_per_step']:.2f} per step, {sync['seconds_in_rounds']:.1f} s{moved})"))  # fmt: skip
    skipped = s.get("skipped_lines")
    if skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped["by_reason"].items()))
        rows.append(("skipped lines", f"{skipped['skipped']:,} of {skipped['lines_read']:,} ({reasons})"))
    e = s.get("eval")
    if e:
        auc_line = f"{e['auc']:.4f}"
        if s.get("teacher_auc") is not None:
            auc_line += f"  (teacher {s['teacher_auc']:.4f}, gap {s['teacher_auc'] - e['auc']:+.4f})"
        rows += [
            ("eval AUC", auc_line),
            ("eval NE", f"{e['ne']:.4f}"),
            ("eval log loss", f"{e['log_loss']:.4f}"),
            ("eval accuracy", f"{e['accuracy']:.4f} (click rate {e['click_rate']:.4f}, {e['num_samples']:,} samples)"),
        ]
    for i, f in enumerate(s.get("failures", []), 1):
        who = f"ranks {f['back']}" if f.get("back") else "no rank replaced"
        rows.append((
            f"failure {i}",
            f"{f['recovery']} at step {f['failure_step']} ({who}): {f['seconds_to_first_step']:.1f} s to the next step, "
            f"{f['lost_samples']:,} samples lost",
        ))  # fmt: skip
    if "failures" in s:
        rows.append(("lost samples", f"{s['lost_samples']:,} (portion of lost samples {s['portion_of_lost_samples']:.2e})"))
    t = s.get("tiers_rank0")
    if t:
        rows.append((
            "tiers (rank 0)",
            f"{t['hot_rows']:,} of {t['rows']:,} rows in memory ({t['hot_bytes'] / 2**30:.2f} GiB); per step "
            f"{t['cold_blocks_read_per_step']:,.0f} SSD blocks read, {t['cold_blocks_written_per_step']:,.0f} written",
        ))  # fmt: skip
    if s.get("max_rss_gib_rank0") is not None:
        rows.append(("peak memory", f"{s['max_rss_gib_rank0']:.2f} GiB (rank 0's process)"))
    rows += [("metrics", s["metrics"]), ("plot", s["plot"])]
    width = max(len(k) for k, _ in rows)
    lines = ["", "== dist_rec training summary " + "=" * 40] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
