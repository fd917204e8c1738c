#!/bin/sh
# Ballast lab initramfs /init (PID 1 until switch_root).
# Debian's kernel has virtio and squashfs as modules, not built in, so this
# loads them, mounts the read-only squashfs root from /dev/vda and switches
# into it. Nothing here is writable state: the root's own init does the rest.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
  echo "initramfs: $*"
  echo "initramfs: dropping to a rescue shell on the console"
  exec setsid cttyhack sh
}

# /etc/modules lists the module files in dependency order; guest-image.ts
# derives that order from each module's depends= modinfo field.
while read -r mod; do
  [ -n "$mod" ] || continue
  insmod "/lib/modules/$mod" || echo "initramfs: insmod $mod failed"
done < /etc/modules

# virtio-blk probes asynchronously and TCG is slow, so wait for the disk
# instead of assuming it is there right after insmod returns.
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ "$i" -gt 300 ] && fail "no /dev/vda after 30 s"
  sleep 0.1
done

mkdir -p /newroot
mount -t squashfs -o ro /dev/vda /newroot || fail "cannot mount /dev/vda as squashfs"
[ -e /newroot/etc/inittab ] || fail "the root on /dev/vda has no /etc/inittab"
# Hand the API filesystems over instead of remounting them, so nothing the
# kernel already created in /dev is lost.
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/init
