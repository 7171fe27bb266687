//! Field offsets and flag bits of the running kernel, read from its BTF.
//!
//! The eBPF object is compiled once; everything that moves between kernel
//! versions (folio field offsets, `enum pageflags` bit numbers, the place of
//! `vma` inside `struct vm_fault`) is looked up here and handed to the
//! programs in [`KernelLayout`].

use std::path::Path;

use mapcount_common::{KernelLayout, OFFSET_ABSENT, khugepaged_arg};

pub use crate::btf::Btf;
use crate::btf::{Kind, Type};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read BTF from {path}: {reason}; the kernel needs CONFIG_DEBUG_INFO_BTF=y")]
    ReadBtf { path: String, reason: String },
    #[error("BTF has no struct {0}; is this a kernel BTF (vmlinux)?")]
    MissingStruct(&'static str),
    #[error("BTF has none of the fields {candidates:?} in struct {strukt}, which mapcount needs")]
    MissingRequiredField { strukt: &'static str, candidates: &'static [&'static str] },
    #[error("BTF has no enum value {0}")]
    MissingEnumValue(&'static str),
}

/// Whether mapcount can work without a field of the kernel (here) or a
/// probe point (`probes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Without it the core metrics stay empty (for a field: the object
    /// cannot be used at all).
    Core,
    /// Absent on some kernels; the metrics that need it stay empty there.
    Optional,
}

/// One field the programs read: the struct, the member names it has had
/// across kernel generations (first match wins), and the slot it fills.
struct FieldSpec {
    slot: &'static str,
    strukt: &'static str,
    candidates: &'static [&'static str],
    need: Need,
    set: fn(&mut KernelLayout, u32),
    /// A second hop inside an embedded struct (`file.f_path` then
    /// `path.dentry`): its offset is added.
    then: Option<(&'static str, &'static str)>,
}

const FIELDS: &[FieldSpec] = &[
    FieldSpec {
        slot: "folio.flags",
        strukt: "folio",
        candidates: &["flags"],
        need: Need::Core,
        set: |l, v| l.folio_flags = v,
        then: None,
    },
    FieldSpec {
        slot: "folio.mapping",
        strukt: "folio",
        candidates: &["mapping"],
        need: Need::Core,
        set: |l, v| l.folio_mapping = v,
        then: None,
    },
    FieldSpec {
        slot: "folio._mapcount",
        strukt: "folio",
        candidates: &["_mapcount"],
        need: Need::Core,
        set: |l, v| l.folio_mapcount = v,
        then: None,
    },
    FieldSpec {
        slot: "folio._refcount",
        strukt: "folio",
        candidates: &["_refcount"],
        need: Need::Core,
        set: |l, v| l.folio_refcount = v,
        then: None,
    },
    // 6.1-6.7: a u8 of its own (6.1 also has a _flags_1 that is not the
    // order, so _folio_order is tried first); 6.8+: the low byte of _flags_1.
    FieldSpec {
        slot: "folio.order",
        strukt: "folio",
        candidates: &["_folio_order", "_flags_1"],
        need: Need::Core,
        set: |l, v| l.folio_order = v,
        then: None,
    },
    FieldSpec {
        slot: "folio._large_mapcount",
        strukt: "folio",
        candidates: &["_large_mapcount"],
        need: Need::Optional,
        set: |l, v| l.folio_large_mapcount = v,
        then: None,
    },
    FieldSpec {
        slot: "folio._entire_mapcount",
        strukt: "folio",
        // 6.1 calls the PMD mapcount _total_mapcount (folio_entire_mapcount reads it).
        candidates: &["_entire_mapcount", "_total_mapcount"],
        need: Need::Optional,
        set: |l, v| l.folio_entire_mapcount = v,
        then: None,
    },
    FieldSpec {
        slot: "folio._nr_pages_mapped",
        strukt: "folio",
        candidates: &["_nr_pages_mapped"],
        need: Need::Optional,
        set: |l, v| l.folio_nr_pages_mapped = v,
        then: None,
    },
    FieldSpec {
        slot: "folio._pincount",
        strukt: "folio",
        candidates: &["_pincount"],
        need: Need::Optional,
        set: |l, v| l.folio_pincount = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_mm",
        strukt: "vm_area_struct",
        candidates: &["vm_mm"],
        need: Need::Core,
        set: |l, v| l.vma_mm = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_flags",
        strukt: "vm_area_struct",
        candidates: &["vm_flags", "__vm_flags"],
        need: Need::Core,
        set: |l, v| l.vma_flags = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_fault.vma",
        strukt: "vm_fault",
        candidates: &["vma"],
        need: Need::Core,
        set: |l, v| l.vmf_vma = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_fault.page",
        strukt: "vm_fault",
        candidates: &["page"],
        need: Need::Core,
        set: |l, v| l.vmf_page = v,
        then: None,
    },
    FieldSpec {
        slot: "page.compound_head",
        strukt: "page",
        // 7.x renamed it: compound_info holds the head pointer or a mask.
        candidates: &["compound_head", "compound_info"],
        need: Need::Core,
        set: |l, v| l.page_compound_head = v,
        then: None,
    },
    FieldSpec {
        slot: "folio._mm_ids",
        strukt: "folio",
        candidates: &["_mm_ids"],
        need: Need::Optional,
        set: |l, v| l.folio_mm_ids = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_area_struct.anon_vma",
        strukt: "vm_area_struct",
        candidates: &["anon_vma"],
        need: Need::Core,
        set: |l, v| l.vma_anon_vma = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_file",
        strukt: "vm_area_struct",
        candidates: &["vm_file"],
        need: Need::Core,
        set: |l, v| l.vma_file = v,
        then: None,
    },
    FieldSpec {
        slot: "task_struct.mm",
        strukt: "task_struct",
        candidates: &["mm"],
        need: Need::Core,
        set: |l, v| l.task_mm = v,
        then: None,
    },
    FieldSpec {
        slot: "task_struct.tgid",
        strukt: "task_struct",
        candidates: &["tgid"],
        need: Need::Core,
        set: |l, v| l.task_tgid = v,
        then: None,
    },
    FieldSpec {
        slot: "file.f_path.dentry",
        strukt: "file",
        candidates: &["f_path"],
        need: Need::Optional,
        set: |l, v| l.file_dentry = v,
        then: Some(("path", "dentry")),
    },
    FieldSpec {
        slot: "dentry.d_name.name",
        strukt: "dentry",
        candidates: &["d_name"],
        need: Need::Optional,
        set: |l, v| l.dentry_name = v,
        then: Some(("qstr", "name")),
    },
    FieldSpec {
        slot: "file.f_inode",
        strukt: "file",
        candidates: &["f_inode"],
        need: Need::Optional,
        set: |l, v| l.file_inode = v,
        then: None,
    },
    FieldSpec {
        slot: "inode.i_sb",
        strukt: "inode",
        candidates: &["i_sb"],
        need: Need::Optional,
        set: |l, v| l.inode_sb = v,
        then: None,
    },
    FieldSpec {
        slot: "super_block.s_type",
        strukt: "super_block",
        candidates: &["s_type"],
        need: Need::Optional,
        set: |l, v| l.sb_type = v,
        then: None,
    },
    FieldSpec {
        slot: "file_system_type.name",
        strukt: "file_system_type",
        candidates: &["name"],
        need: Need::Optional,
        set: |l, v| l.fs_type_name = v,
        then: None,
    },
    FieldSpec {
        slot: "folio.index",
        strukt: "folio",
        candidates: &["index", "__folio_index"],
        need: Need::Core,
        set: |l, v| l.folio_index = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_start",
        strukt: "vm_area_struct",
        candidates: &["vm_start"],
        need: Need::Core,
        set: |l, v| l.vma_start = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_end",
        strukt: "vm_area_struct",
        candidates: &["vm_end"],
        need: Need::Core,
        set: |l, v| l.vma_end = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_pgoff",
        strukt: "vm_area_struct",
        candidates: &["vm_pgoff"],
        need: Need::Core,
        set: |l, v| l.vma_pgoff = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_ops",
        strukt: "vm_area_struct",
        candidates: &["vm_ops"],
        need: Need::Core,
        set: |l, v| l.vma_ops = v,
        then: None,
    },
    FieldSpec {
        slot: "vm_fault.flags",
        strukt: "vm_fault",
        candidates: &["flags"],
        need: Need::Optional,
        set: |l, v| l.vmf_flags = v,
        then: None,
    },
    FieldSpec {
        slot: "pagetable_move_control.old",
        strukt: "pagetable_move_control",
        candidates: &["old"],
        need: Need::Optional,
        set: |l, v| l.pmc_old = v,
        then: None,
    },
    FieldSpec {
        slot: "pagetable_move_control.old_addr",
        strukt: "pagetable_move_control",
        candidates: &["old_addr"],
        need: Need::Optional,
        set: |l, v| l.pmc_old_addr = v,
        then: None,
    },
    FieldSpec {
        slot: "pagetable_move_control.new_addr",
        strukt: "pagetable_move_control",
        candidates: &["new_addr"],
        need: Need::Optional,
        set: |l, v| l.pmc_new_addr = v,
        then: None,
    },
    FieldSpec {
        slot: "pagetable_move_control.len_in",
        strukt: "pagetable_move_control",
        candidates: &["len_in"],
        need: Need::Optional,
        set: |l, v| l.pmc_len = v,
        then: None,
    },
];

/// What stays empty when an optional field is absent.
pub fn consequence(slot: &str) -> &'static str {
    match slot {
        "folio._large_mapcount" => {
            "folio mapcount of large folios (before 6.10: summed per page by the kernel, not readable)"
        }
        "folio._entire_mapcount" => "PMD mapcount of large folios",
        "folio._nr_pages_mapped" => "pages mapped by PTE of large folios (gone with CONFIG_NO_PAGE_MAPCOUNT)",
        "folio._pincount" => "pins of large folios",
        "folio._mm_ids" => "the kernel's own maybe-shared bit (6.15+)",
        KHUGEPAGED_STATUS_SLOT | SCAN_EXCEED_SHARED_PTE_SLOT => {
            "mapcount_khugepaged_shared_pte_refusals_total"
        }
        "vm_fault.flags" => "outcome=\"unshare\" (unshare faults are counted as writes)",
        "pagetable_move_control.old"
        | "pagetable_move_control.old_addr"
        | "pagetable_move_control.new_addr"
        | "pagetable_move_control.len_in" => {
            "none: before 6.15 move_page_tables takes its arguments one by one"
        }
        "file.f_path.dentry"
        | "dentry.d_name.name"
        | "file.f_inode"
        | "inode.i_sb"
        | "super_block.s_type"
        | "file_system_type.name" => "source names of driver-mapped pages (source=\"other\")",
        _ => "",
    }
}

/// One resolved row, for `mapcountd check` and the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedField {
    pub slot: &'static str,
    /// The member name this kernel uses, if it has one.
    pub member: Option<&'static str>,
    pub offset: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct Resolved {
    pub layout: KernelLayout,
    pub fields: Vec<ResolvedField>,
}

pub const DEFAULT_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

pub fn load_btf(path: &Path) -> Result<Btf, LayoutError> {
    let error = |reason: String| LayoutError::ReadBtf { path: path.display().to_string(), reason };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    Btf::parse(bytes).map_err(|e| error(e.to_string()))
}

pub fn resolve(btf: &Btf) -> Result<Resolved, LayoutError> {
    let mut layout = KernelLayout::ABSENT;
    layout.typed_pointer_loads = u32::from(btf.sorted_by_name());
    let mut fields = Vec::with_capacity(FIELDS.len() + 2);
    for spec in FIELDS {
        let strukt = match find_struct(btf, spec.strukt)? {
            Some(strukt) => strukt,
            // A struct of newer kernels only (pagetable_move_control).
            None if spec.need == Need::Optional => {
                fields.push(ResolvedField { slot: spec.slot, member: None, offset: None });
                continue;
            }
            None => return Err(LayoutError::MissingStruct(spec.strukt)),
        };
        let mut found = None;
        for &candidate in spec.candidates {
            if let Some(bits) = member_bit_offset(btf, &strukt, candidate)? {
                found = Some((candidate, bits / 8));
                break;
            }
        }
        if let (Some((member, offset)), Some((inner, inner_member))) = (found, spec.then) {
            let inner_struct = find_struct(btf, inner)?.ok_or(LayoutError::MissingStruct(inner))?;
            found =
                member_bit_offset(btf, &inner_struct, inner_member)?.map(|bits| (member, offset + bits / 8));
        }
        match found {
            Some((member, offset)) => {
                (spec.set)(&mut layout, offset);
                fields.push(ResolvedField { slot: spec.slot, member: Some(member), offset: Some(offset) });
            }
            None if spec.need == Need::Optional => {
                fields.push(ResolvedField { slot: spec.slot, member: None, offset: None });
            }
            None => {
                return Err(LayoutError::MissingRequiredField {
                    strukt: spec.strukt,
                    candidates: spec.candidates,
                });
            }
        }
    }
    layout.pg_head_bit = enum_value(btf, "pageflags", "PG_head")?;
    layout.pg_swapbacked_bit = enum_value(btf, "pageflags", "PG_swapbacked")?;
    layout.pg_swapcache_bit = enum_value(btf, "pageflags", "PG_swapcache")?;
    if let Some(page) = find_struct(btf, "page")? {
        layout.page_size = page.size();
        fields.push(ResolvedField { slot: "page (size)", member: None, offset: Some(layout.page_size) });
    }
    // Write faults over the whole handle_mm_fault call need it (do_wp_page inlined).
    if let Ok(write) = enum_value(btf, "fault_flag", "FAULT_FLAG_WRITE") {
        layout.fault_flag_write = write;
    }
    // Since 5.18; its absence only merges unshare faults into the writes.
    if let Ok(unshare) = enum_value(btf, "fault_flag", "FAULT_FLAG_UNSHARE") {
        layout.fault_flag_unshare = unshare;
        fields.push(ResolvedField {
            slot: "fault_flag.FAULT_FLAG_UNSHARE (value)",
            member: Some("FAULT_FLAG_UNSHARE"),
            offset: Some(unshare),
        });
    }
    fields.push(ResolvedField {
        slot: "pageflags.PG_swapcache (bit)",
        member: Some("PG_swapcache"),
        offset: Some(layout.pg_swapcache_bit),
    });
    fields.push(ResolvedField {
        slot: "pageflags.PG_head (bit)",
        member: Some("PG_head"),
        offset: Some(layout.pg_head_bit),
    });
    fields.push(ResolvedField {
        slot: "pageflags.PG_swapbacked (bit)",
        member: Some("PG_swapbacked"),
        offset: Some(layout.pg_swapbacked_bit),
    });
    // khugepaged's refusals for shared PTEs.
    let arguments = khugepaged_scan_arguments(btf)?;
    let status_arg = arguments.map(|(status, _)| status);
    let refusal = enum_value(btf, "scan_result", "SCAN_EXCEED_SHARED_PTE").ok();
    if let (Some((status, stopped_at)), Some(value)) = (arguments, refusal) {
        layout.khugepaged_status_arg = status;
        layout.scan_exceed_shared_pte = value;
        layout.khugepaged_stopped_at = stopped_at;
    }
    fields.push(ResolvedField { slot: KHUGEPAGED_STATUS_SLOT, member: Some("status"), offset: status_arg });
    fields.push(ResolvedField {
        slot: SCAN_EXCEED_SHARED_PTE_SLOT,
        member: Some("SCAN_EXCEED_SHARED_PTE"),
        offset: refusal,
    });
    debug_assert!(fields.iter().all(|f| f.offset != Some(OFFSET_ABSENT)));
    Ok(Resolved { layout, fields })
}

const KHUGEPAGED_STATUS_SLOT: &str = "mm_khugepaged_scan_pmd (argument)";
const SCAN_EXCEED_SHARED_PTE_SLOT: &str = "scan_result (value)";

/// The arguments of tracepoint `mm_khugepaged_scan_pmd`, as the raw
/// tracepoint sees them: where the scan's result is (counted from 0), and
/// what the second argument is (a [`khugepaged_arg`] value: a pointer
/// until 7.x made it a page frame number). Every kernel
/// since 4.8 ends the prototype with `(..., referenced, none_or_zero,
/// status, unmapped)`; BTF keeps it as the typedef
/// `btf_trace_mm_khugepaged_scan_pmd`, a pointer to a function whose first
/// parameter is the tracepoint's own data, not an argument.
fn khugepaged_scan_arguments(btf: &Btf) -> Result<Option<(u32, u32)>, LayoutError> {
    for typedef in btf.named("btf_trace_mm_khugepaged_scan_pmd").filter(|t| t.kind == Kind::Typedef) {
        let Some(pointer) = btf.get(typedef.type_id()).filter(|t| t.kind == Kind::Ptr) else { continue };
        let Some(proto) = btf.get(pointer.type_id()).filter(|t| t.kind == Kind::FuncProto) else { continue };
        let parameters: Vec<u32> = proto.parameters().collect();
        if parameters.len() < 5 {
            continue;
        }
        let stopped_at = match btf.get(parameters[2]) {
            Some(t) if t.kind == Kind::Ptr => khugepaged_arg::PAGE,
            _ => khugepaged_arg::PFN,
        };
        return Ok(Some((parameters.len() as u32 - 3, stopped_at)));
    }
    Ok(None)
}

/// Whether BTF describes a function of this name (needed for fentry; also
/// what `mapcountd check --btf` uses in place of /proc/kallsyms).
pub fn has_function(btf: &Btf, name: &str) -> bool {
    btf.named(name).any(|t| t.kind == Kind::Func)
}

/// Whether fentry can take `name`: BTF describes it, and it does not return
/// a struct or union by value, which the verifier refuses (`ptep_clear_flush`
/// returns a `pte_t`).
pub fn fentry_can_attach(btf: &Btf, name: &str) -> bool {
    let returns_aggregate = |function: Type| {
        btf.get(function.type_id())
            .filter(|proto| proto.kind == Kind::FuncProto)
            .and_then(|proto| strip_to_aggregate(btf, proto.type_id()))
            .is_some()
    };
    btf.named(name).any(|t| t.kind == Kind::Func && !returns_aggregate(t))
}

fn find_struct<'b>(btf: &'b Btf, name: &'b str) -> Result<Option<Type<'b>>, LayoutError> {
    // A forward declaration has no members; skip to the definition.
    Ok(btf.named(name).find(|t| t.kind == Kind::Struct && t.members().next().is_some()))
}

/// Skips typedefs and qualifiers to the struct or union underneath.
fn strip_to_aggregate(btf: &Btf, id: u32) -> Option<Type<'_>> {
    btf.skip_modifiers(id).filter(|t| matches!(t.kind, Kind::Struct | Kind::Union))
}

/// Bit offset of `name` in `strukt`, searching through anonymous structs
/// and unions (struct folio is mostly made of them).
fn member_bit_offset(btf: &Btf, strukt: &Type, name: &str) -> Result<Option<u32>, LayoutError> {
    for member in strukt.members() {
        if member.name == name {
            return Ok(Some(member.bit_offset));
        }
        if member.name.is_empty()
            && let Some(inner) = strip_to_aggregate(btf, member.type_id)
            && let Some(bits) = member_bit_offset(btf, &inner, name)?
        {
            return Ok(Some(member.bit_offset + bits));
        }
    }
    Ok(None)
}

fn enum_value(btf: &Btf, enum_name: &str, value: &'static str) -> Result<u32, LayoutError> {
    btf.named(enum_name)
        .find_map(|t| t.enum_values().find(|&(name, _)| name == value).map(|(_, v)| v))
        .ok_or(LayoutError::MissingEnumValue(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The machine's own kernel: whatever it is, the required fields must
    /// resolve and the offsets must be plausible for struct folio.
    #[test]
    fn resolves_running_kernel() {
        let path = Path::new(DEFAULT_BTF_PATH);
        let resolved = resolve(&load_btf(path).unwrap()).unwrap();
        let l = resolved.layout;
        assert_eq!(l.folio_flags, 0);
        // mapping, _mapcount and _refcount have sat at 24/48/52 on x86-64
        // since struct folio exists; a different answer means a parser bug.
        assert_eq!((l.folio_mapping, l.folio_mapcount, l.folio_refcount), (24, 48, 52));
        assert!(l.folio_order >= 64, "order lives in the second struct page");
        assert!(l.pg_head_bit < 64 && l.pg_swapbacked_bit < 64);
        assert_ne!(l.pg_head_bit, l.pg_swapbacked_bit);
    }

    /// Resolves the layout of each Debian kernel in the VM matrix from its
    /// BTF and checks every offset and bit against an independent reading
    /// of the same BTF by bpftool.
    #[test]
    #[ignore = "needs the kernels' BTF: run `cargo xtask test`, which sets MAPCOUNT_BTF_DIR"]
    fn debian_kernels_agree_with_bpftool() {
        let dir = std::env::var_os("MAPCOUNT_BTF_DIR").expect("MAPCOUNT_BTF_DIR is set by cargo xtask test");
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        assert!(!files.is_empty(), "no BTF files in {dir:?}");
        for file in files {
            let resolved = resolve(&load_btf(&file).unwrap()).unwrap();
            let dump = bpftool::Dump::read(&file);
            let row = |slot: &str| resolved.fields.iter().find(|f| f.slot == slot).unwrap().offset;
            for spec in FIELDS {
                let first = spec.candidates.iter().find_map(|m| dump.member_offset(spec.strukt, m));
                let expected = match (first, spec.then) {
                    (Some(offset), Some((inner, member))) => {
                        dump.member_offset(inner, member).map(|o| offset + o)
                    }
                    (first, _) => first,
                };
                assert_eq!(row(spec.slot), expected, "{}: {}", file.display(), spec.slot);
            }
            for value in ["PG_head", "PG_swapbacked", "PG_swapcache"] {
                let expected = dump.enum_value("pageflags", value);
                assert!(expected.is_some(), "bpftool finds {value}");
                assert_eq!(row(&format!("pageflags.{value} (bit)")), expected, "{}: {value}", file.display());
            }
            assert_eq!(row("page (size)"), dump.struct_size("page"), "{}: struct page", file.display());
            // Every kernel of the matrix has khugepaged's tracepoint:
            // `(mm, page or folio, writable, referenced, none_or_zero,
            // status, unmapped)` until 7.x made it `(mm, pfn, referenced,
            // none_or_zero, status, unmapped)` (include/trace/events/huge_memory.h).
            let refusal = dump.enum_value("scan_result", "SCAN_EXCEED_SHARED_PTE");
            assert!(refusal.is_some(), "bpftool finds SCAN_EXCEED_SHARED_PTE in {}", file.display());
            assert_eq!(row(SCAN_EXCEED_SHARED_PTE_SLOT), refusal, "{}", file.display());
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let layout = resolved.layout;
            let expected = match name.as_str() {
                "6.1.btf" | "6.12.btf" => (5, khugepaged_arg::PAGE),
                _ => (4, khugepaged_arg::PFN),
            };
            assert_eq!(
                (layout.khugepaged_status_arg, layout.khugepaged_stopped_at),
                expected,
                "{}: khugepaged tracepoint arguments",
                file.display()
            );
            eprintln!("{}: {} fields agree with bpftool", file.display(), resolved.fields.len());
        }
    }

    /// A second, independent BTF reader: bpftool's raw dump.
    mod bpftool {
        use std::{collections::HashMap, path::Path, process::Command};

        struct BtfType {
            kind: String,
            name: String,
            /// For qualifiers and typedefs: the type they refer to.
            type_id: u32,
            size: Option<u32>,
            /// Struct/union members (name, type id, bit offset) or enum values (name, -, value).
            members: Vec<(String, u32, u32)>,
        }

        pub struct Dump {
            types: HashMap<u32, BtfType>,
        }

        fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
            line.split_whitespace().find_map(|w| w.strip_prefix(key))
        }

        impl Dump {
            pub fn read(file: &Path) -> Self {
                let out = Command::new("bpftool")
                    .args(["btf", "dump", "file"])
                    .arg(file)
                    .args(["format", "raw"])
                    .output();
                let out = out.expect("bpftool runs (cargo xtask setup installs it)");
                assert!(out.status.success(), "bpftool failed: {}", String::from_utf8_lossy(&out.stderr));
                let text = String::from_utf8(out.stdout).unwrap();
                let mut types = HashMap::new();
                let mut current: Option<u32> = None;
                for line in text.lines() {
                    if let Some(rest) = line.strip_prefix('[') {
                        let (id, rest) = rest.split_once("] ").unwrap();
                        let id: u32 = id.parse().unwrap();
                        let kind = rest.split_whitespace().next().unwrap().to_owned();
                        let name = rest.split('\'').nth(1).unwrap_or("").to_owned();
                        let type_id = field(rest, "type_id=").and_then(|v| v.parse().ok()).unwrap_or(0);
                        let size = field(rest, "size=").and_then(|v| v.parse().ok());
                        types.insert(id, BtfType { kind, name, type_id, size, members: Vec::new() });
                        current = Some(id);
                    } else if let (Some(id), Some(rest)) = (current, line.strip_prefix('\t')) {
                        let name = rest.split('\'').nth(1).unwrap_or("").to_owned();
                        let type_id = field(rest, "type_id=").and_then(|v| v.parse().ok()).unwrap_or(0);
                        let value = field(rest, "bits_offset=")
                            .or_else(|| field(rest, "val="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        types.get_mut(&id).unwrap().members.push((name, type_id, value));
                    }
                }
                Self { types }
            }

            fn aggregate(&self, mut id: u32) -> Option<&BtfType> {
                loop {
                    let t = self.types.get(&id)?;
                    match t.kind.as_str() {
                        "STRUCT" | "UNION" => return Some(t),
                        "CONST" | "VOLATILE" | "TYPEDEF" | "TYPE_TAG" | "RESTRICT" => id = t.type_id,
                        _ => return None,
                    }
                }
            }

            fn find_bits(&self, t: &BtfType, member: &str) -> Option<u32> {
                for (name, type_id, bits) in &t.members {
                    if name == member {
                        return Some(*bits);
                    }
                    if name == "(anon)"
                        && let Some(inner) = self.aggregate(*type_id)
                        && let Some(inner_bits) = self.find_bits(inner, member)
                    {
                        return Some(bits + inner_bits);
                    }
                }
                None
            }

            pub fn member_offset(&self, strukt: &str, member: &str) -> Option<u32> {
                let t = self
                    .types
                    .values()
                    .find(|t| t.kind == "STRUCT" && t.name == strukt && !t.members.is_empty())?;
                self.find_bits(t, member).map(|bits| bits / 8)
            }

            pub fn struct_size(&self, strukt: &str) -> Option<u32> {
                self.types
                    .values()
                    .find(|t| t.kind == "STRUCT" && t.name == strukt && !t.members.is_empty())?
                    .size
            }

            pub fn enum_value(&self, enumeration: &str, value: &str) -> Option<u32> {
                self.types
                    .values()
                    .filter(|t| t.kind == "ENUM" && t.name == enumeration)
                    .flat_map(|t| &t.members)
                    .find(|(name, _, _)| name == value)
                    .map(|(_, _, v)| *v)
            }
        }
    }
}
