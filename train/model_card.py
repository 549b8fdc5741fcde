"""The model card of a site-trained classifier (``classifier.md`` beside the weights), rendered from the run's
result: what it was trained on, the protocol, the cross-validation and hold-out metrics, the gate, the notice.

Everything comes from ``result.json``'s content, so the card and the registry cannot disagree; it names images
only by count (no patient keys, no instance ids, no paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .report import _fmt, results_table


def _counts_rows(counts: Mapping[str, Any]) -> list[str]:
    def cats(c: Mapping[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in c.items()) or "none"

    def dates(d: Mapping[str, Any]) -> str:
        return f"{d['first']} to {d['last']}" if d.get("first") else "not recorded"

    lines = ["| | training | hold-out |", "|---|---|---|"]
    t, h = counts["training"], counts["holdout"]
    for label, fn in (("images used", lambda c: str(c["images"])), ("patients", lambda c: str(c["patients"])),
                      ("pneumoconiosis present / absent", lambda c: f"{c['present']} / {c['absent']}"),
                      ("ILO major category", lambda c: cats(c["category"])),
                      ("label sources", lambda c: cats(c["label_sources"])),
                      ("read dates", lambda c: dates(c["read_dates"])),
                      ("excluded (unreadable or refused by the input check)", lambda c: cats(c["excluded"]))):
        lines.append(f"| {label} | {fn(t)} | {fn(h)} |")
    return lines


def _holdout_rows(holdout: Mapping[str, Any]) -> list[str]:
    lines = ["| model | threshold | AUC (95 % CI) | sensitivity | specificity | accuracy | QWK | ECE |",
             "|---|---|---|---|---|---|---|---|"]
    for role in ("candidate", "champion"):
        m = holdout.get(role)
        if not m:
            continue
        lo, hi = m.get("auc_ci") or (None, None)
        ci = f" ({_fmt(lo)}–{_fmt(hi)})" if lo is not None and hi is not None else ""
        lines.append(f"| {role} {m.get('model', '')} | {_fmt(m.get('threshold'))} | {_fmt(m.get('auc'))}{ci} | "
                     f"{_fmt(m.get('sensitivity'))} | {_fmt(m.get('specificity'))} | {_fmt(m.get('accuracy'))} | "
                     f"{_fmt(m.get('qwk'))} | {_fmt(m.get('ece'))} |")
    return lines


def render(result: Mapping[str, Any]) -> str:
    """Markdown of the card."""
    s, gate = result["settings"], result["gate"]
    protocol = result["protocol"]
    md = [f"# {result['name']} {result['version']}: trained at site {result['site']} (run {result['run_id']})", "",
          f"> {result['notice']}", "",
          "| | |", "| --- | --- |",
          f"| file | `{result['model_file']}`, half-precision weights, sha256 `{result['sha256']}` |",
          "| architecture | ResNet-34, one-channel input, heads: pneumoconiosis present and ILO major category 0-3 |",
          f"| initialisation | {protocol['initialisation']} |",
          f"| input | lung crop by the node's lung U-Net (5 % margin), letterboxed to {s['size']} x {s['size']} |",
          f"| decision threshold | {_fmt(result['threshold'])} ({s['threshold_rule']} on the pooled out-of-fold "
          f"predictions) |", "",
          "## What it was trained on", "",
          f"Labels: {result['labels_note'] or 'not described'}.", "",
          *_counts_rows(result["counts"]), "",
          "## Protocol", "",
          f"{s['folds']}-fold cross-validation, stratified by label and category and grouped by patient (no patient "
          f"in two folds; hold-out patients in none); ResNet-34, focal loss, Adam lr {s['lr']:g}, batch "
          f"{s['batch_size']}, up to {s['epochs']} epochs with early stopping (patience {s['patience']}) on the "
          f"validation AUC; brightness augmentation after the split, on training folds only; the final model on "
          f"all training images for {protocol['final_epochs']} epoch(s) (the folds' median best epoch); seed "
          f"{s['seed']}, device {protocol['device']}.", "",
          "## Cross-validation (out-of-fold; per fold at 0.5, pooled at the threshold)", "",
          results_table(result["per_fold"], result["pooled"]), "",
          "## Frozen hold-out (never trained on), through the node's inference path", ""]
    holdout = result["holdout"]
    if holdout.get("candidate"):
        md += _holdout_rows(holdout) + [""]
    md += [f"{holdout['n']} hold-out image(s) classified, {holdout['excluded']} excluded.", "",
           "## Promotion gate", "",
           f"**{'passed' if gate['passed'] else 'refused'}** (alpha {gate['alpha']:g}, floors: sensitivity "
           f"{gate['min_sensitivity']:g}, specificity {gate['min_specificity']:g}).", ""]
    if gate.get("auc_difference") is not None:
        lo, hi = gate["auc_difference_ci"]
        md += [f"AUC difference candidate - champion {gate['auc_difference']:+.3f} (95 % CI {lo:+.3f} to {hi:+.3f}), "
               f"paired DeLong p = {gate['p_value']:.3g} (two-sided), {gate['p_worse']:.3g} (candidate worse).", ""]
    md += [f"- {reason}" for reason in gate["reasons"]] + ([""] if gate["reasons"] else [])
    md += ["## Figures", ""] + [f"![{name}]({name})" for name in result["figures"]] + [""]
    return "\n".join(md)
