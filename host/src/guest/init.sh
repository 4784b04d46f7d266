#!/bin/busybox sh
# The cocoon initramfs's /init (busybox sh). Embedded in cocoon-host and
# written into every initramfs it builds (host/src/guest/initramfs.rs).
#
# Stage 1 (PID 1 in the initramfs): loads the modules in /lib/modules/load
# (dependency order, computed by the host), reads the plan from the kernel
# command line (host/src/guest/cmdline.rs documents it), waits for every
# disk by its virtio serial, builds the root in /newroot:
#   layered: each layer read-only (squashfs or erofs), base first, under an
#            overlayfs whose upper and work dirs live on the cow (ext4);
#   disk:    the root partition of the cow disk (cocoon.rootpart=, else the
#            first partition that mounts as ext4, else the whole disk);
# then moves /dev, /proc and /sys into it, copies busybox and this script to
# /dev/.cocoon and switch_roots to stage 2.
#
# Stage 2 (PID 1 in the new root, run as `busybox sh init stage2`): mounts
# the data disks where the plan says (resolved inside the new root, so an
# image's symlinks cannot redirect them), then either execs the image's
# /sbin/init, or runs the OCI process from /cocoon/exec (Entrypoint + Cmd
# with Env, WorkingDir, User; host/src/guest/exec.rs), and when it exits,
# unmounts the data disks and powers off.
#
# Every line it prints starts with "cocoon-init: " on the console. A fatal
# error says why and ends the VM (reboot -f; the VMMs run with no reboot).

say() { echo "cocoon-init: $*"; }
die() {
    echo "cocoon-init: fatal: $*"
    sync
    reboot -f
    # PID 1 must not return: the kernel would panic without saying why.
    while :; do sleep 1; done
}

# %XX-decoding of the command line's values (cmdline.rs encodes every byte
# outside [A-Za-z0-9/._-], so a raw value has no backslash).
decode() { printf '%b' "$(echo "$1" | sed 's/%/\\x/g')"; }

# The /dev node of the disk with virtio serial $1, once it exists.
find_disk() {
    for s in /sys/block/vd*/serial; do
        [ -r "$s" ] || continue
        if [ "$(cat "$s")" = "$1" ]; then
            d=${s%/serial}
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 1
}

wait_disk() {
    i=0
    while ! find_disk "$1"; do
        i=$((i + 1))
        [ $i -le 600 ] || return 1
        usleep 100000
    done
}

# The GPT unique GUID (lower-case) of partition $2 of disk $1.
gpt_partuuid() {
    [ "$(dd if="$1" bs=1 skip=512 count=8 2>/dev/null)" = "EFI PART" ] || return 1
    lba=$(od -An -tu4 -j 584 -N 4 "$1" | tr -d ' ')
    esz=$(od -An -tu4 -j 596 -N 4 "$1" | tr -d ' ')
    od -An -tx1 -j $((lba * 512 + ($2 - 1) * esz + 16)) -N 16 "$1" | tr -d ' \n' |
        awk '{ s = $0; print substr(s,7,2) substr(s,5,2) substr(s,3,2) substr(s,1,2) "-" \
            substr(s,11,2) substr(s,9,2) "-" substr(s,15,2) substr(s,13,2) "-" \
            substr(s,17,4) "-" substr(s,21,12) }'
}

# The partitions of disk $1 (/dev/vdX), in partition-number order.
partitions() {
    name=${1##*/}
    for p in /sys/block/"$name"/"$name"*; do
        [ -r "$p/partition" ] && echo "$(cat "$p/partition") /dev/${p##*/}"
    done | sort -n | while read -r _ dev; do echo "$dev"; done
}

stage1() {
    export PATH=/bin
    /bin/busybox mkdir -p /proc /sys /dev /newroot /cocoon
    /bin/busybox --install -s /bin
    mount -t devtmpfs devtmpfs /dev 2>/dev/null
    exec </dev/console >/dev/console 2>&1
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    say "started ($(uname -r))"

    while read -r m; do
        insmod "/lib/modules/$m.ko" || die "insmod $m failed"
    done </lib/modules/load
    say "modules loaded: $(tr '\n' ' ' </lib/modules/load)"

    root_kind=""
    rootpart=""
    disks=""
    set -f
    for arg in $(cat /proc/cmdline); do
        case "$arg" in
        cocoon.root=*) root_kind=${arg#cocoon.root=} ;;
        cocoon.rootpart=*) rootpart=${arg#cocoon.rootpart=} ;;
        cocoon.disk=*) disks="$disks ${arg#cocoon.disk=}" ;;
        esac
    done
    set +f
    [ -n "$root_kind" ] || die "no cocoon.root= on the kernel command line"

    lower=""
    n=0
    cow=""
    : >/cocoon/mounts
    for d in $disks; do
        IFS=: read -r serial role mp fstype <<EOF
$d
EOF
        serial=$(decode "$serial")
        dev=$(wait_disk "$serial") || die "disk $serial ($role) did not appear within 60 s"
        ro=$(cat "/sys/block/${dev##*/}/ro")
        say "disk $serial role=$role dev=$dev ro=$ro"
        case "$role" in
        layer)
            mkdir -p "/cocoon/layers/$n"
            mount -o ro -t squashfs "$dev" "/cocoon/layers/$n" 2>/dev/null ||
                mount -o ro -t erofs "$dev" "/cocoon/layers/$n" ||
                die "layer $serial ($dev) is neither squashfs nor erofs"
            lower="/cocoon/layers/$n${lower:+:$lower}"
            n=$((n + 1))
            ;;
        cow) cow=$dev ;;
        data)
            mp=$(decode "$mp")
            if [ -n "$mp" ] && [ "$fstype" = ext4 ]; then
                echo "$dev $mp" >>/cocoon/mounts
            fi
            ;;
        cidata) ;;
        *) die "disk $serial: unknown role $role" ;;
        esac
    done
    [ -n "$cow" ] || die "the plan has no cow disk"

    case "$root_kind" in
    layered)
        [ -n "$lower" ] || die "a layered root with no layers"
        mkdir -p /cocoon/cow
        mount -t ext4 "$cow" /cocoon/cow || die "cannot mount the cow $cow as ext4"
        mkdir -p /cocoon/cow/upper /cocoon/cow/work
        mount -t overlay overlay -o "lowerdir=$lower,upperdir=/cocoon/cow/upper,workdir=/cocoon/cow/work" /newroot ||
            die "cannot mount the overlay root (lowerdir=$lower)"
        say "root overlay layers=$n lowerdir=$lower upper=$cow"
        ;;
    disk)
        part=""
        case "$rootpart" in
        PARTUUID=*)
            want=$(decode "${rootpart#PARTUUID=}" | tr A-F a-f)
            for p in $(partitions "$cow"); do
                num=$(cat "/sys/class/block/${p##*/}/partition")
                if [ "$(gpt_partuuid "$cow" "$num")" = "$want" ]; then part=$p; fi
            done
            [ -n "$part" ] || die "no partition of $cow has PARTUUID $want"
            ;;
        LABEL=*)
            label=$(decode "${rootpart#LABEL=}")
            part=$(findfs "LABEL=$label") || die "no filesystem labelled $label"
            ;;
        "") ;;
        *)
            part=$(partitions "$cow" | sed -n "${rootpart}p")
            [ -n "$part" ] || die "$cow has no partition $rootpart"
            ;;
        esac
        if [ -n "$part" ]; then
            mount -t ext4 "$part" /newroot || die "cannot mount the root partition $part as ext4"
        else
            for p in $(partitions "$cow") "$cow"; do
                if mount -t ext4 "$p" /newroot 2>/dev/null; then
                    part=$p
                    break
                fi
            done
            [ -n "$part" ] || die "no ext4 filesystem on $cow or its partitions"
        fi
        say "root disk $part"
        ;;
    *) die "cocoon.root=$root_kind: not layered or disk" ;;
    esac

    mkdir -p /newroot/dev /newroot/proc /newroot/sys || die "cannot make /dev, /proc, /sys in the root"
    mount --move /dev /newroot/dev && mount --move /proc /newroot/proc && mount --move /sys /newroot/sys ||
        die "cannot move /dev, /proc, /sys into the root"
    mkdir -p /newroot/dev/.cocoon/bin
    cp /bin/busybox /init /cocoon/mounts /newroot/dev/.cocoon/ || die "cannot copy busybox into /dev/.cocoon"
    [ -f /cocoon/exec ] && cp /cocoon/exec /newroot/dev/.cocoon/exec
    say "switch_root"
    exec switch_root /newroot /dev/.cocoon/busybox sh /dev/.cocoon/init stage2
    die "switch_root failed"
}

# User (USER, USER:GROUP, UID or UID:GID) as uid:gid:home, from the root's
# /etc/passwd and /etc/group. The user must have a passwd entry.
resolve_user() {
    u=${1%%:*}
    g=""
    case "$1" in *:*) g=${1#*:} ;; esac
    line=$(awk -F: -v u="$u" '$1 == u || $3 == u { print $3 ":" $4 ":" $6; exit }' /etc/passwd 2>/dev/null)
    if [ -n "$line" ]; then
        uid=${line%%:*}
        rest=${line#*:}
        gid=${rest%%:*}
        home=${rest#*:}
    else
        # busybox's start-stop-daemon, which drops the privileges, needs
        # a passwd entry even for a numeric uid.
        return 1
    fi
    if [ -n "$g" ]; then
        case "$g" in
        *[!0-9]*) gid=$(awk -F: -v g="$g" '$1 == g { print $3; exit }' /etc/group 2>/dev/null)
            [ -n "$gid" ] || return 1 ;;
        *) gid=$g ;;
        esac
    fi
    echo "$uid:$gid:${home:-/}"
}

unmount_data() {
    while read -r dev mp; do
        umount "$mp" 2>/dev/null || mount -o remount,ro "$mp"
    done </dev/.cocoon/mounts
    mount -o remount,ro / 2>/dev/null
    sync
}

stage2() {
    PATH=/dev/.cocoon/bin
    /dev/.cocoon/busybox --install -s /dev/.cocoon/bin
    while read -r dev mp; do
        mkdir -p "$mp" && mount -t ext4 "$dev" "$mp" || die "cannot mount $dev at $mp"
        say "mounted $dev at $mp"
    done </dev/.cocoon/mounts

    if [ -e /sbin/init ] || [ -L /sbin/init ]; then
        say "exec /sbin/init"
        rm -rf /dev/.cocoon
        unset PATH
        exec /sbin/init
        echo "cocoon-init: fatal: exec /sbin/init failed"
        reboot -f
    fi
    [ -f /dev/.cocoon/exec ] || die "the root has no /sbin/init and the image no Entrypoint or Cmd"
    . /dev/.cocoon/exec
    [ $# -gt "$cocoon_nenv" ] || die "the root has no /sbin/init and the image no Entrypoint or Cmd"
    cd "$cocoon_workdir" || die "WorkingDir $cocoon_workdir: cannot cd there"
    case "$cocoon_user" in
    "" | root | 0 | 0:0 | root:root)
        say "running the OCI process as root"
        env -i HOME=/ "$@"
        rc=$?
        ;;
    *)
        ugh=$(resolve_user "$cocoon_user") || die "User $cocoon_user: not in the root's /etc/passwd (or its group not in /etc/group); a user other than root needs a passwd entry here"
        uid=${ugh%%:*}
        rest=${ugh#*:}
        gid=${rest%%:*}
        home=${rest#*:}
        # The program, found on the image's PATH as env -i would.
        path=""
        i=0
        for w in "$@"; do
            [ $i -lt "$cocoon_nenv" ] || break
            case "$w" in PATH=*) path=${w#PATH=} ;; esac
            i=$((i + 1))
        done
        eval "prog=\${$((cocoon_nenv + 1))}"
        case "$prog" in
        */*) abs=$prog ;;
        *) abs=$(PATH=$path command -v "$prog") || die "$prog: not found on PATH=$path" ;;
        esac
        say "running the OCI process as $uid:$gid"
        # Everything before the program stays (env words), the program is
        # replaced by start-stop-daemon running it as uid:gid.
        n=0
        for w in "$@"; do
            shift
            if [ $n -eq "$cocoon_nenv" ]; then
                set -- "$@" /dev/.cocoon/bin/start-stop-daemon -S -c "$uid:$gid" -x "$abs" --
            else
                set -- "$@" "$w"
            fi
            n=$((n + 1))
        done
        env -i HOME="$home" "$@"
        rc=$?
        ;;
    esac
    say "the OCI process exited with status $rc"
    unmount_data
    say "power off"
    reboot -f
    while :; do sleep 1; done
}

if [ "$1" = stage2 ]; then
    stage2
else
    stage1
fi
