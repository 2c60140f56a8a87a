"""Figures of the report, one function per picture; each returns a matplotlib Figure.

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot,
so nothing here touches the global backend or keeps figures alive: the report
works headless (Agg) and inside a long-running study process.

Layers are small multiples (one panel per MoE layer) sharing one colour scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from moe_testbed.analysis.rundir import Run
from moe_testbed.routing.tables import Snapshot

MAX_COLS = 4
CURVE_METRICS = (("util", "utilization"), ("purity", "purity"), ("specialization", "specialization"))


def _grid(
    n_panels: int, panel_w: float, panel_h: float, extra_w: float = 0.0, max_cols: int = MAX_COLS
) -> tuple[Figure, list]:
    ncols = min(n_panels, max_cols)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(ncols * panel_w + extra_w, nrows * panel_h), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def column_shares(n_EC: np.ndarray) -> np.ndarray:
    """Each column divided by its sum: the share of domain d's slots that expert e got."""
    m_1C = n_EC.sum(axis=0, keepdims=True)
    return np.divide(n_EC, m_1C, out=np.zeros(n_EC.shape, dtype=np.float64), where=m_1C > 0)


def majority_order(share_EC: np.ndarray) -> np.ndarray:
    """Experts sorted by majority domain, then by how much of it they take.

    Expert ids of a learned router are arbitrary; sorting makes specialisation
    show as a block diagonal instead of scattered cells.
    """
    best_E = share_EC.argmax(axis=1)
    top_E = share_EC.max(axis=1)
    used_E = share_EC.sum(axis=1) > 0
    # unused experts last, then by majority domain, then strongest first
    return np.lexsort((-top_E, best_E, ~used_E))


def heatmap_figure(snap: Snapshot, title: str) -> Figure | None:
    """Expert x domain share per layer (each column sums to 1), plus the reference router's table.

    None for a snapshot without MoE layers.
    """
    L, E, C = snap.tables.counts.shape
    if L == 0:  # dense model: nothing is routed
        return None
    panels: list[tuple[str, np.ndarray]] = []
    scalars = snap.scalars(prefix="")
    for l, name in enumerate(snap.layers):
        label = f"{name}  P={scalars[f'purity/{name}']:.2f}"
        if f"specialization/{name}" in scalars:
            label += f"  S={scalars[f'specialization/{name}']:.2f}"
        panels.append((label, column_shares(snap.tables.counts[l].astype(np.float64))))
    if snap.tables.ref_counts is not None:
        panels.append(("reference router (upper bound)", column_shares(snap.tables.ref_counts[0])))
    vmax = max(max(float(s.max()) for _, s in panels), 2.0 / E)

    panel_w = max(2.6, 0.34 * C + 1.0)
    panel_h = max(2.6, min(0.2 * E + 1.3, 9.0))
    # L layers + the reference on one row up to 5 panels (the usual 4-layer model).
    fig, axes = _grid(len(panels), panel_w, panel_h, extra_w=0.8, max_cols=MAX_COLS + 1)
    ncols = min(len(panels), MAX_COLS + 1)
    image = None
    for i, (ax, (label, share_EC)) in enumerate(zip(axes, panels)):
        order = majority_order(share_EC)
        image = ax.imshow(share_EC[order], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        if E <= 16 and C <= 12:  # small tables: print the shares, skipping near-zero cells to keep it calm
            for (row, col), value in np.ndenumerate(share_EC[order]):
                if value >= 0.05:
                    color = "black" if value > 0.6 * vmax else "white"
                    ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(C), snap.domains, rotation=60, ha="right", fontsize=8)
        every = max(1, math.ceil(E / 24))  # at most ~24 expert labels per panel
        ticks = list(range(0, E, every))
        ax.set_yticks(ticks, [str(int(order[i])) for i in ticks], fontsize=7)
        if i % ncols == 0:
            ax.set_ylabel("expert id (sorted by majority domain)", fontsize=8)
    fig.suptitle(f"{title}: share of each domain's slots per expert (step {snap.step})", fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="share of the domain's slots")
    return fig


def series(run: Run, key: str, kind: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar over the run's records of ``kind``, skipping records without it."""
    records = run.eval if kind == "eval" else run.train
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    if not pts and kind == "eval" and key.startswith("val/") and run.snapshots:
        # Eval lines without routing scalars (e.g. an older trainer): recompute them from the snapshots.
        pts = [(s.step, v) for s in run.snapshots if (v := s.scalars(prefix="val/").get(key)) is not None]
    if not pts:
        return np.array([]), np.array([])
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values)


def curves_figure(run: Run) -> Figure | None:
    """Utilization, purity and specialization on validation data over training, one line per layer.

    None when the run has no routing metrics at all (a dense model).
    """
    if not any(series(run, f"val/{key}/mean")[0].size for key, _ in CURVE_METRICS):
        return None
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, len(CURVE_METRICS))
    colors = _layer_colors(len(run.layers))
    for ax, (key, label) in zip(axes, CURVE_METRICS):
        for color, name in zip(colors, run.layers):
            x, y = series(run, f"val/{key}/{name}")
            if x.size:
                ax.plot(x, y, marker="o", ms=3, lw=1.2, color=color, label=name)
        x, y = series(run, f"val/{key}/mean")
        if x.size:
            ax.plot(x, y, color="black", lw=2.2, label="mean")
        x, y = series(run, f"{key}/mean", kind="train")
        if x.size:
            ax.plot(x, y, color="0.5", lw=1, ls="--", label="mean, training batches")
        if key == "specialization":
            ax.axhline(1.0, color="tab:red", ls=":", lw=1)
            ax.text(
                0.01, 1.0, " reference", color="tab:red", fontsize=8, va="bottom", transform=ax.get_yaxis_transform()
            )
            ax.axhline(0.0, color="0.4", ls=":", lw=1)
        if key == "purity":
            x, y = series(run, "val/purity_chance/mean")
            if x.size:
                ax.plot(x, y, color="0.4", ls=":", lw=1, label="chance")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # one legend with every line kind, without duplicates
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"{run.name}: routing metrics on validation data", fontsize=11)
    return fig


def expert_load_figure(run: Run) -> Figure | None:
    """Which expert is used when: load share x E of every expert (rows) per evaluation interval (columns).

    Uses the training slots counted between evaluations; 1 = even load, 0 = unused.
    None when the snapshots carry no training counts.
    """
    snaps = [s for s in run.snapshots if s.train_counts is not None and s.train_counts.sum() > 0]
    if not snaps or snaps[0].train_counts.shape[0] == 0:
        return None
    L, E, _ = snaps[0].train_counts.shape
    load_LES = np.stack([s.train_counts.sum(axis=2) for s in snaps], axis=-1).astype(np.float64)
    total_LS = load_LES.sum(axis=1, keepdims=True)
    rel_LES = np.divide(load_LES * E, total_LS, out=np.full(load_LES.shape, np.nan), where=total_LS > 0)
    vmax = max(2.0, float(np.nanmax(rel_LES)))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    S = len(snaps)
    fig, axes = _grid(L, max(2.8, 0.45 * S + 1.2), max(2.6, min(0.2 * E + 1.3, 9.0)), extra_w=0.8)
    image = None
    for l, ax in enumerate(axes):
        image = ax.imshow(rel_LES[l], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        every = max(1, math.ceil(S / 8))
        ticks = list(range(0, S, every))
        ax.set_xticks(ticks, [str(snaps[i].step) for i in ticks], rotation=45, fontsize=8)
        e_every = max(1, math.ceil(E / 24))
        ax.set_yticks(range(0, E, e_every), [str(e) for e in range(0, E, e_every)], fontsize=7)
        ax.set_title(run.layers[l] if l < len(run.layers) else f"layer {l}", fontsize=9)
        ax.set_xlabel("training steps up to", fontsize=8)
        if l % MAX_COLS == 0:
            ax.set_ylabel("expert id", fontsize=8)
    fig.suptitle(f"{run.name}: expert load during training (f_e x E; 1 = even, 0 = unused)", fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="load share x E")
    return fig


def domain_loss_figure(run: Run) -> Figure | None:
    """Final validation loss per domain (bars) and its course over training (lines)."""
    domains = run.domains
    final = run.final
    values = [final.get(f"val/loss/{d}") for d in domains]
    if not domains or all(v is None for v in values):
        return None
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax_bar, ax_line = fig.subplots(1, 2, width_ratios=[1, 1.4])
    colors = _layer_colors(len(domains), cmap="tab10" if len(domains) <= 10 else "tab20")
    heights = [np.nan if v is None else float(v) for v in values]
    bars = ax_bar.bar(range(len(domains)), heights, color=colors)
    ax_bar.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_bar.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=8)
    ax_bar.set_ylabel("validation loss (nats/token)")
    ax_bar.set_title(f"final (step {final.get('step', '?')})")
    mean = final.get("val/loss")
    if isinstance(mean, int | float):
        ax_bar.axhline(mean, color="black", ls="--", lw=1, label=f"mean {mean:.2f}")
        ax_bar.legend(fontsize=8, loc="lower right")
    for color, d in zip(colors, domains):
        x, y = series(run, f"val/loss/{d}")
        if x.size:
            ax_line.plot(x, y, marker="o", ms=3, color=color, label=d)
    ax_line.set_xlabel("step")
    ax_line.set_ylabel("validation loss")
    ax_line.set_title("over training")
    ax_line.grid(alpha=0.3)
    ax_line.legend(fontsize=8, loc="upper right", ncols=2 if len(domains) > 6 else 1)
    fig.suptitle(f"{run.name}: validation loss per domain", fontsize=11)
    return fig


def scatter_figure(names: Sequence[str], util: Sequence[float], spec: Sequence[float], ref_util: float) -> Figure:
    """Specialization vs utilization, one point per run; the reference router is the upper bound (S = 1)."""
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    ax.axhline(1.0, color="tab:red", ls="--", lw=1)
    ax.axhline(0.0, color="0.5", ls=":", lw=1)
    ax.text(
        0.01,
        1.0,
        " reference router: specialization = 1 (upper bound)",
        color="tab:red",
        fontsize=8,
        va="bottom",
        transform=ax.get_yaxis_transform(),
    )
    ax.text(
        0.01,
        0.0,
        " chance: domain-blind router",
        color="0.4",
        fontsize=8,
        va="bottom",
        transform=ax.get_yaxis_transform(),
    )
    if math.isfinite(ref_util):
        ax.scatter([ref_util], [1.0], marker="*", s=220, color="tab:red", zorder=3, label="reference router")
    x = np.asarray(util, dtype=np.float64)
    y = np.asarray(spec, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], y[ok], s=40, color="tab:blue", zorder=3, label="runs")
    for name, xi, yi in zip(np.asarray(names)[ok], x[ok], y[ok]):
        ax.annotate(str(name), (xi, yi), xytext=(4, 4), textcoords="offset points", fontsize=7)
    lo_x = min([0.5, *x[ok].tolist()]) - 0.02
    ax.set_xlim(lo_x, 1.02)
    ax.set_ylim(min([-0.1, *y[ok].tolist()]) - 0.05, max([1.15, *y[ok].tolist()]) + 0.05)
    ax.set_xlabel("utilization U (1 = even load)")
    ax.set_ylabel("specialization (0 = chance, 1 = reference)")
    ax.set_title("specialization vs utilization (validation, mean over layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def domain_loss_comparison_figure(runs: Sequence[Run], names: Sequence[str]) -> Figure | None:
    """Final validation loss per domain, runs side by side."""
    domains = list(dict.fromkeys(d for r in runs for d in r.domains))  # first-seen order
    if not domains:
        return None
    width = 0.8 / len(runs)
    fig = Figure(figsize=(max(7.0, 0.9 * len(domains) * max(1, len(runs) / 3) + 3), 4), layout="constrained")
    ax = fig.subplots()
    colors = _layer_colors(len(runs), cmap="tab10" if len(runs) <= 10 else "tab20")
    for i, (run, name) in enumerate(zip(runs, names)):
        final = run.final
        heights = [float(final.get(f"val/loss/{d}", np.nan)) for d in domains]
        ax.bar(np.arange(len(domains)) + (i - (len(runs) - 1) / 2) * width, heights, width, label=name, color=colors[i])
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("final validation loss")
    ax.set_title("validation loss per domain")
    ax.grid(axis="y", alpha=0.3)
    finite = [float(r.final.get(f"val/loss/{d}", np.nan)) for r in runs for d in domains]
    finite = [v for v in finite if math.isfinite(v)]
    if finite:  # differences between runs are small next to the loss itself: zoom in
        lo, hi = min(finite), max(finite)
        ax.set_ylim(max(0.0, lo - 0.5 * (hi - lo + 0.05)), hi + 0.2 * (hi - lo + 0.05))
    fig.legend(fontsize=7, loc="outside right upper")
    return fig


def _layer_colors(n: int, cmap: str = "viridis") -> list:
    from matplotlib import colormaps

    cm = colormaps[cmap]
    if cmap.startswith("tab"):
        return [cm(i % cm.N) for i in range(n)]
    return [cm(x) for x in np.linspace(0.0, 0.85, max(n, 1))][:n]
