"""Writes an evaluation's results: ``results.json``, ``report.md``, ``report.html`` and bar plots in ``plots/``.

The per-question section puts each mode's answer next to the others with its citations and the gold
answer; ``blind`` shuffles and unlabels them per question and saves the key to ``blind_key.json``.
"""

import html
import json
import random
import string
from pathlib import Path

from core.atomic import atomic_writer
from evaluation.runner import ANSWER_METRICS, CITATION_METRICS

RESULTS_FILE, MARKDOWN_FILE, HTML_FILE, KEY_FILE, PLOTS_DIR = (
    "results.json", "report.md", "report.html", "blind_key.json", "plots")
ANSWER_COLUMNS = (*ANSWER_METRICS, "conflicting", "abstention_accuracy", "false_abstention", *CITATION_METRICS, "error", "timeout",
                  "seconds")


def write_report(results: dict, out_dir: str | Path, *, blind: bool = False, seed: int = 0) -> dict[str, Path]:
    """Write every output file into ``out_dir`` (created); returns name -> path of what was written."""
    out = Path(out_dir)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    written = {"json": _write(out / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False) + "\n")}
    written |= {f"plot:{name}": path for name, path in write_plots(results, out / PLOTS_DIR).items()}
    columns = _side_by_side(results, blind=blind, seed=seed)
    if blind:
        key = {row["id"]: {label: mode for label, mode, _ in row["columns"]} for row in columns}
        written["key"] = _write(out / KEY_FILE, json.dumps(key, indent=2) + "\n")
    plots = [path.relative_to(out).as_posix() for name, path in written.items() if name.startswith("plot:")]
    written["markdown"] = _write(out / MARKDOWN_FILE, render_markdown(results, columns, plots, blind=blind))
    written["html"] = _write(out / HTML_FILE, render_html(results, columns, plots, blind=blind))
    return written


# ---- tables -----------------------------------------------------------------------------------

def summary_tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every summary: retrieval, answers, general set, perplexity."""
    tables = []
    retrieval = results.get("retrieval")
    if retrieval:
        summary = retrieval["summary"]
        metrics = list(next(iter(summary.values()), {}))
        tables.append((f"Retrieval ({retrieval['questions']} questions with gold sources)", ["mode", *metrics],
                       [[mode, *(_fmt(values.get(m)) for m in metrics)] for mode, values in summary.items()]))
    answers = results.get("answers")
    if answers:
        tables.append(("Answers", ["mode", *ANSWER_COLUMNS, "answers"],
                       [[mode, *(_fmt(s.get(m)) for m in ANSWER_COLUMNS), str(s.get("answers", 0))]
                        for mode, s in answers["summary"].items()]))
    for kind, modes in (answers or {}).get("by_type", {}).items():
        tables.append((f"Answers, type {kind!r}", ["mode", *ANSWER_COLUMNS, "answers"],
                       [[mode, *(_fmt(s.get(m)) for m in ANSWER_COLUMNS), str(s.get("answers", 0))]
                        for mode, s in modes.items()]))
    general = results.get("general")
    if general:
        rows = [[mode, *(_fmt(s.get(m)) for m in ANSWER_METRICS)] for mode, s in general["summary"].items()]
        if general.get("drop"):
            rows.append(["drop (base - adapter)", *(_fmt(general["drop"].get(m)) for m in ANSWER_METRICS)])
        tables.append((f"General ability ({general.get('set', '')})", ["mode", *ANSWER_METRICS], rows))
    perplexity = results.get("perplexity")
    if perplexity:
        tables.append((f"Perplexity ({perplexity['examples']} held-out examples, {perplexity['tokens']} answer tokens)",
                       ["model", "perplexity"],
                       [["base", _fmt(perplexity["base"])], ["adapter", _fmt(perplexity.get("adapter"))]]))
    return tables


def _side_by_side(results: dict, *, blind: bool, seed: int) -> list[dict]:
    """Per question: id, question, gold, and columns [(label, mode, answer)] in display order."""
    answers = results.get("answers")
    if not answers:
        return []
    rng = random.Random(seed)
    rows = []
    for entry in answers["per_question"]:
        modes = list(entry["answers"])
        if blind:
            rng.shuffle(modes)
            labels = [f"Answer {string.ascii_uppercase[i]}" for i in range(len(modes))]
        else:
            labels = modes
        rows.append({"id": entry["id"], "question": entry["question"], "gold": entry["gold"],
                     "unanswerable": entry["unanswerable"], "sources": entry["sources"],
                     "columns": [(label, mode, entry["answers"][mode]) for label, mode in zip(labels, modes)]})
    return rows


# ---- Markdown ---------------------------------------------------------------------------------

def render_markdown(results: dict, columns: list[dict], plots: list[str], *, blind: bool) -> str:
    lines = [f"# lorag evaluation: {results['question_set']['name']}", "", _header_line(results), ""]
    for title, header, rows in summary_tables(results):
        lines += [f"## {title}", "", _md_row(header), _md_row(["---"] * len(header))]
        lines += [_md_row(row) for row in rows] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    if columns:
        lines += ["## Answers side by side" + (" (blind: labels are shuffled per question)" if blind else ""), ""]
    for row in columns:
        gold = "(unanswerable: the documents do not contain it)" if row["unanswerable"] else row["gold"]
        lines += [f"### {row['id']}: {row['question']}", "", f"**Gold:** {gold}", ""]
        lines += [_md_row(["", *(label for label, _, _ in row["columns"])]), _md_row(["---"] * (len(row["columns"]) + 1))]
        lines.append(_md_row(["answer", *(_answer_text(a) for _, _, a in row["columns"])]))
        lines.append(_md_row(["citations", *(_citations_text(a) for _, _, a in row["columns"])]))
        if not blind:
            lines.append(_md_row(["F1 / cited ok", *(_score_text(a) for _, _, a in row["columns"])]))
        lines.append("")
    return "\n".join(lines) + "\n"


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


# ---- HTML -------------------------------------------------------------------------------------

_STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:110rem}table{border-collapse:collapse;margin:1rem 0}
td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}td:first-child,th:first-child{text-align:left}
.q{border-top:2px solid #888;margin-top:2rem}.grid{display:grid;gap:1rem;grid-template-columns:repeat(var(--n),1fr)}
.card{border:1px solid #ccc;border-radius:.4rem;padding:.6rem;white-space:pre-wrap}.gold{background:#eef7ee;padding:.4rem}
.cite{font-size:.85em;color:#444}img{max-width:48rem;display:block}"""


def render_html(results: dict, columns: list[dict], plots: list[str], *, blind: bool) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lorag evaluation: {e(results['question_set']['name'])}"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>lorag evaluation: {e(results['question_set']['name'])}</h1><p>{e(_header_line(results))}</p>"]
    for title, header, rows in summary_tables(results):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    if plots:
        parts.append("<h2>Plots</h2>" + "".join(f"<img src='{e(p)}' alt='{e(Path(p).stem)}'>" for p in plots))
    if columns:
        parts.append("<h2>Answers side by side" + (" (blind)" if blind else "") + "</h2>")
    for row in columns:
        gold = "(unanswerable: the documents do not contain it)" if row["unanswerable"] else row["gold"]
        parts.append(f"<div class='q'><h3>{e(row['id'])}: {e(row['question'])}</h3><div class='gold'><b>Gold:</b> {e(gold)}</div>"
                     f"<div class='grid' style='--n:{len(row['columns'])}'>")
        for label, _, answer in row["columns"]:
            score = "" if blind else f"<div class='cite'>{e(_score_text(answer))}</div>"
            parts.append(f"<div class='card'><b>{e(label)}</b>\n{e(_answer_text(answer))}"
                         f"<div class='cite'>{e(_citations_text(answer))}</div>{score}</div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---- plots ------------------------------------------------------------------------------------

def write_plots(results: dict, directory: Path) -> dict[str, Path]:
    """One grouped bar chart per summary table: metrics on the x axis, one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    from matplotlib import pyplot as plt

    charts = {}
    if results.get("retrieval"):
        charts["retrieval"] = ("Retrieval", results["retrieval"]["summary"], None)
    if results.get("answers"):
        charts["answers"] = ("Answers", results["answers"]["summary"], (*ANSWER_METRICS, "abstention_accuracy", "false_abstention"))
        charts["citations"] = ("Citations", results["answers"]["summary"], CITATION_METRICS)
    if results.get("general"):
        charts["general"] = ("General ability", results["general"]["summary"], ANSWER_METRICS)
    if results.get("perplexity"):
        p = results["perplexity"]
        charts["perplexity"] = ("Perplexity (lower is better)", {"base": {"perplexity": p["base"]},
                                                                  "adapter": {"perplexity": p.get("adapter")}}, None)
    written = {}
    for name, (title, summary, metrics) in charts.items():
        metrics = list(metrics or next(iter(summary.values()), {}))
        modes = list(summary)
        figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(1, len(modes)) / 2), 4), dpi=100)
        try:
            width = 0.8 / max(len(modes), 1)
            for i, mode in enumerate(modes):
                values = [summary[mode].get(m) or 0.0 for m in metrics]
                axes.bar([x + i * width for x in range(len(metrics))], values, width, label=mode)
            axes.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(metrics))], metrics, rotation=20, ha="right")
            axes.set_title(title)
            axes.grid(axis="y", alpha=0.3)
            axes.legend()
            figure.tight_layout()
            path = directory / f"{name}.png"
            with atomic_writer(path) as tmp:
                figure.savefig(tmp, format="png")
        finally:
            plt.close(figure)
        written[name] = path
    return written


# ---- text pieces and files --------------------------------------------------------------------

def _header_line(results: dict) -> str:
    q = results["question_set"]
    parts = [f"{q['questions']} questions ({q['unanswerable']} unanswerable, format {q['format']})",
             results["backend"], f"generator {results.get('generator') or '-'}", results["created_at"]]
    if results["options"].get("adapter"):
        parts.insert(2, f"adapter {results['options']['adapter']}")
    if q["bad_records"]:
        parts.append(f"{len(q['bad_records'])} bad records skipped")
    return "; ".join(parts)


def _answer_text(answer: dict) -> str:
    return f"(error: {answer['error']})" if answer.get("error") else (answer["text"] or "(empty)")


def _citations_text(answer: dict) -> str:
    cited = answer.get("citations") or []
    return "; ".join(f"[{c['number']}] {Path(c['source']).name} p{c['page']}" for c in cited) or "no citations"


def _score_text(answer: dict) -> str:
    s = answer["scores"]
    return f"F1 {_fmt(s.get('f1'))}, citation precision {_fmt(s.get('citation_precision'))}"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _write(path: Path, text: str) -> Path:
    with atomic_writer(path) as file:
        file.write(text.encode("utf-8"))
    return path
