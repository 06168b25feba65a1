#!/usr/bin/env bash
# The nightly regression sweep; cron (mmspec-nightly.cron) or the KubeRay job runs it.
#
#   1. run the nightly grid                 mmspec-orch submit
#   2. compare with the last good run       mmspec-orch compare LAST_GOOD NEW  -> NEW/compare.md
#   3. record the run in the history        mmspec-orch history add / show     -> NEW/history.*
#   4. publish the reports                  copy them to $MMSPEC_PUBLISH_DIR/<run>/, link latest
#   5. a run with no failed shard and no regression becomes the last good run (a symlink)
#
# Exit status: 0 all good; 1 a regression, a hard failure (lossless mismatch, more errors) or
# failed shards; 2 invalid input (grid, workloads, an unreadable run); 3 another sweep is
# still running.
#
# Settings (environment):
#   MMSPEC_ORCH          the CLI                              (default: mmspec-orch on PATH)
#   MMSPEC_NIGHTLY_GRID  the grid                             (default: examples/nightly.yaml)
#   MMSPEC_NIGHTLY_DIR   state: runs/, last-good, history/    (default: /var/lib/mmspec/nightly)
#   MMSPEC_PUBLISH_DIR   where reports are published          (default: unset, not published)
#   MMSPEC_MACHINE       the machine's name in the history    (default: hostname)
#   MMSPEC_THRESHOLD     compare's relative threshold         (default: 0.05)
#   MMSPEC_COMPARE_ARGS  more compare options, e.g. "--min-samples 20" or, the night after
#                        methods were dropped from the grid, "--allow-missing"
#   RAY_ADDRESS          join this Ray cluster (set inside a RayJob); unset: a local node
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
orch=${MMSPEC_ORCH:-mmspec-orch}
grid=${MMSPEC_NIGHTLY_GRID:-$here/../../examples/nightly.yaml}
state=${MMSPEC_NIGHTLY_DIR:-/var/lib/mmspec/nightly}
publish=${MMSPEC_PUBLISH_DIR:-}
machine=${MMSPEC_MACHINE:-$(hostname)}
threshold=${MMSPEC_THRESHOLD:-0.05}
read -r -a compare_args <<<"${MMSPEC_COMPARE_ARGS:-}"

log() { printf '%s nightly: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

# Replace a symlink in one step, so a reader never finds it missing.
relink() { ln -sfn "$1" "$2.tmp" && mv -Tf "$2.tmp" "$2"; }

mkdir -p "$state/runs" "$state/history"
# One sweep at a time: a slow night must not overlap the next one and race on last-good.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$state/.lock"
    if ! flock -n 9; then
        log "another sweep holds $state/.lock"
        exit 3
    fi
fi

if [[ -n "${RAY_ADDRESS:-}" ]]; then
    ray_args=(--address "$RAY_ADDRESS")
else
    ray_args=(--local)
fi

# A fresh results root per night: the run directory is then the only folder in it.
out=$(mktemp -d "$state/runs/$(date -u +%Y%m%dT%H%M%SZ).XXXX")
submit_rc=0
"$orch" submit "$grid" --out "$out" "${ray_args[@]}" || submit_rc=$?
if ((submit_rc == 2)); then
    log "invalid grid or workloads: $grid"
    exit 2
fi
run=$(find "$out" -mindepth 1 -maxdepth 1 -type d | head -n 1)
if [[ -z "$run" ]]; then
    log "submit (exit $submit_rc) made no run directory under $out"
    exit 2
fi
log "run $run (submit exit $submit_rc)"

compare_rc=0
if [[ -e "$state/last-good" ]]; then
    base=$(readlink -f "$state/last-good")
    "$orch" compare "$base" "$run" --threshold "$threshold" --out "$run/compare.md" \
        "${compare_args[@]}" >/dev/null || compare_rc=$?
    log "compare with $base: exit $compare_rc: $(head -n 1 "$run/compare.md" 2>/dev/null || true)"
else
    log "no last good run yet: this run becomes the first baseline if it is clean"
fi

# History and publishing go on whatever compare said: a regressed night belongs in both.
"$orch" history add "$run" --store "$state/history" --machine "$machine" ||
    log "history add failed"
# The trend table is for people; the regression verdict is compare's.
"$orch" history show --store "$state/history" --machine "$machine" \
    --plot "$run/history.svg" >"$run/history.md" || log "history show failed"

if [[ -n "$publish" ]]; then
    dest="$publish/$(basename "$run")"
    mkdir -p "$dest"
    for file in report.html report.md compare.md history.md history.svg; do
        if [[ -f "$run/$file" ]]; then
            cp "$run/$file" "$dest/"
        fi
    done
    relink "$dest" "$publish/latest"
    log "published $dest"
fi

if ((submit_rc == 0 && compare_rc == 0)); then
    relink "$run" "$state/last-good"
    log "last good run is now $run"
fi

if ((compare_rc != 0)); then
    exit "$compare_rc"
fi
exit "$submit_rc"
