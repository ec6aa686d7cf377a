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


def markdown(results: dict[str, Any]) -> str:
    """The bench as Markdown: settings, all files, then ggufmix against each stock mix at equal size."""
    ev = results["eval"]
    rows = sorted(results["rows"], key=lambda r: (r["imatrix"], r["tensor_bytes"], r["kind"]))
    lines = [f"# {results['model']}", "",
             f"Source PPL {results['base_ppl']:.3f}; {ev['n_chunks']} chunks x {ev['ctx']} tokens of "
             f"{results['config']['text']}; KLD {ev['kld_mode']}; llama-cpp-python {ev['llama_cpp_python']}.", "",
             _HEADER, "|" + "---|" * 10, *(_row(r) for r in rows), ""]
    vs = versus_stock(results["rows"])
    if vs:
        lines += ["## At each stock mix's size", "",
                  "| stock mix | imatrix | strategy | stock KLD | ggufmix KLD | ratio | bytes (ggufmix / stock) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {v['mix']} | {v['imatrix']} | {v['strategy']} | {v['stock_kld']:.4f} | {v['kld']:.4f} | "
                  f"{v['ratio']:.3f} | {v['bytes']} / {v['stock_bytes']} |" for v in vs]
    return "\n".join(lines) + "\n"
