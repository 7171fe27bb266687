//! The exact totals while the ring buffer overflows: a storm of small
//! pages fills the ring buffer while this process maps THPs and a child
//! copies one page of each. The kernel side's totals of those THPs must
//! equal what the kernel's own page flags and page maps say happened,
//! with events lost at the same time (the ring-buffer counters of the
//! same series fall short, and are printed beside them).
//!
//! The daemon's table budget is too small for the storm: its small folios
//! are sampled, and the kernel side keeps the events of the others.
//!
//! Order-9 anonymous folios are this scenario's alone: the storm maps
//! small pages with THP disabled, and nothing else runs in the VM.

use std::{ptr, thread::sleep, time::Duration};

use crate::{
    checker::Checker,
    demo,
    kernel::{is_thp, pfn, pid_pfn},
    memory::{PAGE, map_anon, unmap, write_each_page},
    metrics::{MetricsSource, Scrape},
    scenarios::{THP, Waiters, map_thp_aligned},
};

/// THPs mapped: 64 MiB, enough that some of their events meet a full
/// ring buffer.
const THPS: usize = 32;
/// Small pages held while the storm runs: 64 MiB, some 2 MB of table.
const HELD_PAGES: usize = 16384;
/// The storm runs around the THP work (its start and end included).
const STORM_SECONDS: u64 = 20;

/// The series of the scenario's THPs, in the exact totals and in the
/// counters built from the ring buffer.
struct Figures {
    add_new_calls: f64,
    add_new_pages: f64,
    copies: f64,
    lost: f64,
}

impl Figures {
    fn read(scrape: &Scrape, prefix: &str) -> Self {
        let thp = [("op", "add_new"), ("level", "pmd"), ("kind", "anon"), ("order", "9")];
        Figures {
            add_new_calls: scrape.sum(&format!("{prefix}rmap_calls_total"), &thp),
            add_new_pages: scrape.sum(&format!("{prefix}rmap_pages_total"), &thp),
            copies: scrape.sum(
                &format!("{prefix}cow_faults_total"),
                &[("outcome", "copy"), ("kind", "anon"), ("order", "9")],
            ),
            lost: scrape.sum("mapcount_events_lost_total", &[]),
        }
    }

    fn since(&self, before: &Self) -> Self {
        Figures {
            add_new_calls: self.add_new_calls - before.add_new_calls,
            add_new_pages: self.add_new_pages - before.add_new_pages,
            copies: self.copies - before.copies,
            lost: self.lost - before.lost,
        }
    }
}

pub(crate) fn exact_totals(metrics: &MetricsSource) -> anyhow::Result<Checker> {
    let mut checker = Checker::default();
    let before = metrics.scrape()?;
    // Small pages held throughout: more than the daemon's table budget
    // (`--folio-table.memory=1M` in this mode) holds exactly.
    let held =
        map_anon(HELD_PAGES, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, libc::PROT_READ | libc::PROT_WRITE);
    unsafe { libc::madvise(held.cast(), HELD_PAGES * PAGE, libc::MADV_NOHUGEPAGE) };
    write_each_page(held, HELD_PAGES, 1);
    // SAFETY: the storm child only maps, touches, forks and exits.
    let storm = match unsafe { libc::fork() } {
        0 => {
            demo::storm(STORM_SECONDS);
            unsafe { libc::_exit(0) };
        }
        pid => pid,
    };
    sleep(Duration::from_secs(2));

    let p = map_thp_aligned(THPS * THP);
    // One write per THP: each is mapped by a PMD at its first touch.
    for i in 0..THPS {
        unsafe { ptr::write_volatile(p.add(i * THP), 1) };
    }
    // An order-9 folio: a THP page whose 512 pages are contiguous frames.
    let order_9 = |address: usize| -> anyhow::Result<bool> {
        Ok(is_thp(address)? && pfn(address + THP - PAGE)? == pfn(address)? + 511)
    };
    let thps = (0..THPS).map(|i| order_9(p as usize + i * THP)).collect::<anyhow::Result<Vec<_>>>()?;
    let thps_given = thps.iter().filter(|t| **t).count();
    // A child writes the first page of each THP: a copy on write of a page
    // of an order-9 folio (the child's PMD is split first).
    let address = p as usize;
    let child = Waiters::spawn(1, move |_| {
        for i in 0..THPS {
            unsafe { ptr::write_volatile((address + i * THP) as *mut u8, 2) };
        }
    });
    let child_pid = child.pids()[0];
    // The child has written once its first page of each THP is a frame of
    // its own; those of the THPs are the copies the kernel made of them.
    let mut copied = 0;
    for _ in 0..200 {
        copied = (0..THPS)
            .filter(|i| thps[*i])
            .map(|i| Ok(pid_pfn(child_pid, address + i * THP)? != pfn(address + i * THP)?))
            .collect::<anyhow::Result<Vec<bool>>>()?
            .into_iter()
            .filter(|c| *c)
            .count();
        if copied == thps_given {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    child.release();
    unmap(p, THPS * THP / PAGE);
    unmap(held, HELD_PAGES);
    unsafe { libc::waitpid(storm, ptr::null_mut(), 0) };

    // The totals are read from the kernel at scrape time: nothing to drain.
    let after = metrics.scrape()?;
    let exact = Figures::read(&after, "mapcount_exact_").since(&Figures::read(&before, "mapcount_exact_"));
    let from_ring = Figures::read(&after, "mapcount_").since(&Figures::read(&before, "mapcount_"));
    println!(
        "MAPCOUNT-EXACT thps={thps_given} copied={copied} lost={} exact: add_new={} pages={} copies={} ring_buffer: add_new={} pages={} copies={}",
        exact.lost,
        exact.add_new_calls,
        exact.add_new_pages,
        exact.copies,
        from_ring.add_new_calls,
        from_ring.add_new_pages,
        from_ring.copies,
    );
    checker.range("exact/events_lost_meanwhile", 1, exact.lost, 1.0, f64::INFINITY);
    checker.range("exact/thps_given", THPS, thps_given as f64, 1.0, THPS as f64);
    checker.exact("exact/thp_first_mappings", thps_given, exact.add_new_calls);
    checker.exact("exact/thp_first_mapping_pages", thps_given * 512, exact.add_new_pages);
    checker.exact("exact/thp_page_copies", copied, exact.copies);

    // The daemon runs with a table budget the storm overflows: small folios
    // are sampled, and the kernel side keeps the others' events. Of the
    // small folios' rmap calls the kernel counted, those neither received
    // nor lost (every lost event counted as one of them) stayed in the kernel.
    let small = |scrape: &Scrape, name: &str| scrape.sum(name, &[("order", "0")]);
    let counted =
        small(&after, "mapcount_exact_rmap_calls_total") - small(&before, "mapcount_exact_rmap_calls_total");
    let received = small(&after, "mapcount_rmap_calls_total") - small(&before, "mapcount_rmap_calls_total");
    let ratio = after.sum("mapcount_folio_table_sampling_ratio", &[]);
    let dropped_by_daemon = after.sum("mapcount_events_sampled_out_total", &[]);
    let kept_in_kernel = counted - received - exact.lost;
    println!(
        "MAPCOUNT-SAMPLING ratio={ratio} small_rmap_calls: counted={counted} received={received} kept_in_kernel>={kept_in_kernel} dropped_by_daemon={dropped_by_daemon} table_bytes={}",
        after.sum("mapcount_folio_table_bytes", &[])
    );
    checker.range("sampling/small_folios_sampled", 1, 1.0 / ratio, 2.0, f64::INFINITY);
    checker.range("sampling/kept_in_the_kernel", 1, kept_in_kernel, 1.0, f64::INFINITY);
    Ok(checker)
}
