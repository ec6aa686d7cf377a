#!/usr/bin/env python3
"""Read which weight types each ggml backend multiplies (MUL_MAT) and gathers (GET_ROWS) off the pinned
llama.cpp sources, into ggufmix/data/backends.json (the ``--palette cuda|metal|vulkan|adreno|cpu-arm`` data).

Usage: python scripts/gen_backends.py SDIST_DIR [-o ggufmix/data/backends.json]

SDIST_DIR is llama-cpp-python's unpacked source package (``pip download --no-deps --no-binary :all:
llama-cpp-python==0.3.36``), or its ``vendor/llama.cpp``. Each backend's ``supports_op`` is written in one
of three styles, and each gets its own small reader:

- a ``switch`` on ``op->src[0]->type`` (CUDA ``ggml_backend_cuda_device_supports_op``, Vulkan
  ``ggml_backend_vk_device_supports_op``): labels followed by ``return true`` / ``break`` are supported, by
  ``return <condition>`` conditional, ``default`` refuses;
- an ``if`` chain on ``op->src[0]->type == T`` (OpenCL ``ggml_opencl_supports_op``, Adreno's backend);
- exclusions (``!= T``) in Metal's ``ggml_metal_device_supports_op``, where the kernels present in the
  ``.metal`` sources (``kernel_mul_mv_<t>_f32``, ``kernel_get_rows_<t>``) say the rest.

The CPU has every type; ``cpu-arm`` records which types the ARM CPU repacks into interleaved layouts
(``ggml-cpu/repack.cpp`` ``ggml_repack_get_optimal_repack_type``), the facts ``--fit`` meets through
llama.cpp's measured buffers.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TYPE = re.compile(r"GGML_TYPE_(\w+)")


def root_of(sdist: Path) -> Path:
    for cand in (sdist / "vendor" / "llama.cpp", sdist):
        if (cand / "ggml" / "src").is_dir():
            return cand
    raise SystemExit(f"{sdist}: no ggml/src inside (give the unpacked llama-cpp-python sdist)")


def function_body(text: str, signature: str) -> str:
    """The source of the function whose definition starts with ``signature`` (brace matched)."""
    start = text.index(signature)
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
    raise ValueError(f"unbalanced braces after {signature}")


def op_region(body: str, op: str) -> str:
    """From ``case GGML_OP_<op>:`` to the next ``case GGML_OP_`` that is not part of the same label group."""
    m = re.search(rf"case GGML_OP_{op}:", body)
    if m is None:
        raise ValueError(f"no case GGML_OP_{op}")
    rest = body[m.end():]
    nxt = re.search(r"\n\s*case GGML_OP_(?!" + op + r"_ID\b)\w+:", rest)
    return rest[:nxt.start()] if nxt else rest


def switch_types(region: str) -> dict[str, str]:
    """Label groups of the first ``switch (...type)``: type -> "yes" or the condition of its return."""
    sw = re.search(r"switch\s*\(\s*(?:op->src\[0\]->type|src0_type|a->type)\s*\)\s*\{", region)
    if sw is None:
        raise ValueError("no switch on the weight type")
    out, pending = {}, []
    for line in region[sw.end():].splitlines():
        s = line.strip()
        if s.startswith("default:") or s.startswith("}"):
            break
        labels = TYPE.findall(s) if s.startswith("case ") else []
        pending += labels
        stmt = s.split(":", 1)[1].strip() if labels and ":" in s else ("" if labels else s)
        if not stmt or not pending or stmt.startswith("//") or stmt.startswith("#"):
            continue
        verdict = "yes" if stmt in ("return true;", "break;") else stmt.removeprefix("return ").rstrip(";")
        out.update(dict.fromkeys(pending, verdict))
        pending = []
    return out


def if_chain_types(region: str) -> dict[str, str]:
    """Types named as ``op->src[0]->type == GGML_TYPE_X`` in an if/else-if chain: all are conditional on src1."""
    found = re.findall(r"op->src\[0\]->type\s*==\s*GGML_TYPE_(\w+)", region)
    return {t: "yes, with conditions (see source)" for t in dict.fromkeys(found)}


def cuda_like(root: Path, rel: str, signature: str) -> dict[str, dict[str, str]]:
    body = function_body((root / rel).read_text(), signature)
    return {"mul_mat": switch_types(op_region(body, "MUL_MAT")), "get_rows": switch_types(op_region(body, "GET_ROWS"))}


def opencl(root: Path) -> dict[str, dict[str, str]]:
    body = function_body((root / "ggml/src/ggml-opencl/ggml-opencl.cpp").read_text(),
                         "static bool ggml_opencl_supports_op")
    return {"mul_mat": if_chain_types(op_region(body, "MUL_MAT")), "get_rows": switch_types(op_region(body, "GET_ROWS"))}


def metal(root: Path) -> dict[str, dict[str, str]]:
    folder = root / "ggml/src/ggml-metal"
    src = "\n".join(p.read_text() for p in sorted(folder.rglob("*.metal")))
    body = function_body((folder / "ggml-metal-device.m").read_text(), "bool ggml_metal_device_supports_op")
    helper = function_body((folder / "ggml-metal-device.m").read_text(), "static bool ggml_metal_supports_mul_mat_op")
    refused = set(re.findall(r"op->src\[0\]->type\s*==\s*GGML_TYPE_(\w+)", helper.split("return false")[0]))
    refused_rows = set(re.findall(r"op->src\[0\]->type\s*!=\s*GGML_TYPE_(\w+)", op_region(body, "GET_ROWS")))
    mv = set(re.findall(r'(?:host_name\("|kernel void )kernel_mul_mv_([a-z0-9_A-Z]+?)_f32(?:"\)|\()', src))
    rows = set(re.findall(r'(?:host_name\("|kernel void )kernel_get_rows_([a-z0-9_A-Z]+?)(?:"\)|\()', src))
    known = set(re.findall(r"GGML_TYPE_(\w+)\s*=", (root / "ggml/include/ggml.h").read_text()))
    up = {t: t.upper() for t in mv | rows if t.upper() in known}  # not the templates (kernel_get_rows_f, _q)
    return {"mul_mat": {up[t]: "yes" for t in sorted(mv) if t in up and up[t] not in refused},
            "get_rows": {up[t]: "yes" for t in sorted(rows) if t in up and up[t] not in refused_rows}}


def cpu_repack(root: Path, features: str) -> list[str]:
    """Types ggml's CPU backend repacks when the CPU has one of ``features`` (a regex of ``ggml_cpu_has_*`` names)
    in the branches of ``ggml_repack_get_optimal_repack_type``."""
    text = (root / "ggml/src/ggml-cpu/repack.cpp").read_text()
    body = function_body(text, "static const ggml::cpu::tensor_traits * ggml_repack_get_optimal_repack_type")
    found = []
    for m in re.finditer(r"if \(cur->type == GGML_TYPE_(\w+)\)", body):
        block = body[m.end():].split("} else if (cur->type")[0]
        if re.search(rf"ggml_cpu_has_({features})\(", block):
            found.append(m.group(1))
    return found


def generate(root: Path, command: str) -> dict[str, object]:
    backends = {
        "cuda": cuda_like(root, "ggml/src/ggml-cuda/ggml-cuda.cu", "static bool ggml_backend_cuda_device_supports_op"),
        "vulkan": cuda_like(root, "ggml/src/ggml-vulkan/ggml-vulkan.cpp",
                            "static bool ggml_backend_vk_device_supports_op"),
        "metal": metal(root),
        "adreno": opencl(root),
    }
    return {"about": "Weight types each ggml backend has kernels for, read off llama.cpp's supports_op by "
                     "scripts/gen_backends.py; 'yes' or the condition llama.cpp tests. llama.cpp keeps token_embd "
                     "on the CPU (the input layer), so a palette is the MUL_MAT types; GET_ROWS is recorded for "
                     "tied output/embedding use.",
            "command": command, "llama_cpp_python": root.parent.parent.name.removeprefix("llama_cpp_python-"),
            "backends": backends, "cpu_repack": {"arm": cpu_repack(root, "neon|sve|matmul_int8|dotprod"),
                                                  "x86": cpu_repack(root, "avx2|avx512\\w*")}}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sdist", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=Path("ggufmix/data/backends.json"))
    args = ap.parse_args(argv)
    doc = generate(root_of(args.sdist), "python scripts/gen_backends.py SDIST_DIR  (llama-cpp-python sdist, unpacked)")
    args.output.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    for name, b in doc["backends"].items():
        print(f"{name}: MUL_MAT {', '.join(b['mul_mat'])}")
    for cpu, types in doc["cpu_repack"].items():
        print(f"cpu {cpu} repacks: {', '.join(types)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
