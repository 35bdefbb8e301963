#!/usr/bin/env bash
# make mutate: cosmic-ray over the files named in mutation/*.toml, each with the fast tests that cover it.
# Mutates files IN PLACE (one mutant at a time, restored after each run): do not edit or test in this checkout
# while it runs. Sessions and reports go to runs/mutation/. Not part of CI (one test run per mutant: hours).
#   TARGETS="sampling chat"   which configs to run (default: all mutation/*.toml)
#   MUTATE_TIMEOUT=3600       seconds per target before stopping (finished results are kept; rerun to resume)
set -uo pipefail
cd "$(dirname "$0")/.."
out=runs/mutation
mkdir -p "$out"
targets=${TARGETS:-$(ls mutation/*.toml | xargs -n1 basename | sed 's/\.toml$//')}
# The test commands go through a fork server holding torch/transformers/triton imported (seconds per mutant, not a
# minute): mutation/pytest_forkserver.py. Without it (MUTATE_FORKSERVER=0) they run plain pytest, same verdicts.
if [ "${MUTATE_FORKSERVER:-1}" != 0 ]; then
    python mutation/pytest_forkserver.py serve "$out/pytest.sock" > "$out/forkserver.log" 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null' EXIT
    for _ in $(seq 120); do grep -q ready "$out/forkserver.log" 2>/dev/null && break; sleep 1; done
fi
for target in $targets; do
    config=mutation/$target.toml
    session=$out/$target.sqlite
    [ -f "$session" ] || { cosmic-ray init "$config" "$session" && cr-filter-operators "$session" "$config"; }
    module=$(sed -n 's/^module-path = "\(.*\)"/\1/p' "$config")
    cp "$module" "$out/$target.orig"
    timeout "${MUTATE_TIMEOUT:-3600}" cosmic-ray exec "$config" "$session"
    cp "$out/$target.orig" "$module"  # undo a mutant left in place when the timeout stopped a run
    cr-report --surviving-only --show-diff "$session" > "$out/$target-survivors.txt"
    cr-report --show-pending "$session" | tail -4 > "$out/$target-summary.txt"
    echo "== $target: $(tr '\n' ' ' < "$out/$target-summary.txt")"
done
