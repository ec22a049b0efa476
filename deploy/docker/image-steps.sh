#!/bin/sh
# The build and runtime steps of both image targets (Dockerfile: cpu and gpu), in one place so the
# two targets cannot drift apart: each stage runs this script with the same step names, the GPU
# target differing only in its base image and its extra (`gpu` instead of `cpu`).
#
#   image-steps.sh deps EXTRA     build stage: /opt/venv with pyproject.toml's dependencies + EXTRA's
#                                 (cpu: onnxruntime, gpu: onnxruntime-gpu)
#   image-steps.sh project        build stage: + this project (service/), then what the server
#                                 never runs is removed: pip, setuptools, tests of the dependencies
#   image-steps.sh runtime        runtime stage: the non-root user 10001 and its /output folder
#   image-steps.sh requirements EXTRA     print the requirements `deps` installs (tests use it)
#
# The install is ./scripts/serve.sh's (a venv, pip upgraded, the project with the same extra),
# split in two steps so that the dependency layer is reused while only service/ changes. It needs
# python3 >= 3.11 (tomllib) in the base image.
set -eu

VENV=/opt/venv
PY=$VENV/bin/python
step=${1:?usage: image-steps.sh deps EXTRA | project | runtime | requirements EXTRA}
extra=${2:-}

requirements() {
  # pyproject.toml's [project] dependencies, plus those of the extra, one per line.
  python3 - "$extra" <<'EOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extra = sys.argv[1]
print("\n".join(project["dependencies"] + project["optional-dependencies"][extra]))
EOF
}

case $step in
requirements)
  requirements
  ;;
deps)
  case $extra in cpu | gpu) ;; *) echo "image-steps.sh deps: EXTRA must be cpu or gpu" >&2; exit 2 ;; esac
  requirements > /tmp/requirements.txt
  python3 -m venv "$VENV"
  "$PY" -m pip install --upgrade pip
  "$PY" -m pip install -r /tmp/requirements.txt
  rm /tmp/requirements.txt
  ;;
project)
  "$PY" -m pip install --no-deps .
  # The server imports none of these: pip and setuptools (nothing is installed at run time; the
  # image is read-only), the test suites that numpy and others ship inside their packages.
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  for dist in setuptools wheel; do
    if "$PY" -m pip show -q "$dist" 2>/dev/null; then "$PY" -m pip uninstall -y -q "$dist"; fi
  done
  "$PY" -m pip uninstall -y -q pip
  find "$site" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
  find "$site" -name conftest.py -delete
  rm -f "$VENV"/bin/pip* "$VENV"/bin/Activate.ps1
  # Bytecode for every module, once, at build time: the image is read-only at run time (nothing
  # could be cached there) and the start-up then reads .pyc instead of compiling every import.
  "$PY" -m compileall -q -j 0 "$site"
  ;;
runtime)
  groupadd --system --gid 10001 serving
  useradd --system --uid 10001 --gid serving --create-home --home-dir /home/serving \
    --shell /usr/sbin/nologin serving
  mkdir /output
  chown serving:serving /output
  ;;
*)
  echo "image-steps.sh: unknown step '$step'" >&2
  exit 2
  ;;
esac
