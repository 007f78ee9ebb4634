"""`pgpo-train plot`: one colour per run in every panel, every run in the legend."""

from __future__ import annotations

import json

import pytest

from pgpo_train.run.plot import plot_runs
from pgpo_train.run.plot import run_label


def _run(tmp_path, name, algo, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"algo": algo, "pgpo": {"estimator": "full", "tau": 0.4, "beta": 2}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def _runs(tmp_path):
    # the DAPO run logs no pgpo/* metric: before, PGPO took DAPO's colour in the PGPO-only panels
    dapo = [{"step": s, "reward/mean": 0.1 * s} for s in range(1, 6)]
    pgpo = [{"step": s, "reward/mean": 0.2 * s, "pgpo/kl_mean": 0.01 * s, "pgpo/weight_std": 0.3} for s in range(1, 6)]
    # the first panel (reward) lacks the third run: before, the legend (taken from the first panel) dropped it
    sft_only = [{"step": s, "sft/loss": 2.0 / s} for s in range(1, 6)]
    return [_run(tmp_path, "dapo-s0", "dapo", dapo), _run(tmp_path, "pgpo-s0", "pgpo", pgpo),
            _run(tmp_path, "sft-s0", "sft", sft_only)]


def test_one_colour_per_run_across_panels_and_every_run_in_the_legend(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real_savefig(fig, *a, **k)))
    dirs = _runs(tmp_path)
    plot_runs(dirs, str(tmp_path / "curves.png"), smooth=1)
    (fig,) = saved
    colour_of: dict[str, set[str]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colour_of.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    labels = [run_label(d) for d in dirs]
    assert set(colour_of) == set(labels)
    assert all(len(c) == 1 for c in colour_of.values()), colour_of  # one colour per run, in every panel
    assert len({next(iter(c)) for c in colour_of.values()}) == len(labels)  # and runs differ
    legend_labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend_labels == labels
    legend_colours = [to_hex(h.get_color()) for leg in fig.legends for h in leg.legend_handles]
    assert legend_colours == [next(iter(colour_of[label])) for label in labels]


def test_plot_runs_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_runs(_runs(tmp_path), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 1000 and out.endswith("curves.png")
