#!/usr/bin/env bash
# The wheels `weightship serve` needs on the GPU image (Python 3.12, which has torch, transformers,
# safetensors, sentencepiece, tokenizers, httpx, rich and PyYAML but not the web stack), at the
# versions constraints.txt pins, into .whl/ (ignored through .git/info/exclude). bench/gpu.sh
# installs them there when the device call carries .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
for name in fastapi starlette uvicorn pydantic pydantic_core annotated-types typing-inspection annotated-doc \
            jsonschema jsonschema-specifications referencing rpds-py typer h11 click shellingham; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt | head -1)
    [ -n "$pin" ] && pins+=("$pin")
done
PY=${PY:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
ls .whl
