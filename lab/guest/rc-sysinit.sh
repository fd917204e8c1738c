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

# Hold the optional data disk (/dev/vdb) open, the way a mounted filesystem
# would. Linux drops a block device's page cache on its last close, so
# without a holder every cache-read workload would leave nothing cached.
# That cache is reported as "Buffers" in /proc/meminfo, not "Cached".
if [ -b /dev/vdb ]; then
  sleep 2147483647 </dev/vdb >/dev/null 2>&1 &
fi

hostname ballast-guest
ip link set lo up
# Static addressing: with restrict=on there is no DHCP worth waiting for and
# the only reachable peer is the guestfwd address 10.0.2.100.
if ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2; then
  :
else
  echo "rc.sysinit: eth0 setup failed"
fi
