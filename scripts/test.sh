#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the pinned local stand-ins for Kinesis
# and DynamoDB into .emulators/ (git-ignored) when absent, builds, and runs every test.
# The integration tests start and stop their own servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

EMU="$PWD/.emulators"
KINESIS_LOCAL=kinesis-local@0.6.2
DYNALITE=dynalite@4.0.0
MOTO="moto[dynamodb,s3]==5.2.5"

for tool in cargo node npm python3; do
  command -v "$tool" >/dev/null || { echo "scripts/test.sh: '$tool' is required" >&2; exit 1; }
done

installed_version() { # package -> version in .emulators, or nothing
  node -e "try{console.log(require('$EMU/node_modules/$1/package.json').version)}catch(e){}" 2>/dev/null
}
if [ "$(installed_version kinesis-local)" != "0.6.2" ] || [ "$(installed_version dynalite)" != "4.0.0" ]; then
  echo "== installing $KINESIS_LOCAL and $DYNALITE into .emulators/"
  mkdir -p "$EMU"
  npm install --prefix "$EMU" --no-audit --no-fund --loglevel=error "$KINESIS_LOCAL" "$DYNALITE"
fi
if ! "$EMU/venv/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '5.2.5')" 2>/dev/null; then
  echo "== installing $MOTO into .emulators/venv"
  python3 -m venv "$EMU/venv"
  "$EMU/venv/bin/pip" install --quiet --disable-pip-version-check "$MOTO" flask flask-cors
fi

export KCL_EMULATORS_DIR="$EMU"
echo "== building"
# The benchmarks (kcl-bench) have no tests: they are type-checked, not built in debug (three
# large binaries to link for nothing); `cargo run --release -p kcl-bench` builds them.
# Built by `cargo test --no-run`, exactly as the test run below will want it: after a `cargo
# build --all-targets`, the first `cargo test` compiled the workspace's crates and linked every
# test binary again (measured: 5 min 40 s on 2 cores).
cargo test --workspace --exclude kcl-bench --all-features --no-run --quiet
echo "== testing"
# The compile-fail tests (kcl-macros/tests/ui.rs, trybuild) spend ~2.5 minutes compiling a
# project of their own in target/tests/trybuild, while most other tests wait on the emulators:
# run them beside the rest. Their output and result are counted with the others'. (trybuild
# colours its output unless NO_COLOR is set.) It is selected from the whole workspace, as the
# build above was: `-p kcl-macros` resolves features for that package alone, and builds its own
# copies of the crates (42 s holding the build directory's lock).
NO_COLOR=1 cargo test --workspace --exclude kcl-bench --all-features --test ui >target/test-ui.log 2>&1 &
ui_pid=$!
cargo test --workspace --exclude kcl-bench --all-features --no-fail-fast -- --exact --skip ui 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
ui_status=0
wait "$ui_pid" || ui_status=$?
echo "== compile-fail tests (kcl-macros/tests/ui.rs)"
cat target/test-ui.log | tee -a target/test-output.log
if [ "$status" -eq 0 ]; then status=$ui_status; fi
# Last, so that its own feature resolution (`-p kcl-bench`) cannot make the tests rebuild.
echo "== type-checking the benchmarks"
bench_status=0
cargo check -p kcl-bench --all-features --all-targets --quiet || bench_status=$?
if [ "$status" -eq 0 ]; then status=$bench_status; fi
passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' target/test-output.log | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' target/test-output.log | awk '{s+=$1} END {print s+0}')
echo "$passed passed, $failed failed"
exit "$status"
