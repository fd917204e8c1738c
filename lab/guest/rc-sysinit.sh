#!/bin/sh
# Ballast lab guest boot script, run once by busybox init ("sysinit").
# It stands in for what systemd does on a production guest, reduced to what
# the agent and the tests need.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mounted() { grep -q " $1 " /proc/mounts 2>/dev/null; }

mounted /proc || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
# The root is a read-only squashfs (so node's pages stay reclaimable page
# cache instead of unreclaimable Shmem); these are the writable places.
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
# The agent may read per-cgroup memory stats, as it would under systemd.
if grep -qw cgroup2 /proc/filesystems && [ -d /sys/fs/cgroup ]; then
  mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || echo "rc.sysinit: cgroup2 mount failed"
fi

# Keep kernel chatter off the serial shell that tests parse. Oopses and
# panics still print: the kernel raises the console level for those itself.
echo 1 > /proc/sys/kernel/printk

# The optional data disk (/dev/vdb, see lab/guest-image.ts) is a read-only
# squashfs holding /blob, 500 MiB of random bytes, for page-cache workloads.
# Reading a file on a mounted filesystem puts its pages in meminfo "Cached"
# (clean page cache, as on a production guest), and they stay cached after
# the reader exits because the mount holds the device open.
# virtio-blk devices bind before we run, but the disk node can lag on slow
# TCG, so wait briefly when a second virtio-blk device is bound.
nblk=$(ls -d /sys/bus/virtio/drivers/virtio_blk/virtio* 2>/dev/null | wc -l)
if [ "$nblk" -ge 2 ]; then
  i=0
  while [ ! -b /dev/vdb ] && [ "$i" -lt 100 ]; do
    i=$((i + 1))
    sleep 0.1
  done
fi
if [ -b /dev/vdb ]; then
  mount -t squashfs -o ro /dev/vdb /data || echo "rc.sysinit: cannot mount /dev/vdb on /data"
fi

hostname ballast-guest
ip link set lo up
# Static addressing: with restrict=on there is no DHCP worth waiting for and
# the only reachable peer is the guestfwd address 10.0.2.100. The lab's
# default guest has no network device at all (the agent talks over its
# virtio-serial port), so only a guest started with guestfwd has an eth0.
if [ -e /sys/class/net/eth0 ]; then
  if ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2; then
    :
  else
    echo "rc.sysinit: eth0 setup failed"
  fi
fi
