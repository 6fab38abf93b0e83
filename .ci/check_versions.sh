#!/usr/bin/env bash
# Checks that pyproject.toml's declared ranges are true at both ends: builds two throw-away venvs,
#   low:  requirements.lock, then every dependency declared as ">=LOW,<=HIGH" in pyproject.toml
#         (transformers, deepspeed, and the others so bounded) installed at its LOW version
#         (pip changes the transitive packages those versions need, e.g. huggingface-hub);
#   high: requirements.lock exactly (the newest: each upper bound is the locked version),
# runs the fast test set in each, and prints one markdown table row per end.
# Usage: bash .ci/check_versions.sh [extra pytest args, e.g. -k "not prefix"]
# Takes about 10 minutes on 2 cores. Exit status: 0 when both ends pass.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
LOCK=requirements.lock
TORCH_PIN="torch==2.13.0"      # the CPU build on this machine's disk; installed first in each venv
PYTEST_ARGS=(-q -p no:cacheprovider -m "not slow" "$@")

WORK=$(mktemp -d /tmp/check-versions.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# pyproject's ">=LOW,<=HIGH" requirements, as "name LOW HIGH" lines.
python3 - >"$WORK/bounds" <<'EOF'
import re, tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
reqs = project["dependencies"] + project.get("optional-dependencies", {}).get("dev", [])
for req in reqs:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,\s]+)\s*,\s*<=\s*([^,\s]+)\s*", req)
    if m:
        print(*m.groups())
EOF
locked() { grep -i -m1 "^$1==" "$LOCK" | sed 's/.*==//'; }
version() { "$1/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$2"; }
bound() { awk -v p="$1" -v c="$2" '$1 == p {print $c}' "$WORK/bounds"; }

for pkg in transformers deepspeed; do
  [ -n "$(bound "$pkg" 2)" ] || { echo "pyproject.toml has no '$pkg>=LOW,<=HIGH' range" >&2; exit 2; }
done
while read -r pkg low high; do  # the newest end is the lock: the two must agree
  if [ "$(locked "$pkg")" != "$high" ]; then
    echo "warning: $pkg: pyproject's upper bound $high but $LOCK has $(locked "$pkg")" >&2
  fi
done <"$WORK/bounds"

# make_venv NAME [pip requirement...]: torch first, then the lock exactly, then the overrides.
make_venv() {
  local venv="$WORK/$1"; shift
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$TORCH_PIN"
  "$venv/bin/pip" install -q --no-deps -r "$LOCK" -e .
  if [ $# -gt 0 ]; then "$venv/bin/pip" install -q "$@"; fi
  "$venv/bin/pip" check >&2
}

# run_end NAME: the fast set in that venv, with its own DeepSpeed JIT extension folder; prints the row.
run_end() {
  local venv="$WORK/$1" log="$WORK/$1.log" rc=0
  TORCH_EXTENSIONS_DIR="$WORK/tx-$1" "$venv/bin/python" -m pytest "${PYTEST_ARGS[@]}" >"$log" 2>&1 || rc=$?
  grep -E "^(FAILED|ERROR) " "$log" | sed "s/^/[$1] /" >&2 || true
  local last passed failed errors
  last=$(tail -n 1 "$log")
  passed=$(grep -oE "[0-9]+ passed" <<<"$last" | cut -d' ' -f1 || true)
  failed=$(grep -oE "[0-9]+ failed" <<<"$last" | cut -d' ' -f1 || true)
  errors=$(grep -oE "[0-9]+ errors?" <<<"$last" | cut -d' ' -f1 || true)
  local others
  others=$("$venv/bin/pip" freeze 2>/dev/null | grep -iE "^($(awk '$1 != "transformers" && $1 != "deepspeed" {print $1}' "$WORK/bounds" | paste -sd'|'))==" | tr '\n' ' ' || true)
  echo "| $1 | $(version "$venv" transformers) | $(version "$venv" deepspeed) | ${others% } | ${passed:-0} | $(( ${failed:-0} + ${errors:-0} )) | $([ $rc -eq 0 ] && echo passed || echo "failed (pytest rc $rc)") | $(date -u +%Y-%m-%d) |" >"$WORK/$1.row"
  return $rc
}

low_pins=()
while read -r pkg low high; do low_pins+=("$pkg==$low"); done <"$WORK/bounds"

status=0
echo "building venv 'low': ${low_pins[*]}" >&2
make_venv low "${low_pins[@]}"
run_end low || status=1
echo "building venv 'high': $LOCK" >&2
make_venv high
run_end high || status=1

echo
echo "Fast set (pytest ${PYTEST_ARGS[*]}) at both ends of pyproject.toml's ranges; torch $(version "$WORK/high" torch), Python $(python3 -c 'import platform; print(platform.python_version())'):"
echo
echo "| end | transformers | deepspeed | other bounded packages | passed | failed | result | date |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
cat "$WORK/low.row" "$WORK/high.row"
exit $status
