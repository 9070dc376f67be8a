#!/bin/sh
# /init of the project's test initramfs (busybox sh; packed by build-test-kernel.sh).
#
# Console protocol (on the kernel console, ttyS0; all markers start with "linux-test: "):
#   linux-test: init kernel=<release> cpus=<online> uptime=<s>   once, when /init starts
#   linux-test: ready                     waiting for a command line on the console
#   host -> guest:  run <id> <shell command>\n
#   linux-test: begin <id>                then the command's output (stdout and stderr)
#   linux-test: end <id> rc=<status>      the command's exit status
#   linux-test: error <text>              a line that was not understood
#   linux-test: shutdown <why>            /init is powering off or rebooting
# <id> is any word without spaces, chosen by the host. The command runs in a subshell
# (`eval`, so pipes, `;`, `&&`, redirections work) with stdin from /dev/null, in / with
# PATH=/bin:/sbin:/usr/bin:/usr/sbin. If its output does not end with a newline, the end
# marker follows it on the same line: match markers as substrings (kernel messages may also
# share a line with them). Console echo is off, so the host's lines are not repeated.
# A command line is at most 4095 bytes (the tty's canonical line).
#
# Commands on the kernel command line: each `linux-test.run="<shell command>"` (repeatable;
# in double quotes when it has spaces; no double quotes inside) runs before the first ready
# marker, framed the same way with ids cmdline-1, cmdline-2, ...
#
# Power: busybox acpid turns the ACPI power button (KEY_POWER from /dev/input/event*) into
# /etc/acpi/PWRF/00000080, which runs `poweroff`; as busybox's own init, this /init takes
# SIGUSR2 (poweroff) and SIGUSR1 (halt) as "power off cleanly" and SIGTERM (reboot) and
# SIGINT as "reboot cleanly": SIGTERM to all processes, unmount all (read-only where busy),
# SIGKILL to what is left, then `poweroff -f` (syncs; ACPI S5: the VMM exits 0) or
# `reboot -f` (with reboot=k the VMM exits 3, or reboots with --on-reset reboot). So
# `poweroff` and `reboot` work as commands too. About 10 s from the button to the VMM's exit.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
cd /

# Every process costs real time where the kernel runs emulated (about 1-2 s for a fork and
# an exec): use builtins where possible. One mount for all of /etc/fstab: proc, sysfs,
# devtmpfs on /dev, tmpfs on /tmp.
mount -a
# The console: no echo of the host's command lines.
stty -echo 2>/dev/null

read -r kver < /proc/sys/kernel/osrelease
cpus=0
while read -r key rest; do
    [ "$key" = processor ] && cpus=$((cpus + 1))
done < /proc/cpuinfo
read -r up _ < /proc/uptime
echo "linux-test: init kernel=$kver cpus=$cpus uptime=$up"

shutdown() {  # $1: poweroff | reboot, $2: why
    trap '' USR1 USR2 TERM INT
    echo "linux-test: shutdown $1 ($2)"
    kill -TERM -1 2>/dev/null
    umount -a -r 2>/dev/null   # (the time it takes is the grace period of SIGTERM)
    kill -KILL -1 2>/dev/null
    # poweroff -f and reboot -f sync first.
    if [ "$1" = reboot ]; then
        reboot -f
    else
        poweroff -f
    fi
    sleep 5
    echo "linux-test: error $1 -f returned"
    while :; do sleep 3600; done
}
trap 'shutdown poweroff SIGUSR2' USR2
trap 'shutdown poweroff SIGUSR1' USR1
trap 'shutdown reboot SIGTERM' TERM
trap 'shutdown reboot SIGINT' INT
trap '' HUP PIPE

# The ACPI power button, as a distribution handles it: acpid runs the PWRF handler.
acpid -l /tmp/acpid.log

run_cmd() {  # $1: id, $2: shell command
    echo "linux-test: begin $1"
    ( eval "$2" ) </dev/null &
    pid=$!
    # `wait` returns early (status > 128) when a trapped signal arrives; go on waiting.
    while :; do
        wait "$pid"
        rc=$?
        [ -d "/proc/$pid" ] || break
    done
    echo "linux-test: end $1 rc=$rc"
}

# linux-test.run="..." words of /proc/cmdline, split as the kernel does (double quotes).
n=0
read -r cl < /proc/cmdline
while :; do
    cl=${cl#"${cl%%[! ]*}"}
    [ -n "$cl" ] || break
    word=""
    while [ -n "$cl" ]; do
        case $cl in
            ' '*) break ;;
            '"'*)
                cl=${cl#?}
                case $cl in
                    *'"'*) word=$word${cl%%'"'*}; cl=${cl#*'"'} ;;
                    *) word=$word$cl; cl="" ;;
                esac ;;
            *)
                part=${cl%%[ \"]*}
                word=$word$part
                cl=${cl#"$part"} ;;
        esac
    done
    case $word in
        linux-test.run=*) n=$((n + 1)); run_cmd "cmdline-$n" "${word#linux-test.run=}" ;;
    esac
done

# The command loop.
cr=$(printf '\r')
fails=0
while :; do
    echo "linux-test: ready"
    if ! IFS= read -r line; then
        # A signal (its trap ran) or no console: do not spin.
        fails=$((fails + 1))
        [ "$fails" -lt 5 ] || sleep 1
        continue
    fi
    fails=0
    line=${line%"$cr"}
    case $line in
        "run "*)
            rest=${line#run }
            rest=${rest#"${rest%%[! ]*}"}
            id=${rest%% *}
            cmd=${rest#"$id"}
            if [ -z "$id" ]; then
                echo "linux-test: error run without an id"
            else
                run_cmd "$id" "$cmd"
            fi ;;
        "") ;;
        *) echo "linux-test: error unknown command: $line" ;;
    esac
done
