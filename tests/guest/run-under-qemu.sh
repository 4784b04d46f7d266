#!/usr/bin/env bash
# Builds the test guest and checks it end-to-end under QEMU's microvm:
# a read-write and a read-only disk with random data, plus a virtio device
# that is not a disk. Checks the guest's report (capacity, serial, RO flag),
# its sha256 of named sectors against sha256sum on the host, that its write
# lands in the RW file and that the RO file is untouched, and that it powers
# off by itself. Then a counting boot: the guest halts between ticks (the
# local APIC timer wakes it, so QEMU uses far less CPU than wall time), its
# ticks are a period apart, and a line typed on COM1 meanwhile is echoed.
# Exits non-zero on any mismatch.
#
#   tests/guest/run-under-qemu.sh            # uses KVM when /dev/kvm is usable
#   ACCEL=tcg tests/guest/run-under-qemu.sh  # force emulation
#   KEEP=1 ...                               # keep the work directory
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target/guest}
qemu=${QEMU:-qemu-system-x86_64}
timeout_s=${TIMEOUT:-120}

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

command -v "$qemu" >/dev/null || fail "$qemu not found (scripts/install-deps installs qemu-system-x86)"

echo "== build"
(cd "$here" && cargo build --release --quiet)
guest=$CARGO_TARGET_DIR/x86_64-unknown-none/release/cocoon-test-guest
[ -f "$guest" ] || fail "no guest at $guest"

work=$(mktemp -d)
if [ -z "${KEEP:-}" ]; then
    trap 'rm -rf "$work"' EXIT
else
    echo "work directory: $work"
fi

if [ -z "${ACCEL:-}" ]; then
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then ACCEL=kvm; else ACCEL=tcg; fi
fi
if [ "$ACCEL" = kvm ]; then
    # arch-capabilities off: nested KVM here refuses QEMU's write of
    # MSR_IA32_ARCH_CAPABILITIES (0x10a) with -cpu host; the guest needs none
    # of it.
    cpu=(-accel kvm -cpu host,-arch-capabilities)
else
    cpu=(-accel tcg -cpu max)
fi

rw=$work/rw.raw
ro=$work/ro.raw
head -c $((64 << 20)) /dev/urandom >"$rw"
head -c $((16 << 20)) /dev/urandom >"$ro"
cp "$rw" "$work/rw.orig"
cp "$ro" "$work/ro.orig"

# Sectors of a file: sha256 of COUNT sectors from SECTOR.
sectors_sha() { dd if="$1" bs=512 skip="$2" count="$3" status=none | sha256sum | cut -d' ' -f1; }

boot() { # APPEND OUTFILE
    local status=0
    timeout "$timeout_s" "$qemu" -M microvm,acpi=off "${cpu[@]}" -m 128M \
        -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
        -device isa-debug-exit,iobase=0xf4,iosize=4 \
        -kernel "$guest" -append "$1" \
        -drive id=rw,file="$rw",format=raw,if=none,cache=none \
        -device virtio-blk-device,drive=rw,serial=data0 \
        -device virtio-rng-device \
        -drive id=ro,file="$ro",format=raw,if=none,readonly=on \
        -device virtio-blk-device,drive=ro,serial=layer0 \
        >"$2" 2>"$2.stderr" || status=$?
    tr -d '\r' <"$2" >"$2.clean" && mv "$2.clean" "$2"
    # isa-debug-exit with 0 makes QEMU exit 1; a triple fault under
    # -no-reboot exits 0; 124 is the timeout.
    case $status in
        0 | 1) ;;
        124) cat "$2" "$2.stderr" >&2; fail "guest did not power off within ${timeout_s}s" ;;
        *) cat "$2" "$2.stderr" >&2; fail "qemu exited with $status" ;;
    esac
    grep -q '^cocoon-guest: start$' "$2" || { cat "$2" "$2.stderr" >&2; fail "no start line"; }
    grep -q '^cocoon-guest: done ' "$2" || { cat "$2" "$2.stderr" >&2; fail "no done line"; }
    if grep '^cocoon-guest: error' "$2" >&2; then fail "the guest reported errors"; fi
}

# QEMU decides the order of the virtio_mmio.device= entries, hence the disk
# indices: a first boot with no actions finds them by serial.
echo "== boot 1: probe ($ACCEL)"
boot "" "$work/probe.log"
cat "$work/probe.log"
index_of() { sed -n "s/^cocoon-guest: disk index=\([0-9]*\) .* serial=$1 .*/\1/p" "$work/probe.log"; }
rwi=$(index_of data0)
roi=$(index_of layer0)
[ -n "$rwi" ] && [ -n "$roi" ] || fail "disks data0 and layer0 not both reported"
grep -q '^cocoon-guest: skip addr=0x[0-9a-f]* reason=not-block$' "$work/probe.log" ||
    fail "the rng device was not reported as skipped"
grep -q '^cocoon-guest: done disks=2$' "$work/probe.log" || fail "expected done disks=2"

check_disk() { # SERIAL INDEX FILE RO
    local want="cocoon-guest: disk index=$2 addr=0x[0-9a-f]* capacity_sectors=$(($(stat -c %s "$3") / 512)) serial=$1 ro=$4"
    grep -qx "$want" "$work/probe.log" || fail "no line matching: $want"
}
check_disk data0 "$rwi" "$rw" 0
check_disk layer0 "$roi" "$ro" 1

echo "== boot 2: hash, write, seqread"
# Hashes of both disks (one spanning several 128 KiB requests and ending on
# the last sector), a write to each, read-backs, a sequential read.
actions=(
    "cocoon.hash=$rwi:0:8"
    "cocoon.hash=$rwi:1001:264"
    "cocoon.hash=$roi:$((16 * 2048 - 40)):40"
    "cocoon.write=$rwi:4:5a"
    "cocoon.hash=$rwi:4:1"
    "cocoon.write=$roi:3:a5"
    "cocoon.hash=$roi:0:8"
    "cocoon.seqread=$rwi:64M"
)
boot "${actions[*]}" "$work/run.log"
cat "$work/run.log"

expect_line() {
    grep -qx "cocoon-guest: $1" "$work/run.log" || fail "missing or different: cocoon-guest: $1"
}
expect_line "hash index=$rwi sector=0 count=8 sha256=$(sectors_sha "$work/rw.orig" 0 8)"
expect_line "hash index=$rwi sector=1001 count=264 sha256=$(sectors_sha "$work/rw.orig" 1001 264)"
expect_line "hash index=$roi sector=$((16 * 2048 - 40)) count=40 sha256=$(sectors_sha "$work/ro.orig" $((16 * 2048 - 40)) 40)"
expect_line "write index=$rwi sector=4 byte=5a outcome=ok"
five_a=$(head -c 512 /dev/zero | tr '\0' '\132' | sha256sum | cut -d' ' -f1)
expect_line "hash index=$rwi sector=4 count=1 sha256=$five_a"
expect_line "write index=$roi sector=3 byte=a5 outcome=error"
expect_line "hash index=$roi sector=0 count=8 sha256=$(sectors_sha "$work/ro.orig" 0 8)"
grep -q "^cocoon-guest: seqread index=$rwi bytes=67108864 ns=[1-9][0-9]*$" "$work/run.log" ||
    fail "no seqread line"

# On the host: the RW write landed and changed nothing else; the RO file is
# unchanged.
[ "$(sectors_sha "$rw" 4 1)" = "$five_a" ] || fail "sector 4 of the RW file is not 0x5a"
cmp -s <(dd if="$rw" bs=512 count=4 status=none) <(dd if="$work/rw.orig" bs=512 count=4 status=none) ||
    fail "RW file changed before sector 4"
cmp -s <(dd if="$rw" bs=512 skip=5 status=none) <(dd if="$work/rw.orig" bs=512 skip=5 status=none) ||
    fail "RW file changed after sector 4"
cmp -s "$ro" "$work/ro.orig" || fail "the RO file changed"

echo "== boot 3: count, halted between ticks, with input"
period_ms=50
ticks=40
TIMEFORMAT='%R %U %S'
# The line arrives while the guest counts; the feeder outlives the boot.
# Only `time`'s report goes to count.time: boot's own stderr (a failure's
# log and message) goes where the script's does, through fd 3.
exec 3>&2
{ time boot "cocoon.count=$period_ms:$ticks" "$work/count.log" \
    < <(sleep 1; printf 'hello from the host\n'; sleep 10) 2>&3; } 2>"$work/count.time"
exec 3>&-
grep -v '^cocoon-guest: count ' "$work/count.log"
grep -q '^cocoon-guest: tsc khz=[1-9][0-9]* .* idle=hlt-' "$work/count.log" ||
    fail "the guest does not halt while it waits (no idle=hlt- on the tsc line)"
grep -qx 'cocoon-guest: input: hello from the host' "$work/count.log" ||
    fail "the line typed while the guest counted was not echoed"
khz=$(sed -n 's/^cocoon-guest: tsc khz=\([0-9]*\) .*/\1/p' "$work/count.log")
sed -n 's/^cocoon-guest: count n=\([0-9]*\) tsc=\([0-9]*\)$/\1 \2/p' "$work/count.log" |
    awk -v ticks="$ticks" -v min=$((khz * period_ms * 9 / 10)) '
        { if (NR != $1) { print "count " NR " is n=" $1; bad = 1 }
          if (NR > 1 && $2 - last < min) { print "count " NR " came " ($2 - last) " TSC ticks after the last"; bad = 1 }
          last = $2 }
        END { if (NR != ticks) { print NR " count lines, not " ticks; bad = 1 }; exit bad }' ||
    fail "the count lines are not $ticks, consecutive, a period apart"
read -r wall user sys <"$work/count.time"
echo "count boot: ${wall}s wall, ${user}s user + ${sys}s system CPU"
awk -v w="$wall" -v u="$user" -v s="$sys" 'BEGIN { exit !(u + s < w / 2) }' ||
    fail "QEMU used ${user}s + ${sys}s of CPU in ${wall}s: the guest does not idle"

ns=$(sed -n 's/^cocoon-guest: seqread .* ns=\([0-9]*\)$/\1/p' "$work/run.log")
tsc=$(sed -n 's/^cocoon-guest: tsc //p' "$work/run.log")
echo "seqread: 64 MiB in $((ns / 1000000)) ms, $((64 * 1000000000 / ns)) MiB/s ($tsc)"
echo "PASS"
