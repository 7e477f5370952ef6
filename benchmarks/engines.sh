#!/usr/bin/env bash
# The default study through each engine, from fresh clones of one commit, one after the other:
#   snakemake --cores all   (make run's first command)
#   dvc repro               (make dvc-repro's first command)
# Writes results/bench/engines.md (wall times, their ratio, machine, commit) and compares the
# two runs' metrics files, timing keys left out. Needs .venv (make setup); takes about 30 min on
# 2 cores. Usage: benchmarks/engines.sh [COMMIT] (default HEAD). With RECORD=1 the dvc repro
# run's dvc.lock and results/ (all but results/bench) replace this checkout's: what to commit
# when code the results depend on changed (tests/test_lock.py checks they agree).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$repo" rev-parse "${1:-HEAD}")
work=$(mktemp -d)
export PATH="$repo/.venv/bin:$PATH"

clone() {  # clone NAME: a fresh clone of the commit, sharing this checkout's .venv
  git clone -q "$repo" "$work/$1" && git -C "$work/$1" checkout -q "$commit"
  ln -s "$repo/.venv" "$work/$1/.venv"
}

timed() {  # timed NAME COMMAND...: seconds of COMMAND run in clone NAME
  local start
  start=$(date +%s)
  (cd "$work/$1" && PYTHONPATH="$work/$1" "${@:2}" > "$work/$1.log" 2>&1)
  echo $(($(date +%s) - start))
}

clone snakemake && clone dvc
snakemake_s=$(timed snakemake snakemake --cores all)
dvc_s=$(timed dvc dvc repro)
same=$(python - "$work" <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
def numbers(path):
    return {k: v for k, v in json.loads(path.read_text()).items() if "seconds" not in k}
files = sorted((work / "snakemake" / "results" / "metrics").rglob("*.json"))
same = [numbers(f) == numbers(work / "dvc" / f.relative_to(work / "snakemake")) for f in files]
print(f"{sum(same)} of {len(same)}")
EOF
)
cpu=$(python -c "from diffprune.machine import describe, label; print(label(describe()))" 2>/dev/null \
  || grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
mkdir -p "$repo/results/bench"
cat > "$repo/results/bench/engines.md" <<EOF
# The default study through each engine (benchmarks/engines.sh)

Fresh clones of commit ${commit:0:7}, one after the other, on $(nproc) cores ($cpu), no GPU.

| command | wall time |
|---|---|
| \`snakemake --cores all\` | $snakemake_s s |
| \`dvc repro\` | $dvc_s s |

\`dvc repro\` / Snakemake: $(python -c "print(f'{$dvc_s / $snakemake_s:.2f}')")x.
Metrics files with the same numbers in both runs (keys with "seconds" left out): $same.
EOF
cat "$repo/results/bench/engines.md"
if [ "${RECORD:-0}" = 1 ]; then
  find "$repo/results" -mindepth 1 -maxdepth 1 ! -name bench -exec rm -rf {} +
  (cd "$work/dvc/results" && find . -mindepth 1 -maxdepth 1 ! -name bench -exec cp -a {} "$repo/results/" \;)
  cp "$work/dvc/dvc.lock" "$repo/dvc.lock"
  echo "recorded: dvc.lock and results/ of the dvc repro run"
fi
rm -rf "$work"
