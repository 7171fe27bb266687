//! Kernel side of mapcount: probes on the rmap functions and on `do_wp_page`.
//!
//! Each probe reads the folio's own counters and writes one [`Event`] into
//! the `EVENTS` ring buffer. Field offsets and flag bits are not compiled in:
//! the daemon resolves them from the running kernel's BTF and writes them into
//! [`LAYOUT`] before the object is loaded, so this one object serves every
//! supported kernel.
//!
//! Every handler exists twice: as a kprobe (works everywhere) and as an
//! fentry/fexit program (cheaper, needs BTF and function tracing). The daemon
//! picks one per probe; the handlers only see the arguments.
#![no_std]
#![no_main]
// An atomic add with no result (BPF's `lock xadd`): this target's
// `core::sync::atomic` offers no read-modify-write without compare-and-swap.
#![feature(core_intrinsics)]
// A 32-bit register move in `TypedFolio::mapping_type`.
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_get_func_arg, bpf_get_smp_processor_id,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_kernel_str_bytes,
    },
    macros::{fentry, fexit, kprobe, kretprobe, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::{FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext},
};
use aya_log_ebpf::warn;
use mapcount_common::{
    Event, EventType, FIELD_ABSENT, FolioKind, ForkEvent, KernelLayout, Level, MoveEvent, OFFSET_ABSENT,
    RmapOp, SOURCE_NAME_LEN, ScanRefusalEvent, SourceEvent, TeardownEvent, WriteFaultOutcome, counter,
    event_flags, fork_copy, sampling, shared_hint, totals, vm_flags, vma_class,
};

/// Written by the daemon before load (see `mapcount_daemon::layout`).
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = KernelLayout::ABSENT;

/// Set by the daemon: wake it only once this many bytes wait in the ring
/// buffer (it also drains on a timer); 0 leaves the kernel's rule, a
/// wake-up at every record the daemon has not seen yet.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 0;

/// Set by the daemon: 1 when the kernel has no `do_wp_page` of its own
/// (inlined into its caller) and write faults are classified over the
/// whole `handle_mm_fault` call instead (see `fault_window_entry`). The
/// rmap handlers then also note removes and adds inside the window.
#[unsafe(no_mangle)]
static WHOLE_FAULT_WINDOWS: u32 = 0;

/// Where the kernel keeps the start of its `struct page` array (the
/// address of x86-64's `vmemmap_base`, from /proc/kallsyms), or 0: turns
/// the page frame of a PTE into its page, in a whole-fault window whose
/// reuse shows no folio otherwise.
#[unsafe(no_mangle)]
static VMEMMAP_BASE_ADDRESS: u64 = 0;

/// Set by the daemon: its own thread group id. Its address space is left
/// out (its ring buffer alone is thousands of driver-page mappings, and its
/// heap and stacks come and go with every scrape), but for the page cache
/// (see [`observer_leaves_out`]).
#[unsafe(no_mangle)]
static OBSERVER_TGID: u32 = 0;

/// The daemon's `mm`, learnt at its first rmap call or write fault: events
/// on its address space from other contexts (reclaim, exit) are left out too.
#[map]
static OBSERVER_MM: Array<u64> = Array::with_max_entries(1, 0);

/// With batched wake-ups, how often a CPU asks the ring buffer how full it
/// is: every this many records it produces (a helper call saved on the
/// others; the threshold is overshot by at most this many records per CPU).
const WAKEUP_CHECK_EVERY: u64 = 64;

/// Submit flags for a record, the `produced`th of this CPU: see [`WAKEUP_BYTES`].
#[inline(always)]
fn wakeup_flags(produced: u64) -> u64 {
    let threshold = unsafe { core::ptr::read_volatile(&raw const WAKEUP_BYTES) };
    if threshold == 0 {
        0
    } else if produced.is_multiple_of(WAKEUP_CHECK_EVERY)
        && EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= threshold
    {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

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

/// Records produced and lost, per CPU, by `counter` slot.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Exact totals of rmap calls, pages and write faults, per CPU, counted
/// before a record is asked for (see `mapcount_common::totals`).
#[map]
static TOTALS: PerCpuArray<totals::Totals> = PerCpuArray::with_max_entries(1, 0);

/// Set by the daemon while its folio table is over its memory budget: the
/// `mapcount_common::sampling` shift (0: every folio). Read per event, so
/// a change holds from the next call on.
#[map]
static SAMPLING: Array<u32> = Array::with_max_entries(1, 0);

/// A small folio outside the daemon's sample: its events stay here (after
/// they were counted in the totals).
#[inline(always)]
fn sampled_out(event: &Event) -> bool {
    let shift = SAMPLING.get(0).copied().unwrap_or(0);
    !sampling::sampled(event.folio, event.order, shift)
}

/// Small folios are sampled, and `folio`'s address is outside the sample:
/// the folio's events are dropped if it is small.
#[inline(always)]
fn outside_sample(folio: u64) -> bool {
    let shift = SAMPLING.get(0).copied().unwrap_or(0);
    shift != 0 && !sampling::sampled(folio, 0, shift)
}

/// With small folios sampled, most rmap calls are about a small folio
/// outside the sample. For a `page` whose address is outside it
/// ([`outside_sample`]), this tells from its first `struct page` alone,
/// before the VMA, the clock or the folio's counters are read, whether it
/// is a small folio: then the call is counted in the exact totals (unless
/// it is on the daemon's own address space, which `mm` returns) and goes no
/// further. False for what the full path must see: a large folio, a tail
/// page, an unreadable page.
#[inline(always)]
fn small_and_sampled_out(
    page: u64,
    mm: impl FnOnce() -> u64,
    op: RmapOp,
    level: Level,
    nr_pages: u32,
) -> bool {
    let mut place = MaybeUninit::uninit();
    let snapshot = Snapshot::of_first_page(&mut place, page);
    if !snapshot.copied {
        return false;
    }
    let info: u64 = snapshot.field(layout!(page_compound_head)).unwrap_or(0);
    info & 1 == 0 && small_folio_sampled_out(page, snapshot, mm, op, level, nr_pages)
}

/// [`small_and_sampled_out`] for a folio (never a tail page) whose fields
/// are at hand.
#[inline(always)]
fn small_folio_sampled_out(
    folio: u64,
    fields: &impl FolioFields,
    mm: impl FnOnce() -> u64,
    op: RmapOp,
    level: Level,
    nr_pages: u32,
) -> bool {
    let flags: u64 = fields.field(layout!(folio_flags)).unwrap_or(0);
    if has_head_bit(flags) {
        return false;
    }
    // Hugetlb folios are large: of the full path's filters, only the
    // daemon's own address space applies. The totals want the kind alone.
    let kind = if op == RmapOp::AddNew {
        // Read at the entry of folio_add_new_anon_rmap, which sets the
        // mapping (see `new_anon`).
        FolioKind::Anon as u8
    } else {
        folio_kind(flags, fields.mapping_type())
    };
    if observer_leaves_out(mm, kind) {
        return true;
    }
    note_in_fault_window(op, folio);
    total_rmap(op, level, kind, 0, nr_pages);
    true
}

/// Adds each `(slot, n)` to this CPU's totals: one lookup of the array
/// for all of them.
#[inline(always)]
fn add_to_totals<const N: usize>(additions: [(usize, u64); N]) {
    let Some(totals) = TOTALS.get_ptr_mut(0) else { return };
    for (slot, n) in additions {
        // SAFETY: this CPU's own value; programs do not migrate while they
        // run, so there is no other writer.
        if let Some(total) = unsafe { (*totals).slots.get_mut(slot) } {
            *total += n;
        }
    }
}

/// Counts an rmap call on a folio of `kind` and `order` in the exact totals.
#[inline(always)]
fn total_rmap(op: RmapOp, level: Level, kind: u8, order: u8, nr_pages: u32) {
    let (op, level) = (op as u8, level as u8);
    add_to_totals([
        (totals::rmap_calls(op, level, kind, order), 1),
        (totals::rmap_pages(op, level, kind, order), nr_pages as u64),
    ]);
}

/// Counts a write fault in the exact totals; without a known folio kind,
/// at order 0, as the daemon counts its record.
#[inline(always)]
fn total_write_fault(event: &Event) {
    let order = if event.kind == 0 { 0 } else { event.order };
    add_to_totals([(totals::write_faults(event.outcome, event.kind, order), 1)]);
}

/// One open `do_wp_page` call per task: what happened between entry and return.
#[repr(C)]
#[derive(Clone, Copy)]
struct WriteFaultWindow {
    start_ns: u64,
    vmf: u64,
    mm: u64,
    vma_shared: u8,
    saw_new_anon: u8,
    saw_reuse: u8,
    /// `FAULT_FLAG_UNSHARE` was set: not a write.
    unshare: u8,
    /// PFNMAP or MIXEDMAP: a NULL `vmf->page` is a raw pfn, not the zero page.
    raw_pfn_vma: u8,
    /// Opened at `handle_mm_fault` (WHOLE_FAULT_WINDOWS), not `do_wp_page`.
    whole_fault: u8,
    /// Seen inside a whole-fault window: a present PTE cleared and flushed
    /// (only a COW replaces a present PTE), an rmap remove (of the old
    /// folio), an rmap add of an existing folio (a first touch of a file
    /// page, not a write-protect fault).
    saw_clear_flush: u8,
    saw_remove: u8,
    saw_map: u8,
    /// The fault was counted at PMD level already.
    counted: u8,
    _pad: [u8; 6],
    /// The folio the fault was about, where a whole-fault window saw it
    /// (the removed old folio of a copy, the moved one of a reuse).
    folio: u64,
}

/// Keyed by thread id (the low half of `bpf_get_current_pid_tgid`). A
/// thread keeps its entry from one fault to the next, open while
/// `start_ns` is set: updated in place, which saves an insert and a delete
/// (two helper calls) per fault. LRU: exited threads' entries make room.
#[map]
static WRITE_FAULTS: LruHashMap<u32, WriteFaultWindow> = LruHashMap::with_max_entries(16384, 0);

/// Open write-fault windows, counted by thread id modulo the slots: most
/// rmap calls (every new anonymous folio of a first touch) happen outside
/// any write fault, and a zero here spares them the hash lookup in
/// [`WRITE_FAULTS`], about 200 instructions. A count, not a thread id, so
/// that threads sharing a slot all find it non-zero. It can only be too
/// high, which costs a lookup (a window the LRU evicted while open).
#[map]
static OPEN_WINDOWS: Array<u64> = Array::with_max_entries(OPEN_WINDOW_SLOTS, 0);

const OPEN_WINDOW_SLOTS: u32 = 4096;

/// Adds `delta` to the open windows of `tid`'s slot. Atomic: threads on
/// other CPUs share the slot.
#[inline(always)]
fn count_open_window(tid: u32, delta: i64) {
    if let Some(count) = OPEN_WINDOWS.get_ptr_mut(tid % OPEN_WINDOW_SLOTS) {
        use core::intrinsics::{AtomicOrdering, atomic_xadd};
        // SAFETY: an aligned u64 in the map's value memory.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta as u64) };
    }
}

/// The current thread's write-fault window, if one is open. The thread's
/// own increment at the window's opening is visible to it here, on
/// whatever CPU it runs now.
#[inline(always)]
fn open_write_fault(tid: u32) -> Option<*mut WriteFaultWindow> {
    let open_in_slot = OPEN_WINDOWS.get(tid % OPEN_WINDOW_SLOTS).copied().unwrap_or(1);
    if open_in_slot == 0 {
        return None;
    }
    WRITE_FAULTS.get_ptr_mut(tid).filter(|&window| unsafe { (*window).start_ns } != 0)
}

/// Closes `tid`'s open window at `slot` (from [`open_write_fault`]).
#[inline(always)]
fn close_window(tid: u32, slot: *mut WriteFaultWindow) {
    unsafe { (*slot).start_ns = 0 };
    count_open_window(tid, -1);
}

/// x86-64's base pages.
const PAGE_SHIFT: u32 = 12;
const PMD_PAGES: u32 = 512;
const PUD_PAGES: u32 = 512 * 512;
const PMD_ORDER: u8 = 9;
/// 6.1-6.7 `rmap_t`: the call maps the whole compound page (by PMD).
const RMAP_COMPOUND: u64 = 1 << 1;

// ---- reading the kernel ---------------------------------------------------

/// Arguments of the probed function, however the program was entered.
trait Args {
    fn raw(&self, n: usize) -> u64;

    /// What an rmap record needs of the VMA in argument `n`.
    #[inline(always)]
    fn vma_facts(&self, n: usize) -> VmaFacts {
        vma_facts(self.raw(n))
    }

    /// The address space of the VMA in argument `n`.
    #[inline(always)]
    fn vma_mm(&self, n: usize) -> u64 {
        vma_mm(self.raw(n))
    }

    /// The folio in argument `n`, and whether its fields may be plain
    /// loads (else they are copied: [`Snapshot`]).
    #[inline(always)]
    fn folio_arg(&self, _n: usize) -> FolioArg {
        FolioArg::COPY
    }

    /// What a write fault's window needs of the `struct vm_fault` in
    /// argument `n`.
    #[inline(always)]
    fn fault_facts(&self, n: usize) -> FaultFacts {
        fault_facts(self.raw(n))
    }
}

impl Args for ProbeContext {
    #[inline(always)]
    fn raw(&self, n: usize) -> u64 {
        ProbeContext::arg::<u64>(self, n).unwrap_or(0)
    }
}

/// fentry/fexit arguments arrive typed (a `struct page *` is a BTF
/// pointer to the verifier, which then forbids the bit arithmetic of
/// `page_folio`); `bpf_get_func_arg` hands them over as plain numbers.
#[inline(always)]
fn traced_arg(ctx: *mut core::ffi::c_void, n: usize) -> u64 {
    let mut value = 0u64;
    unsafe { bpf_get_func_arg(ctx, n as u32, &mut value) };
    value
}

impl Args for FEntryContext {
    #[inline(always)]
    fn raw(&self, n: usize) -> u64 {
        traced_arg(self.as_ptr(), n)
    }

    /// The VMA's integer fields as plain loads through the typed argument
    /// (a `struct vm_area_struct *` to the verifier, which checks each
    /// offset against the kernel's BTF; the JIT makes each a fault-safe
    /// load) instead of from a 128-byte copy: about 70 instructions fewer
    /// per record. The mm is a pointer field: see `vma_mm` below.
    #[inline(always)]
    fn vma_facts(&self, n: usize) -> VmaFacts {
        let typed = typed_arg(self, n);
        VmaFacts {
            mm: self.vma_mm(n),
            flags: typed_field(typed, layout!(vma_flags)),
            start: typed_field(typed, layout!(vma_start)),
            end: typed_field(typed, layout!(vma_end)),
            pgoff: typed_field(typed, layout!(vma_pgoff)),
        }
    }

    /// A plain load where the kernel's verifier checks pointer loads
    /// cheaply ([`typed_pointer_loads`]); else a helper, whose call costs
    /// about 130 instructions whatever it copies.
    #[inline(always)]
    fn vma_mm(&self, n: usize) -> u64 {
        if typed_pointer_loads() {
            typed_field(typed_arg(self, n), layout!(vma_mm))
        } else {
            vma_mm(self.raw(n))
        }
    }

    #[inline(always)]
    fn folio_arg(&self, n: usize) -> FolioArg {
        FolioArg { loads: typed_pointer_loads(), folio: TypedFolio(typed_arg(self, n)) }
    }

    /// Plain loads through the typed `struct vm_fault *` and the VMA
    /// pointer in it, where pointer loads are cheap: three helper calls
    /// fewer per write fault.
    #[inline(always)]
    fn fault_facts(&self, n: usize) -> FaultFacts {
        let vma_offset = layout!(vmf_vma);
        if !typed_pointer_loads() || vma_offset == OFFSET_ABSENT {
            return fault_facts(self.raw(n));
        }
        let vmf = typed_arg(self, n);
        let vma = typed_field::<u64>(vmf, vma_offset) as *const u8;
        FaultFacts {
            mm: typed_field(vma, layout!(vma_mm)),
            vma_flags: typed_field(vma, layout!(vma_flags)),
            fault_flags: typed_field(vmf, layout!(vmf_flags)),
        }
    }
}

/// Argument `n` of an fentry program as the verifier knows it: a
/// BTF-typed pointer.
#[inline(always)]
fn typed_arg(ctx: &FEntryContext, n: usize) -> *const u8 {
    // SAFETY: the trampoline's context holds the function's arguments.
    unsafe { *ctx.as_ptr().cast::<*const u8>().add(n) }
}

/// Whether a pointer field may be a plain load: the verifier checks each
/// such load by searching the kernel's BTF for the field's trust
/// annotations (`btf_nested_type_is_trusted`), on every path to it. On
/// kernels whose BTF is sorted by name (7.3 is) that search is a binary
/// search; on older ones it is linear, and cost start-up more than the
/// helper it saves costs at run time. Read-only data, so the verifier
/// follows only the branch taken.
#[inline(always)]
fn typed_pointer_loads() -> bool {
    layout!(typed_pointer_loads) != 0
}

/// An integer field at `offset` of a kernel object an fentry program has
/// as a typed argument, or 0 if the kernel has no such field.
#[inline(always)]
fn typed_field<T: Copy + Default>(object: *const u8, offset: u32) -> T {
    if offset == OFFSET_ABSENT {
        return T::default();
    }
    // SAFETY: the verifier checks the offset against the argument's BTF
    // type; a fault reads as zero.
    unsafe { core::ptr::read_volatile(object.add(offset as usize).cast::<T>()) }
}

impl Args for FExitContext {
    #[inline(always)]
    fn raw(&self, n: usize) -> u64 {
        traced_arg(self.as_ptr(), n)
    }
}

/// Adds one to this CPU's counter; returns the new count.
#[inline(always)]
fn count(slot: u32) -> u64 {
    match COUNTERS.get_ptr_mut(slot) {
        // Per-CPU slot, and programs do not migrate while they run: no
        // other writer, a plain add is enough.
        Some(counter) => unsafe {
            *counter += 1;
            *counter
        },
        None => 0,
    }
}

/// Room for one record, counted as produced on this CPU whether or not the
/// ring buffer has space. Submit it with [`Reserved::submit`].
#[inline(always)]
fn reserve<T: 'static>() -> Option<Reserved<T>> {
    let produced = count(counter::PRODUCED);
    match EVENTS.reserve::<T>(0) {
        Some(entry) => Some(Reserved { entry, produced }),
        None => {
            count(counter::RING_BUFFER_FULL);
            None
        }
    }
}

struct Reserved<T: 'static> {
    entry: RingBufEntry<T>,
    /// This CPU's count of records produced, this one included.
    produced: u64,
}

impl<T> Reserved<T> {
    #[inline(always)]
    fn submit(self, record: T) {
        let mut entry = self.entry;
        if size_of::<T>().is_multiple_of(8) && align_of::<T>() >= 8 {
            copy_words(entry.as_mut_ptr(), &record);
        } else {
            entry.write(record); // a driver page's source: rare
        }
        entry.submit(wakeup_flags(self.produced));
    }
}

/// `*dst = *src` for a record of whole, aligned words, a word at a time: a
/// plain copy made LLVM call `memmove`, a loop of one-byte loads and stores
/// (see [`Snapshot`]).
#[inline(always)]
fn copy_words<T>(dst: *mut T, src: &T) {
    let (dst, src) = (dst.cast::<u64>(), (src as *const T).cast::<u64>());
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: both are valid and aligned for all of T's words.
        unsafe { dst.add(i).write_volatile(src.add(i).read()) };
    }
}

#[inline(always)]
fn this_cpu() -> u32 {
    unsafe { bpf_get_smp_processor_id() }
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

/// Bytes of a kernel object copied by one helper call: two `struct page`s,
/// which hold every folio field mapcount reads (the second page has the
/// large-folio counters); for a VMA, its mm, flags, anon_vma and file.
const SNAPSHOT_BYTES: u32 = 128;

/// The fields of a small folio: one `struct page`.
const SMALL_FOLIO_BYTES: usize = 64;

/// The first [`SNAPSHOT_BYTES`] of a kernel object, copied with one helper
/// call; fields are then taken from the copy instead of one call each. The
/// offsets come from [`LAYOUT`], read-only data whose values the verifier
/// knows, so each access is at a fixed stack offset. A field beyond the copy
/// (a kernel with unusual struct layout) falls back to a read of its own.
///
/// The copy starts uninitialised and [`Snapshot::take`] or
/// [`Snapshot::take_first_page`] writes every word of it: the helper
/// writes what it copies (zeroes, if the copy fails), [`zero_words`] the
/// rest. Zero-initialising it instead made LLVM call `memset`, which on
/// this target is a loop of one-byte stores: five instructions a byte,
/// 680 per snapshot, most of a record's cost.
struct Snapshot {
    base: u64,
    copied: bool,
    copy: [MaybeUninit<u64>; SNAPSHOT_WORDS],
}

const SNAPSHOT_WORDS: usize = (SNAPSHOT_BYTES / 8) as usize;

/// Stores zero in `words[from..]`, a word at a time. Volatile, so that LLVM
/// does not merge the stores into a `memset` call (see [`Snapshot`]).
#[inline(always)]
fn zero_words(words: &mut [MaybeUninit<u64>; SNAPSHOT_WORDS], from: usize) {
    for word in words.iter_mut().skip(from) {
        // SAFETY: a valid, aligned place on this program's stack.
        unsafe { core::ptr::write_volatile(word, MaybeUninit::new(0)) };
    }
}

impl Snapshot {
    /// A snapshot of `base`, made in `place` on the caller's stack. (A
    /// constant with an uninitialised copy would not do: LLVM may store
    /// undefined bytes as zeroes, with the same `memset`.)
    #[inline(always)]
    fn of(place: &mut MaybeUninit<Snapshot>, base: u64) -> &mut Snapshot {
        let snapshot = Self::place(place);
        snapshot.take(base);
        snapshot
    }

    /// A snapshot of the first `struct page` at `base` ([`Snapshot::take_first_page`]).
    #[inline(always)]
    fn of_first_page(place: &mut MaybeUninit<Snapshot>, base: u64) -> &mut Snapshot {
        let snapshot = Self::place(place);
        snapshot.take_first_page(base);
        snapshot
    }

    #[inline(always)]
    fn place(place: &mut MaybeUninit<Snapshot>) -> &mut Snapshot {
        let snapshot = place.as_mut_ptr();
        // SAFETY: the fields that must be initialised are, before the
        // reference is made; the copy is `MaybeUninit` words.
        unsafe {
            (&raw mut (*snapshot).base).write(0);
            (&raw mut (*snapshot).copied).write(false);
            place.assume_init_mut()
        }
    }

    /// Copies `base` into this snapshot, in place: the stack is 512 bytes
    /// for everything, and a snapshot is a quarter of it.
    #[inline(always)]
    fn take(&mut self, base: u64) {
        if base != 0 {
            self.base = base;
            let bytes = unsafe {
                core::slice::from_raw_parts_mut(self.copy.as_mut_ptr().cast::<u8>(), SNAPSHOT_BYTES as usize)
            };
            self.copied = unsafe { bpf_probe_read_kernel_buf(base as *const u8, bytes) }.is_ok();
            if self.copied {
                return;
            }
        }
        // A small folio's struct page can be the last before a hole in the
        // vmemmap, where the second half of the copy faults. Its own page
        // is readable: copy that (a small folio needs nothing beyond it).
        // For no object at all, this zeroes the snapshot.
        self.take_first_page(base);
    }

    /// Copies only the first `struct page` at `base`: all a small folio
    /// has (fields beyond it read as zero).
    /// Returns whether it was copied.
    #[inline(always)]
    fn take_first_page(&mut self, base: u64) -> bool {
        self.base = base;
        if base == 0 {
            zero_words(&mut self.copy, 0);
            self.copied = false;
            return false;
        }
        let bytes = unsafe {
            core::slice::from_raw_parts_mut(self.copy.as_mut_ptr().cast::<u8>(), SMALL_FOLIO_BYTES)
        };
        self.copied = unsafe { bpf_probe_read_kernel_buf(base as *const u8, bytes) }.is_ok();
        zero_words(&mut self.copy, SMALL_FOLIO_BYTES / 8);
        self.copied
    }

    /// An integer field at `offset`.
    #[inline(always)]
    fn field<T: Copy>(&self, offset: u32) -> Option<T> {
        if offset == OFFSET_ABSENT {
            return None;
        }
        let size = size_of::<T>() as u32;
        // Integers are aligned to their size, which the copy keeps. A copy
        // that failed left zeroes (the helper clears its buffer on error):
        // no test of `copied` per field, which would give the verifier two
        // paths at each (callers that must tell zero from unreadable test
        // it once).
        if offset <= SNAPSHOT_BYTES - size && offset.is_multiple_of(size) {
            return Some(unsafe { self.copy.as_ptr().cast::<u8>().add(offset as usize).cast::<T>().read() });
        }
        read_at(self.base, offset)
    }
}

/// Where a folio's fields are read from: a [`Snapshot`] copied by a helper
/// call, or the folio itself through an fentry program's typed argument
/// ([`TypedFolio`]).
trait FolioFields {
    /// An integer field at `offset`, None if the kernel has no such field.
    fn field<T: Copy>(&self, offset: u32) -> Option<T>;

    /// False when the folio could not be read: its counters are unknown,
    /// not zero.
    fn readable(&self) -> bool;

    /// The type bits of `folio->mapping` (`FOLIO_MAPPING_ANON`,
    /// `FOLIO_MAPPING_KSM`: its low two bits), or None for no mapping.
    fn mapping_type(&self) -> Option<u32>;
}

impl FolioFields for Snapshot {
    #[inline(always)]
    fn field<T: Copy>(&self, offset: u32) -> Option<T> {
        Snapshot::field(self, offset)
    }

    #[inline(always)]
    fn readable(&self) -> bool {
        self.copied
    }

    #[inline(always)]
    fn mapping_type(&self) -> Option<u32> {
        match self.field::<u64>(layout!(folio_mapping)) {
            None | Some(0) => None,
            Some(mapping) => Some(mapping as u32 & 3),
        }
    }
}

/// A folio an fentry program has as a typed argument (a `struct folio *`
/// to the verifier), on a kernel whose verifier checks pointer loads
/// cheaply ([`typed_pointer_loads`]). Each field is a plain load the
/// verifier checks against the kernel's BTF, instead of a copy of the
/// folio's first two pages by a helper call: about 200 instructions fewer
/// per record. The JIT makes each load fault-safe; the rmap functions are
/// only ever handed a live folio, which is always readable.
#[derive(Clone, Copy)]
struct TypedFolio(*const u8);

/// A program's folio argument, and whether its fields may be plain loads
/// ([`TypedFolio`]). A flag beside a pointer that always holds a value,
/// not an `Option`: a `None` leaves its pointer undefined, and LLVM may
/// then spill a register nothing wrote, which the verifier refuses
/// ("R6 !read_ok": the fentry PMD programs on 6.12).
#[derive(Clone, Copy)]
struct FolioArg {
    loads: bool,
    folio: TypedFolio,
}

impl FolioArg {
    /// Fields copied: kprobe programs, page-based kernels, unsorted BTF.
    const COPY: FolioArg = FolioArg { loads: false, folio: TypedFolio(core::ptr::null()) };

    /// [`small_and_sampled_out`] for the folio at `folio`, from plain loads
    /// where they are allowed, else from a copy of its first page.
    #[inline(always)]
    fn small_and_sampled_out(
        &self,
        folio: u64,
        mm: impl FnOnce() -> u64,
        op: RmapOp,
        level: Level,
        nr_pages: u32,
    ) -> bool {
        if self.loads {
            small_folio_sampled_out(folio, &self.folio, mm, op, level, nr_pages)
        } else {
            small_and_sampled_out(folio, mm, op, level, nr_pages)
        }
    }
}

impl FolioFields for TypedFolio {
    #[inline(always)]
    fn field<T: Copy>(&self, offset: u32) -> Option<T> {
        if offset == OFFSET_ABSENT {
            return None;
        }
        // SAFETY: the verifier checks the offset against `struct folio`.
        Some(unsafe { core::ptr::read_volatile(self.0.add(offset as usize).cast::<T>()) })
    }

    #[inline(always)]
    fn readable(&self) -> bool {
        true
    }

    /// `mapping` is a pointer field: loaded, the verifier knows it as a
    /// pointer and refuses `&` on it. A privileged program may take its
    /// low half by a 32-bit move, which gives a plain number.
    #[inline(always)]
    fn mapping_type(&self) -> Option<u32> {
        let mapping = self.field::<u64>(layout!(folio_mapping))?;
        if mapping == 0 {
            return None;
        }
        let low_half: u32;
        // SAFETY: a register move; no memory is touched.
        unsafe {
            core::arch::asm!("w0 = w1", in("r1") mapping, lateout("r0") low_half,
                options(pure, nomem, nostack, preserves_flags))
        };
        Some(low_half & 3)
    }
}

/// The folio a page belongs to, and a snapshot of it in `place`: the page's
/// own copy when it is not a tail page (one copy instead of two).
#[inline(always)]
fn folio_of_page(page: u64, place: &mut MaybeUninit<Snapshot>) -> (u64, &Snapshot) {
    let snapshot = Snapshot::of(place, page);
    let info: u64 = snapshot.field(layout!(page_compound_head)).unwrap_or(0);
    let folio = compound_head(page, info);
    if folio != page {
        snapshot.take(folio);
    }
    (folio, snapshot)
}

/// `page_folio()`. A tail page has bit 0 of `compound_head` set; the rest
/// is the head's address, or (7.x `compound_info` with power-of-two
/// `struct page` in vmemmap) a mask that rounds the page's own address down
/// to its head. A mask is all ones above a bit and zeros below; no vmemmap
/// address has that shape.
#[inline(always)]
fn page_folio(page: u64) -> u64 {
    compound_head(page, read_at(page, layout!(page_compound_head)).unwrap_or(0))
}

/// `page_folio` given the page's `compound_head` (or `compound_info`).
#[inline(always)]
fn compound_head(page: u64, info: u64) -> u64 {
    if info & 1 == 0 {
        return page;
    }
    let value = info & !1;
    let below = !value;
    if below & below.wrapping_add(1) == 0 { page & value } else { value }
}

/// PG_head in a folio's `flags`: a large folio.
#[inline(always)]
fn has_head_bit(flags: u64) -> bool {
    let head_bit = layout!(pg_head_bit);
    head_bit < 64 && flags & (1u64 << head_bit) != 0
}

/// What a folio is, from its `flags` and the type bits of its mapping
/// ([`FolioFields::mapping_type`]).
#[inline(always)]
fn folio_kind(flags: u64, mapping: Option<u32>) -> u8 {
    let swapbacked_bit = layout!(pg_swapbacked_bit);
    match mapping {
        Some(3) => FolioKind::Ksm as u8,
        Some(1) => FolioKind::Anon as u8,
        None => FolioKind::NoMapping as u8,
        Some(_) if swapbacked_bit < 64 && flags & (1u64 << swapbacked_bit) != 0 => FolioKind::Shmem as u8,
        Some(_) => FolioKind::File as u8,
    }
}

/// What the folio is and its counters, from its `fields`.
#[inline(always)]
fn fill_folio(event: &mut Event, folio: u64, fields: &impl FolioFields) {
    event.folio = folio;
    let flags: u64 = fields.field(layout!(folio_flags)).unwrap_or(0);
    let large = has_head_bit(flags);
    // PG_swapcache is PG_owner_priv_1, which file folios use as PG_checked:
    // folio_test_swapcache() also wants PG_swapbacked.
    let swapcache_bit = layout!(pg_swapcache_bit);
    let swapbacked_bit = layout!(pg_swapbacked_bit);
    if swapcache_bit < 64
        && swapbacked_bit < 64
        && flags & (1u64 << swapcache_bit) != 0
        && flags & (1u64 << swapbacked_bit) != 0
    {
        event.flags |= event_flags::SWAPCACHE;
    }

    event.kind = folio_kind(flags, fields.mapping_type());

    if !fields.readable() {
        // Unreadable: counters unknown, not zero.
        event.refcount = FIELD_ABSENT;
        event.mapcount = FIELD_ABSENT;
        return;
    }
    event.refcount = fields.field(layout!(folio_refcount)).unwrap_or(FIELD_ABSENT);
    if large {
        // These fields live in the folio's second struct page; on a small
        // folio they belong to the next, unrelated page.
        event.order = fields.field::<u8>(layout!(folio_order)).unwrap_or(0);
        event.mapcount = fields.field(layout!(folio_large_mapcount)).unwrap_or(FIELD_ABSENT);
        event.entire_mapcount = fields.field(layout!(folio_entire_mapcount)).unwrap_or(FIELD_ABSENT);
        event.nr_pages_mapped = fields.field(layout!(folio_nr_pages_mapped)).unwrap_or(FIELD_ABSENT);
        event.pincount = fields.field(layout!(folio_pincount)).unwrap_or(FIELD_ABSENT);
        event.shared_hint = match fields.field::<u64>(layout!(folio_mm_ids)) {
            Some(ids) if ids & (1 << 63) != 0 => shared_hint::MAYBE_SHARED,
            Some(_) => shared_hint::EXCLUSIVE,
            None => shared_hint::UNKNOWN,
        };
    } else {
        event.order = 0;
        event.mapcount = fields.field(layout!(folio_mapcount)).unwrap_or(FIELD_ABSENT);
    }
}

#[inline(always)]
fn vma_mm(vma: u64) -> u64 {
    read_at(vma, layout!(vma_mm)).unwrap_or(0)
}

/// What an rmap record needs of the VMA, from one snapshot of it.
#[derive(Clone, Copy)]
struct VmaFacts {
    mm: u64,
    flags: u64,
    start: u64,
    end: u64,
    pgoff: u64,
}

#[inline(always)]
fn vma_facts(vma: u64) -> VmaFacts {
    let mut place = MaybeUninit::uninit();
    let snapshot = Snapshot::of(&mut place, vma);
    VmaFacts {
        mm: snapshot.field(layout!(vma_mm)).unwrap_or(0),
        flags: snapshot.field(layout!(vma_flags)).unwrap_or(0),
        start: snapshot.field(layout!(vma_start)).unwrap_or(0),
        end: snapshot.field(layout!(vma_end)).unwrap_or(0),
        pgoff: snapshot.field(layout!(vma_pgoff)).unwrap_or(0),
    }
}

/// Whether an event on `mm` is mapcountd's own (see [`OBSERVER_TGID`]).
/// Learns the daemon's mm when the daemon itself is running.
#[inline(always)]
fn is_observer(mm: u64) -> bool {
    let observer_tgid = unsafe { core::ptr::read_volatile(&raw const OBSERVER_TGID) };
    if observer_tgid == 0 {
        return false;
    }
    let Some(known) = OBSERVER_MM.get_ptr_mut(0) else { return false };
    // Once learnt, the daemon's mm says it all (it never execs): no read of
    // the current task on every call.
    let learnt = unsafe { *known };
    if learnt != 0 && mm != 0 {
        return mm == learnt;
    }
    let (current_mm, tgid) = current_mm_and_tgid();
    if tgid == observer_tgid && current_mm != 0 {
        unsafe { *known = current_mm };
        return mm == 0 || mm == current_mm;
    }
    mm != 0 && mm == unsafe { *known }
}

/// Filters applied before a record is reserved, so that produced equals
/// received plus lost: hugetlb VMAs here, the observer's own address space
/// once the folio's kind is known ([`observer_leaves_out`]).
#[inline(always)]
fn hugetlb_left_out(vma: &VmaFacts) -> bool {
    if vma.flags & vm_flags::HUGETLB != 0 {
        count(counter::HUGETLB_SKIPPED);
        return true;
    }
    false
}

/// Whether an rmap call on a folio of `kind`, in the address space that
/// `mm` returns, is left out as the daemon's own. `mm` is called only for
/// a kind that can be (on the sampled path it costs a helper call).
/// Page-cache folios are not: the daemon maps its binary and the libraries
/// every process maps, and a page of those it faults in after a workload
/// mapped it is one more mapping in the kernel's count, which the table
/// must see too (left out, every later event on the page found the table
/// one mapping short). Its anonymous and driver pages are its alone.
#[inline(always)]
fn observer_leaves_out(mm: impl FnOnce() -> u64, kind: u8) -> bool {
    if kind == FolioKind::File as u8 || kind == FolioKind::Shmem as u8 {
        return false;
    }
    if is_observer(mm()) {
        count(counter::OBSERVER_SKIPPED);
        return true;
    }
    false
}

/// `Event::base`: where the folio's first page is mapped in this VMA. The
/// kernel's own rule (`vma_address`) from the folio's index; a folio that
/// index places outside the VMA (driver pages, KSM pages in a second
/// process) is filed at the VMA's start, the same for its add and remove.
#[inline(always)]
fn folio_base(vma: &VmaFacts, index: u64, order: u8) -> u64 {
    let base = vma.start.wrapping_add(index.wrapping_sub(vma.pgoff) << PAGE_SHIFT);
    let size = 1u64 << ((order as u32 & 31) + PAGE_SHIFT);
    if base.wrapping_add(size) <= vma.start || base >= vma.end { vma.start } else { base }
}

/// The running task's mm and thread group id. `bpf_get_current_task_btf`
/// returns a pointer the verifier knows to be a task (read-only data gives
/// the offsets as constants), so `tgid` is a plain load, not a helper call.
/// `mm` is a pointer field: a plain load only where the verifier checks
/// those cheaply ([`typed_pointer_loads`]), else a helper.
#[inline(always)]
fn current_mm_and_tgid() -> (u64, u32) {
    let task = unsafe { bpf_get_current_task_btf() } as u64;
    let mm = match layout!(task_mm) {
        OFFSET_ABSENT => 0,
        offset if typed_pointer_loads() => unsafe {
            core::ptr::read_volatile((task + offset as u64) as *const u64)
        },
        offset => unsafe { bpf_probe_read_kernel((task + offset as u64) as *const u64) }.unwrap_or(0),
    };
    let tgid = match layout!(task_tgid) {
        OFFSET_ABSENT => (bpf_get_current_pid_tgid() >> 32) as u32,
        offset => unsafe { core::ptr::read_volatile((task + offset as u64) as *const u32) },
    };
    (mm, tgid)
}

/// Reads a kernel string through a chain of pointers into `out`.
#[inline(always)]
fn read_name(string: u64, out: &mut [u8; SOURCE_NAME_LEN]) {
    if string != 0 {
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(string as *const u8, out) };
    }
}

/// Where a page without a mapping was mapped: the VMA class and the file
/// (a socket, a BPF map, io_uring, a device) behind the VMA.
#[inline(always)]
fn emit_source(vma: u64, op: RmapOp, nr_pages: u32) {
    let Some(entry) = reserve::<SourceEvent>() else { return };
    let flags: u64 = read_at(vma, layout!(vma_flags)).unwrap_or(0);
    let mut event = SourceEvent {
        event_type: EventType::Source as u8,
        vma_class: if flags & vm_flags::MIXEDMAP != 0 {
            vma_class::MIXEDMAP
        } else if flags & vm_flags::PFNMAP != 0 {
            vma_class::PFNMAP
        } else {
            vma_class::OTHER
        },
        op: op as u8,
        _pad: [0],
        nr_pages,
        cpu: this_cpu(),
        _pad2: 0,
        fs_type: [0; SOURCE_NAME_LEN],
        name: [0; SOURCE_NAME_LEN],
    };
    let file: u64 = read_at(vma, layout!(vma_file)).unwrap_or(0);
    let dentry: u64 = read_at(file, layout!(file_dentry)).unwrap_or(0);
    read_name(read_at(dentry, layout!(dentry_name)).unwrap_or(0), &mut event.name);
    let inode: u64 = read_at(file, layout!(file_inode)).unwrap_or(0);
    let sb: u64 = read_at(inode, layout!(inode_sb)).unwrap_or(0);
    let fs_type: u64 = read_at(sb, layout!(sb_type)).unwrap_or(0);
    read_name(read_at(fs_type, layout!(fs_type_name)).unwrap_or(0), &mut event.fs_type);
    entry.submit(event);
}

// ---- rmap events ----------------------------------------------------------

/// A record about a folio: what it is and its counters, stamped just
/// before they were read (the daemon orders records by that time).
#[inline(always)]
fn folio_event(timestamp_ns: u64, folio: u64, fields: &impl FolioFields) -> Event {
    let mut event = Event::ZERO;
    event.cpu = this_cpu();
    event.timestamp_ns = timestamp_ns;
    fill_folio(&mut event, folio, fields);
    event
}

#[inline(always)]
fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// An rmap call on the folio in argument `folio_arg`, mapped in the VMA in
/// argument `vma_arg`.
#[inline(always)]
fn emit_rmap(args: &impl Args, folio_arg: usize, vma_arg: usize, op: RmapOp, level: Level, nr_pages: u32) {
    let folio = args.raw(folio_arg);
    let arg = args.folio_arg(folio_arg);
    if outside_sample(folio) && arg.small_and_sampled_out(folio, || args.vma_mm(vma_arg), op, level, nr_pages)
    {
        return;
    }
    // Read only now: a program's reads of its arguments are not moved past
    // the sample test, and most calls end there.
    let vma = args.raw(vma_arg);
    let facts = args.vma_facts(vma_arg);
    if hugetlb_left_out(&facts) {
        return;
    }
    let timestamp_ns = now();
    if arg.loads {
        record_rmap(timestamp_ns, folio, &arg.folio, vma, &facts, op, level, nr_pages);
    } else {
        let mut place = MaybeUninit::uninit();
        let snapshot = Snapshot::of(&mut place, folio);
        record_rmap(timestamp_ns, folio, snapshot, vma, &facts, op, level, nr_pages);
    }
}

/// An rmap call's record, from the folio's `fields` read after `timestamp_ns`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn record_rmap(
    timestamp_ns: u64,
    folio: u64,
    fields: &impl FolioFields,
    vma: u64,
    facts: &VmaFacts,
    op: RmapOp,
    level: Level,
    nr_pages: u32,
) {
    let index = fields.field(layout!(folio_index)).unwrap_or(0);
    let event = folio_event(timestamp_ns, folio, fields);
    if observer_leaves_out(|| facts.mm, event.kind) {
        return;
    }
    note_in_fault_window(op, folio);
    total_rmap(op, level, event.kind, event.order, nr_pages);
    if sampled_out(&event) {
        return;
    }
    let Some(entry) = reserve::<Event>() else { return };
    submit_rmap(entry, event, vma, facts, index, op, level, nr_pages);
}

/// A page-based (6.1-6.7) rmap call: a compound call maps the whole PMD.
#[inline(always)]
fn emit_page_rmap(args: &impl Args, page_arg: usize, vma_arg: usize, op: RmapOp, compound: bool) {
    let (page, vma) = (args.raw(page_arg), args.raw(vma_arg));
    let (level, nr_pages) = if compound { (Level::Pmd, PMD_PAGES) } else { (Level::Pte, 1) };
    if outside_sample(page) && small_and_sampled_out(page, || args.vma_mm(vma_arg), op, level, nr_pages) {
        return;
    }
    let facts = args.vma_facts(vma_arg);
    if hugetlb_left_out(&facts) {
        return;
    }
    let timestamp_ns = now();
    let mut place = MaybeUninit::uninit();
    let (folio, snapshot) = folio_of_page(page, &mut place);
    record_rmap(timestamp_ns, folio, snapshot, vma, &facts, op, level, nr_pages);
}

/// Completes an rmap record from `folio_event` with the call and submits it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn submit_rmap(
    entry: Reserved<Event>,
    mut event: Event,
    vma: u64,
    facts: &VmaFacts,
    index: u64,
    op: RmapOp,
    level: Level,
    nr_pages: u32,
) {
    event.event_type = EventType::Rmap as u8;
    event.op = op as u8;
    event.level = level as u8;
    event.nr_pages = nr_pages;
    event.mm = facts.mm;
    event.base = folio_base(facts, index, event.order);
    let (current_mm, tgid) = current_mm_and_tgid();
    if event.mm != 0 && event.mm == current_mm {
        event.flags |= event_flags::OWN_MM;
    }
    event.tgid = tgid;
    let kind = event.kind;
    entry.submit(event);
    if kind == FolioKind::NoMapping as u8 && op != RmapOp::Remove {
        emit_source(vma, op, nr_pages);
    }
}

/// Declares a kprobe and an fentry program that run the same handler.
macro_rules! entry_probe {
    ($kprobe:ident, $fentry:ident, |$args:ident| $body:expr) => {
        #[kprobe]
        pub fn $kprobe(ctx: ProbeContext) -> u32 {
            let $args = &ctx;
            $body;
            0
        }

        #[fentry]
        pub fn $fentry(ctx: FEntryContext) -> u32 {
            let $args = &ctx;
            $body;
            0
        }
    };
}

// folio_add_anon_rmap_ptes(folio, page, nr_pages, vma, address, flags)
entry_probe!(add_anon_ptes, add_anon_ptes_fentry, |a| emit_rmap(
    a,
    0,
    3,
    RmapOp::Add,
    Level::Pte,
    a.raw(2) as u32
));
// folio_add_anon_rmap_pmd(folio, page, vma, address, flags)
entry_probe!(add_anon_pmd, add_anon_pmd_fentry, |a| emit_rmap(a, 0, 2, RmapOp::Add, Level::Pmd, PMD_PAGES));
// folio_add_file_rmap_ptes(folio, page, nr_pages, vma)
entry_probe!(add_file_ptes, add_file_ptes_fentry, |a| emit_rmap(
    a,
    0,
    3,
    RmapOp::Add,
    Level::Pte,
    a.raw(2) as u32
));
// folio_add_file_rmap_pmd(folio, page, vma)
entry_probe!(add_file_pmd, add_file_pmd_fentry, |a| emit_rmap(a, 0, 2, RmapOp::Add, Level::Pmd, PMD_PAGES));
// folio_add_file_rmap_pud(folio, page, vma)
entry_probe!(add_file_pud, add_file_pud_fentry, |a| emit_rmap(a, 0, 2, RmapOp::Add, Level::Pud, PUD_PAGES));
// folio_remove_rmap_ptes(folio, page, nr_pages, vma)
entry_probe!(remove_ptes, remove_ptes_fentry, |a| emit_rmap(
    a,
    0,
    3,
    RmapOp::Remove,
    Level::Pte,
    a.raw(2) as u32
));
// folio_remove_rmap_pmd(folio, page, vma)
entry_probe!(remove_pmd, remove_pmd_fentry, |a| emit_rmap(a, 0, 2, RmapOp::Remove, Level::Pmd, PMD_PAGES));
// folio_remove_rmap_pud(folio, page, vma)
entry_probe!(remove_pud, remove_pud_fentry, |a| emit_rmap(a, 0, 2, RmapOp::Remove, Level::Pud, PUD_PAGES));

// 6.1-6.7: page_add_anon_rmap(page, vma, address, rmap_t flags)
entry_probe!(page_add_anon, page_add_anon_fentry, |a| emit_page_rmap(
    a,
    0,
    1,
    RmapOp::Add,
    a.raw(3) & RMAP_COMPOUND != 0
));
// 6.1-6.7: page_add_file_rmap(page, vma, bool compound)
entry_probe!(page_add_file, page_add_file_fentry, |a| emit_page_rmap(
    a,
    0,
    1,
    RmapOp::Add,
    a.raw(2) & 0xff != 0
));
// 6.1-6.7: page_remove_rmap(page, vma, bool compound)
entry_probe!(page_remove, page_remove_fentry, |a| emit_page_rmap(
    a,
    0,
    1,
    RmapOp::Remove,
    a.raw(2) & 0xff != 0
));

// ---- new anonymous folios -------------------------------------------------
//
// folio_add_new_anon_rmap(folio, vma, address[, flags]) and 6.1's
// page_add_new_anon_rmap(page, vma, address) (the same first three
// arguments up to 7.3) make a folio nobody maps yet the anonymous folio of
// one mapping. The record is built at their entry, from what the call sets:
// the kind (anon), the counters (one mapping) and the index (the address's
// page in the VMA). Not at their return: a return probe is a second
// program at every anonymous page fault, and the dearer kind (fexit's
// trampoline calls the function itself; a kretprobe replaces the return
// address and keeps the arguments in a map until then).

/// `ENTIRELY_MAPPED` (mm/internal.h; `COMPOUND_MAPPED` before 6.8): the
/// bit `_nr_pages_mapped` holds while a PMD maps the folio.
const ENTIRELY_MAPPED: i32 = 0x80_0000;

/// The counters of a new anonymous folio once `folio_add_new_anon_rmap`
/// has set them, as the kernel stores them (minus one), for a record read
/// at its entry. A field the kernel lacks stays absent.
#[inline(always)]
fn as_after_new_anon(event: &mut Event, level: Level, nr_pages: u32) {
    event.kind = FolioKind::Anon as u8;
    let pmd = level == Level::Pmd;
    if event.mapcount != FIELD_ABSENT {
        // A small folio's `_mapcount`; a large one's `_large_mapcount`
        // counts the PMD once, or each PTE.
        event.mapcount = if pmd { 0 } else { nr_pages as i32 - 1 };
    }
    if event.entire_mapcount != FIELD_ABSENT {
        event.entire_mapcount = if pmd { 0 } else { -1 };
    }
    if event.nr_pages_mapped != FIELD_ABSENT {
        event.nr_pages_mapped = if pmd { ENTIRELY_MAPPED } else { nr_pages as i32 };
    }
}

/// A new anonymous folio, `folio`, for the VMA in argument 1; `arg` says
/// whether its fields may be plain loads.
#[inline(always)]
fn new_anon(args: &impl Args, folio: u64, arg: FolioArg) {
    // A new anonymous folio inside a write fault is the copy.
    if let Some(window) = open_write_fault(thread_id()) {
        unsafe { (*window).saw_new_anon = 1 };
    }
    // Fork's copy of a pinned page goes to the daemon whatever the sample:
    // the table copied the original into the child, and this says which
    // mapping to take back (`FolioTable::replace_fork_copy`).
    if outside_sample(folio) {
        let mm = args.vma_mm(1);
        if current_mm_and_tgid().0 == mm
            && arg.small_and_sampled_out(folio, || mm, RmapOp::AddNew, Level::Pte, 1)
        {
            return;
        }
    }
    let (vma, address) = (args.raw(1), args.raw(2));
    let facts = args.vma_facts(1);
    if observer_leaves_out(|| facts.mm, FolioKind::Anon as u8) || hugetlb_left_out(&facts) {
        return;
    }
    let timestamp_ns = now();
    if arg.loads {
        record_new_anon(timestamp_ns, folio, &arg.folio, vma, address, &facts);
    } else {
        let mut place = MaybeUninit::uninit();
        let snapshot = Snapshot::of(&mut place, folio);
        record_new_anon(timestamp_ns, folio, snapshot, vma, address, &facts);
    }
}

/// A new anonymous folio's record, from its `fields` read after `timestamp_ns`.
#[inline(always)]
fn record_new_anon(
    timestamp_ns: u64,
    folio: u64,
    fields: &impl FolioFields,
    vma: u64,
    address: u64,
    facts: &VmaFacts,
) {
    let mut event = folio_event(timestamp_ns, folio, fields);
    // A PMD-sized anonymous folio is mapped by one PMD; smaller (m)THPs by PTEs.
    let (level, nr_pages) = if event.order >= PMD_ORDER {
        (Level::Pmd, PMD_PAGES)
    } else {
        (Level::Pte, 1u32 << (event.order & 31))
    };
    as_after_new_anon(&mut event, level, nr_pages);
    total_rmap(RmapOp::AddNew, level, event.kind, event.order, nr_pages);
    // The sample changed since the test above, or the first page was
    // unreadable: the same rule.
    if sampled_out(&event) && current_mm_and_tgid().0 == facts.mm {
        return;
    }
    let Some(entry) = reserve::<Event>() else { return };
    // linear_page_index(): what the call stores in folio->index.
    let index = (address.wrapping_sub(facts.start) >> PAGE_SHIFT).wrapping_add(facts.pgoff);
    submit_rmap(entry, event, vma, facts, index, RmapOp::AddNew, level, nr_pages);
}

#[kprobe]
pub fn add_new_anon(ctx: ProbeContext) -> u32 {
    new_anon(&ctx, Args::raw(&ctx, 0), FolioArg::COPY);
    0
}

#[kprobe]
pub fn page_add_new_anon(ctx: ProbeContext) -> u32 {
    new_anon(&ctx, page_folio(Args::raw(&ctx, 0)), FolioArg::COPY);
    0
}

#[fentry]
pub fn add_new_anon_fentry(ctx: FEntryContext) -> u32 {
    new_anon(&ctx, Args::raw(&ctx, 0), ctx.folio_arg(0));
    0
}

#[fentry]
pub fn page_add_new_anon_fentry(ctx: FEntryContext) -> u32 {
    new_anon(&ctx, page_folio(Args::raw(&ctx, 0)), FolioArg::COPY);
    0
}

// ---- write faults ---------------------------------------------------------

/// What a write fault's window needs of its `struct vm_fault`: the VMA's
/// address space and flags, and the fault's flags.
struct FaultFacts {
    mm: u64,
    vma_flags: u64,
    fault_flags: u32,
}

/// [`FaultFacts`] of the `struct vm_fault` at `vmf`, by helper calls.
#[inline(always)]
fn fault_facts(vmf: u64) -> FaultFacts {
    let vma: u64 = read_at(vmf, layout!(vmf_vma)).unwrap_or(0);
    let mut vma_place = MaybeUninit::uninit();
    let vma_snapshot = Snapshot::of(&mut vma_place, vma);
    FaultFacts {
        mm: vma_snapshot.field(layout!(vma_mm)).unwrap_or(0),
        vma_flags: vma_snapshot.field(layout!(vma_flags)).unwrap_or(0),
        fault_flags: read_at(vmf, layout!(vmf_flags)).unwrap_or(0),
    }
}

/// do_wp_page(vmf), do_huge_pmd_wp_page(vmf): open the per-task window.
#[inline(always)]
fn write_fault_entry(args: &impl Args) {
    let facts = args.fault_facts(0);
    if is_observer(facts.mm) {
        count(counter::OBSERVER_SKIPPED);
        return;
    }
    let unshare_flag = layout!(fault_flag_unshare);
    let unshare = unshare_flag != OFFSET_ABSENT && facts.fault_flags & unshare_flag != 0;
    store_window(WriteFaultWindow::opened(args.raw(0), facts.mm, facts.vma_flags, unshare, false));
}

impl WriteFaultWindow {
    /// A window opened now, for a fault on a VMA of `mm` with `vma_flags`.
    #[inline(always)]
    fn opened(vmf: u64, mm: u64, vma_flags: u64, unshare: bool, whole_fault: bool) -> Self {
        Self {
            start_ns: now(),
            vmf,
            mm,
            vma_shared: (vma_flags & (vm_flags::SHARED | vm_flags::MAYSHARE) != 0) as u8,
            saw_new_anon: 0,
            saw_reuse: 0,
            unshare: unshare as u8,
            raw_pfn_vma: (vma_flags & (vm_flags::PFNMAP | vm_flags::MIXEDMAP) != 0) as u8,
            whole_fault: whole_fault as u8,
            saw_clear_flush: 0,
            saw_remove: 0,
            saw_map: 0,
            counted: 0,
            _pad: [0; 6],
            folio: 0,
        }
    }
}

#[inline(always)]
fn store_window(window: WriteFaultWindow) {
    let tid = thread_id();
    match WRITE_FAULTS.get_ptr_mut(tid) {
        Some(slot) => {
            let was_open = unsafe { (*slot).start_ns } != 0;
            // Inside a whole-fault window, a PMD write fault
            // (do_huge_pmd_wp_page) is part of it: keep the window.
            if was_open && unsafe { (*slot).whole_fault } != 0 && window.whole_fault == 0 {
                return;
            }
            unsafe { *slot = window };
            // One left open (its return was missed) is counted already.
            if !was_open {
                count_open_window(tid, 1);
            }
        }
        None => {
            if WRITE_FAULTS.insert(tid, window, 0).is_ok() {
                count_open_window(tid, 1);
            } else {
                let _ = count(counter::TASK_STATE_FULL);
            }
        }
    }
}

/// do_wp_page returned: classify and emit.
#[inline(always)]
fn write_fault_return() {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(slot) = open_write_fault(pid_tgid as u32) else { return };
    let window = unsafe { *slot };
    close_window(pid_tgid as u32, slot);

    // vmf->page is the page the fault was about (NULL for the zero page);
    // vmf lives in the caller's frame, still valid while do_wp_page returns.
    let page: u64 = read_at(window.vmf, layout!(vmf_page)).unwrap_or(0);
    let outcome = if window.unshare != 0 {
        WriteFaultOutcome::Unshare
    } else if window.vma_shared != 0 {
        WriteFaultOutcome::Shared
    } else if window.saw_new_anon != 0 {
        if page != 0 || window.raw_pfn_vma != 0 {
            WriteFaultOutcome::Copy
        } else {
            WriteFaultOutcome::CopyZeroPage
        }
    } else if window.saw_reuse != 0 {
        WriteFaultOutcome::Reuse
    } else {
        WriteFaultOutcome::Other
    };

    let returned_ns = now();
    let mut event = if page != 0 {
        let mut place = MaybeUninit::uninit();
        let (folio, snapshot) = folio_of_page(page, &mut place);
        folio_event(returned_ns, folio, snapshot)
    } else {
        Event { cpu: this_cpu(), timestamp_ns: returned_ns, ..Event::ZERO }
    };
    event.event_type = EventType::WriteFault as u8;
    event.outcome = outcome as u8;
    event.mm = window.mm;
    event.duration_ns = returned_ns.saturating_sub(window.start_ns).min(u32::MAX as u64) as u32;
    event.tgid = (pid_tgid >> 32) as u32;
    total_write_fault(&event);
    if event.folio != 0 && sampled_out(&event) {
        return;
    }
    let Some(entry) = reserve::<Event>() else { return };
    entry.submit(event);
}

/// Marks a reuse inside the window: `wp_page_reuse` (also on shared
/// mappings, which the VMA flags tell apart), `folio_move_anon_rmap` /
/// `page_move_anon_rmap`, or `ptep_set_access_flags` (only the reuse path
/// upgrades the PTE in place; copies install a new one).
#[inline(always)]
fn mark_reuse() {
    if let Some(window) = open_write_fault(thread_id()) {
        unsafe { (*window).saw_reuse = 1 };
    }
}

entry_probe!(write_fault_entry_kprobe, write_fault_entry_fentry, |a| write_fault_entry(a));
entry_probe!(reuse_marker, reuse_marker_fentry, |a| {
    let _ = a;
    mark_reuse()
});

/// ptep_set_access_flags(vma, address, ptep, entry, dirty): a reuse; in a
/// whole-fault window, also the folio, from the page frame in `entry`.
#[inline(always)]
fn mark_reuse_at(pte: u64) {
    if let Some(window) = open_write_fault(thread_id()) {
        unsafe {
            (*window).saw_reuse = 1;
            if (*window).whole_fault != 0 && (*window).folio == 0 {
                let page = page_of_pte(pte);
                if page != 0 {
                    (*window).folio = page_folio(page);
                }
            }
        }
    }
}

/// The `struct page` of a present x86-64 PTE's frame, or 0.
#[inline(always)]
fn page_of_pte(pte: u64) -> u64 {
    const PRESENT: u64 = 1;
    const PFN_MASK: u64 = 0x000f_ffff_ffff_f000;
    if pte & PRESENT == 0 {
        return 0;
    }
    page_of_frame((pte & PFN_MASK) >> 12)
}

/// The `struct page` of a page frame number, or 0 where the vmemmap's
/// start is not known.
#[inline(always)]
fn page_of_frame(pfn: u64) -> u64 {
    let at = unsafe { core::ptr::read_volatile(&raw const VMEMMAP_BASE_ADDRESS) };
    let size = layout!(page_size);
    if at == 0 || size == OFFSET_ABSENT {
        return 0;
    }
    match read_at::<u64>(at, 0) {
        Some(vmemmap) if vmemmap != 0 => vmemmap + pfn * size as u64,
        _ => 0,
    }
}

entry_probe!(reuse_pte_marker, reuse_pte_marker_fentry, |a| mark_reuse_at(a.raw(3)));
/// folio_move_anon_rmap(folio, vma) / page_move_anon_rmap(page, vma):
/// a reuse, and (for a window over handle_mm_fault, which has no
/// vmf->page to read) the folio it was about.
#[inline(always)]
fn mark_reuse_of(folio_or_page: u64) {
    if let Some(window) = open_write_fault(thread_id()) {
        unsafe {
            (*window).saw_reuse = 1;
            if (*window).whole_fault != 0 {
                (*window).folio = page_folio(folio_or_page);
            }
        }
    }
}

entry_probe!(move_anon_marker, move_anon_marker_fentry, |a| mark_reuse_of(a.raw(0)));

#[kretprobe]
pub fn write_fault_return_kretprobe(_ctx: RetProbeContext) -> u32 {
    write_fault_return();
    0
}

#[fexit]
pub fn write_fault_return_fexit(_ctx: FExitContext) -> u32 {
    write_fault_return();
    0
}

// ---- write faults on a PMD --------------------------------------------------
//
// do_huge_pmd_wp_page(vmf): a write fault on a PMD-mapped anonymous THP.
// It reuses the THP in place, or (since 6.13) replaces the huge zero page
// with a new THP, or splits the PMD and returns VM_FAULT_FALLBACK, after
// which do_wp_page handles the fault at PTE level. Same window as above.

const VM_FAULT_FALLBACK: u64 = 0x800;
/// VM_FAULT_OOM | SIGBUS | HWPOISON | HWPOISON_LARGE | SIGSEGV | RETRY.
const VM_FAULT_NOT_DONE: u64 = 0x1 | 0x2 | 0x10 | 0x20 | 0x40 | 0x400;

#[inline(always)]
fn pmd_write_fault_return(ret: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(slot) = open_write_fault(pid_tgid as u32) else { return };
    let window = unsafe { *slot };
    if ret & VM_FAULT_FALLBACK != 0 {
        // The PTE-level fault that follows is the one to count.
        if window.whole_fault == 0 {
            close_window(pid_tgid as u32, slot);
        }
        return;
    }
    if window.whole_fault != 0 {
        unsafe { (*slot).counted = 1 }; // handle_mm_fault closes it
    } else {
        close_window(pid_tgid as u32, slot);
    }
    let outcome = if window.unshare != 0 {
        WriteFaultOutcome::Unshare
    } else if ret & VM_FAULT_NOT_DONE != 0 {
        WriteFaultOutcome::Other
    } else if window.saw_new_anon != 0 {
        // At PMD level only the huge zero page is replaced by a new THP.
        WriteFaultOutcome::CopyZeroPage
    } else {
        WriteFaultOutcome::Reuse
    };
    let returned_ns = now();
    let anon_thp = outcome == WriteFaultOutcome::Reuse || outcome == WriteFaultOutcome::Unshare;
    let event = Event {
        event_type: EventType::WriteFault as u8,
        outcome: outcome as u8,
        level: Level::Pmd as u8,
        // The THP itself is not at hand (vmf->page is not set at PMD level):
        // a reused one is an anonymous PMD-sized folio by construction.
        kind: if anon_thp { FolioKind::Anon as u8 } else { 0 },
        order: if anon_thp { PMD_ORDER } else { 0 },
        mm: window.mm,
        cpu: this_cpu(),
        timestamp_ns: returned_ns,
        duration_ns: returned_ns.saturating_sub(window.start_ns).min(u32::MAX as u64) as u32,
        tgid: (pid_tgid >> 32) as u32,
        ..Event::ZERO
    };
    total_write_fault(&event);
    if event.folio != 0 && sampled_out(&event) {
        return;
    }
    let Some(entry) = reserve::<Event>() else { return };
    entry.submit(event);
}

entry_probe!(pmd_write_fault_entry_kprobe, pmd_write_fault_entry_fentry, |a| write_fault_entry(a));

#[kretprobe]
pub fn pmd_write_fault_return_kretprobe(ctx: RetProbeContext) -> u32 {
    pmd_write_fault_return(ctx.ret::<u32>() as u64);
    0
}

#[fexit]
pub fn pmd_write_fault_return_fexit(ctx: FExitContext) -> u32 {
    pmd_write_fault_return(ctx.ret::<u32>().unwrap_or(0) as u64);
    0
}

// ---- write faults where do_wp_page is inlined ------------------------------
//
// A kernel built with a small configuration may inline do_wp_page into its
// caller. The window then spans handle_mm_fault(vma, address, flags, regs)
// for write and unshare faults, and what happens inside tells the outcome:
// only a COW clears and flushes a present PTE (ptep_clear_flush) before
// mapping a new anonymous folio; with an rmap remove of the old folio it
// is a copy, without one the old page was the zero page (no rmap). A new
// anonymous folio without a flush, or an add of an existing folio, is a
// first touch, not a write-protect fault, and is not counted. Reuse is seen
// by the same markers as in do_wp_page.

#[inline(always)]
fn whole_fault_windows() -> bool {
    let value = unsafe { core::ptr::read_volatile(&raw const WHOLE_FAULT_WINDOWS) };
    value != 0
}

#[inline(always)]
fn fault_window_entry(vma: u64, fault_flags: u64) {
    let write = layout!(fault_flag_write);
    let unshare = layout!(fault_flag_unshare);
    let unshare_bit = if unshare == OFFSET_ABSENT { 0 } else { unshare as u64 };
    if write == OFFSET_ABSENT || fault_flags & (write as u64 | unshare_bit) == 0 {
        return;
    }
    let facts = vma_facts(vma);
    if is_observer(facts.mm) {
        count(counter::OBSERVER_SKIPPED);
        return;
    }
    store_window(WriteFaultWindow::opened(0, facts.mm, facts.flags, fault_flags & unshare_bit != 0, true));
}

/// Inside a whole-fault window: an rmap call of this thread.
#[inline(always)]
fn note_in_fault_window(op: RmapOp, folio: u64) {
    if !whole_fault_windows() {
        return;
    }
    if let Some(window) = open_write_fault(thread_id()) {
        unsafe {
            match op {
                RmapOp::Remove => {
                    (*window).saw_remove = 1;
                    (*window).folio = folio;
                }
                RmapOp::Add => (*window).saw_map = 1,
                RmapOp::AddNew => {}
            }
        }
    }
}

#[inline(always)]
fn fault_window_return(ret: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(slot) = open_write_fault(pid_tgid as u32) else { return };
    let window = unsafe { *slot };
    close_window(pid_tgid as u32, slot);
    if window.whole_fault == 0 || window.counted != 0 {
        return;
    }
    let copied = window.saw_new_anon != 0 && window.saw_clear_flush != 0;
    let outcome = if ret & VM_FAULT_NOT_DONE != 0 {
        if !copied && window.saw_reuse == 0 {
            return; // nothing says a write-protect fault was under way
        }
        WriteFaultOutcome::Other
    } else if window.unshare != 0 {
        WriteFaultOutcome::Unshare
    } else if window.vma_shared != 0 {
        if window.saw_map != 0 || window.saw_new_anon != 0 {
            return; // a first touch
        }
        WriteFaultOutcome::Shared
    } else if window.saw_new_anon != 0 {
        if !copied {
            return; // a first touch: nothing present was replaced
        }
        if window.saw_remove != 0 || window.raw_pfn_vma != 0 {
            WriteFaultOutcome::Copy
        } else {
            WriteFaultOutcome::CopyZeroPage
        }
    } else if window.saw_reuse != 0 {
        WriteFaultOutcome::Reuse
    } else if window.saw_map != 0 {
        return; // a first touch of a file page
    } else {
        WriteFaultOutcome::Other
    };
    let returned_ns = now();
    let mut event = if window.folio != 0 {
        let mut place = MaybeUninit::uninit();
        let snapshot = Snapshot::of(&mut place, window.folio);
        folio_event(returned_ns, window.folio, snapshot)
    } else {
        Event { cpu: this_cpu(), timestamp_ns: returned_ns, ..Event::ZERO }
    };
    event.event_type = EventType::WriteFault as u8;
    event.outcome = outcome as u8;
    event.mm = window.mm;
    event.duration_ns = returned_ns.saturating_sub(window.start_ns).min(u32::MAX as u64) as u32;
    event.tgid = (pid_tgid >> 32) as u32;
    total_write_fault(&event);
    if event.folio != 0 && sampled_out(&event) {
        return;
    }
    let Some(entry) = reserve::<Event>() else { return };
    entry.submit(event);
}

// handle_mm_fault(vma, address, flags, regs)
entry_probe!(fault_window_entry_kprobe, fault_window_entry_fentry, |a| fault_window_entry(
    a.raw(0),
    a.raw(2)
));

#[kretprobe]
pub fn fault_window_return_kretprobe(ctx: RetProbeContext) -> u32 {
    fault_window_return(ctx.ret::<u32>() as u64);
    0
}

#[fexit]
pub fn fault_window_return_fexit(ctx: FExitContext) -> u32 {
    fault_window_return(ctx.ret::<u32>().unwrap_or(0) as u64);
    0
}

/// ptep_clear_flush(): a present PTE replaced (inside a window: a COW). In
/// fentry mode, which cannot take ptep_clear_flush (it returns a struct),
/// the TLB flush inside it, flush_tlb_mm_range(): the other paths of a
/// fault that flush (NUMA hinting, migration) map no new anonymous folio,
/// and a copy needs both.
#[inline(always)]
fn mark_clear_flush() {
    if let Some(window) = open_write_fault(thread_id()) {
        unsafe { (*window).saw_clear_flush = 1 };
    }
}

entry_probe!(clear_flush_marker, clear_flush_marker_fentry, |a| {
    let _ = a;
    mark_clear_flush()
});

// ---- fork ----------------------------------------------------------------

/// copy_page_range(dst_vma, src_vma): one VMA of a fork. What the kernel
/// duplicates, decided as it does (see `fork_copy`).
#[inline(always)]
fn fork_copy(dst_vma: u64, src_vma: u64) {
    let mut dst_place = MaybeUninit::uninit();
    let dst = Snapshot::of(&mut dst_place, dst_vma);
    let dst_mm = dst.field(layout!(vma_mm)).unwrap_or(0);
    let dst_flags: u64 = dst.field(layout!(vma_flags)).unwrap_or(0);
    let dst_ops: u64 = dst.field(layout!(vma_ops)).unwrap_or(0);
    let Some(entry) = reserve::<ForkEvent>() else { return };
    let mut src_place = MaybeUninit::uninit();
    let src = Snapshot::of(&mut src_place, src_vma);
    let flags: u64 = src.field(layout!(vma_flags)).unwrap_or(0);
    let anon_vma: u64 = src.field(layout!(vma_anon_vma)).unwrap_or(0);
    // vma_needs_copy(), 6.1 to 7.x: the child's uffd-wp, then the source's
    // raw-pfn and hugetlb flags, then its anon_vma. (7.x folds the flags
    // into VM_COPY_ON_FORK, which adds guard regions: those hold no pages.)
    let entries = dst_flags & vm_flags::UFFD_WP != 0
        || flags & (vm_flags::PFNMAP | vm_flags::MIXEDMAP | vm_flags::HUGETLB) != 0
        || anon_vma != 0;
    let mut copy = 0;
    if entries {
        copy |= fork_copy::ENTRIES;
        // copy_huge_pmd(): "Skip if can be re-fill on fault".
        if dst_ops == 0 {
            copy |= fork_copy::HUGE_ENTRIES;
        }
    }
    entry.submit(ForkEvent {
        event_type: EventType::Fork as u8,
        copy,
        _pad: [0; 6],
        src_mm: src.field(layout!(vma_mm)).unwrap_or(0),
        start: src.field(layout!(vma_start)).unwrap_or(0),
        dst_mm,
        end: src.field(layout!(vma_end)).unwrap_or(0),
        timestamp_ns: now(),
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        cpu: this_cpu(),
    });
}

entry_probe!(fork_copy_kprobe, fork_copy_fentry, |a| fork_copy(a.raw(0), a.raw(1)));

// ---- entries that move ------------------------------------------------------

/// A `move_page_tables` call: what it was asked to move.
#[repr(C)]
#[derive(Clone, Copy)]
struct MoveCall {
    mm: u64,
    old_addr: u64,
    new_addr: u64,
    len: u64,
}

/// move_page_tables(): up to 6.14 (vma, old_addr, new_vma, new_addr, len,
/// ...); since 6.15 one `struct pagetable_move_control *` (LAYOUT.pmc_*).
#[inline(always)]
fn move_call<A: Args>(args: &A) -> MoveCall {
    let (vma, old_addr, new_addr, len) = if layout!(pmc_old_addr) != OFFSET_ABSENT {
        let pmc = args.raw(0);
        (
            read_at(pmc, layout!(pmc_old)).unwrap_or(0),
            read_at(pmc, layout!(pmc_old_addr)).unwrap_or(0),
            read_at(pmc, layout!(pmc_new_addr)).unwrap_or(0),
            read_at(pmc, layout!(pmc_len)).unwrap_or(0),
        )
    } else {
        (args.raw(0), args.raw(1), args.raw(3), args.raw(4))
    };
    MoveCall { mm: vma_mm(vma), old_addr, new_addr, len }
}

/// move_page_tables() returned `moved` bytes. Reported at return: a PMD
/// that could not move whole was split inside the call, and those rmap
/// calls name the old addresses.
#[inline(always)]
fn page_tables_moved(call: &MoveCall, moved: u64) {
    if moved == 0 {
        return;
    }
    if is_observer(call.mm) {
        count(counter::OBSERVER_SKIPPED);
        return;
    }
    let Some(entry) = reserve::<MoveEvent>() else { return };
    entry.submit(MoveEvent {
        event_type: EventType::Move as u8,
        _pad: [0; 3],
        cpu: this_cpu(),
        mm: call.mm,
        old_addr: call.old_addr,
        new_addr: call.new_addr,
        len: if moved < call.len { moved } else { call.len },
        timestamp_ns: now(),
    });
}

/// Kept from entry to return in both modes: since 6.15 the call may
/// realign `pmc`'s addresses before it returns.
#[map]
static MOVE_CALLS: HashMap<u32, MoveCall> = HashMap::with_max_entries(16384, 0);

#[inline(always)]
fn move_entry_common<A: Args>(args: &A) {
    if MOVE_CALLS.insert(thread_id(), move_call(args), 0).is_err() {
        count(counter::TASK_STATE_FULL);
    }
}

#[inline(always)]
fn move_return_common<C: EbpfContext>(ctx: &C, moved: u64) {
    let tid = thread_id();
    let Some(&call) = (unsafe { MOVE_CALLS.get(tid) }) else {
        // Attached while the call ran, or its entry found the map full:
        // entries moved that the table does not follow.
        if moved != 0 {
            warn!(ctx, "move_page_tables returned without its entry: {} bytes moved unseen", moved);
        }
        return;
    };
    let _ = MOVE_CALLS.remove(tid);
    page_tables_moved(&call, moved);
}

entry_probe!(move_entry, move_entry_fentry, |a| move_entry_common(a));

#[kretprobe]
pub fn move_return(ctx: RetProbeContext) -> u32 {
    move_return_common(&ctx, ctx.ret::<u64>());
    0
}

#[fexit]
pub fn move_fexit(ctx: FExitContext) -> u32 {
    move_return_common(&ctx, ctx.ret::<u64>().unwrap_or(0));
    0
}

// ---- teardown ---------------------------------------------------------------

/// exit_mmap(mm) returned: its page tables and their rmap calls are done.
#[inline(always)]
fn teardown(mm: u64) {
    let Some(entry) = reserve::<TeardownEvent>() else { return };
    entry.submit(TeardownEvent {
        event_type: EventType::Teardown as u8,
        _pad: [0; 3],
        cpu: this_cpu(),
        mm,
        timestamp_ns: now(),
    });
}

/// exit_mmap's argument, kept from kprobe to kretprobe.
#[map]
static TEARDOWN_CALLS: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

#[kprobe]
pub fn teardown_entry(ctx: ProbeContext) -> u32 {
    if TEARDOWN_CALLS.insert(thread_id(), Args::raw(&ctx, 0), 0).is_err() {
        count(counter::TASK_STATE_FULL);
    }
    0
}

#[kretprobe]
pub fn teardown_return(_ctx: RetProbeContext) -> u32 {
    let tid = thread_id();
    if let Some(&mm) = unsafe { TEARDOWN_CALLS.get(tid) } {
        let _ = TEARDOWN_CALLS.remove(tid);
        teardown(mm);
    }
    0
}

/// fexit sees the argument at return: nothing to keep at entry.
#[fentry]
pub fn teardown_entry_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[fexit]
pub fn teardown_fexit(ctx: FExitContext) -> u32 {
    teardown(Args::raw(&ctx, 0));
    0
}

// ---- khugepaged ---------------------------------------------------------------

/// khugepaged finished looking at a PMD range (tracepoint
/// `mm_khugepaged_scan_pmd`). Only refusals for too many shared PTEs are
/// sent: the daemon asks its table whether the folio that crossed the
/// limit is shared in truth. A tracepoint, not a function: it cannot be
/// inlined away, and it needs neither kprobes nor fentry.
///
/// One program per shape the arguments have had, each reading its own at
/// constant offsets (the verifier takes nothing else from a context, and
/// refuses to attach a program that reads past the tracepoint's last
/// argument); the daemon attaches the one BTF describes.
#[inline(always)]
fn send_scan_refusal(mm: u64, folio: u64) -> i32 {
    let Some(entry) = reserve::<ScanRefusalEvent>() else { return 0 };
    entry.submit(ScanRefusalEvent {
        event_type: EventType::ScanRefusal as u8,
        _pad: [0; 3],
        cpu: this_cpu(),
        mm,
        folio,
        timestamp_ns: now(),
    });
    0
}

/// Before 7.x: (mm, page, writable, referenced, none_or_zero, status,
/// unmapped): a page of the folio the scan stopped at, or NULL.
/// page_folio() takes it to its folio. (Debian's 6.1 sets that folio after
/// the sharing test: at a refusal it passes the folio of the PTE before,
/// NULL at the first; 6.10+ set it before.)
#[raw_tracepoint(tracepoint = "mm_khugepaged_scan_pmd")]
pub fn khugepaged_scan_pmd_page(ctx: RawTracePointContext) -> i32 {
    let args = ctx.as_ptr() as *const u64;
    let (mm, page, status) = unsafe { (*args, *args.add(1), *args.add(5)) };
    // An `int` in a 64-bit slot. Most scans end otherwise: nothing to send.
    if status as u32 != layout!(scan_exceed_shared_pte) {
        return 0;
    }
    send_scan_refusal(mm, page_folio(page))
}

/// 7.x: (mm, the folio's page frame number or -1, referenced,
/// none_or_zero, status, unmapped).
#[raw_tracepoint(tracepoint = "mm_khugepaged_scan_pmd")]
pub fn khugepaged_scan_pmd_pfn(ctx: RawTracePointContext) -> i32 {
    let args = ctx.as_ptr() as *const u64;
    let (mm, pfn, status) = unsafe { (*args, *args.add(1), *args.add(4)) };
    if status as u32 != layout!(scan_exceed_shared_pte) {
        return 0;
    }
    // -1: the scan stopped before it looked at a folio.
    let folio = if pfn == u64::MAX { 0 } else { page_folio(page_of_frame(pfn)) };
    send_scan_refusal(mm, folio)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
