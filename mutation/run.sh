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
