//! Field offsets and flag bits of the running kernel, read from its BTF.
//!
//! The eBPF object is compiled once; everything that moves between kernel
//! versions (folio field offsets, `enum pageflags` bit numbers, the place of
//! `vma` inside `struct vm_fault`) is looked up here and handed to the
//! programs in [`KernelLayout`].

use std::path::Path;

use btf_rs::{Btf, Type};
use mapcount_common::{KernelLayout, OFFSET_ABSENT};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read BTF from {path}: {reason}; the kernel needs CONFIG_DEBUG_INFO_BTF=y")]
    ReadBtf { path: String, reason: String },
    #[error("BTF has no struct {0}; is this a kernel BTF (vmlinux)?")]
    MissingStruct(&'static str),
    #[error("BTF has none of the fields {candidates:?} in struct {strukt}, which mapcount needs")]
    MissingRequiredField {
        strukt: &'static str,
        candidates: &'static [&'static str],
    },
    #[error("BTF has no enum value {0}")]
    MissingEnumValue(&'static str),
    #[error("malformed BTF: {0}")]
    Btf(String),
}

/// Whether mapcount can work without a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    Required,
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
}

const FIELDS: &[FieldSpec] = &[
    FieldSpec {
        slot: "folio.flags",
        strukt: "folio",
        candidates: &["flags"],
        need: Need::Required,
        set: |l, v| l.folio_flags = v,
    },
    FieldSpec {
        slot: "folio.mapping",
        strukt: "folio",
        candidates: &["mapping"],
        need: Need::Required,
        set: |l, v| l.folio_mapping = v,
    },
    FieldSpec {
        slot: "folio._mapcount",
        strukt: "folio",
        candidates: &["_mapcount"],
        need: Need::Required,
        set: |l, v| l.folio_mapcount = v,
    },
    FieldSpec {
        slot: "folio._refcount",
        strukt: "folio",
        candidates: &["_refcount"],
        need: Need::Required,
        set: |l, v| l.folio_refcount = v,
    },
    // 6.1-6.7: a u8 of its own (6.1 also has a _flags_1 that is not the
    // order, so _folio_order is tried first); 6.8+: the low byte of _flags_1.
    FieldSpec {
        slot: "folio.order",
        strukt: "folio",
        candidates: &["_folio_order", "_flags_1"],
        need: Need::Required,
        set: |l, v| l.folio_order = v,
    },
    FieldSpec {
        slot: "folio._large_mapcount",
        strukt: "folio",
        candidates: &["_large_mapcount"],
        need: Need::Optional,
        set: |l, v| l.folio_large_mapcount = v,
    },
    FieldSpec {
        slot: "folio._entire_mapcount",
        strukt: "folio",
        // 6.1 calls the PMD mapcount _total_mapcount (folio_entire_mapcount reads it).
        candidates: &["_entire_mapcount", "_total_mapcount"],
        need: Need::Optional,
        set: |l, v| l.folio_entire_mapcount = v,
    },
    FieldSpec {
        slot: "folio._nr_pages_mapped",
        strukt: "folio",
        candidates: &["_nr_pages_mapped"],
        need: Need::Optional,
        set: |l, v| l.folio_nr_pages_mapped = v,
    },
    FieldSpec {
        slot: "folio._pincount",
        strukt: "folio",
        candidates: &["_pincount"],
        need: Need::Optional,
        set: |l, v| l.folio_pincount = v,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_mm",
        strukt: "vm_area_struct",
        candidates: &["vm_mm"],
        need: Need::Required,
        set: |l, v| l.vma_mm = v,
    },
    FieldSpec {
        slot: "vm_area_struct.vm_flags",
        strukt: "vm_area_struct",
        candidates: &["vm_flags", "__vm_flags"],
        need: Need::Required,
        set: |l, v| l.vma_flags = v,
    },
    FieldSpec {
        slot: "vm_fault.vma",
        strukt: "vm_fault",
        candidates: &["vma"],
        need: Need::Required,
        set: |l, v| l.vmf_vma = v,
    },
];

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
    Btf::from_file(path).map_err(|e| LayoutError::ReadBtf {
        path: path.display().to_string(),
        reason: format!("{e:#}"),
    })
}

pub fn resolve(btf: &Btf) -> Result<Resolved, LayoutError> {
    let mut layout = KernelLayout::ABSENT;
    let mut fields = Vec::with_capacity(FIELDS.len() + 2);
    for spec in FIELDS {
        let strukt = find_struct(btf, spec.strukt)?.ok_or(LayoutError::MissingStruct(spec.strukt))?;
        let mut found = None;
        for &candidate in spec.candidates {
            if let Some(bits) = member_bit_offset(btf, &strukt, candidate)? {
                found = Some((candidate, bits / 8));
                break;
            }
        }
        match found {
            Some((member, offset)) => {
                (spec.set)(&mut layout, offset);
                fields.push(ResolvedField {
                    slot: spec.slot,
                    member: Some(member),
                    offset: Some(offset),
                });
            }
            None if spec.need == Need::Optional => {
                fields.push(ResolvedField {
                    slot: spec.slot,
                    member: None,
                    offset: None,
                });
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
    debug_assert!(fields.iter().all(|f| f.offset != Some(OFFSET_ABSENT)));
    Ok(Resolved { layout, fields })
}

fn find_struct(btf: &Btf, name: &str) -> Result<Option<btf_rs::Struct>, LayoutError> {
    let types = match btf.resolve_types_by_name(name) {
        Ok(types) => types,
        Err(_) => return Ok(None),
    };
    Ok(types.into_iter().find_map(|t| match t {
        // A forward declaration has no members; skip to the definition.
        Type::Struct(s) if !s.members.is_empty() => Some(s),
        _ => None,
    }))
}

/// Skips typedefs and qualifiers to the struct or union underneath.
fn strip_to_aggregate(btf: &Btf, mut ty: Type) -> Result<Option<btf_rs::Struct>, LayoutError> {
    loop {
        ty = match ty {
            Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
            Type::Typedef(t) => btf.resolve_chained_type(&t)?,
            Type::Const(t) => btf.resolve_chained_type(&t)?,
            Type::Volatile(t) => btf.resolve_chained_type(&t)?,
            Type::TypeTag(t) => btf.resolve_chained_type(&t)?,
            _ => return Ok(None),
        };
    }
}

/// Bit offset of `name` in `strukt`, searching through anonymous structs
/// and unions (struct folio is mostly made of them).
fn member_bit_offset(btf: &Btf, strukt: &btf_rs::Struct, name: &str) -> Result<Option<u32>, LayoutError> {
    for member in &strukt.members {
        let member_name = btf.resolve_name(member)?;
        if member_name == name {
            return Ok(Some(member.bit_offset()));
        }
        if member_name.is_empty() {
            let inner = btf.resolve_chained_type(member)?;
            if let Some(inner) = strip_to_aggregate(btf, inner)?
                && let Some(bits) = member_bit_offset(btf, &inner, name)?
            {
                return Ok(Some(member.bit_offset() + bits));
            }
        }
    }
    Ok(None)
}

fn enum_value(btf: &Btf, enum_name: &str, value: &'static str) -> Result<u32, LayoutError> {
    let types = btf
        .resolve_types_by_name(enum_name)
        .map_err(|_| LayoutError::MissingEnumValue(value))?;
    for ty in types {
        if let Type::Enum(e) = ty {
            for member in &e.members {
                if btf.resolve_name(member)? == value {
                    return Ok(member.val());
                }
            }
        }
    }
    Err(LayoutError::MissingEnumValue(value))
}

/// btf-rs reports errors as `anyhow::Error`, which is not a `std::error::Error`.
impl From<anyhow::Error> for LayoutError {
    fn from(e: anyhow::Error) -> Self {
        LayoutError::Btf(format!("{e:#}"))
    }
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
        assert_eq!(
            (l.folio_mapping, l.folio_mapcount, l.folio_refcount),
            (24, 48, 52)
        );
        assert!(l.folio_order >= 64, "order lives in the second struct page");
        assert!(l.pg_head_bit < 64 && l.pg_swapbacked_bit < 64);
        assert_ne!(l.pg_head_bit, l.pg_swapbacked_bit);
    }
}
