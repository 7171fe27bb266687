
ready() {
    for _ in $(seq 1 600); do
        wget -q -O /dev/null http://127.0.0.1:9730/-/ready 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
alive() { [ -e /proc/$1 ] && ! grep -q '^State:.*Z' /proc/$1/status 2>/dev/null; }
# Signal $1 with $2 and give it 30 s to exit, then kill it (and say so).
finish() {
    kill -$2 $1
    for _ in $(seq 1 300); do alive $1 || break; sleep 0.1; done
    if alive $1; then echo "MAPCOUNT-BENCH-KILLED $1 did not exit after SIG$2"; kill -KILL $1; fi
    wait $1 2>/dev/null
}
stop() { finish $1 TERM; }
# all: every figure; kernel-cost: the fentry tracers' loops, one round,
# and the programs' instructions per call (cargo xtask bench --kernel-cost).
part=$BENCH_PART
# Start-up: exec to /-/ready, five times.
[ "$part" = all ] && for _ in 1 2 3 4 5; do
    line=$(mapcount-workload time-ready -- mapcountd --log.level=warn)
    echo "$line"
    pid=$(echo "$line" | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
    # Not our child (its parent exited): it ends as a zombie of init.
    finish $pid TERM
done
# The scenarios' own event stream, for the host's ingest benchmark: recorded
# here, written raw to the virtio disk the host reads back.
if [ "$part" = all ]; then
    mapcountd --record /tmp/events.rec --ringbuf.size=67108864 --log.level=warn >/tmp/record.log 2>&1 &
    d=$!
    ready
    mapcount-workload check --metrics 127.0.0.1:9730/metrics --file-dir /mnt/ramfs >/dev/null
    stop $d
fi
if [ "$part" = all ] && [ -b /dev/vda ]; then
    dd if=/tmp/events.rec of=/dev/vda bs=1M 2>/dev/null && sync
    echo "MAPCOUNT-RECORD bytes=$(stat -c %s /tmp/events.rec)"
fi
rm -f /tmp/events.rec
# The functions mapcountd attaches, for bpftrace to probe the same ones.
mapcountd --attach.mode=fentry >/tmp/attach.log 2>&1 &
d=$!
ready
stop $d
probes=$(sed -n 's/.*attached probe="\([a-z_]*\)" function="\([a-z_.0-9]*\)".*/\1 \2/p' /tmp/attach.log |
    while read probe function; do
        case $probe in *_return) echo "kretprobe:$function" ;; *) echo "kprobe:$function" ;; esac
    done | sort -u | tr '\n' ',' | sed 's/,$//')
echo "MAPCOUNT-BENCH-PROBES $probes"
# The same functions as fentry/fexit programs, for like-for-like with
# mapcountd's fentry mode (kfunc/kretfunc: the names bpftrace 0.17 knows).
fentry_probes=$(echo "$probes" | sed 's/kretprobe:/kretfunc:/g; s/kprobe:/kfunc:/g')
tracer() {
    case $1 in
        none) ;;
        mapcountd-fentry|mapcountd-kprobe)
            # Paused while a loop runs: 64 MiB hold every record meanwhile.
            mapcountd --attach.mode=${1#mapcountd-} --ringbuf.size=67108864 --log.level=warn >/tmp/tracer.log 2>&1 &
            tracer_pid=$!; pause="--pause $tracer_pid"; ready ;;
        mapcountd-fentry-sampled)
            # As above, tracking one small folio in 2^20: the kernel side
            # counts every call and sends almost no record.
            mapcountd --attach.mode=fentry --folio-table.sample-shift=20 --ringbuf.size=67108864 --log.level=warn >/tmp/tracer.log 2>&1 &
            tracer_pid=$!; pause="--pause $tracer_pid"; ready ;;
        mapcountd-fentry-running)
            mapcountd --attach.mode=fentry --log.level=warn >/tmp/tracer.log 2>&1 &
            tracer_pid=$!; ready ;;
        mapcountd-fentry-every-record)
            mapcountd --attach.mode=fentry --ringbuf.wakeup=every-record --log.level=warn >/tmp/tracer.log 2>&1 &
            tracer_pid=$!; ready ;;
        bpftrace-*)
            case $1 in *-empty) action='{ }' ;; *) action='{ @calls[probe] = count(); }' ;; esac
            case $1 in bpftrace-fentry-*) on=$fentry_probes ;; *) on=$probes ;; esac
            bpftrace -e "$on $action" >/tmp/tracer.log 2>&1 &
            tracer_pid=$!
            for _ in $(seq 1 600); do
                grep -q Attaching /tmp/tracer.log && break
                # Refused: say why (the report lists it) and time nothing.
                if ! alive $tracer_pid; then
                    sed "s/^/tracer $1: /" /tmp/tracer.log | head -5
                    tracer_pid=""
                    return 1
                fi
                sleep 0.1
            done
            sleep 1 ;;
    esac
}
# Kernel-side cost: the same loops under each tracer, five rounds of three
# runs each, the best of fifteen. A tracer's first run can overlap its own
# start-up (bpftrace attaches after it says so: its first run is up to 1.5
# times its others), and starting a tracer costs more than its loops.
rounds="1 2 3 4 5"
tracers="none mapcountd-fentry mapcountd-kprobe mapcountd-fentry-sampled mapcountd-fentry-running
    mapcountd-fentry-every-record bpftrace-fentry-empty bpftrace-fentry-count bpftrace-kprobe-empty bpftrace-kprobe-count"
# bpftrace's programs too: what its empty and counting programs run per
# call, beside mapcountd's.
profiled="mapcountd-fentry mapcountd-fentry-sampled mapcountd-kprobe bpftrace-fentry-empty bpftrace-fentry-count
    bpftrace-kprobe-empty bpftrace-kprobe-count"
if [ "$part" = kernel-cost ]; then
    rounds=1
    tracers="none mapcountd-fentry mapcountd-fentry-sampled bpftrace-fentry-empty bpftrace-fentry-count"
    profiled="mapcountd-fentry mapcountd-fentry-sampled bpftrace-fentry-empty bpftrace-fentry-count"
fi
for round in $rounds; do
    for t in $tracers; do
        tracer_pid=""
        pause=""
        tracer $t || continue
        mapcount-workload cost --metrics 127.0.0.1:9730/metrics $pause --repeat 3 | sed "s/^MAPCOUNT-COST /MAPCOUNT-COST tracer=$t round=$round /"
        if [ -n "$tracer_pid" ]; then
            finish $tracer_pid INT
            grep -q ERROR /tmp/tracer.log && sed "s/^/tracer $t: /" /tmp/tracer.log | head -5
        fi
    done
done
# Instructions per call of each tracer's programs: the kernel's BPF
# statistics over one more run of the loops under each mode (guest time
# counts instructions, 8 ns each, so run time / 8 is instructions).
for t in $profiled; do
    tracer_pid=""
    pause=""
    tracer $t || continue
    # bpftrace attaches its programs one by one after it says it does: a
    # first run of the loops lets it finish (without it, its programs saw
    # a third to half of the calls mapcountd's did).
    case $t in
        bpftrace-*) mapcount-workload cost --metrics 127.0.0.1:9730/metrics --repeat 1 >/dev/null ;;
    esac
    echo 1 >/proc/sys/kernel/bpf_stats_enabled
    mapcount-workload cost --metrics 127.0.0.1:9730/metrics $pause --repeat 1 >/dev/null
    echo 0 >/proc/sys/kernel/bpf_stats_enabled
    bpftool prog show |
        sed -n "s/^[0-9]*: *[a-z_]* *name \([^ ]*\) .* run_time_ns \([0-9]*\) run_cnt \([0-9]*\).*/MAPCOUNT-PROG tracer=$t name=\1 ns=\2 calls=\3/p"
    finish $tracer_pid INT
done
if [ "$part" = kernel-cost ]; then
    echo "MAPCOUNT-BENCH-DONE"
    reboot -f
fi
# A 1 GiB process forks while another faults at full speed, against a
# fresh daemon with the default ring buffer.
mapcountd --log.level=warn >/tmp/fork-big.log 2>&1 &
d=$!
ready
mapcount-workload fork-big --metrics 127.0.0.1:9730/metrics --mib 1024
stop $d
# Lossless rate: a fresh daemon per rate, per-CPU accounting at its exit;
# with the default ring buffer, then with a 64 KiB one that overflows.
for ring in 8388608 65536; do
    for rate in 10000 20000 40000 80000 160000 320000; do
        mapcountd --ringbuf.size=$ring --log.level=info >/tmp/rate.log 2>&1 &
        d=$!
        ready
        mapcount-workload rate --events-per-second $rate --seconds 10 | sed "s/^/MAPCOUNT-RATE ring=$ring target=$rate /"
        stop $d
        grep 'event accounting' /tmp/rate.log | sed "s/^/MAPCOUNT-RATE ring=$ring target=$rate /"
    done
done
echo "MAPCOUNT-BENCH-DONE"
# qemu runs with -no-reboot, so a reboot ends it too: kernels without ACPI
# (the small one) cannot power off and would only halt.
reboot -f
