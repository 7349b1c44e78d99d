"""Tuning report: trials table, plots, parameter importance, the two chosen configurations, summary.

Written to ``results/hyperopt/``:

``trials.csv``
    one row per trial (number, state, value, round, batches, n_train, n_params, wall time, epochs,
    validation-loss standard error, RMSE per label, parameters, worker).
``optimization_history.png``, ``intermediate_values.png``, ``parallel_coordinate.png``,
``param_importance.png``
    matplotlib figures (drawn here; optuna's plotting helpers are not used).
``best_params.toml``
    the trial with the lowest validation loss.
``robust_params.toml``
    the one-standard-error rule: among the completed trials whose validation loss lies within one
    standard error (of the best trial's loss, over validation spectra) of the best, the one with the
    fewest parameters. Those trials are statistically indistinguishable on the validation set; the
    smallest is cheaper to train and to ensemble, and less tuned to the particular validation spectra
    and training batches that the best one happened to see.
``summary.txt``, ``summary.json``
    what :func:`tuning_summary` returns, in words and as data.

Both TOML files are configuration overlays for ``specabund train --config``: ``[model]`` holds
:class:`~specabund.models.ModelConfig` fields (always ``name``, plus the tuned ones), ``[training]``
:class:`~specabund.training.TrainConfig` fields and ``[training.augment]``
:class:`~specabund.training.AugmentConfig` fields. The number of epochs is not written: trials train
``epochs_per_trial`` epochs, the final training uses its own ``[training] epochs``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from ..config import dumps
from ..errors import SpecabundError
from ..plotting import save_figure
from ..utils import atomic_write, atomic_write_json, atomic_write_text
from ..workspace import result_folder
from .space import SearchSpace, parse_param

logger = logging.getLogger(__name__)

BEST_FILE = "best_params.toml"
ROBUST_FILE = "robust_params.toml"
TRIALS_FILE = "trials.csv"
SUMMARY_TXT = "summary.txt"
SUMMARY_JSON = "summary.json"
MIN_TRIALS_IMPORTANCE = 4

ROBUST_RULE = (
    "one-standard-error rule: among completed trials whose validation loss is within one standard error "
    "(of the best trial's loss over validation spectra) of the best, the one with the fewest parameters "
    "(ties: lower loss). They are statistically indistinguishable on the validation set; the smallest is "
    "cheaper to train and ensemble and less fitted to the validation spectra and training batches the "
    "best trial happened to see."
)


def _complete(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [
        t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]


def select_best(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The completed trial with the lowest validation loss (``None`` when there is none)."""
    done = _complete(trials)
    return min(done, key=lambda t: (t.value, t.number)) if done else None


def select_robust(trials: Sequence[FrozenTrial]) -> tuple[FrozenTrial | None, float]:
    """The trial the one-standard-error rule picks, and the loss threshold it used.

    Falls back to the best trial when the best has no standard error recorded.
    """
    best = select_best(trials)
    if best is None:
        return None, math.nan
    assert best.value is not None
    se = best.user_attrs.get("val_loss_se")
    if se is None or not math.isfinite(float(se)):
        return best, float(best.value)
    threshold = float(best.value) + float(se)
    cands = [t for t in _complete(trials) if t.value is not None and t.value <= threshold]
    pick = min(cands, key=lambda t: (int(t.user_attrs.get("n_params", 2**62)), t.value, t.number))
    return pick, threshold


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial with its state, value, bookkeeping attributes, RMSE per label and parameters."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "round": ua.get("round"),
            "batches": ";".join(str(b) for b in ua.get("batches", [])),
            "n_train": ua.get("n_train"),
            "n_params": ua.get("n_params"),
            "epochs_run": ua.get("epochs_run", len(t.intermediate_values)),
            "best_epoch": ua.get("best_epoch"),
            "final_val_loss": ua.get("final_val_loss"),
            "val_loss_se": ua.get("val_loss_se"),
            "wall_time_s": ua.get("wall_time_s"),
            "pruned_at_epoch": ua.get("pruned_at_epoch"),
            "diverged": bool(ua.get("diverged", False)),
            "surplus": bool(ua.get("surplus", False)),
            "val_loss_per_epoch": json.dumps(ua.get("val_loss_per_epoch", [])),
        }
        for lab, v in (ua.get("rmse") or {}).items():
            row[f"rmse_{lab}"] = v
        for k, v in t.params.items():
            row[f"param_{k}"] = v
        w = ua.get("worker") or {}
        row["worker"] = f"{w.get('host', '')}:{w.get('pid', '')}" if w else ""
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else ""
        rows.append(row)
    return pd.DataFrame(rows)


def history_figure(study: optuna.Study) -> Figure:
    """Validation loss per trial (completed: dots, pruned: crosses at their last loss) and best so far."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    comp = _complete(trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if comp:
        ax.plot([t.number for t in comp], [t.value for t in comp], "o", color="C0", label="complete")
        best, xs, ys = math.inf, [], []
        for t in comp:
            best = min(best, float(t.value))  # type: ignore[arg-type]
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C3", label="best so far")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.plot([t.number for t in pruned], last, "x", color="0.5", label="pruned (last epoch)")
    if not comp and not pruned:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss (Gaussian NLL)")
    ax.set_title("optimisation history")
    if comp or pruned:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def intermediate_figure(study: optuna.Study) -> Figure:
    """Validation loss per epoch of every trial (pruned ones grey)."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        color = "0.6" if t.state == TrialState.PRUNED else None
        ax.plot(steps, [t.intermediate_values[s] for s in steps], "-", lw=1, color=color, alpha=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss per epoch (grey: pruned)")
    fig.tight_layout()
    return fig


def _axis_values(
    spec_kind: str, log: bool, values: Sequence[Any], choices: Sequence[Any] | None
) -> np.ndarray:
    if spec_kind == "categorical":
        order = list(choices or sorted(set(values), key=repr))
        pos = [order.index(v) if v in order else np.nan for v in values]
        return np.asarray(pos, dtype=float) / max(len(order) - 1, 1)
    x = np.asarray(values, dtype=float)
    if log:
        x = np.log10(x)
    lo, hi = np.nanmin(x), np.nanmax(x)
    return (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)


def parallel_figure(study: optuna.Study, space: SearchSpace | None = None) -> Figure:
    """Parallel coordinates of the completed trials, coloured by validation loss (dark = better)."""
    comp = _complete(study.get_trials(deepcopy=False))
    names = sorted({k for t in comp for k in t.params}) if space is None else space.names
    fig = Figure(figsize=(max(6, 1.4 * len(names) + 2), 4.5))
    ax = fig.add_subplot()
    if len(comp) < 2 or not names:
        ax.text(
            0.5, 0.5, "need at least 2 completed trials", ha="center", va="center", transform=ax.transAxes
        )
        ax.set_axis_off()
        return fig
    values = np.array([t.value for t in comp], dtype=float)
    cols = []
    for name in names:
        vals = [t.params.get(name) for t in comp]
        if space is not None:
            p = space.by_name(name)
            cols.append(_axis_values(p.kind, p.log, vals, p.choices))
        else:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
            cols.append(_axis_values("float" if numeric else "categorical", False, vals, None))
    mat = np.column_stack([*cols, _axis_values("float", False, list(values), None)])
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis_r"]
    norm = mpl.colors.Normalize(vmin=float(values.min()), vmax=float(values.max()))
    for i in np.argsort(-values):
        ax.plot(range(mat.shape[1]), mat[i], color=cmap(norm(values[i])), lw=1.5, alpha=0.85)
    ax.set_xticks(range(mat.shape[1]), [*names, "val loss"], rotation=30, ha="right")
    ax.set_yticks([0, 1], ["low", "high"])
    ax.set_title("parallel coordinates (axes scaled to the sampled range; log ranges in log)")
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="validation loss")
    fig.tight_layout()
    return fig


def param_importance(study: optuna.Study, seed: int = 0) -> tuple[dict[str, float], str]:
    """fANOVA importances of the parameters, or ``({}, reason)`` when they cannot be computed."""
    comp = _complete(study.get_trials(deepcopy=False))
    if len(comp) < MIN_TRIALS_IMPORTANCE:
        return {}, f"needs at least {MIN_TRIALS_IMPORTANCE} completed trials, have {len(comp)}"
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
        )
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return {}, f"not computable ({exc})"
    imp = {k: float(v) for k, v in imp.items() if math.isfinite(float(v))}
    if not imp:
        return {}, "no parameter varied across the completed trials"
    return imp, "fANOVA"


def importance_figure(importance: Mapping[str, float], note: str) -> Figure:
    fig = Figure(figsize=(6, 0.4 * max(len(importance), 3) + 1.2))
    ax = fig.add_subplot()
    if importance:
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names], color="C0")
        ax.set_xlabel("importance (fANOVA, fraction of variance)")
    else:
        ax.text(
            0.5,
            0.5,
            f"parameter importance: {note}",
            ha="center",
            va="center",
            wrap=True,
            transform=ax.transAxes,
        )
        ax.set_axis_off()
    ax.set_title("hyperparameter importance")
    fig.tight_layout()
    return fig


def _space_of(study: optuna.Study) -> SearchSpace | None:
    raw = study.user_attrs.get("space")
    if not isinstance(raw, dict):
        return None
    params = []
    for name, d in raw.items():
        spec = {k: d[k] for k in ("low", "high", "log", "step", "choices") if k in d}
        if d.get("target", "").startswith(("model.", "training.", "augment.")):
            spec["target"] = d["target"]
        params.append(parse_param(name, spec))
    ratios = study.user_attrs.get("group_ratios") or [1.0, 2.0, 3.0]
    return SearchSpace(params=tuple(params), group_ratios=tuple(float(r) for r in ratios))


def _overlay_text(trial: FrozenTrial, space: SearchSpace, model_name: str, header: Sequence[str]) -> str:
    overlay = space.overlay(trial.params, model_name)
    lines = [f"# {h}" if h else "#" for h in header]
    return "\n".join(lines) + "\n" + dumps(overlay)


def write_params_files(
    study: optuna.Study, space: SearchSpace, output_dir: str | Path, model_name: str
) -> dict[str, Path]:
    """Write ``best_params.toml`` and ``robust_params.toml`` (nothing when no trial completed)."""
    output_dir = Path(output_dir)
    trials = study.get_trials(deepcopy=False)
    best = select_best(trials)
    if best is None:
        return {}
    robust, threshold = select_robust(trials)
    assert robust is not None
    common = [
        "Overlay for `specabund train --config <this file>`: [model] = ModelConfig fields, [training] =",
        "TrainConfig fields, [training.augment] = AugmentConfig fields. Epochs are not set: trials trained",
        f"{study.user_attrs.get('epochs_per_trial', '?')} epochs on round batches; the final training uses "
        "[training] epochs.",
    ]
    out = {}
    best_header = [
        f"specabund tune: study {study.study_name!r}, best trial {best.number} (lowest validation loss)",
        f"validation loss {best.value:.5g} +- {best.user_attrs.get('val_loss_se') or float('nan'):.3g} (SE), "
        f"{best.user_attrs.get('n_params')} parameters, round {best.user_attrs.get('round')}",
        *common,
    ]
    out["best"] = output_dir / BEST_FILE
    atomic_write_text(out["best"], _overlay_text(best, space, model_name, best_header))
    robust_header = [
        f"specabund tune: study {study.study_name!r}, robust choice trial {robust.number}",
        f"validation loss {robust.value:.5g} (threshold {threshold:.5g}), "
        f"{robust.user_attrs.get('n_params')} parameters (best trial: {best.user_attrs.get('n_params')})",
        *_wrap("Rule: " + ROBUST_RULE, 100),
        *common,
    ]
    out["robust"] = output_dir / ROBUST_FILE
    atomic_write_text(out["robust"], _overlay_text(robust, space, model_name, robust_header))
    return out


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return lines


def _trial_info(t: FrozenTrial | None) -> dict[str, Any] | None:
    if t is None:
        return None
    ua = t.user_attrs
    return {
        "number": t.number,
        "value": t.value,
        "val_loss_se": ua.get("val_loss_se"),
        "n_params": ua.get("n_params"),
        "round": ua.get("round"),
        "rmse": ua.get("rmse"),
        "params": dict(t.params),
    }


def write_report(
    study: optuna.Study,
    output_dir: str | Path,
    *,
    space: SearchSpace | None = None,
    model_name: str | None = None,
    storage: str = "",
    seed: int = 0,
) -> dict[str, Any]:
    """Write the whole report of ``study`` into ``output_dir`` and return the summary dictionary.

    Parameters
    ----------
    study : optuna.Study
        The study (loaded from its storage).
    output_dir : path
        ``results/hyperopt``.
    space : SearchSpace, optional
        The search space (default: the one stored in the study's user attributes).
    model_name : str, optional
        ``[model] name`` written into the overlays (default: the study's ``model_name`` attribute).
    storage : str
        Description of the storage, for the summary.
    seed : int
        Seed of the fANOVA forest.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    space = space or _space_of(study)
    if space is None:
        raise SpecabundError(f"study {study.study_name!r} has no search space recorded; pass space=")
    model_name = model_name or str(study.user_attrs.get("model_name", "rescnn"))
    df = trials_frame(study)
    with atomic_write(output_dir / TRIALS_FILE, "w", encoding="utf-8", newline="") as fh:
        df.to_csv(fh, index=False)
    files: dict[str, str] = {"trials": TRIALS_FILE}
    for key, fname, fig in (
        ("history", "optimization_history.png", history_figure(study)),
        ("intermediate", "intermediate_values.png", intermediate_figure(study)),
        ("parallel", "parallel_coordinate.png", parallel_figure(study, space)),
    ):
        save_figure(fig, output_dir / fname)
        files[key] = fname
    importance, imp_note = param_importance(study, seed=seed)
    save_figure(importance_figure(importance, imp_note), output_dir / "param_importance.png")
    files["importance"] = "param_importance.png"
    for p in write_params_files(study, space, output_dir, model_name).values():
        files[p.stem] = p.name
    files["summary"] = SUMMARY_TXT
    trials = study.get_trials(deepcopy=False)
    best = select_best(trials)
    robust, threshold = select_robust(trials)
    states = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
    summary: dict[str, Any] = {
        "study_name": study.study_name,
        "storage": storage,
        "labels": study.user_attrs.get("labels"),
        "n_trials_requested": study.user_attrs.get("n_trials"),
        "n_complete": states["COMPLETE"],
        "n_pruned": states["PRUNED"],
        "n_fail": states["FAIL"],
        "n_running": states["RUNNING"],
        "n_surplus": int(sum(1 for t in trials if t.user_attrs.get("surplus"))),
        "best": _trial_info(best),
        "robust": _trial_info(robust),
        "robust_rule": ROBUST_RULE,
        "robust_threshold": threshold,
        "importance": importance,
        "importance_note": imp_note,
        "total_wall_time_s": float(np.nansum([float(t.user_attrs.get("wall_time_s") or 0) for t in trials])),
        "files": sorted(files.values()),
    }
    atomic_write_json(output_dir / SUMMARY_JSON, summary)
    atomic_write_text(output_dir / SUMMARY_TXT, summary_text(summary))
    return summary


def summary_text(summary: Mapping[str, Any]) -> str:
    """Human-readable form of a tuning summary."""
    lines = [
        f"study {summary['study_name']!r} ({summary.get('storage') or 'storage not recorded'})",
        f"labels: {', '.join(summary.get('labels') or [])}",
        f"trials: {summary['n_complete']} complete, {summary['n_pruned']} pruned, {summary['n_fail']} failed "
        f"({summary.get('n_surplus', 0)} surplus), {summary['n_running']} running; "
        f"requested {summary.get('n_trials_requested')}",
        f"training time of all trials: {summary.get('total_wall_time_s', 0.0):.1f} s",
    ]
    for key, title in (("best", "best (lowest validation loss)"), ("robust", "robust (one-SE rule)")):
        info = summary.get(key)
        if not info:
            lines.append(f"{title}: no completed trial")
            continue
        se = info.get("val_loss_se")
        se_txt = f" +- {se:.3g}" if isinstance(se, (int, float)) else ""
        lines.append(
            f"{title}: trial {info['number']}, val loss {info['value']:.5g}{se_txt}, "
            f"{info.get('n_params')} parameters"
        )
        for k, v in info["params"].items():
            lines.append(f"    {k} = {v:.4g}" if isinstance(v, float) else f"    {k} = {v}")
        if info.get("rmse"):
            rmse = ", ".join(f"{lab} {v:.4f}" for lab, v in info["rmse"].items() if v is not None)
            lines.append(f"    RMSE: {rmse}")
    lines.append(f"robust rule: {summary.get('robust_rule', ROBUST_RULE)}")
    imp = summary.get("importance") or {}
    if imp:
        lines.append("parameter importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    else:
        lines.append(f"parameter importance: {summary.get('importance_note', 'not computed')}")
    lines.append("files: " + ", ".join(summary.get("files") or []))
    return "\n".join(lines) + "\n"


def tuning_summary(results_dir: str | Path) -> dict[str, Any]:
    """The summary of the last tuning report, for ``specabund show-results --result-type tuning``.

    Parameters
    ----------
    results_dir : path
        The results folder (holding ``hyperopt/``) or the ``hyperopt`` folder itself.

    Returns
    -------
    dict
        ``study_name``, ``storage``, ``labels``, trial counts (``n_complete``, ``n_pruned``, ``n_fail``,
        ``n_running``, ``n_surplus``, ``n_trials_requested``), ``best`` and ``robust`` (``number``,
        ``value``, ``val_loss_se``, ``n_params``, ``round``, ``rmse``, ``params``), ``robust_rule``,
        ``importance``, ``files`` (file names in the folder), plus ``folder`` and ``text`` (the
        content of ``summary.txt``) and ``trials`` (the trials table as a list of records).

    Raises
    ------
    SpecabundError
        When no tuning report exists there.
    """
    folder = Path(results_dir)
    if not (folder / SUMMARY_JSON).exists() and (result_folder(folder, "tuning") / SUMMARY_JSON).exists():
        folder = result_folder(folder, "tuning")
    path = folder / SUMMARY_JSON
    if not path.exists():
        raise SpecabundError(
            f"{folder}: no tuning results ({SUMMARY_JSON} missing); run `specabund tune` first"
        )
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary["folder"] = str(folder)
    txt = folder / SUMMARY_TXT
    summary["text"] = txt.read_text(encoding="utf-8") if txt.exists() else summary_text(summary)
    trials_csv = folder / TRIALS_FILE
    summary["trials"] = pd.read_csv(trials_csv).to_dict("records") if trials_csv.exists() else []
    return summary
