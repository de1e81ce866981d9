#!/usr/bin/env bash
# The README's test command, RUNS times in a row (default 3), in a fresh clone and a fresh virtual
# environment, while bench/busy.py keeps every core busy: how "the suite passes on a busy 2-core
# machine" is checked. The clone is made beside this repository, so ../shared/assets is found as
# in CI; it is removed at the end. Prints one line per run and exits non-zero if any run failed.
#
#     bash bench/suite_under_load.sh [RUNS]
set -uo pipefail
runs="${1:-3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="$(mktemp -d "$(dirname "$repo")/suite-under-load.XXXXXX")"
venv="$(mktemp -d "${TMPDIR:-/tmp}/suite-under-load-venv.XXXXXX")"
logs="$(mktemp -d "${TMPDIR:-/tmp}/suite-under-load-logs.XXXXXX")"
busy_pid=""
cleanup() { [ -n "$busy_pid" ] && kill "$busy_pid" 2>/dev/null; rm -rf "$clone" "$venv"; }  # logs are kept
trap cleanup EXIT
git clone -q "$repo" "$clone" || exit 1  # a sibling of the repository: ../shared is the same
cd "$clone"
python3 -m venv "$venv" && . "$venv/bin/activate"
pip install -q "torch==2.13.0" -e ".[test]" || exit 1
python bench/busy.py --seconds 36000 &
busy_pid=$!
failed=0
for run in $(seq 1 "$runs"); do
    start=$(date +%s)
    python -m pytest -q -p no:cacheprovider > "$logs/run$run.log" 2>&1
    status=$?
    echo "run $run: exit $status, $(( $(date +%s) - start )) s: $(tail -n 1 "$logs/run$run.log")"
    if [ $status -ne 0 ]; then
        failed=1
        grep -E '^(FAILED|ERROR)' "$logs/run$run.log"
        echo "  (log: $logs/run$run.log)"
    fi
done
exit $failed
