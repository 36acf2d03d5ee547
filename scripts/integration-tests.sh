#!/usr/bin/env bash
# Runs the integration tests (tests/integration/tests/*.rs) against real daemons, several
# test files at once. scripts/test.sh calls it; run it alone, as root, after
# `cargo build --workspace --bins`.
#
# Each test file starts its own daemons, network namespaces, bridges, addresses and
# scratch dirs under names and numbers of its own, so different files can run side by
# side; within a file, one test at a time, except in the files named in `split`, whose
# tests have daemons and numbers of their own each. The files that make fake GPU device nodes
# (/dev/nvidiaN, and the one /dev/nvidiactl they all pass) run one after another in a
# single lane, so that no file removes a node another one's containers use. The files
# named in `solo` change what every process on the machine shares (the kernel's
# limits) and run alone, after the others.
#
#   SSP_TEST_LANES   how many files run at once (3)
#   SSP_TEST_ONLY    run just these files (space-separated names, e.g. "migrate lxd")
# Each file's output goes to target/test-logs/NAME.log; a failing file's is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
lanes=${SSP_TEST_LANES:-3}
logs=$PWD/target/test-logs
rm -rf "$logs"
mkdir -p "$logs"

if ! cargo test -p ssp-integration --locked --no-run 2>"$logs/build.log"; then
  cat "$logs/build.log" >&2
  exit 1
fi
# "  Executable tests/NAME.rs (target/debug/deps/NAME-HASH)"
declare -A exe
while read -r name path; do exe[$name]=$PWD/$path; done < <(
  sed -n 's|^ *Executable tests/\([a-z0-9_]*\)\.rs (\(.*\))$|\1 \2|p' "$logs/build.log")
[ ${#exe[@]} -gt 0 ] || { echo "integration-tests: no test executables in $logs/build.log" >&2; exit 1; }

names=()
if [ -n "${SSP_TEST_ONLY:-}" ]; then
  for n in $SSP_TEST_ONLY; do
    [ -n "${exe[$n]:-}" ] || { echo "integration-tests: no test file $n (there are: ${!exe[*]})" >&2; exit 2; }
    names+=("$n")
  done
else
  names=("${!exe[@]}")
fi

# Slowest first, so that the lanes finish together; files not named here go last.
order=(migrate_faults cluster isolation images renewal reconcile trust evacuate
       migrate first_day stale_leader)
# Files whose tests run as jobs of their own (each test's hosts and bridges are its own).
split=(migrate_faults cluster)
# Files that run alone, after every other file.
solo=(host_limits)
gpu=() rest=() alone=()
for n in "${order[@]}" $(printf '%s\n' "${names[@]}" | sort); do
  [[ " ${names[*]} " == *" $n "* ]] || continue
  [[ " ${gpu[*]} ${rest[*]} ${alone[*]} " == *" $n "* ]] && continue
  if [[ " ${solo[*]} " == *" $n "* ]]; then alone+=("$n")
  elif grep -q 'fake_gpus' "tests/integration/tests/$n.rs"; then gpu+=("$n"); else rest+=("$n"); fi
done

# A job is a file, one test of a split file (FILE/TEST), or the GPU files in turn.
queue=()
for n in "${rest[@]}"; do
  if [[ " ${split[*]} " == *" $n "* ]]; then
    while read -r t; do queue+=("$n/$t"); done < <("${exe[$n]}" --list 2>/dev/null | sed -n 's/: test$//p')
  else
    queue+=("$n")
  fi
done
# The GPU files take about as long as the longest test: they start after the first job.
if [ ${#gpu[@]} -gt 0 ]; then
  if [ ${#queue[@]} -gt 0 ]; then queue=("${queue[0]}" "${gpu[*]}" "${queue[@]:1}"); else queue=("${gpu[*]}"); fi
fi

run_job() { # FILE or FILE/TEST... in turn; prints one line each, and the log of a failure
  local rc=0 n f filter t0 t log
  for n in "$@"; do
    f=${n%%/*} filter=()
    [ "$f" = "$n" ] || filter=(--exact "${n#*/}")
    log=$logs/${n//\//.}.log
    t0=$(date +%s)
    # A run that passed no test at all (a test renamed, say) is a failure too.
    if (cd tests/integration && "${exe[$f]}" --test-threads=1 "${filter[@]}") >"$log" 2>&1 &&
       grep -q '^test result: ok\. [1-9][0-9]* passed' "$log"; then
      t=$(( $(date +%s) - t0 ))
      echo "integration: $n ok (${t}s)"
    else
      t=$(( $(date +%s) - t0 ))
      rc=1
      { echo "integration: $n FAILED (${t}s); its output:"; cat "$log"
        echo "integration: end of $n's output"; } >&2
      echo "$n" >>"$logs/failed"
    fi
  done
  return $rc
}

t0=$(date +%s)
pids=() next=0
while [ $next -lt ${#queue[@]} ] || [ ${#pids[@]} -gt 0 ]; do
  while [ ${#pids[@]} -lt "$lanes" ] && [ $next -lt ${#queue[@]} ]; do
    # shellcheck disable=SC2086 # a job is a list of names
    run_job ${queue[$next]} &
    pids+=($!)
    next=$((next + 1))
  done
  wait -n || true
  alive=()
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
  pids=("${alive[@]}")
done
for n in "${alone[@]}"; do
  run_job "$n" || true
done
if [ -s "$logs/failed" ]; then
  echo "integration: FAILED: $(tr '\n' ' ' <"$logs/failed")(logs in $logs)" >&2
  exit 1
fi
echo "integration: all ${#names[@]} files passed in $(( $(date +%s) - t0 ))s, $lanes at a time"
