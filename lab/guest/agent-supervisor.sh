#!/bin/sh
# Ballast lab agent supervisor: restarts ballast-agent whenever it exits, the
# way agent/ballast-agent.service (Restart=always, RestartSec=1s) does under
# systemd in production. Arguments come from the kernel command line:
#   ballast.vm_id=<id>            -> --vm-id <id>
#   ballast.coordinator=<h:p>     -> --coordinator <h:p> (default 10.0.2.100:50051)
#   ballast.channel=<kind>        -> --channel <kind> (auto|virtio-serial|tcp; default:
#                                    the agent's own, auto: the virtio-serial port
#                                    org.ballast.agent.0 if present, else TCP)
#   ballast.agent=0               -> do not start the agent at all
# BALLAST_CMDLINE, BALLAST_AGENT and BALLAST_AGENT_LOG override the inputs so
# tests can exercise this loop with a stand-in agent.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp
# Same as the systemd unit: keep the agent small and predictable.
export NODE_OPTIONS=--max-old-space-size=64
CMDLINE="${BALLAST_CMDLINE:-/proc/cmdline}"
AGENT="${BALLAST_AGENT:-/opt/ballast/ballast-agent.mjs}"
LOG="${BALLAST_AGENT_LOG:-/tmp/agent.log}"
# Never the serial console: that is the test shell's channel.
exec >>"$LOG" 2>&1 </dev/null

vm_id=""
coordinator="10.0.2.100:50051"
channel=""
enabled=1
for arg in $(cat "$CMDLINE"); do
  case "$arg" in
    ballast.vm_id=*) vm_id="${arg#*=}" ;;
    ballast.coordinator=*) coordinator="${arg#*=}" ;;
    ballast.channel=*) channel="${arg#*=}" ;;
    ballast.agent=*) enabled="${arg#*=}" ;;
  esac
done

if [ "$enabled" = "0" ]; then
  echo "agent-supervisor: ballast.agent=0 on the kernel command line, not starting the agent"
  exit 0
fi

set -- run --coordinator "$coordinator"
[ -n "$vm_id" ] && set -- "$@" --vm-id "$vm_id"
[ -n "$channel" ] && set -- "$@" --channel "$channel"

# OOMScoreAdjust=-900: the OOM killer must not pick the agent that is
# supposed to prevent OOM. Inherited by every node the loop starts.
echo -900 > /proc/self/oom_score_adj 2>/dev/null

while :; do
  # Rotate so a crash-looping agent cannot fill the tmpfs (guest RAM).
  if [ "$(stat -c %s "$LOG" 2>/dev/null || echo 0)" -gt 8388608 ]; then
    mv -f "$LOG" "$LOG.1"
    exec >>"$LOG" 2>&1
  fi
  echo "agent-supervisor: $(date -u +%FT%TZ) starting ballast-agent $*"
  # V8 flags as in the systemd unit: at 1 Hz the optimising compiler never
  # pays off (lite mode), and a 1 MiB young generation keeps RSS under 60 MiB.
  node --lite-mode --max-semi-space-size=1 "$AGENT" "$@"
  echo "agent-supervisor: $(date -u +%FT%TZ) ballast-agent exited with status $?, restarting in 1 s"
  sleep 1
done
