#!/usr/bin/env bash
# The device side's tests on linux/arm64: a Debian bookworm arm64 userland run by QEMU user-mode on this
# (x86_64) machine, with QEMU_CPU=cortex-a72 (a Raspberry Pi 4's core). docs/device.md#on-aarch64 says what it
# proves; tests/test_aarch64.py runs it in CI.
#
#   infra/aarch64/run-device-tests.sh                         # as root; the device tests (DEVICE_TESTS below)
#   infra/aarch64/run-device-tests.sh tests/test_probation.py # other pytest arguments instead
#
# 1. apt-get installs qemu-user-static, binfmt-support and debootstrap where missing; binfmt_misc is mounted and
#    qemu-aarch64 enabled (flag F: the userland needs no QEMU binary of its own).
# 2. debootstrap builds the userland from nothing into $EDGESHIP_AARCH64_CACHE (default ~/.cache/edgeship/aarch64);
#    a venv inside gets edgeship[device,litert] and the test tools as PyPI's aarch64 wheels, at the versions of
#    requirements/constraints.txt (nothing builds from source). Both are kept, keyed by what built them (this
#    recipe; the lock and pyproject.toml), so the next run on this machine reuses them; a fresh machine builds them.
# 3. This checkout's files are copied in, and pytest runs inside with EDGESHIP_TEST_TIME_SCALE (default 5) for
#    the emulation's slowness. Mounts live in a private mount namespace: nothing stays mounted after the run.
#
# Exit status: pytest's; 77 when this machine cannot run it, the reason on the last line of stderr.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${EDGESHIP_AARCH64_CACHE:-$HOME/.cache/edgeship/aarch64}
export QEMU_CPU=${QEMU_CPU:-cortex-a72}
scale=${EDGESHIP_TEST_TIME_SCALE:-5}
DEVICE_TESTS=(tests/test_agent.py tests/test_probation.py tests/test_device_serve.py tests/test_telemetry.py
              tests/test_ota.py tests/test_shadow_idle.py tests/test_device_metrics.py)
# The publisher's side of S3 (moto, boto3) is the pipeline's, not the device's: a device reads the repository over
# HTTP, which the other updater tests cover.
DEVICE_TESTS+=(--deselect tests/test_ota.py::test_publish_into_s3_and_update_straight_from_the_endpoint)
TEST_TOOLS=(pytest pytest-timeout onnx flatbuffers sqlalchemy)  # what those tests import beyond the extras
USERLAND="bookworm arm64 minbase python3,python3-venv,ca-certificates,mosquitto"

cannot() { echo "cannot run the aarch64 tests here: $*" >&2; exit 77; }
step() { echo "[aarch64 $(date +%T)] $*" >&2; }

[ "$(id -u)" = 0 ] || cannot "needs root (apt-get, binfmt_misc, debootstrap and chroot); run it with sudo"
[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || cannot "written for an x86_64 host, not $(uname -m)"
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || cannot "${missing[*]} missing and no apt-get to install them"
  step "apt-get install ${missing[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
    || cannot "apt-get install ${missing[*]} failed"
fi
if [ "$(uname -m)" != aarch64 ]; then
  mountpoint -q /proc/sys/fs/binfmt_misc \
    || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
    || cannot "binfmt_misc is not mounted and cannot be (mount -t binfmt_misc failed: a container without that right?)"
  update-binfmts --enable qemu-aarch64 2>/dev/null || true
  grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
    || cannot "binfmt_misc has no enabled qemu-aarch64 entry (update-binfmts --enable qemu-aarch64 failed)"
  grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || cannot "the qemu-aarch64 binfmt entry lacks flag F (fix-binary), so a chroot cannot find QEMU"
fi

mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9  # one run at a time per cache (two CI jobs on one machine)
key() { sha256sum | cut -c1-16; }
rootfs=$cache/rootfs
userland_key=$(echo "$USERLAND" | key)
if [ ! -f "$rootfs/.edgeship-userland-$userland_key" ]; then
  mirror=$(grep -hoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
           | head -1 | tr -d ' ' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  read -r suite arch variant packages <<<"$USERLAND"
  step "debootstrap $suite $arch from $mirror (5-8 min emulated on 2 idle cores)"
  rm -rf "$rootfs" "$rootfs.new"
  debootstrap --arch="$arch" --foreign --variant="$variant" --include="$packages" "$suite" "$rootfs.new" "$mirror" \
    >/dev/null
  chroot "$rootfs.new" /debootstrap/debootstrap --second-stage >/dev/null
  rm -rf "$rootfs.new/var/cache/apt/archives/"*.deb
  touch "$rootfs.new/.edgeship-userland-$userland_key"
  mv "$rootfs.new" "$rootfs"
fi
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/host-ca.crt"  # pip behind this machine's CA bundle

# The emulated CPUs as Linux on a Cortex-A72 lists them: QEMU 7.2 passes the host's /proc/cpuinfo through, and
# onnxruntime's CPU detection (cpuinfo) crashes on an x86 one.
cpuinfo=$cache/cpuinfo
for ((cpu = 0; cpu < $(nproc); cpu++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$cpu"
  printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
done >"$cpuinfo"

# Run a command inside the userland (proc, sys, dev and the ARM cpuinfo mounted in a private mount namespace).
inside() {
  unshare --mount --propagation private -- bash -c '
    set -e; r=$1; shift
    mount -t proc proc "$r/proc"; mount --bind "$1" "$r/proc/cpuinfo"
    mount -t sysfs sys "$r/sys"; mount --rbind /dev "$r/dev"
    mount -t tmpfs -o size=4g tmpfs "$r/tmp"
    shift; exec chroot "$r" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
      QEMU_CPU="$QEMU_CPU" PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
      PIP_DEFAULT_TIMEOUT=120 "$@"' inside "$rootfs" "$cpuinfo" "$@"
}

step "this checkout into the userland"
rm -rf "$rootfs/src" && mkdir -p "$rootfs/src/edgeship"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - 2>/dev/null) \
  | tar -C "$rootfs/src/edgeship" -xf -

# The lock's versions without its hashes (those are of the x86_64 files): pip picks the aarch64 wheels.
venv_key=$(cat "$repo/requirements/constraints.txt" "$repo/pyproject.toml" <(echo "${TEST_TOOLS[*]}") | key)
venv=/opt/edgeship/venv-$venv_key
pins=/opt/edgeship/constraints.txt
if [ ! -f "$rootfs$venv/.complete" ]; then
  step "venv: edgeship[device,litert] and ${TEST_TOOLS[*]} from PyPI (2.5-3.5 min emulated)"
  rm -rf "$rootfs/opt/edgeship" && mkdir -p "$rootfs/opt/edgeship"
  sed 's/ --hash=.*//' "$repo/requirements/constraints.txt" >"$rootfs$pins"
  inside python3 -m venv "$venv"
  inside "$venv/bin/python" -m pip install -q --only-binary=:all: -c "$pins" pip setuptools wheel
  inside "$venv/bin/python" -m pip install -q --only-binary=:all: --no-build-isolation -c "$pins" \
    "/src/edgeship[device,litert]" "${TEST_TOOLS[@]}"
  touch "$rootfs$venv/.complete"
else
  inside "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --no-index /src/edgeship
fi

[ $# -gt 0 ] || set -- "${DEVICE_TESTS[@]}"
step "pytest on aarch64 (QEMU_CPU=$QEMU_CPU, EDGESHIP_TEST_TIME_SCALE=$scale): $*"
inside /bin/sh -c 'echo "machine: $(uname -m) python: $("$0" -c "import platform; print(platform.machine())")"' \
  "$venv/bin/python"
status=0
inside /bin/sh -c 'cd /src/edgeship && python=$1 && shift && exec env EDGESHIP_TEST_TIME_SCALE="$0" \
  PYTHONDONTWRITEBYTECODE=1 "$python" -m pytest -p no:cacheprovider -q -rs "$@"' "$scale" "$venv/bin/python" "$@" \
  || status=$?
rm -rf "$rootfs/src"
exit $status
