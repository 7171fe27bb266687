//! p. The kernel's two-slot guess at "mapped by somebody else" (6.15+
//! `folio_maybe_mapped_shared`), wrong on purpose: a 64 KiB folio mapped
//! by three processes (the parent, then two fork children); the parent and
//! the first child unmap it. The second child alone maps it, but it never
//! held one of the folio's two `_mm_ids` slots, so the kernel keeps the
//! shared bit set. The kernel's answers: kpagecount of each of the child's
//! pages (one mapping each: exclusive), and on 6.15+ the bit itself, which
//! arrives with the child's next rmap event (a page it drops). Then the
//! child writes its first page: 6.15+ copy it because of the bit, earlier
//! kernels because they never reuse a large folio, though nobody else
//! maps it (the kernel's answer: the page's frame changed).

use super::{Cue, Waiters, check_smaps, frames_mapped_once, map_64k_folio};
use crate::{
    checker::Checker,
    kernel::pid_pfn,
    memory::{PAGE, unmap},
    metrics::{MetricsSource, Scrape},
};

const PAGES: usize = 16;

pub(super) fn maybe_shared(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let Some(q) = map_64k_folio(checker, "p_maybe_shared", 3)? else { return Ok(()) };
    // The folio's frames, to tell its pages from copies later.
    let first_frame = crate::kernel::pfn(q as usize)?;
    let frames = first_frame..first_frame + PAGES as u64;
    let before = metrics.settled_scrape()?;
    // The first child takes the folio's second slot.
    let first = Waiters::spawn(1, |_| {});
    // The second child finds no slot free. When told to (`go`), it drops
    // its last page, so that an rmap event carries the kernel's bit.
    let cue = Cue::new();
    let last_page = q as usize + (PAGES - 1) * PAGE;
    let second = Waiters::spawn(1, |_| {
        first.forget_in_child();
        cue.wait();
        unsafe { libc::madvise(last_page as *mut libc::c_void, PAGE, libc::MADV_DONTNEED) };
        unsafe { std::ptr::write_volatile(q, 9) };
        cue.done();
    });
    let survivor = second.pids()[0];
    unmap(q, PAGES);
    first.release();
    cue.go_and_wait();

    // The kernel: each page of the folio the child still maps is mapped
    // once; its first page is a copy now, if its frame changed.
    let (mapped, mapped_once) = frames_mapped_once(survivor, q as usize, 1..PAGES - 1, &frames)?;
    let copied = pid_pfn(survivor, q as usize).is_ok_and(|frame| !frames.contains(&frame));
    let after = metrics.settled_scrape()?;
    let rows = metrics.folios_of(survivor)?;
    let row = rows.iter().find(|r| r.address == q as usize as u64 && r.order == 4);
    checker.exact("p_maybe_shared/pages_mapped", mapped, row.map_or(0.0, |r| r.mapcount as f64));
    let exclusive = usize::from(mapped > 0 && mapped_once == mapped);
    checker.exact("p_maybe_shared/sharers", exclusive, row.map_or(0.0, |r| f64::from(r.sharers)));
    let simulated_set = row.is_some_and(|r| r.simulated_bit == "set");
    match row.map(|r| r.kernel_bit.as_str()) {
        Some(kernel @ ("set" | "clear")) => {
            let kernel_set = kernel == "set";
            checker.exact(
                "p_maybe_shared/kernel_bit_simulated",
                usize::from(kernel_set),
                f64::from(u8::from(simulated_set)),
            );
            // Exclusive in truth, shared by the bit: the false positive the
            // audit counts.
            let false_positives = |s: &Scrape| {
                s.sum(
                    "mapcount_maybe_shared_folios",
                    &[
                        ("heuristic", "folio_maybe_mapped_shared"),
                        ("verdict", "shared"),
                        ("truth", "exclusive"),
                        ("kind", "anon"),
                        ("order", "4"),
                    ],
                )
            };
            checker.exact(
                "p_maybe_shared/false_positives",
                usize::from(kernel_set) * exclusive,
                false_positives(&after) - false_positives(&before),
            );
            let differ =
                |s: &Scrape| s.sum("mapcount_maybe_shared_bit_checks_total", &[("result", "differ")]);
            checker.exact("p_maybe_shared/bit_differences", 0, differ(&after) - differ(&before));
        }
        _ => {
            println!(
                "MAPCOUNT-NOTE p_maybe_shared: simulated bit {}",
                if simulated_set { "set" } else { "clear" }
            );
            checker.not_applicable(
                "p_maybe_shared/kernel_bit_simulated",
                "the kernel keeps no maybe-shared bit",
            );
        }
    }
    // The copy of a page of a folio nobody else mapped.
    let wasted = |s: &Scrape| s.sum("mapcount_cow_copies_of_exclusive_large_folios_total", &[("order", "4")]);
    checker.exact(
        "p_maybe_shared/exclusive_copies",
        usize::from(copied) * exclusive,
        wasted(&after) - wasted(&before),
    );
    // What smaps, pagemap and kpagecount say of the child's pages: exact,
    // private; estimated by the bit, shared.
    let from = q as usize;
    let result =
        check_smaps(metrics, checker, "p_maybe_shared", &[("child", survivor)], from, from + PAGES * PAGE);
    second.release();
    result
}
