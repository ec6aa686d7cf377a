"""``results.md``: the bench table, and each stock mix against ggufmix at its size (pure: dict in, text out)."""
from __future__ import annotations

from typing import Any

_HEADER = "| file | imatrix | target | bpw | MB | mean KLD | p99 KLD | PPL | top-1 | build s |"


def _row(r: dict[str, Any]) -> str:
    build = "-" if r["build_s"] is None else f"{r['build_s']:.1f}"
    return (f"| {r['file']} | {r['imatrix']} | {r['target']} | {r['bpw']:.3f} | {r['file_bytes'] / 1e6:.2f} | "
            f"{r['kld']:.4f} ± {r['kld_stderr']:.4f} | {r['kld_p99']:.3f} | {r['ppl']:.3f} | "
            f"{100 * r['top1']:.2f}% | {build} |")


def versus_stock(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every stock row, each strategy's file built at that stock file's size: KLD ratio to stock."""
    out = []
    for s in (r for r in rows if r["kind"] == "stock"):
        for r in rows:
            if r["kind"] != "stock" and r["imatrix"] == s["imatrix"] and r["target"] == s["target"]:
                out.append({"mix": s["target"], "imatrix": s["imatrix"], "strategy": r["kind"],
                            "stock_kld": s["kld"], "kld": r["kld"], "ratio": r["kld"] / s["kld"] if s["kld"] else None,
                            "stock_bytes": s["tensor_bytes"], "bytes": r["tensor_bytes"]})
    return out


def by_strategy(rows: list[dict[str, Any]], mode: str) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Mean KLD of every ggufmix strategy (rows) at every target (columns, smallest first) for one imatrix
    mode: the table that says which strategy buys most at each size."""
    ours = [r for r in rows if r["kind"] != "stock" and r["imatrix"] == mode]
    size: dict[str, int] = {}
    for r in ours:
        size[r["target"]] = max(size.get(r["target"], 0), r["tensor_bytes"])
    targets = sorted(size, key=lambda t: (size[t], t))
    table: dict[str, dict[str, float]] = {}
    for r in ours:
        table.setdefault(r["kind"], {})[r["target"]] = r["kld"]
    return targets, table


def _pivot(rows: list[dict[str, Any]], mode: str) -> list[str]:
    targets, table = by_strategy(rows, mode)
    stock = {r["target"]: r["kld"] for r in rows if r["kind"] == "stock" and r["imatrix"] == mode}
    best = {t: min((v[t] for v in table.values() if t in v), default=None) for t in targets}
    head = [t if t not in stock else f"= {t} (stock {stock[t]:.4f})" for t in targets]

    def cell(v: dict[str, float], t: str) -> str:
        if t not in v:
            return "-"
        return f"**{v[t]:.4f}**" if v[t] == best[t] else f"{v[t]:.4f}"

    order = sorted(table, key=lambda k: [table[k].get(t, float("inf")) for t in reversed(targets)])
    return [f"| strategy | {' | '.join(head)} |", "|---" * (len(targets) + 1) + "|",
            *(f"| `{k}` | {' | '.join(cell(table[k], t) for t in targets)} |" for k in order)]


def markdown(results: dict[str, Any]) -> str:
    """The bench as Markdown: settings, all files, then ggufmix against each stock mix at equal size."""
    ev = results["eval"]
    rows = sorted(results["rows"], key=lambda r: (r["imatrix"], r["tensor_bytes"], r["kind"]))
    lines = [f"# {results['model']}", "",
             f"Source PPL {results['base_ppl']:.3f}; {ev['n_chunks']} chunks x {ev['ctx']} tokens of "
             f"{results['config']['text']}; KLD {ev['kld_mode']}; llama-cpp-python {ev['llama_cpp_python']}.", "",
             _HEADER, "|" + "---|" * 10, *(_row(r) for r in rows), ""]
    for mode in sorted({r["imatrix"] for r in rows if r["kind"] != "stock"}):
        lines += [f"## Mean KLD by strategy (imatrix: {mode})", "", *_pivot(rows, mode), ""]
    if results.get("score_s"):
        lines += ["## Scoring wall time", "", "| scores | seconds |", "|---|---|",
                  *(f"| {k} | {'-' if v is None else f'{v:.0f}'} |" for k, v in results["score_s"].items()), ""]
    vs = versus_stock(results["rows"])
    if vs:
        lines += ["## At each stock mix's size", "",
                  "| stock mix | imatrix | strategy | stock KLD | ggufmix KLD | ratio | bytes (ggufmix / stock) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {v['mix']} | {v['imatrix']} | {v['strategy']} | {v['stock_kld']:.4f} | {v['kld']:.4f} | "
                  f"{v['ratio']:.3f} | {v['bytes']} / {v['stock_bytes']} |" for v in vs]
    return "\n".join(lines) + "\n"
