"""The run report: PNG figures (matplotlib, no display needed) and one index.html.

Figures:
- difficulty: histogram of the fused difficulty score, coloured by the stage a sample enters;
- agreement: the measurer's rank against the built-in tasks' true level (when known);
- schedule: subset size, τ, λ and LR against the step, from the per-step metrics;
- loss: training loss per step for each run, stage boundaries marked;
- eval: mean ± sd of ROUGE-L and exact match per model × eval set;
- a Tune search's metric against each searched key (`plot_search`, in `<run>/tune/`).
Every function takes plain tables, so the plain demo and the Ray pipeline share them.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines and in Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pocl_ray import difficulty  # noqa: E402
from pocl_ray.config import Config  # noqa: E402
from pocl_ray.evaluation import read_results  # noqa: E402
from pocl_ray.run_dir import RunDir  # noqa: E402
from pocl_ray.scores import format_quality, measurer_quality, read_scores  # noqa: E402

STAGE_COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_difficulty(scores: pd.DataFrame, path: Path) -> Path:
    """Histogram of the RRF score (higher = easier), one colour per entering stage."""
    fig, ax = plt.subplots(figsize=(7, 4))
    stages = sorted(scores["stage"].unique())
    data = [scores.loc[scores["stage"] == s, "rrf"] for s in stages]
    colours = [STAGE_COLOURS[s % len(STAGE_COLOURS)] for s in stages]
    ax.hist(data, bins=40, stacked=True, color=colours, label=[f"stage {s}" for s in stages])
    ax.set_xlabel("fused difficulty score (RRF; higher = easier)")
    ax.set_ylabel("training samples")
    ax.set_title(f"Difficulty of {len(scores)} training samples, by the stage they enter")
    ax.legend(title="enters in")
    return _save(fig, path)


def plot_agreement(scores: pd.DataFrame, path: Path) -> Path:
    """Box plot of difficulty_rank per true level (built-in tasks), with Spearman's rho."""
    levels = sorted(scores["level"].dropna().unique())
    signals = [c.removeprefix("rank_") for c in scores.columns if c.startswith("rank_")]
    quality = measurer_quality(scores, signals)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot(
        [scores.loc[scores["level"] == lv, "difficulty_rank"] for lv in levels],
        tick_labels=[str(int(lv)) for lv in levels],
    )
    ax.set_xlabel("true level of the built-in task (1 = easiest)")
    ax.set_ylabel("measured difficulty rank (1 = easiest)")
    ax.set_title("Measurer vs true difficulty, Spearman rho:\n" + format_quality(quality),
                 fontsize=9)  # fmt: skip
    return _save(fig, path)


def _stage_starts(metrics: pd.DataFrame) -> list[int]:
    first = metrics.groupby("stage")["step"].min()
    return [int(s) for s in first.iloc[1:]]


def plot_schedule(metrics: pd.DataFrame, sizes: list[int], path: Path) -> Path:
    """Subset size, τ, λ and LR per step of one run (four stacked panels)."""
    fig, axes = plt.subplots(4, 1, figsize=(7, 7), sharex=True)
    step = metrics["step"]
    panels = [
        (metrics["stage"].map(lambda s: sizes[int(s)]), "subset size"),
        (metrics["tau"], "temperature tau"),
        (metrics["kd_ratio"], "KD ratio lambda"),
        (metrics["lr"], "learning rate"),
    ]
    for ax, (values, label) in zip(axes, panels):
        ax.plot(step, values, color="#4c78a8")
        ax.set_ylabel(label)
        for b in _stage_starts(metrics):
            ax.axvline(b, color="grey", lw=0.8, ls=":")
    axes[0].set_title("POCL schedule (dotted lines: stage boundaries)")
    axes[-1].set_xlabel("optimizer step")
    return _save(fig, path)


def plot_loss(runs: Mapping[str, pd.DataFrame], path: Path, window: int = 20) -> Path:
    """Training loss per step (moving average) for each run; POCL stage boundaries dotted."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in runs.items():
        ax.plot(m["step"], m["loss"].rolling(window, min_periods=1).mean(), label=name)
        if m["stage"].nunique() > 1:
            for b in _stage_starts(m):
                ax.axvline(b, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"(1-lambda) CE + lambda KD, {window}-step mean")
    # the curriculum's loss jumps at a boundary by design: harder data, larger tau^2 KD term
    ax.set_title("Training loss (dotted: stage boundaries; tau and lambda rise per stage)")
    ax.legend()
    return _save(fig, path)


def plot_eval(results: pd.DataFrame, path: Path, spread: str = "decoding seeds") -> Path:
    """Bars of mean ± sd per model × eval set for ROUGE-L and exact match.

    `results` has one row per model × set × seed with columns model, set, rougeL, exact_match;
    `spread` names what the seeds are (decoding seeds, or training seeds).
    """
    agg = results.groupby(["set", "model"])[["rougeL", "exact_match"]].agg(["mean", "std"])
    agg = agg.fillna(0.0)
    seeds = results.groupby(["set", "model"]).size().max()
    sets = list(dict.fromkeys(results["set"]))
    models = list(dict.fromkeys(results["model"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    width = 0.8 / len(models)
    for ax, metric, label in zip(axes, ["rougeL", "exact_match"], ["ROUGE-L", "exact match"]):
        for i, model in enumerate(models):
            xs = [j + i * width for j in range(len(sets))]
            means = [agg.loc[(s, model), (metric, "mean")] for s in sets]
            sds = [agg.loc[(s, model), (metric, "std")] for s in sets]
            ax.bar(xs, means, width, yerr=sds if seeds > 1 else None, capsize=3, label=model)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
        ax.set_ylabel(f"{label} (x100)")
        over = f"mean +/- sd, {seeds} {spread}" if seeds > 1 else "one run each"
        caveat = "(one training run per student: not a comparison)"
        ax.set_title(f"{label}, {over}" + (f"\n{caveat}" if spread == "decoding seeds" else ""))
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_comparison(seed_scores: pd.DataFrame, reference: str, path: Path) -> Path:
    """`pocl-ray compare`: per eval set, each method's mean ROUGE-L over training seeds with
    ± sd bars and one dot per seed (the spread a single run hides)."""
    sets = list(dict.fromkeys(seed_scores["set"]))
    methods = list(dict.fromkeys(seed_scores["method"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(3 + 1.2 * len(methods) * len(sets), 3.8),
                             squeeze=False)  # fmt: skip
    for ax, set_name in zip(axes[0], sets):
        rows = seed_scores[seed_scores["set"] == set_name]
        for i, method in enumerate(methods):
            values = rows.loc[rows["method"] == method, "rougeL"].to_numpy()
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            colour = "grey" if method == reference else STAGE_COLOURS[i % len(STAGE_COLOURS)]
            ax.bar(i, values.mean(), yerr=sd, capsize=4, color=colour, alpha=0.6)
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(set_name)
        ax.set_ylabel("ROUGE-L (x100)")
    seeds = seed_scores.groupby("method")["train_seed"].nunique().max()
    fig.suptitle(f"mean ± sd over {seeds} training seed(s); dots: one student each", fontsize=10)
    return _save(fig, path)


def write_index(out_dir: Path, figures: list[tuple[str, Path]], table_html: str) -> Path:
    """index.html with the comparison table and every figure."""
    parts = ["<html><head><meta charset='utf-8'><title>pocl-ray report</title></head><body>"]
    parts.append("<h1>pocl-ray report</h1>")
    if table_html:
        parts.append("<h2>Results</h2>" + table_html)
    for title, fig in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><img src='{fig.name}' style='max-width:100%'>")
    parts.append("</body></html>")
    path = out_dir / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def build_report(
    out_dir: str | Path,
    *,
    scores: pd.DataFrame,
    sizes: list[int],
    runs: Mapping[str, pd.DataFrame],
    results: pd.DataFrame | None,
    schedule_run: str,
    extra: Sequence[tuple[str, Path]] = (),
    spread: str = "decoding seeds",
) -> Path:
    """Write every figure that the inputs allow, and index.html; returns the index path.
    `extra`: figures made already (title, path in out_dir); `spread`: what the rows of one
    model in `results` differ by."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = [("Difficulty by stage", plot_difficulty(scores, out / "difficulty.png"))]
    if "level" in scores and scores["level"].notna().all():
        figs.append(
            ("Measurer agreement with true level", plot_agreement(scores, out / "agreement.png"))
        )
    figs.append(("Schedule", plot_schedule(runs[schedule_run], sizes, out / "schedule.png")))
    figs.append(("Training loss", plot_loss(runs, out / "loss.png")))
    table = ""
    if results is not None:
        figs.append(("Evaluation", plot_eval(results, out / "eval.png", spread)))
        summary = results.groupby(["model", "set"], sort=False)[["rougeL", "exact_match"]]
        table = summary.agg(["mean", "std"]).round(2).to_html()
    return write_index(out, [*extra, *figs], table)


def plot_search(
    table: pd.DataFrame, keys: Sequence[str], metric: str, path: Path, log_keys: Sequence[str] = ()
) -> Path:
    """A Tune search's metric against each searched key, one panel per key (the results
    table of `search.results_table`): filled dots ran their whole plan, hollow ones were
    stopped early (their metric is from fewer samples); the KD reference is a dashed line."""
    ran = table[(table["role"] == "search") & table[metric].notna()]
    ref = table[(table["role"] == "kd_reference") & table[metric].notna()]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 1, 3.6), squeeze=False,
                             sharey=True)  # fmt: skip
    done = (ran["status"] == "done").to_numpy()
    for ax, key in zip(axes[0], keys):
        values = pd.to_numeric(ran[key], errors="coerce")
        if values.isna().any():  # categories (modes, lists): one position each
            labels = ran[key].astype(str)
            names = sorted(labels.unique())
            values = labels.map({name: i for i, name in enumerate(names)})
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.scatter(values[done], ran[metric][done], color="#4c78a8", label="ran its plan")
        ax.scatter(values[~done], ran[metric][~done], facecolors="none", edgecolors="#e45756",
                   label="stopped early")  # fmt: skip
        if not ref.empty:
            ax.axhline(ref[metric].iloc[0], color="grey", ls="--", label="KD reference")
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{metric} by searched value: one run per point, compare at equal budgets")
    return _save(fig, path)


SEARCH_SECTION = ("<!-- tune search -->", "<!-- /tune search -->")


def link_search(run: RunDir) -> Path | None:
    """Add (or refresh) a Tune search's section in the run's report/index.html: its figure
    and links to results.csv and best_config.yaml. None when there is no report or search."""
    index, results = run.report / "index.html", run.root / "tune" / "results.csv"
    if not index.exists() or not results.exists():
        return None
    page, (start, end) = index.read_text(encoding="utf-8"), SEARCH_SECTION
    if start in page:
        page = page[: page.index(start)] + page[page.index(end) + len(end) :]
    section = (
        f"{start}<h2>Tune search</h2><p><a href='../tune/results.csv'>results.csv</a> "
        "(one row per trial), <a href='../tune/best_config.yaml'>best_config.yaml</a></p>"
        f"<img src='../tune/metric_by_param.png' style='max-width:100%'>{end}"
    )
    index.write_text(page.replace("</body>", section + "</body>"), encoding="utf-8")
    return index


RUN_LABELS = {  # the pipeline's runs (jobs/pipeline.py), in report order
    "pocl": "POCL student",
    "kd": "KD student (no curriculum)",
    "sft": "SFT student (no teacher)",
}


def pipeline_report(cfg: Config, run: RunDir, names: Sequence[str]) -> Path:
    """(Re)build `<run>/report/` of a pipeline run: the scores table, the metrics of the
    runs `names` (training seed 0 of each: `<run>/compare/<name>/seed0/metrics.jsonl`), the
    evaluation (`compare/eval/`; `<name>.seed<k>` rows pooled per name, so the table and bars
    are mean ± sd over training seeds) and the comparison figure."""
    table = read_scores(run)
    cur = cfg.curriculum
    sizes = difficulty.stage_sizes(len(table), cur.num_stages, cur.fractions)
    runs = {RUN_LABELS.get(n, n): pd.read_json(run.root / "compare" / n / "seed0" / "metrics.jsonl",
                                               lines=True) for n in names}  # fmt: skip
    results = read_results(run.root, "compare/eval")
    results = results[results["stat"] == "mean"].copy()
    results["model"] = results["model"].str.split(".seed", regex=False).str[0]
    per_seed = pd.read_csv(run.root / "compare" / "seed_scores.csv")
    reference = "kd" if "kd" in names else names[0]
    run.report.mkdir(parents=True, exist_ok=True)
    extra = [("Comparison over training seeds",
              plot_comparison(per_seed, reference, run.report / "comparison.png"))]  # fmt: skip
    index = build_report(run.report, scores=table, sizes=sizes, runs=runs, results=results,
                         schedule_run=RUN_LABELS.get(names[0], names[0]), extra=extra,
                         spread="training seeds")  # fmt: skip
    link_search(run)  # a search in this run directory keeps its section
    return index
