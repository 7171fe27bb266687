//! The event ABI between the mapcount eBPF programs and `mapcountd`.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that the byte
//! layout written by the kernel side is exactly the layout decoded in
//! userspace. Sizes are asserted in the tests below; change them only
//! together with the record-file version.
#![no_std]

// User space (the daemon, the workload) has the standard library; the
// eBPF side has only core.
#[cfg(feature = "user")]
extern crate std;
#[cfg(feature = "user")]
use std::{borrow::ToOwned, format, string::String};

/// Value stored in a counter field when the running kernel has no such
/// field (for example `_large_mapcount` before 6.10), or when the field is
/// meaningless for this folio (per-folio counters of a small folio).
pub const FIELD_ABSENT: i32 = i32::MIN;

/// Offset value in [`KernelLayout`] for a field the kernel lacks.
pub const OFFSET_ABSENT: u32 = u32::MAX;

/// What a ring-buffer record describes: the first byte of every record.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// A call of an rmap add or remove function: [`Event`].
    Rmap = 1,
    /// A write fault that finished (`do_wp_page` returned): [`Event`].
    WriteFault = 2,
    /// Fork copying one VMA (`copy_page_range`): [`ForkEvent`].
    Fork = 3,
    /// Where a page without a mapping (driver page) was mapped: [`SourceEvent`].
    Source = 4,
    /// Page-table entries moved to other addresses without rmap calls
    /// (mremap, exec's stack relocation): [`MoveEvent`].
    Move = 5,
    /// An address space was torn down (`exit_mmap` returned): [`TeardownEvent`].
    Teardown = 6,
    /// khugepaged refused to collapse a range because too many of its PTEs
    /// map folios it takes for shared: [`ScanRefusalEvent`].
    ScanRefusal = 7,
}

/// Which rmap operation an [`EventType::Rmap`] event reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RmapOp {
    /// Another mapping of a folio that already had an rmap (fault, migration, KSM).
    Add = 1,
    /// The first mapping of a freshly allocated anonymous folio.
    AddNew = 2,
    /// A mapping went away (unmap, exit, COW of the old folio, split).
    Remove = 3,
}

/// Page-table level of the mapping.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Pte = 1,
    Pmd = 2,
    Pud = 3,
}

/// Folio kind, from `folio->mapping` and `PG_swapbacked`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FolioKind {
    Anon = 1,
    Ksm = 2,
    File = 3,
    Shmem = 4,
    /// `mapping == NULL`: driver pages inserted with `vm_insert_page` and friends.
    NoMapping = 5,
}

/// How a write fault ended.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFaultOutcome {
    /// Private mapping, the faulting task kept the folio and made it writable.
    Reuse = 1,
    /// Private mapping, a new folio was allocated and the old one unmapped.
    Copy = 2,
    /// Private mapping, the PTE held the shared zero page: a copy with no old folio.
    CopyZeroPage = 3,
    /// `VM_SHARED | VM_MAYSHARE` mapping: made writable in place, never a COW.
    Shared = 4,
    /// None of the above was seen (fault retried, OOM, raced with another thread).
    Other = 5,
    /// `FAULT_FLAG_UNSHARE`: a read-only GUP pin (or KSM unmerge) asked for
    /// an exclusive anonymous page; nothing was written.
    Unshare = 6,
}

/// Bits of [`Event::flags`].
pub mod event_flags {
    /// The task that caused the event owns the address space (`current->mm
    /// == vma->vm_mm`): its tgid names the mm. Not so for kernel threads
    /// (khugepaged, ksmd) or remote access.
    pub const OWN_MM: u8 = 1 << 0;
    /// `PG_swapcache` was set on the folio.
    pub const SWAPCACHE: u8 = 1 << 1;
}

/// Values of [`Event::shared_hint`].
pub mod shared_hint {
    /// The kernel keeps no such bit (before 6.15), or the folio is small.
    pub const UNKNOWN: u8 = 0;
    pub const EXCLUSIVE: u8 = 1;
    pub const MAYBE_SHARED: u8 = 2;
}

/// An rmap call or a finished write fault.
///
/// For rmap events the folio counters are read at the function's entry, so
/// they describe the folio *before* the operation; the daemon applies the
/// operation itself. For `folio_add_new_anon_rmap` they are read at return,
/// because that function initialises them. For write faults they describe
/// the faulting folio when the fault returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// An [`EventType`]: first, as in every record.
    pub event_type: u8,
    /// An [`RmapOp`] (rmap events).
    pub op: u8,
    /// A [`Level`] (rmap events).
    pub level: u8,
    /// A [`FolioKind`]; 0 if unknown (a write fault on the zero page).
    pub kind: u8,
    /// Folio order.
    pub order: u8,
    /// A [`WriteFaultOutcome`] (write-fault events).
    pub outcome: u8,
    /// The kernel's own "maybe mapped shared" bit of a large folio
    /// (`_mm_ids` bit 63, 6.15+): a [`shared_hint`] value.
    pub shared_hint: u8,
    /// [`event_flags`] bits.
    pub flags: u8,
    /// Opaque folio identity. Never exported: it is a kernel address.
    pub folio: u64,
    /// Opaque address-space identity (`vma->vm_mm`). Never exported.
    pub mm: u64,
    /// The user address of the folio's first page in this VMA,
    /// `vm_start + (folio->index - vm_pgoff) * PAGE_SIZE` (for a folio that
    /// lies outside the VMA by that rule, such as a driver page, `vm_start`).
    /// With `mm` it locates a mapping: unlike the VMA pointer it survives
    /// VMA splits and merges, and mremap is followed by [`MoveEvent`].
    /// Never exported.
    pub base: u64,
    /// `bpf_ktime_get_ns()` at the event.
    pub timestamp_ns: u64,
    pub tgid: u32,
    /// Pages covered by this rmap call (`nr_pages`, or 512 for a PMD).
    pub nr_pages: u32,
    /// `folio->_refcount`.
    pub refcount: i32,
    /// Raw folio mapcount as stored (minus one): `_mapcount` for a small
    /// folio, `_large_mapcount` for a large one.
    pub mapcount: i32,
    /// Raw `_entire_mapcount` (large folios only).
    pub entire_mapcount: i32,
    /// Raw `_nr_pages_mapped` (large folios only).
    pub nr_pages_mapped: i32,
    /// Raw `_pincount` (large folios only).
    pub pincount: i32,
    /// Write faults: time from `do_wp_page` entry to return.
    pub duration_ns: u32,
    /// The CPU that produced the event: losses and deliveries are balanced
    /// per CPU against the kernel's [`counter`] slots.
    pub cpu: u32,
    pub _pad: u32,
}

impl Event {
    /// An event for the kernel side to fill in.
    pub const ZERO: Event = Event {
        event_type: 0,
        op: 0,
        level: 0,
        kind: 0,
        order: 0,
        outcome: 0,
        shared_hint: 0,
        flags: 0,
        folio: 0,
        mm: 0,
        base: 0,
        timestamp_ns: 0,
        tgid: 0,
        nr_pages: 0,
        refcount: FIELD_ABSENT,
        mapcount: FIELD_ABSENT,
        entire_mapcount: FIELD_ABSENT,
        nr_pages_mapped: FIELD_ABSENT,
        pincount: FIELD_ABSENT,
        duration_ns: 0,
        cpu: 0,
        _pad: 0,
    };
}

/// Fork copying one VMA: `copy_page_range(dst_vma, src_vma)`. The kernel
/// duplicates the source's page-table entries inline, with no rmap call a
/// probe could see; the daemon carries the source's mappings to the child.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForkEvent {
    /// [`EventType::Fork`].
    pub event_type: u8,
    /// [`fork_copy`] bits: what the kernel duplicates for the child.
    pub copy: u8,
    pub _pad: [u8; 6],
    pub src_mm: u64,
    /// The VMA's address range, the same in parent and child.
    pub start: u64,
    pub dst_mm: u64,
    pub end: u64,
    pub timestamp_ns: u64,
    pub tgid: u32,
    /// The CPU that produced the event.
    pub cpu: u32,
}

/// Bits of [`ForkEvent::copy`].
pub mod fork_copy {
    /// `vma_needs_copy()`: the source has an anon_vma, is PFNMAP, MIXEDMAP
    /// or hugetlb, or the child's VMA is uffd-wp. Otherwise the child faults
    /// its pages in itself.
    pub const ENTRIES: u8 = 1 << 0;
    /// PMD and PUD entries are duplicated too: `copy_huge_pmd()` skips them
    /// (to be refilled at fault) when the child's VMA is not anonymous
    /// (has `vm_ops`), as for file and shmem THPs.
    pub const HUGE_ENTRIES: u8 = 1 << 1;
}

/// Page-table entries of `mm` moved from `old_addr` to `new_addr`
/// (`move_page_tables`): mremap, and exec moving the stack. No rmap call
/// sees it; the daemon moves the mappings it files at those addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveEvent {
    /// [`EventType::Move`].
    pub event_type: u8,
    pub _pad: [u8; 3],
    /// The CPU that produced the event.
    pub cpu: u32,
    pub mm: u64,
    pub old_addr: u64,
    pub new_addr: u64,
    pub len: u64,
    pub timestamp_ns: u64,
}

/// An address space's page tables are gone (`exit_mmap` returned): every
/// mapping still filed under `mm` is one whose removal was not seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TeardownEvent {
    /// [`EventType::Teardown`].
    pub event_type: u8,
    pub _pad: [u8; 3],
    /// The CPU that produced the event.
    pub cpu: u32,
    pub mm: u64,
    pub timestamp_ns: u64,
}

/// khugepaged gave up on a PMD range with `SCAN_EXCEED_SHARED_PTE`
/// (tracepoint `mm_khugepaged_scan_pmd`): more PTEs than
/// `khugepaged/max_ptes_shared` map folios the kernel takes for shared.
/// `folio` is the one whose PTE crossed the limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanRefusalEvent {
    /// [`EventType::ScanRefusal`].
    pub event_type: u8,
    pub _pad: [u8; 3],
    /// The CPU that produced the event.
    pub cpu: u32,
    pub mm: u64,
    pub folio: u64,
    pub timestamp_ns: u64,
}

/// VMA classes of [`SourceEvent::vma_class`].
pub mod vma_class {
    pub const MIXEDMAP: u8 = 1;
    pub const PFNMAP: u8 = 2;
    pub const OTHER: u8 = 3;
}

/// Length of the names in [`SourceEvent`].
pub const SOURCE_NAME_LEN: usize = 28;

/// Where a page without a mapping was mapped: sent with each rmap add of a
/// [`FolioKind::NoMapping`] folio. Names are raw kernel strings, possibly
/// unterminated; the daemon bounds what it exports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceEvent {
    /// [`EventType::Source`].
    pub event_type: u8,
    /// A [`vma_class`] value.
    pub vma_class: u8,
    /// An [`RmapOp`].
    pub op: u8,
    pub _pad: [u8; 1],
    pub nr_pages: u32,
    /// The CPU that produced the event.
    pub cpu: u32,
    pub _pad2: u32,
    /// `vma->vm_file->f_inode->i_sb->s_type->name` ("sockfs", "anon_inodefs", ...).
    pub fs_type: [u8; SOURCE_NAME_LEN],
    /// `vma->vm_file->f_path.dentry->d_name` ("bpf-map", "[io_uring]", "", ...).
    pub name: [u8; SOURCE_NAME_LEN],
}

/// Slots of the per-CPU `COUNTERS` array. For every CPU, once the probes
/// are detached and the ring buffer drained:
/// `PRODUCED = events received from that CPU + RING_BUFFER_FULL`.
pub mod counter {
    /// `bpf_ringbuf_reserve` failed: the ring buffer was full.
    pub const RING_BUFFER_FULL: u32 = 0;
    /// A per-task state table (write-fault window, new-anon arguments) was
    /// full: a write fault went unclassified (no record was attempted).
    pub const TASK_STATE_FULL: u32 = 1;
    /// Every record the kernel side tried to put in the ring buffer.
    pub const PRODUCED: u32 = 2;
    /// rmap calls and write faults on mapcountd's own address space, left
    /// out so that the observer does not measure itself (no record made):
    /// all but its rmap calls of page-cache folios, which it shares with
    /// every process mapping the same binaries and libraries.
    pub const OBSERVER_SKIPPED: u32 = 3;
    /// rmap calls on hugetlb VMAs, left out of the table: 6.12+ maps and
    /// unmaps hugetlb folios through inline helpers, so only some of their
    /// calls would be seen (no record made).
    pub const HUGETLB_SKIPPED: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// Exact totals the kernel side counts for every rmap call and write fault
/// it sees, per CPU and before it asks the ring buffer for room, so they
/// stay exact when the ring buffer overflows. The daemon reads them at
/// scrape time. One [`Totals`] value per CPU (a single map entry, so one
/// lookup reads them all); the slot functions give the index in it.
pub mod totals {
    /// rmap operations, page-table levels and write-fault outcomes as
    /// their enums number them from 1; slot 0 of a kind is "not known" (a
    /// write fault on the zero page has no folio).
    pub const OPS: usize = 3;
    pub const LEVELS: usize = 3;
    pub const KINDS: usize = 6;
    /// Orders 0..=18: up to a PUD-sized folio on x86-64. A larger order
    /// (none exists there) would be counted at 18.
    pub const ORDERS: usize = 19;
    pub const OUTCOMES: usize = 6;
    const RMAP: usize = OPS * LEVELS * KINDS * ORDERS;
    const WRITE_FAULTS: usize = OUTCOMES * KINDS * ORDERS;
    /// Slots in one CPU's [`Totals`]: rmap calls, rmap pages, write faults.
    pub const COUNT: usize = 2 * RMAP + WRITE_FAULTS;

    /// One CPU's totals (21,888 bytes, under the kernel's 32 KiB limit
    /// for a per-CPU value).
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Totals {
        pub slots: [u64; COUNT],
    }

    #[inline(always)]
    const fn clamp(value: u8, slots: usize) -> usize {
        let value = value as usize;
        if value < slots { value } else { slots - 1 }
    }

    /// Calls of `op` (a [`crate::RmapOp`] byte) at `level` on folios of
    /// `kind` and `order`.
    #[inline(always)]
    pub const fn rmap_calls(op: u8, level: u8, kind: u8, order: u8) -> usize {
        ((clamp(op.wrapping_sub(1), OPS) * LEVELS + clamp(level.wrapping_sub(1), LEVELS)) * KINDS
            + clamp(kind, KINDS))
            * ORDERS
            + clamp(order, ORDERS)
    }

    /// Pages those calls mapped or unmapped.
    #[inline(always)]
    pub const fn rmap_pages(op: u8, level: u8, kind: u8, order: u8) -> usize {
        RMAP + rmap_calls(op, level, kind, order)
    }

    /// Write faults with `outcome` (a [`crate::WriteFaultOutcome`] byte) on
    /// a folio of `kind` and `order` (kind 0: no folio, order 0).
    #[inline(always)]
    pub const fn write_faults(outcome: u8, kind: u8, order: u8) -> usize {
        2 * RMAP
            + (clamp(outcome.wrapping_sub(1), OUTCOMES) * KINDS + clamp(kind, KINDS)) * ORDERS
            + clamp(order, ORDERS)
    }
}

/// Field offsets and bit numbers of the running kernel, resolved from its BTF
/// by the daemon and written into the object's read-only data before load.
/// Offsets are in bytes; [`OFFSET_ABSENT`] marks a field this kernel lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    pub folio_flags: u32,
    pub folio_mapping: u32,
    pub folio_mapcount: u32,
    pub folio_refcount: u32,
    /// The low byte holds the order: `_flags_1 & 0xff` (6.8+) or `_folio_order` (6.1).
    pub folio_order: u32,
    pub folio_large_mapcount: u32,
    pub folio_entire_mapcount: u32,
    pub folio_nr_pages_mapped: u32,
    pub folio_pincount: u32,
    /// `enum pageflags` bit numbers.
    pub pg_head_bit: u32,
    pub pg_swapbacked_bit: u32,
    pub vma_mm: u32,
    pub vma_flags: u32,
    /// `struct vm_fault` → `vma` (inside an anonymous const struct).
    pub vmf_vma: u32,
    /// `struct vm_fault` → `page`: the page the write fault is about.
    pub vmf_page: u32,
    /// `struct page` → `compound_head` (bit 0 set on tail pages): for the
    /// 6.1-6.7 rmap functions, which take a page.
    pub page_compound_head: u32,
    /// `struct folio` → `_mm_ids` (6.15+; bit 63: maybe mapped shared).
    pub folio_mm_ids: u32,
    pub pg_swapcache_bit: u32,
    pub vma_anon_vma: u32,
    pub vma_file: u32,
    pub task_mm: u32,
    /// `struct file` → `f_path.dentry` (two offsets added).
    pub file_dentry: u32,
    /// `struct dentry` → `d_name.name`.
    pub dentry_name: u32,
    pub file_inode: u32,
    pub inode_sb: u32,
    pub sb_type: u32,
    pub fs_type_name: u32,
    /// `struct task_struct` → `tgid`: read with `mm`, saving a helper call.
    pub task_tgid: u32,
    /// `struct folio` → `index`: with the VMA's start and pgoff, where the
    /// folio's first page is mapped.
    pub folio_index: u32,
    pub vma_start: u32,
    pub vma_end: u32,
    pub vma_pgoff: u32,
    /// `vm_ops`: NULL for anonymous VMAs (`vma_is_anonymous`).
    pub vma_ops: u32,
    /// `struct vm_fault` → `flags` (`enum fault_flag`).
    pub vmf_flags: u32,
    /// The values of `FAULT_FLAG_UNSHARE` and `FAULT_FLAG_WRITE` (not offsets).
    pub fault_flag_unshare: u32,
    pub fault_flag_write: u32,
    /// `struct pagetable_move_control` (6.15+: `move_page_tables` takes
    /// one): `old`, `old_addr`, `new_addr`, `len_in`. Absent before, where
    /// the function takes (vma, old_addr, new_vma, new_addr, len).
    pub pmc_old: u32,
    pub pmc_old_addr: u32,
    pub pmc_new_addr: u32,
    pub pmc_len: u32,
    /// `sizeof(struct page)` (not an offset): from a page frame number to
    /// its `struct page` in the vmemmap.
    pub page_size: u32,
    /// Tracepoint `mm_khugepaged_scan_pmd`: which argument is the scan's
    /// result (not an offset), and the value of `SCAN_EXCEED_SHARED_PTE`
    /// in `enum scan_result`. Absent: the refusals are not watched.
    pub khugepaged_status_arg: u32,
    pub scan_exceed_shared_pte: u32,
    /// What the tracepoint's second argument is: a [`khugepaged_arg`] value.
    pub khugepaged_stopped_at: u32,
    /// 1 when the kernel's BTF is sorted by name (7.3): its verifier then
    /// finds a loaded pointer's trust annotations by binary search, and
    /// fentry programs read pointer fields (`vma->vm_mm`, `current->mm`)
    /// as plain loads; 0 on older kernels, whose linear search for each
    /// such load cost more start-up than a helper call costs per event.
    /// Not an offset.
    pub typed_pointer_loads: u32,
}

impl KernelLayout {
    pub const ABSENT: KernelLayout = KernelLayout {
        folio_flags: OFFSET_ABSENT,
        folio_mapping: OFFSET_ABSENT,
        folio_mapcount: OFFSET_ABSENT,
        folio_refcount: OFFSET_ABSENT,
        folio_order: OFFSET_ABSENT,
        folio_large_mapcount: OFFSET_ABSENT,
        folio_entire_mapcount: OFFSET_ABSENT,
        folio_nr_pages_mapped: OFFSET_ABSENT,
        folio_pincount: OFFSET_ABSENT,
        pg_head_bit: OFFSET_ABSENT,
        pg_swapbacked_bit: OFFSET_ABSENT,
        vma_mm: OFFSET_ABSENT,
        vma_flags: OFFSET_ABSENT,
        vmf_vma: OFFSET_ABSENT,
        vmf_page: OFFSET_ABSENT,
        page_compound_head: OFFSET_ABSENT,
        folio_mm_ids: OFFSET_ABSENT,
        pg_swapcache_bit: OFFSET_ABSENT,
        vma_anon_vma: OFFSET_ABSENT,
        vma_file: OFFSET_ABSENT,
        task_mm: OFFSET_ABSENT,
        file_dentry: OFFSET_ABSENT,
        dentry_name: OFFSET_ABSENT,
        file_inode: OFFSET_ABSENT,
        inode_sb: OFFSET_ABSENT,
        sb_type: OFFSET_ABSENT,
        fs_type_name: OFFSET_ABSENT,
        task_tgid: OFFSET_ABSENT,
        folio_index: OFFSET_ABSENT,
        vma_start: OFFSET_ABSENT,
        vma_end: OFFSET_ABSENT,
        vma_pgoff: OFFSET_ABSENT,
        vma_ops: OFFSET_ABSENT,
        vmf_flags: OFFSET_ABSENT,
        fault_flag_unshare: OFFSET_ABSENT,
        fault_flag_write: OFFSET_ABSENT,
        pmc_old: OFFSET_ABSENT,
        pmc_old_addr: OFFSET_ABSENT,
        pmc_new_addr: OFFSET_ABSENT,
        pmc_len: OFFSET_ABSENT,
        page_size: OFFSET_ABSENT,
        khugepaged_status_arg: OFFSET_ABSENT,
        scan_exceed_shared_pte: OFFSET_ABSENT,
        khugepaged_stopped_at: OFFSET_ABSENT,
        typed_pointer_loads: 0,
    };
}

/// Values of [`KernelLayout::khugepaged_stopped_at`]: what tracepoint
/// `mm_khugepaged_scan_pmd` passes as its second argument.
/// Which small folios are tracked once the daemon's table is over its
/// memory budget (`--folio-table.memory`): a deterministic sample by a hash
/// of the folio's address. A folio's `struct page` sits at `vmemmap + pfn *
/// sizeof(struct page)` for as long as the kernel runs, so this is a hash of
/// its page frame: every event of a sampled folio passes, none of the
/// others', on the kernel side and in the daemon alike.
///
/// At `shift` s a folio is sampled when s bits of its hash are zero: one in
/// 2^s. The bits at s + 1 include those at s, so raising the shift only
/// drops folios: a folio never enters the sample halfway through its life
/// (whose earlier mappings would be missing) and none is counted twice.
/// Large folios are always tracked: there are few of them, and they are
/// what the sharing questions are about.
pub mod sampling {
    /// One small folio in 2^20 is the sparsest sample.
    pub const MAX_SHIFT: u32 = 20;

    /// Whether a folio's events are tracked at `shift` (0: all of them).
    #[inline(always)]
    pub fn sampled(folio: u64, order: u8, shift: u32) -> bool {
        if order > 0 || shift == 0 {
            return true;
        }
        // Fibonacci hashing: the product's bits from 32 up depend on all of
        // the address's low bits, where folios differ.
        let hash = folio.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        hash & ((1u64 << (shift & 31)) - 1) == 0
    }
}

pub mod khugepaged_arg {
    /// A `struct page *` (6.1-7.0), of the folio the scan stopped at.
    pub const PAGE: u32 = 0;
    /// The folio's page frame number, or -1 (7.x).
    pub const PFN: u32 = 1;
}

/// VMA flag bits, stable across every supported kernel (include/linux/mm.h).
pub mod vm_flags {
    pub const SHARED: u64 = 0x08;
    pub const MAYSHARE: u64 = 0x80;
    pub const PFNMAP: u64 = 0x400;
    pub const HUGETLB: u64 = 0x40_0000;
    pub const UFFD_WP: u64 = 0x1000;
    pub const MIXEDMAP: u64 = 0x1000_0000;
}

/// For user space: the byte each enum travels as, back to the enum
/// (`TryFrom<u8>`, the unknown byte as the error), and the label it has in
/// metrics. Kept next to the types so that a new variant cannot miss either.
#[cfg(feature = "user")]
mod user {
    use super::{EventType, FolioKind, Level, RmapOp, WriteFaultOutcome};

    macro_rules! byte_enum {
        ($type:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
            impl TryFrom<u8> for $type {
                type Error = u8;
                fn try_from(byte: u8) -> Result<Self, u8> {
                    $(if byte == $type::$variant as u8 {
                        return Ok($type::$variant);
                    })+
                    Err(byte)
                }
            }

            impl $type {
                /// The label value in metrics.
                pub fn label(self) -> &'static str {
                    match self {
                        $($type::$variant => $label,)+
                    }
                }
            }
        };
    }

    byte_enum!(EventType {
        Rmap => "rmap",
        WriteFault => "write_fault",
        Fork => "fork",
        Source => "source",
        Move => "move",
        Teardown => "teardown",
        ScanRefusal => "scan_refusal",
    });
    byte_enum!(RmapOp { Add => "add", AddNew => "add_new", Remove => "remove" });
    byte_enum!(Level { Pte => "pte", Pmd => "pmd", Pud => "pud" });
    byte_enum!(FolioKind {
        Anon => "anon",
        Ksm => "ksm",
        File => "file",
        Shmem => "shmem",
        NoMapping => "nomapping",
    });
    byte_enum!(WriteFaultOutcome {
        Reuse => "reuse",
        Copy => "copy",
        CopyZeroPage => "copy_zero_page",
        Shared => "shared",
        Other => "other",
        Unshare => "unshare",
    });
}

/// Records as the kernel side writes them, for tests, benchmarks and
/// synthetic streams: what a record says is named, the rest is zero.
#[cfg(feature = "user")]
impl Event {
    /// A call of an rmap function: `nr_pages` pages of `folio` (an order
    /// `order` folio of `kind`) mapped or unmapped in `mm` at `base`, at
    /// `level`. The kernel's counters are zero: set them with `..`.
    #[expect(clippy::too_many_arguments, reason = "one argument per field a record says")]
    pub fn rmap(
        op: RmapOp,
        level: Level,
        kind: FolioKind,
        order: u8,
        folio: u64,
        mm: u64,
        base: u64,
        nr_pages: u32,
    ) -> Event {
        Event {
            event_type: EventType::Rmap as u8,
            op: op as u8,
            level: level as u8,
            kind: kind as u8,
            order,
            folio,
            mm,
            base,
            nr_pages,
            ..Event::ZERO
        }
    }

    /// A write fault on `folio` (of `kind`, order `order`) in `mm` that ended in `outcome`.
    pub fn write_fault(outcome: WriteFaultOutcome, kind: FolioKind, order: u8, folio: u64, mm: u64) -> Event {
        Event {
            event_type: EventType::WriteFault as u8,
            outcome: outcome as u8,
            kind: kind as u8,
            order,
            folio,
            mm,
            ..Event::ZERO
        }
    }
}

/// One row of mapcountd's `/debug/folios?tgid=N`: one folio a process maps,
/// named by the daemon's serial number (never its address). The daemon
/// writes rows with [`FolioRow::line`], the workload reads them with
/// [`FolioRow::parse`]: the columns are defined here only.
#[cfg(feature = "user")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FolioRow {
    pub serial: u64,
    /// The process's own (user) address of the folio's first page, the
    /// lowest where it maps the folio more than once. Never a kernel address.
    pub address: u64,
    /// [`FolioKind::label`].
    pub kind: String,
    pub order: u8,
    /// Address spaces mapping it.
    pub sharers: u32,
    pub mapcount: u64,
    pub ptes: u64,
    pub pmds: u64,
    pub partial: bool,
    pub ever_partial: bool,
    pub peak_sharers: u32,
    pub peak_mapcount: u32,
    pub peak_refcount: i32,
    pub cow_copies: u16,
    pub cow_reuses: u16,
    /// The kernel's maybe-shared bit at the folio's last event (6.15+,
    /// large folios): `set`, `clear` or `-`.
    pub kernel_bit: String,
    /// The same bit as the daemon simulates it now, on any kernel.
    pub simulated_bit: String,
}

#[cfg(feature = "user")]
impl FolioRow {
    /// The header line, a comment.
    pub const HEADER: &'static str = "# serial address kind order sharers mapcount ptes pmds partial \
         ever_partial peak_sharers peak_mapcount peak_refcount cow_copies cow_reuses kernel_bit simulated_bit";

    pub fn line(&self) -> String {
        format!(
            "{} {:#x} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {}",
            self.serial,
            self.address,
            self.kind,
            self.order,
            self.sharers,
            self.mapcount,
            self.ptes,
            self.pmds,
            u8::from(self.partial),
            u8::from(self.ever_partial),
            self.peak_sharers,
            self.peak_mapcount,
            self.peak_refcount,
            self.cow_copies,
            self.cow_reuses,
            self.kernel_bit,
            self.simulated_bit
        )
    }

    /// A row as [`FolioRow::line`] wrote it; `None` for a comment or a bad line.
    pub fn parse(line: &str) -> Option<FolioRow> {
        if line.starts_with('#') {
            return None;
        }
        let mut f = line.split_whitespace();
        let mut next = || f.next();
        let row = FolioRow {
            serial: next()?.parse().ok()?,
            address: u64::from_str_radix(next()?.strip_prefix("0x")?, 16).ok()?,
            kind: next()?.to_owned(),
            order: next()?.parse().ok()?,
            sharers: next()?.parse().ok()?,
            mapcount: next()?.parse().ok()?,
            ptes: next()?.parse().ok()?,
            pmds: next()?.parse().ok()?,
            partial: next()? == "1",
            ever_partial: next()? == "1",
            peak_sharers: next()?.parse().ok()?,
            peak_mapcount: next()?.parse().ok()?,
            peak_refcount: next()?.parse().ok()?,
            cow_copies: next()?.parse().ok()?,
            cow_reuses: next()?.parse().ok()?,
            kernel_bit: next()?.to_owned(),
            simulated_bit: next()?.to_owned(),
        };
        next().is_none().then_some(row)
    }
}

/// smaps' fixed point for PSS (`PSS_SHIFT` in fs/proc/task_mmu.c): each
/// page adds `(PAGE_SIZE << PSS_SHIFT) / mapcount`, and the sum is shifted
/// down when printed, so an equal sum prints equal kilobytes.
pub const PSS_SHIFT: u32 = 12;

/// What a kernel reports about some pages one process maps: smaps' Rss,
/// Pss, Shared and Private, pagemap's `PM_MMAP_EXCLUSIVE` and
/// `/proc/kpagecount`, summed over the pages.
#[cfg(feature = "user")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmapsFigures {
    pub rss_bytes: u64,
    /// Bytes << [`PSS_SHIFT`].
    pub pss_shifted: u64,
    pub shared_bytes: u64,
    pub private_bytes: u64,
    /// Mapped pages pagemap calls exclusively mapped.
    pub exclusive_pages: u64,
    /// The sum of `/proc/kpagecount` over the mapped pages.
    pub kpagecount_sum: u64,
    /// Mapped bytes left out of the figures above: the daemon cannot tell
    /// what the kernel reports for them (docs/audit.md).
    pub undetermined_bytes: u64,
}

#[cfg(feature = "user")]
impl SmapsFigures {
    pub fn pss_kb(&self) -> u64 {
        self.pss_shifted >> (PSS_SHIFT + 10)
    }

    /// Rss, Pss, Shared and Private of a `/proc/PID/smaps_rollup` text
    /// (or of one mapping's lines of smaps).
    pub fn from_smaps_rollup(text: &str) -> SmapsFigures {
        let mut figures = SmapsFigures::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(name), Some(kb)) = (words.next(), words.next().and_then(|v| v.parse::<u64>().ok()))
            else {
                continue;
            };
            match name {
                "Rss:" => figures.rss_bytes += kb << 10,
                "Pss:" => figures.pss_shifted += kb << (PSS_SHIFT + 10),
                "Shared_Clean:" | "Shared_Dirty:" => figures.shared_bytes += kb << 10,
                "Private_Clean:" | "Private_Dirty:" => figures.private_bytes += kb << 10,
                _ => {}
            }
        }
        figures
    }

    pub fn add(&mut self, other: &SmapsFigures) {
        self.rss_bytes += other.rss_bytes;
        self.pss_shifted += other.pss_shifted;
        self.shared_bytes += other.shared_bytes;
        self.private_bytes += other.private_bytes;
        self.exclusive_pages += other.exclusive_pages;
        self.kpagecount_sum += other.kpagecount_sum;
        self.undetermined_bytes += other.undetermined_bytes;
    }
}

/// One figure of [`SmapsFigures`], in [`SmapsReport::text`]'s units.
#[cfg(feature = "user")]
type SmapsFigure = fn(&SmapsFigures) -> u64;

/// mapcountd's `/debug/smaps?tgid=N&from=A&to=B`: the figures of one
/// process's mappings of folios that start in `[A, B)`, exact and as a
/// kernel without per-page mapcounts (`CONFIG_NO_PAGE_MAPCOUNT`) reports
/// them. Written with [`SmapsReport::text`], read with [`SmapsReport::parse`].
#[cfg(feature = "user")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmapsReport {
    pub exact: SmapsFigures,
    pub no_page_mapcount: SmapsFigures,
}

#[cfg(feature = "user")]
impl SmapsReport {
    const ROWS: [(&'static str, SmapsFigure); 7] = [
        ("Rss_kB", |f| f.rss_bytes >> 10),
        ("Pss_kB", SmapsFigures::pss_kb),
        ("Shared_kB", |f| f.shared_bytes >> 10),
        ("Private_kB", |f| f.private_bytes >> 10),
        ("Exclusive_pages", |f| f.exclusive_pages),
        ("Kpagecount_sum", |f| f.kpagecount_sum),
        ("Undetermined_kB", |f| f.undetermined_bytes >> 10),
    ];

    /// Kilobytes as smaps prints them (PSS rounded down once, from the sum).
    pub fn text(&self) -> String {
        let mut out = String::from("# figure exact no_page_mapcount\n");
        for (name, value) in Self::ROWS {
            out.push_str(&format!("{name} {} {}\n", value(&self.exact), value(&self.no_page_mapcount)));
        }
        out
    }

    /// Reads [`SmapsReport::text`] back, in its units: kilobytes (PSS
    /// as printed, in `pss_shifted >> PSS_SHIFT` bytes), pages, counts.
    pub fn parse(text: &str) -> Option<SmapsReport> {
        let mut report = SmapsReport::default();
        let mut seen = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut f = line.split_whitespace();
            let (Some(name), Some(exact), Some(estimate)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let (exact, estimate): (u64, u64) = (exact.parse().ok()?, estimate.parse().ok()?);
            for (figures, value) in [(&mut report.exact, exact), (&mut report.no_page_mapcount, estimate)] {
                match name {
                    "Rss_kB" => figures.rss_bytes = value << 10,
                    "Pss_kB" => figures.pss_shifted = value << (PSS_SHIFT + 10),
                    "Shared_kB" => figures.shared_bytes = value << 10,
                    "Private_kB" => figures.private_bytes = value << 10,
                    "Exclusive_pages" => figures.exclusive_pages = value,
                    "Kpagecount_sum" => figures.kpagecount_sum = value,
                    "Undetermined_kB" => figures.undetermined_bytes = value << 10,
                    _ => continue,
                }
            }
            seen += 1;
        }
        (seen == Self::ROWS.len()).then_some(report)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are repr(C), contain only integers and have no implicit padding
    // (checked by the size tests), so every byte pattern is a valid value.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::SourceEvent {}
    unsafe impl aya::Pod for super::MoveEvent {}
    unsafe impl aya::Pod for super::TeardownEvent {}
    unsafe impl aya::Pod for super::ScanRefusalEvent {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::totals::Totals {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_are_nested_and_of_the_stated_rate() {
        use super::sampling::sampled;
        // Folio addresses as the kernel has them: struct pages of 64 bytes.
        let folios = || (0..1u64 << 20).map(|pfn| 0xffff_ea00_0000_0000 + pfn * 64);
        for shift in 1..=8 {
            let mut kept = 0u64;
            for folio in folios() {
                if sampled(folio, 0, shift) {
                    kept += 1;
                    assert!(sampled(folio, 0, shift - 1), "a sampled folio left at a lower shift");
                }
                assert!(sampled(folio, 9, shift), "large folios are always tracked");
            }
            let expected = (1u64 << 20) >> shift;
            // Within 3 standard deviations of a binomial draw.
            let sigma = libm_sqrt(expected as f64);
            assert!(
                (kept as f64 - expected as f64).abs() < 3.0 * sigma + 1.0,
                "shift {shift}: {kept} of {expected}"
            );
        }
    }

    /// no_std: Newton's method is enough for a test's bound.
    fn libm_sqrt(x: f64) -> f64 {
        let mut r = x.max(1.0);
        for _ in 0..64 {
            r = 0.5 * (r + x / r);
        }
        r
    }

    #[test]
    fn every_total_has_its_own_slot() {
        use super::totals::*;
        let mut seen = [false; COUNT];
        let mut mark = |slot: usize| {
            assert!(slot < COUNT && !seen[slot], "slot {slot} out of range or taken twice");
            seen[slot] = true;
        };
        for kind in 0..KINDS as u8 {
            for order in 0..ORDERS as u8 {
                for op in 1..=OPS as u8 {
                    for level in 1..=LEVELS as u8 {
                        mark(rmap_calls(op, level, kind, order));
                        mark(rmap_pages(op, level, kind, order));
                    }
                }
                for outcome in 1..=OUTCOMES as u8 {
                    mark(write_faults(outcome, kind, order));
                }
            }
        }
        assert!(seen.iter().all(|s| *s), "every slot is used");
        assert!(size_of::<Totals>() <= 32 * 1024, "a per-CPU value is at most 32 KiB");
        // An order past the last slot is counted there, not elsewhere.
        assert_eq!(rmap_calls(1, 1, 1, 40), rmap_calls(1, 1, 1, ORDERS as u8 - 1));
    }

    #[cfg(feature = "user")]
    #[test]
    fn folio_rows_read_back_as_written() {
        let row = super::FolioRow {
            serial: 7,
            address: 0x7f00_0020_0000,
            kind: "anon".to_owned(),
            order: 9,
            sharers: 4,
            mapcount: 2048,
            ptes: 0,
            pmds: 4,
            partial: false,
            ever_partial: true,
            peak_sharers: 4,
            peak_mapcount: 2048,
            peak_refcount: 5,
            cow_copies: 0,
            cow_reuses: 1,
            kernel_bit: "set".to_owned(),
            simulated_bit: "-".to_owned(),
        };
        assert_eq!(super::FolioRow::parse(&row.line()), Some(row));
        assert_eq!(super::FolioRow::parse(super::FolioRow::HEADER), None);
        assert_eq!(super::FolioRow::parse("7 anon 9"), None);
    }

    #[cfg(feature = "user")]
    #[test]
    fn smaps_reports_read_back_as_written() {
        let figures = |kb: u64| super::SmapsFigures {
            rss_bytes: kb << 10,
            pss_shifted: (kb / 2) << (super::PSS_SHIFT + 10),
            shared_bytes: 4096,
            private_bytes: (kb << 10) - 4096,
            exclusive_pages: kb / 4 - 1,
            kpagecount_sum: kb / 2,
            undetermined_bytes: 0,
        };
        let report = super::SmapsReport { exact: figures(2048), no_page_mapcount: figures(64) };
        assert_eq!(super::SmapsReport::parse(&report.text()), Some(report));
        assert_eq!(super::SmapsReport::parse("Rss_kB 4 4\n"), None);
    }

    use core::mem::size_of;

    use super::*;

    #[test]
    fn events_have_no_hidden_padding() {
        assert_eq!(size_of::<Event>(), 8 + 4 * 8 + 10 * 4);
        assert_eq!(size_of::<ForkEvent>(), 8 + 5 * 8 + 2 * 4);
        assert_eq!(size_of::<SourceEvent>(), 4 + 3 * 4 + 2 * SOURCE_NAME_LEN);
        assert_eq!(size_of::<MoveEvent>(), 8 + 5 * 8);
        assert_eq!(size_of::<TeardownEvent>(), 8 + 2 * 8);
        assert_eq!(size_of::<ScanRefusalEvent>(), 8 + 3 * 8);
    }

    #[test]
    fn layout_has_no_hidden_padding() {
        assert_eq!(size_of::<KernelLayout>(), 45 * 4);
    }

    /// The decoder tells records apart by size as well as by type byte.
    #[test]
    fn record_sizes_differ() {
        let sizes = [
            size_of::<Event>(),
            size_of::<ForkEvent>(),
            size_of::<SourceEvent>(),
            size_of::<MoveEvent>(),
            size_of::<TeardownEvent>(),
            size_of::<ScanRefusalEvent>(),
        ];
        for (i, a) in sizes.iter().enumerate() {
            assert!(sizes[i + 1..].iter().all(|b| a != b));
        }
    }
}
