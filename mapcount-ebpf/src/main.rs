//! Kernel side of mapcount: probes on the rmap functions and on `do_wp_page`.
//!
//! Each probe reads the folio's own counters and writes one [`Event`] into
//! the `EVENTS` ring buffer. Field offsets and flag bits are not compiled in:
//! the daemon resolves them from the running kernel's BTF and writes them into
//! [`LAYOUT`] before the object is loaded, so this one object serves every
//! supported kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{kprobe, kretprobe, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use aya_log_ebpf::warn;
use mapcount_common::{
    Event, EventType, FIELD_ABSENT, FolioKind, KernelLayout, Level, OFFSET_ABSENT, RmapOp,
    VM_SHARED_OR_MAYSHARE, WriteFaultOutcome, drop_slot,
};

/// Written by the daemon before load (see `mapcount_daemon::layout`).
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = KernelLayout::ABSENT;

/// Read one field of [`LAYOUT`]. The volatile read keeps the compiler from
/// folding the placeholder value into the code.
macro_rules! layout {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&raw const LAYOUT.$field) }
    };
}

/// The daemon sets the size at load time (`--ringbuf.size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Events that could not be delivered, per CPU, by `drop_slot`.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_slot::COUNT, 0);

/// One open `do_wp_page` call per task: what happened between entry and return.
#[repr(C)]
#[derive(Clone, Copy)]
struct WriteFaultWindow {
    start_ns: u64,
    mm: u64,
    folio: u64,
    vma_shared: u8,
    saw_new_anon: u8,
    saw_reuse: u8,
    saw_old_folio: u8,
    kind: u8,
    order: u8,
    _pad: [u8; 2],
}

/// Keyed by thread id (the low half of `bpf_get_current_pid_tgid`).
#[map]
static WRITE_FAULTS: HashMap<u32, WriteFaultWindow> = HashMap::with_max_entries(16384, 0);

/// Arguments of `folio_add_new_anon_rmap`, kept from entry to return.
#[repr(C)]
#[derive(Clone, Copy)]
struct NewAnonCall {
    folio: u64,
    vma: u64,
}

#[map]
static NEW_ANON_CALLS: HashMap<u32, NewAnonCall> = HashMap::with_max_entries(16384, 0);

const PMD_PAGES: u32 = 512;
const PUD_PAGES: u32 = 512 * 512;

#[inline(always)]
fn count_drop(slot: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(slot) {
        // Per-CPU slot: no other CPU writes it, a plain add is enough.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn thread_id() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

#[inline(always)]
fn read_at<T: Copy>(base: u64, offset: u32) -> Option<T> {
    if offset == OFFSET_ABSENT || base == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

#[inline(always)]
fn read_i32_or_absent(base: u64, offset: u32) -> i32 {
    read_at::<i32>(base, offset).unwrap_or(FIELD_ABSENT)
}

/// What the folio is and its counters, read from the folio itself.
#[inline(always)]
fn fill_folio(event: &mut Event, folio: u64) {
    event.folio = folio;
    let flags: u64 = read_at(folio, layout!(folio_flags)).unwrap_or(0);
    let mapping: u64 = read_at(folio, layout!(folio_mapping)).unwrap_or(0);
    let head_bit = layout!(pg_head_bit);
    let large = head_bit < 64 && flags & (1u64 << head_bit) != 0;

    event.kind = if mapping & 3 == 3 {
        FolioKind::Ksm as u8
    } else if mapping & 3 == 1 {
        FolioKind::Anon as u8
    } else if mapping == 0 {
        FolioKind::NoMapping as u8
    } else {
        let swapbacked_bit = layout!(pg_swapbacked_bit);
        if swapbacked_bit < 64 && flags & (1u64 << swapbacked_bit) != 0 {
            FolioKind::Shmem as u8
        } else {
            FolioKind::File as u8
        }
    };

    event.refcount = read_i32_or_absent(folio, layout!(folio_refcount));
    if large {
        // These fields live in the folio's second struct page; on a small
        // folio they belong to the next, unrelated page.
        event.order = read_at::<u8>(folio, layout!(folio_order)).unwrap_or(0);
        event.mapcount = read_i32_or_absent(folio, layout!(folio_large_mapcount));
        event.entire_mapcount = read_i32_or_absent(folio, layout!(folio_entire_mapcount));
        event.nr_pages_mapped = read_i32_or_absent(folio, layout!(folio_nr_pages_mapped));
        event.pincount = read_i32_or_absent(folio, layout!(folio_pincount));
    } else {
        event.order = 0;
        event.mapcount = read_i32_or_absent(folio, layout!(folio_mapcount));
    }
}

#[inline(always)]
fn vma_mm(vma: u64) -> u64 {
    read_at(vma, layout!(vma_mm)).unwrap_or(0)
}

fn emit_rmap(folio: u64, vma: u64, op: RmapOp, level: Level, nr_pages: u32) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_drop(drop_slot::RING_BUFFER_FULL);
        return;
    };
    let mut event = Event::ZERO;
    fill_folio(&mut event, folio);
    event.event_type = EventType::Rmap as u8;
    event.op = op as u8;
    event.level = level as u8;
    event.nr_pages = nr_pages;
    event.mm = vma_mm(vma);
    event.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    entry.write(event);
    entry.submit(0);

    if op == RmapOp::Remove {
        note_old_folio_in_write_fault(&event);
    }
}

/// Inside a write fault, the first folio that loses a mapping is the one the
/// fault copied away from.
#[inline(always)]
fn note_old_folio_in_write_fault(event: &Event) {
    if let Some(window) = WRITE_FAULTS.get_ptr_mut(thread_id()) {
        let window = unsafe { &mut *window };
        if window.saw_old_folio == 0 {
            window.saw_old_folio = 1;
            window.folio = event.folio;
            window.kind = event.kind;
            window.order = event.order;
        }
    }
}

fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

// folio_add_anon_rmap_ptes(folio, page, nr_pages, vma, address, flags)
#[kprobe]
pub fn add_anon_ptes(ctx: ProbeContext) -> u32 {
    emit_rmap(
        arg(&ctx, 0),
        arg(&ctx, 3),
        RmapOp::Add,
        Level::Pte,
        arg(&ctx, 2) as u32,
    );
    0
}

// folio_add_anon_rmap_pmd(folio, page, vma, address, flags)
#[kprobe]
pub fn add_anon_pmd(ctx: ProbeContext) -> u32 {
    emit_rmap(arg(&ctx, 0), arg(&ctx, 2), RmapOp::Add, Level::Pmd, PMD_PAGES);
    0
}

// folio_add_file_rmap_ptes(folio, page, nr_pages, vma)
#[kprobe]
pub fn add_file_ptes(ctx: ProbeContext) -> u32 {
    emit_rmap(
        arg(&ctx, 0),
        arg(&ctx, 3),
        RmapOp::Add,
        Level::Pte,
        arg(&ctx, 2) as u32,
    );
    0
}

// folio_add_file_rmap_pmd(folio, page, vma)
#[kprobe]
pub fn add_file_pmd(ctx: ProbeContext) -> u32 {
    emit_rmap(arg(&ctx, 0), arg(&ctx, 2), RmapOp::Add, Level::Pmd, PMD_PAGES);
    0
}

// folio_add_file_rmap_pud(folio, page, vma)
#[kprobe]
pub fn add_file_pud(ctx: ProbeContext) -> u32 {
    emit_rmap(arg(&ctx, 0), arg(&ctx, 2), RmapOp::Add, Level::Pud, PUD_PAGES);
    0
}

// folio_remove_rmap_ptes(folio, page, nr_pages, vma)
#[kprobe]
pub fn remove_ptes(ctx: ProbeContext) -> u32 {
    emit_rmap(
        arg(&ctx, 0),
        arg(&ctx, 3),
        RmapOp::Remove,
        Level::Pte,
        arg(&ctx, 2) as u32,
    );
    0
}

// folio_remove_rmap_pmd(folio, page, vma)
#[kprobe]
pub fn remove_pmd(ctx: ProbeContext) -> u32 {
    emit_rmap(arg(&ctx, 0), arg(&ctx, 2), RmapOp::Remove, Level::Pmd, PMD_PAGES);
    0
}

// folio_remove_rmap_pud(folio, page, vma)
#[kprobe]
pub fn remove_pud(ctx: ProbeContext) -> u32 {
    emit_rmap(arg(&ctx, 0), arg(&ctx, 2), RmapOp::Remove, Level::Pud, PUD_PAGES);
    0
}

// folio_add_new_anon_rmap(folio, vma, address[, flags]): it initialises the
// counters and the mapping, so the event is built at return.
#[kprobe]
pub fn add_new_anon(ctx: ProbeContext) -> u32 {
    let call = NewAnonCall {
        folio: arg(&ctx, 0),
        vma: arg(&ctx, 1),
    };
    if NEW_ANON_CALLS.insert(thread_id(), call, 0).is_err() {
        count_drop(drop_slot::TASK_STATE_FULL);
        warn!(&ctx, "new-anon call table full");
    }
    if let Some(window) = WRITE_FAULTS.get_ptr_mut(thread_id()) {
        unsafe { (*window).saw_new_anon = 1 };
    }
    0
}

#[kretprobe]
pub fn add_new_anon_return(_ctx: RetProbeContext) -> u32 {
    let tid = thread_id();
    let Some(call) = (unsafe { NEW_ANON_CALLS.get(tid) }).copied() else {
        return 0;
    };
    let _ = NEW_ANON_CALLS.remove(tid);
    // A PMD-sized anonymous folio is mapped by one PMD; smaller (m)THPs by PTEs.
    let mut folio = Event::ZERO;
    fill_folio(&mut folio, call.folio);
    let (level, nr_pages) = if folio.order >= 9 {
        (Level::Pmd, PMD_PAGES)
    } else {
        (Level::Pte, 1u32 << (folio.order & 31))
    };
    emit_rmap(call.folio, call.vma, RmapOp::AddNew, level, nr_pages);
    0
}

// do_wp_page(vmf): open the per-task window.
#[kprobe]
pub fn write_fault_entry(ctx: ProbeContext) -> u32 {
    let vmf = arg(&ctx, 0);
    let vma: u64 = read_at(vmf, layout!(vmf_vma)).unwrap_or(0);
    let vm_flags: u64 = read_at(vma, layout!(vma_flags)).unwrap_or(0);
    let window = WriteFaultWindow {
        start_ns: unsafe { bpf_ktime_get_ns() },
        mm: vma_mm(vma),
        folio: 0,
        vma_shared: (vm_flags & VM_SHARED_OR_MAYSHARE != 0) as u8,
        saw_new_anon: 0,
        saw_reuse: 0,
        saw_old_folio: 0,
        kind: 0,
        order: 0,
        _pad: [0; 2],
    };
    if WRITE_FAULTS.insert(thread_id(), window, 0).is_err() {
        count_drop(drop_slot::TASK_STATE_FULL);
    }
    0
}

/// Marks a private reuse: `wp_page_reuse(vmf, folio)` (also called on shared
/// mappings, which the VMA flags tell apart) or `folio_move_anon_rmap(folio, vma)`.
fn mark_reuse(folio: u64) {
    if let Some(window) = WRITE_FAULTS.get_ptr_mut(thread_id()) {
        let window = unsafe { &mut *window };
        window.saw_reuse = 1;
        if folio != 0 && window.saw_old_folio == 0 {
            let mut probe = Event::ZERO;
            fill_folio(&mut probe, folio);
            window.saw_old_folio = 1;
            window.folio = folio;
            window.kind = probe.kind;
            window.order = probe.order;
        }
    }
}

// wp_page_reuse(vmf[, folio since 6.8])
#[kprobe]
pub fn write_fault_reuse(ctx: ProbeContext) -> u32 {
    mark_reuse(arg(&ctx, 1));
    0
}

// ptep_set_access_flags(vma, address, ptep, entry, dirty): inside the
// write-fault window only the reuse path calls it.
#[kprobe]
pub fn write_fault_pte_reuse(_ctx: ProbeContext) -> u32 {
    mark_reuse(0);
    0
}

// folio_move_anon_rmap(folio, vma)
#[kprobe]
pub fn write_fault_move_anon(ctx: ProbeContext) -> u32 {
    mark_reuse(arg(&ctx, 0));
    0
}

#[kretprobe]
pub fn write_fault_return(_ctx: RetProbeContext) -> u32 {
    let tid = thread_id();
    let Some(window) = (unsafe { WRITE_FAULTS.get(tid) }).copied() else {
        return 0;
    };
    let _ = WRITE_FAULTS.remove(tid);

    let outcome = if window.vma_shared != 0 {
        WriteFaultOutcome::Shared
    } else if window.saw_new_anon != 0 {
        if window.saw_old_folio != 0 {
            WriteFaultOutcome::Copy
        } else {
            WriteFaultOutcome::CopyZeroPage
        }
    } else if window.saw_reuse != 0 {
        WriteFaultOutcome::Reuse
    } else {
        WriteFaultOutcome::Other
    };

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_drop(drop_slot::RING_BUFFER_FULL);
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let mut event = Event::ZERO;
    event.event_type = EventType::WriteFault as u8;
    event.outcome = outcome as u8;
    event.folio = window.folio;
    event.mm = window.mm;
    event.kind = window.kind;
    event.order = window.order;
    event.timestamp_ns = now;
    event.duration_ns = now.saturating_sub(window.start_ns).min(u32::MAX as u64) as u32;
    event.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    entry.write(event);
    entry.submit(0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
