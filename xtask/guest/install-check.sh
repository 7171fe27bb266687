#!/bin/sh
say() { echo "MAPCOUNT-INSTALL $*"; }
# Tracing programs and their links only: systemd has cgroup programs of its own.
count() { bpftool "$1" show 2>/dev/null | grep -cE '^[0-9]+: (kprobe|tracing|perf_event) '; }
for i in $(seq 1 120); do
    state=$(systemctl is-active mapcountd)
    [ "$state" = active ] || [ "$state" = failed ] && break
    sleep 1
done
say "is-active=$state enabled=$(systemctl is-enabled mapcountd) waited=${i}s"
systemctl status mapcountd --no-pager --lines=0 | sed 's/^/MAPCOUNT-INSTALL status: /'
pid=$(systemctl show -p MainPID --value mapcountd)
say "uid=$(stat -c %u /proc/$pid) $(grep CapEff /proc/$pid/status | tr -d '\t')"
curl -s -o /tmp/scrape http://127.0.0.1:9730/metrics
say "scrape_exit=$? lines=$(wc -l </tmp/scrape)"
grep -E '^mapcount_(build_info|kernel_info|probe_attached|events_total)' /tmp/scrape | sed 's/^/MAPCOUNT-INSTALL scrape: /'
progs=$(count prog)
links=$(count link)
systemctl stop mapcountd
say "stopped stop_exit=$? state=$(systemctl is-active mapcountd) progs_before=$progs links_before=$links progs_after=$(count prog) links_after=$(count link)"
journalctl -u mapcountd --no-pager -o cat | sed 's/^/MAPCOUNT-INSTALL journal: /'
systemctl poweroff --force --force
