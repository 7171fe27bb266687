attach=$(sed -n 's/.*mapcount\.attach=\([a-z]*\).*/\1/p' /proc/cmdline)
[ -n "$attach" ] || attach=auto
extra=""
# 64 MiB of ring buffer: the refcount scenario makes a million rmap calls
# in seconds on 6.1, which has no batched rmap functions.
[ "$MODE" = test ] && extra="--record /tmp/events.rec --metrics.dump-on-exit /tmp/final.prom --ringbuf.size=67108864"
[ "$MODE" = selftests ] && extra="--ringbuf.size=67108864"
# Overload: a ring buffer the storm overflows, a folio table it fills.
[ "$MODE" = soak ] && extra="--ringbuf.size=65536 --folio-table.size=20000 --folio-table.memory=1M"
mapcountd --web.listen-address=0.0.0.0:9730 --attach.mode=$attach --log.level=info,mapcount_daemon::aggregate=debug,mapcount_daemon::folios=debug $extra >/tmp/mapcountd.log 2>&1 &
daemon=$!
ready=0
for _ in $(seq 1 300); do
    if wget -q -O /dev/null http://127.0.0.1:9730/-/ready 2>/dev/null; then ready=1; break; fi
    sleep 0.2
done
echo "MAPCOUNT-DAEMON-READY $ready"
if [ "$MODE" = test ]; then
    if [ -x /usr/bin/prometheus ]; then
        # The operator's view: Prometheus scrapes the daemon throughout.
        prometheus --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/tmp/prometheus \
            --web.listen-address=127.0.0.1:9090 >/tmp/prometheus.log 2>&1 &
        prom=$!
        for _ in $(seq 1 300); do
            wget -q -O /dev/null http://127.0.0.1:9090/-/ready 2>/dev/null && break
            sleep 0.2
        done
        # Scraped, and the rules evaluated on that data, before the scenarios.
        for _ in $(seq 1 60); do
            ratio=$(wget -q -O - 'http://127.0.0.1:9090/api/v1/query?query=mapcount_refcount_headroom_ratio')
            case "$ratio" in *'"result":[{'*) break ;; esac
            sleep 1
        done
        sleep 3
        echo "MAPCOUNT-PROM-RATIO-BEFORE $ratio"
        echo "MAPCOUNT-PROM-ALERTS-BEFORE $(wget -q -O - http://127.0.0.1:9090/api/v1/alerts)"
    fi
    mapcount-workload check --metrics 127.0.0.1:9730/metrics --file-dir /mnt/ramfs --expect-mode $attach
    echo "MAPCOUNT-WORKLOAD-EXIT $?"
    # The audit table of the live daemon (docs/audit.md): it must answer.
    mapcountd audit --kernel >/tmp/audit.txt 2>&1
    rc=$?
    sed 's/^/MAPCOUNT-AUDIT /' /tmp/audit.txt
    if [ $rc -eq 0 ]; then result=PASS; else result=FAIL; fi
    echo "MAPCOUNT-CHECK audit/report_exit_status known=0 reported=$rc accepted=0..=0 $result"
    if [ -x /usr/bin/prometheus ]; then
        for _ in $(seq 1 30); do
            alerts=$(wget -q -O - http://127.0.0.1:9090/api/v1/alerts)
            case "$alerts" in *firing*) break ;; esac
            sleep 1
        done
        echo "MAPCOUNT-PROM-ALERTS-AFTER $alerts"
        while read -r index query; do
            echo "MAPCOUNT-PROMQL $index $(wget -q -O - "http://127.0.0.1:9090/api/v1/query?query=$query")"
        done </etc/prometheus/queries.txt
        kill $prom
        wait $prom
        sed 's/^/prometheus: /' /tmp/prometheus.log | grep -v ' level=info ' | head -20
    fi
    # Clean shutdown: every program and link gone, within a second.
    progs=$(bpftool prog show | grep -c '^[0-9]*:')
    links=$(bpftool link show | grep -c '^[0-9]*:')
    start=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    kill -TERM $daemon
    wait $daemon
    echo "MAPCOUNT-DAEMON-EXIT $?"
    end=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    echo "MAPCOUNT-SHUTDOWN progs_before=$progs links_before=$links progs_after=$(bpftool prog show | grep -c '^[0-9]*:') links_after=$(bpftool link show | grep -c '^[0-9]*:') centiseconds=$((end - start))"
    if [ -f /share-path ]; then
        # MAPCOUNT_KEEP_RECORDS: the record and the log, for the host.
        share=$(cat /share-path)
        mkdir -p "$share"
        if mount -t virtiofs share "$share"; then
            cell="$share/$(uname -r)-$attach"
            cp /tmp/events.rec "$cell.rec"
            cp /tmp/mapcountd.log "$cell.log"
            sync
            umount "$share"
            echo "MAPCOUNT-KEPT $cell.rec"
        else
            echo "MAPCOUNT-KEPT none: cannot mount $share (virtiofs)"
        fi
    fi
    mapcountd replay /tmp/events.rec >/tmp/replay.prom 2>/tmp/replay.log
    cat /tmp/replay.log
    mapcount-workload compare /tmp/final.prom /tmp/replay.prom
    # The end-of-run report of a record file says what the live daemon's
    # says of sharing and write faults (the probes are not recorded).
    mapcountd report --file /tmp/final.prom >/tmp/live-report.txt 2>&1
    mapcountd replay --report /tmp/events.rec >/tmp/replay-report.txt 2>/dev/null
    sed 's/^/MAPCOUNT-REPORT /' /tmp/live-report.txt
    grep -E '^  (sharing|write faults) ' /tmp/live-report.txt >/tmp/live-lines.txt
    grep -E '^  (sharing|write faults) ' /tmp/replay-report.txt >/tmp/replay-lines.txt
    sed 's/^/MAPCOUNT-REPLAY-REPORT /' /tmp/replay-lines.txt
    live=$(wc -l </tmp/live-lines.txt)
    lines=$(wc -l </tmp/replay-lines.txt)
    if [ "$lines" -eq 2 ] && cmp -s /tmp/live-lines.txt /tmp/replay-lines.txt; then result=PASS; else result=FAIL; fi
    echo "MAPCOUNT-CHECK report/replay_matches_live known=$live reported=$lines accepted=2_equal_lines $result"
    # SIGINT takes the same way out as SIGTERM.
    mapcountd --web.listen-address=127.0.0.1:9731 --attach.mode=$attach >/tmp/mapcountd-int.log 2>&1 &
    second=$!
    for _ in $(seq 1 300); do
        wget -q -O /dev/null http://127.0.0.1:9731/-/ready 2>/dev/null && break
        sleep 0.2
    done
    kill -INT $second
    wait $second
    echo "MAPCOUNT-SIGINT exit=$? progs_after=$(bpftool prog show | grep -c '^[0-9]*:') links_after=$(bpftool link show | grep -c '^[0-9]*:')"
    sed 's/^/metrics: /' /tmp/final.prom
    sed 's/^/mapcountd: /' /tmp/mapcountd.log
elif [ "$MODE" = selftests ]; then
    # map_hugetlb and hugepage-mmap map 256 MiB of huge pages.
    echo 160 > /proc/sys/vm/nr_hugepages
    # THP for every size the kernel offers, as a test host would run.
    echo always > /sys/kernel/mm/transparent_hugepage/enabled
    metric() {
        wget -q -O - http://127.0.0.1:9730/metrics | grep "^$1" | awk '{s+=$2} END {printf "%d", s}'
    }
    # Until the daemon has taken every record the kernel had produced when
    # asked (the asking itself keeps producing records).
    settle() {
        produced=$(metric mapcount_events_produced_total)
        for _ in $(seq 1 100); do
            sleep 0.2
            taken=$(( $(metric mapcount_events_total) + $(metric mapcount_events_lost_total) ))
            [ $taken -ge $produced ] && break
        done
    }
    # The kernel's counters against the table's: the difference is what
    # processes older than mapcountd map, and must not move.
    drift() {
        wget -q -O /tmp/drift.prom http://127.0.0.1:9730/metrics
        for c in nr_anon_pages nr_mapped nr_anon_transparent_hugepages nr_shmem_pmdmapped nr_file_pmdmapped; do
            k=$(grep "^mapcount_kernel_vmstat{counter=\"$c\"}" /tmp/drift.prom | awk '{printf "%d", $2}')
            t=$(grep "^mapcount_table_vmstat{counter=\"$c\",value=\"exact\"}" /tmp/drift.prom | awk '{printf "%d", $2}')
            echo "MAPCOUNT-DRIFT phase=$1 counter=$c kernel=$k table=$t"
        done
        # The mTHP counters of each anonymous folio size, where the kernel
        # keeps them (6.13+): folios, and folios partially mapped.
        for stats in /sys/kernel/mm/transparent_hugepage/hugepages-*kB/stats; do
            [ -r "$stats/nr_anon" ] || continue
            kb=$(echo "$stats" | sed 's/.*hugepages-\([0-9]*\)kB.*/\1/')
            order=0; pages=$((kb / 4)); while [ $pages -gt 1 ]; do pages=$((pages / 2)); order=$((order + 1)); done
            t=$(grep "^mapcount_folios{kind=\"anon\",order=\"$order\",value=\"exact\"}" /tmp/drift.prom | awk '{printf "%d", $2}')
            echo "MAPCOUNT-DRIFT phase=$1 counter=mthp_order${order}_nr_anon kernel=$(cat "$stats/nr_anon") table=${t:-0}"
            [ -r "$stats/nr_anon_partially_mapped" ] || continue
            t=$(grep "^mapcount_folios_partially_mapped{kind=\"anon\",order=\"$order\"}" /tmp/drift.prom | awk '{printf "%d", $2}')
            echo "MAPCOUNT-DRIFT phase=$1 counter=mthp_order${order}_nr_anon_partially_mapped kernel=$(cat "$stats/nr_anon_partially_mapped") table=${t:-0}"
        done
    }
    settle
    drift begin
    echo "MAPCOUNT-SELFTEST-BEGIN anon_folios=$(metric 'mapcount_folios{kind="anon"')"
    for t in $SELFTESTS; do
        settle
        d0=$(metric mapcount_mapcount_disagreements_total)
        p0=$(metric mapcount_phantom_mappings_total)
        b0=$(metric 'mapcount_maybe_shared_bit_checks_total{result="differ"')
        c0=$(metric mapcount_maybe_shared_bit_checks_total)
        start=$(cut -d. -f1 /proc/uptime)
        (cd /selftests && timeout $SELFTEST_TIMEOUT ./$t >/tmp/selftest.log 2>&1)
        rc=$?
        end=$(cut -d. -f1 /proc/uptime)
        settle
        d1=$(metric mapcount_mapcount_disagreements_total)
        p1=$(metric mapcount_phantom_mappings_total)
        b1=$(metric 'mapcount_maybe_shared_bit_checks_total{result="differ"')
        c1=$(metric mapcount_maybe_shared_bit_checks_total)
        alive=0; kill -0 $daemon 2>/dev/null && alive=1
        echo "MAPCOUNT-SELFTEST test=$t exit=$rc ok=$(grep -c '^ok ' /tmp/selftest.log) not_ok=$(grep -c '^not ok ' /tmp/selftest.log) skip=$(grep -c 'SKIP' /tmp/selftest.log) disagreements=$((d1 - d0)) phantoms=$((p1 - p0)) bit_checks=$((c1 - c0)) bit_differences=$((b1 - b0)) seconds=$((end - start)) daemon_alive=$alive"
        grep '^not ok ' /tmp/selftest.log | head -20 | sed "s/^/selftest $t: /"
        tail -n 4 /tmp/selftest.log | sed "s/^/selftest $t (last lines): /"
    done
    echo "MAPCOUNT-SELFTEST-END anon_folios=$(metric 'mapcount_folios{kind="anon"')"
    # A real application: Redis forks a child for BGSAVE while a client
    # overwrites keys (mapcount-workload redis, which forks nothing: the
    # shell waits). Redis reports the child's copy-on-write size (its smaps
    # Private_Dirty); mapcount counts the copies made meanwhile.
    echo never > /sys/kernel/mm/transparent_hugepage/enabled
    echo 0 > /proc/sys/vm/nr_hugepages
    mkdir -p /tmp/redis
    # A delay per key keeps the child alive while the client writes.
    redis-server --port 6379 --dir /tmp/redis --save '' --appendonly no --rdbcompression no \
        --rdb-key-save-delay 20 --enable-debug-command yes \
        --logfile /tmp/redis.log >/dev/null 2>&1 &
    redis=$!
    for _ in $(seq 1 150); do redis-cli ping 2>/dev/null | grep -q PONG && break; sleep 0.2; done
    mapcount-workload redis --metrics 127.0.0.1:9730/metrics --log /tmp/redis.log --keys 200000
    grep -iE 'copy-on-write|CoW|Background saving' /tmp/redis.log | sed 's/^/redis: /'
    redis-cli SHUTDOWN NOSAVE >/dev/null 2>&1
    wait $redis 2>/dev/null
    settle
    drift end
    grep 'disagree' /tmp/mapcountd.log | head -20 | sed 's/^/mapcountd: /'
    grep 'left at teardown' /tmp/mapcountd.log | head -20 | sed 's/^/mapcountd: /'
    wget -q -O - http://127.0.0.1:9730/metrics | sed 's/^/metrics: /'
    kill -TERM $daemon
    wait $daemon
    echo "MAPCOUNT-DAEMON-EXIT $?"
    grep -E 'event accounting|events lost' /tmp/mapcountd.log | sed 's/^/mapcountd: /'
elif [ "$MODE" = soak ]; then
    seconds=$(sed -n 's/.*mapcount\.soak=\([0-9]*\).*/\1/p' /proc/cmdline)
    mapcount-workload storm --seconds $seconds &
    storm=$!
    start=$(cut -d. -f1 /proc/uptime)
    while kill -0 $storm 2>/dev/null; do
        sleep 10
        now=$(cut -d. -f1 /proc/uptime)
        rss=$(awk '/^VmRSS/ {print $2}' /proc/$daemon/status)
        wget -q -O /tmp/scrape http://127.0.0.1:9730/metrics
        ok=$?
        lost=$(grep '^mapcount_events_lost_total' /tmp/scrape | awk '{s+=$2} END {print s+0}')
        events=$(grep '^mapcount_events_total' /tmp/scrape | awk '{s+=$2} END {print s+0}')
        entries=$(grep '^mapcount_folio_table_entries' /tmp/scrape | awk '{print $2}')
        echo "MAPCOUNT-SOAK t=$((now - start)) rss_kb=$rss scrape_ok=$((ok == 0)) events=$events lost=$lost entries=$entries"
    done
    # The exact totals against the kernel's page maps while another storm
    # overflows the ring buffer.
    mapcount-workload exact-totals --metrics 127.0.0.1:9730/metrics
    kill -TERM $daemon
    wait $daemon
    echo "MAPCOUNT-DAEMON-EXIT $?"
    grep -E 'event accounting|events lost' /tmp/mapcountd.log | sed 's/^/mapcountd: /'
elif [ -f /command ]; then
    # cargo xtask run -- COMMAND: the developer's command in the shared
    # directory, mounted at the host's path (virtiofs), next to mapcountd.
    tail -f /tmp/mapcountd.log | sed 's/^/mapcountd: /' &
    share=$(cat /share-path)
    mkdir -p "$share"
    if ! mount -t virtiofs share "$share"; then
        echo "MAPCOUNT-RUN-FAILED cannot mount the shared directory $share (virtiofs)"
    elif [ $ready != 1 ]; then
        echo "MAPCOUNT-RUN-FAILED mapcountd did not start"
    else
        echo "MAPCOUNT-COMMAND-START"
        (cd "$share" && sh /command)
        rc=$?
        # The last events in flight reach the table before the report.
        sleep 1
        mapcountd report --url http://127.0.0.1:9730/metrics 2>&1 | sed 's/^/MAPCOUNT-REPORT /'
        echo "MAPCOUNT-COMMAND-EXIT $rc"
    fi
    kill -TERM $daemon
    wait $daemon
    sync
    umount "$share" 2>/dev/null
else
    tail -f /tmp/mapcountd.log &
    mapcount-workload demo --metrics 127.0.0.1:9730/metrics --file-dir /mnt/ramfs &
    wait $daemon
fi
# qemu runs with -no-reboot, so a reboot ends it too: kernels without ACPI
# (the small one) cannot power off and would only halt.
reboot -f
