//! The kernel's BTF, read in place: what [`crate::layout`] asks of it
//! (structs and their members, enums, functions and their prototypes).
//!
//! A parser that builds every type and string of vmlinux's BTF (about
//! 100,000 types, 60,000 names) took 110-190 ms of the daemon's start-up.
//! Here one pass notes where each type's record starts and hashes the
//! named ones; records are decoded when asked for.
//!
//! Format: Documentation/bpf/btf.rst. A header, a type section of records
//! (12 bytes, then data whose length depends on the kind), and a string
//! section that names point into.

use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

const MAGIC: u16 = 0xeb9f;

/// The kinds this reader decodes (`BTF_KIND_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Int = 1,
    Ptr = 2,
    Array = 3,
    Struct = 4,
    Union = 5,
    Enum = 6,
    Fwd = 7,
    Typedef = 8,
    Volatile = 9,
    Const = 10,
    Restrict = 11,
    Func = 12,
    FuncProto = 13,
    Var = 14,
    Datasec = 15,
    Float = 16,
    DeclTag = 17,
    TypeTag = 18,
    Enum64 = 19,
}

impl Kind {
    fn of(value: u32) -> Option<Kind> {
        use Kind::*;
        const ALL: [Kind; 19] = [
            Int, Ptr, Array, Struct, Union, Enum, Fwd, Typedef, Volatile, Const, Restrict, Func, FuncProto,
            Var, Datasec, Float, DeclTag, TypeTag, Enum64,
        ];
        ALL.get((value as usize).checked_sub(1)?).copied()
    }

    /// Bytes of data after the 12-byte record, for `vlen` entries.
    fn data_len(self, vlen: usize) -> usize {
        match self {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::Datasec | Kind::Enum64 => 12 * vlen,
            Kind::Enum | Kind::FuncProto => 8 * vlen,
            _ => 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("not BTF (no magic number)")]
    NotBtf,
    #[error("BTF version {0} (this reader knows version 1)")]
    Version(u8),
    #[error("BTF sections outside the data")]
    Truncated,
    #[error("type {id} has kind {kind}, which this reader does not know")]
    UnknownKind { id: u32, kind: u32 },
}

pub struct Btf {
    data: Vec<u8>,
    big_endian: bool,
    /// Where the type section and the string section start in `data`.
    types_start: usize,
    strings: std::ops::Range<usize>,
    /// Offset of each type's record in the type section, by type id (id 0
    /// is void and has no record).
    records: Vec<u32>,
    /// Named types' ids, hashed by name.
    by_name: HashTable<u32>,
}

/// One type's record.
#[derive(Clone, Copy)]
pub struct Type<'b> {
    btf: &'b Btf,
    pub kind: Kind,
    name_off: u32,
    vlen: usize,
    kind_flag: bool,
    /// The size (structs, unions, enums, ints) or the type referred to.
    size_or_type: u32,
    /// Where the data after the record starts, in `btf.data`.
    data: usize,
}

/// A struct or union member.
pub struct Member<'b> {
    pub name: &'b str,
    pub type_id: u32,
    pub bit_offset: u32,
}

impl Btf {
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let big_endian = match data.get(..2) {
            Some(magic) if u16::from_le_bytes([magic[0], magic[1]]) == MAGIC => false,
            Some(magic) if u16::from_be_bytes([magic[0], magic[1]]) == MAGIC => true,
            _ => return Err(BtfError::NotBtf),
        };
        let mut btf = Btf {
            data,
            big_endian,
            types_start: 0,
            strings: 0..0,
            records: vec![0],
            by_name: HashTable::new(),
        };
        let version = btf.data.get(2).copied().ok_or(BtfError::Truncated)?;
        if version != 1 {
            return Err(BtfError::Version(version));
        }
        let header = |field: usize| btf.u32_at(4 + 4 * field).ok_or(BtfError::Truncated).map(|v| v as usize);
        let (header_len, type_off, type_len, str_off, str_len) =
            (header(0)?, header(1)?, header(2)?, header(3)?, header(4)?);
        let types = header_len + type_off..header_len + type_off + type_len;
        let strings = header_len + str_off..header_len + str_off + str_len;
        if types.end > btf.data.len() || strings.end > btf.data.len() {
            return Err(BtfError::Truncated);
        }
        btf.types_start = types.start;
        btf.strings = strings;

        // One pass over the records: where each starts, and its name.
        let mut offset = 0;
        let mut named = Vec::new();
        while offset < type_len {
            let id = btf.records.len() as u32;
            let at = types.start + offset;
            let (Some(name_off), Some(info)) = (btf.u32_at(at), btf.u32_at(at + 4)) else {
                return Err(BtfError::Truncated);
            };
            let raw_kind = (info >> 24) & 0x1f;
            let kind = Kind::of(raw_kind).ok_or(BtfError::UnknownKind { id, kind: raw_kind })?;
            btf.records.push(offset as u32);
            if name_off != 0 {
                named.push((id, name_off));
            }
            offset += 12 + kind.data_len((info & 0xffff) as usize);
        }
        if offset != type_len {
            return Err(BtfError::Truncated);
        }
        let hasher = FxBuildHasher;
        let mut by_name = HashTable::with_capacity(named.len());
        for (id, name_off) in named {
            let hash = hasher.hash_one(btf.string(name_off));
            by_name.insert_unique(hash, id, |&other| hasher.hash_one(btf.name_of(other)));
        }
        btf.by_name = by_name;
        Ok(btf)
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let bytes: [u8; 4] = self.data.get(at..at + 4)?.try_into().ok()?;
        Some(if self.big_endian { u32::from_be_bytes(bytes) } else { u32::from_le_bytes(bytes) })
    }

    /// The string at `offset` of the string section ("" if out of range).
    fn string(&self, offset: u32) -> &str {
        let Some(rest) = self.data.get(self.strings.start + offset as usize..self.strings.end) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn name_of(&self, id: u32) -> &str {
        self.get(id).map_or("", |t| t.name())
    }

    /// The type with this id; `None` for void (0) and ids past the end.
    pub fn get(&self, id: u32) -> Option<Type<'_>> {
        if id == 0 {
            return None;
        }
        let at = self.types_start + *self.records.get(id as usize)? as usize;
        let info = self.u32_at(at + 4)?;
        Some(Type {
            btf: self,
            kind: Kind::of((info >> 24) & 0x1f)?,
            name_off: self.u32_at(at)?,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 != 0,
            size_or_type: self.u32_at(at + 8)?,
            data: at + 12,
        })
    }

    /// Whether the types are sorted by name, the unnamed ones first: how
    /// 7.3 builds vmlinux BTF, so that its verifier can search it by
    /// binary search (`btf_find_by_name_kind`); 6.1 to 6.18 keep build
    /// order and search it linearly. Stops at the first pair out of
    /// order, which on those comes within the first few types.
    pub fn sorted_by_name(&self) -> bool {
        let names = (1..self.records.len() as u32).map(|id| self.name_of(id));
        let mut named = names.skip_while(|name| name.is_empty()).peekable();
        while let Some(name) = named.next() {
            if named.peek().is_some_and(|next| next.as_bytes() < name.as_bytes()) {
                return false;
            }
        }
        true
    }

    /// Every type of this name.
    pub fn named<'b>(&'b self, name: &'b str) -> impl Iterator<Item = Type<'b>> + 'b {
        let hash = FxBuildHasher.hash_one(name);
        self.by_name.iter_hash(hash).filter_map(move |&id| self.get(id).filter(|t| t.name() == name))
    }

    /// The type under typedefs and qualifiers (`None`: void).
    pub fn skip_modifiers(&self, id: u32) -> Option<Type<'_>> {
        let mut ty = self.get(id)?;
        // Bounded: a malformed chain must not loop.
        for _ in 0..32 {
            match ty.kind {
                Kind::Typedef | Kind::Const | Kind::Volatile | Kind::Restrict | Kind::TypeTag => {
                    ty = self.get(ty.size_or_type)?;
                }
                _ => return Some(ty),
            }
        }
        None
    }
}

impl<'b> Type<'b> {
    pub fn name(&self) -> &'b str {
        self.btf.string(self.name_off)
    }

    /// Size in bytes of a struct, union, enum or int.
    pub fn size(&self) -> u32 {
        self.size_or_type
    }

    /// What a pointer, typedef, qualifier or function refers to; a
    /// function prototype's return type.
    pub fn type_id(&self) -> u32 {
        self.size_or_type
    }

    fn entry(&self, index: usize, field: usize) -> u32 {
        let stride = self.kind.data_len(1);
        self.btf.u32_at(self.data + index * stride + 4 * field).unwrap_or(0)
    }

    /// A struct's or union's members (nothing for other kinds).
    pub fn members(&self) -> impl Iterator<Item = Member<'b>> + '_ {
        let count = if matches!(self.kind, Kind::Struct | Kind::Union) { self.vlen } else { 0 };
        (0..count).map(move |i| {
            let offset = self.entry(i, 2);
            Member {
                name: self.btf.string(self.entry(i, 0)),
                type_id: self.entry(i, 1),
                // With the kind flag, the top 8 bits are a bitfield's size.
                bit_offset: if self.kind_flag { offset & 0xff_ffff } else { offset },
            }
        })
    }

    /// A 32-bit enum's values (nothing for other kinds).
    pub fn enum_values(&self) -> impl Iterator<Item = (&'b str, u32)> + '_ {
        let count = if self.kind == Kind::Enum { self.vlen } else { 0 };
        (0..count).map(move |i| (self.btf.string(self.entry(i, 0)), self.entry(i, 1)))
    }

    /// A function prototype's parameter types (nothing for other kinds).
    pub fn parameters(&self) -> impl Iterator<Item = u32> + '_ {
        let count = if self.kind == Kind::FuncProto { self.vlen } else { 0 };
        (0..count).map(move |i| self.entry(i, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: the header, then `types` and `strings` as given.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let mut data = vec![0x9f, 0xeb, 1, 0];
        let type_len = types.len() as u32 * 4;
        for field in [24, 0, type_len, type_len, strings.len() as u32] {
            data.extend_from_slice(&field.to_le_bytes());
        }
        for word in types {
            data.extend_from_slice(&word.to_le_bytes());
        }
        data.extend_from_slice(strings);
        data
    }

    const fn info(kind: Kind, vlen: u32, kind_flag: bool) -> u32 {
        (kind_flag as u32) << 31 | (kind as u32) << 24 | vlen
    }

    /// 7.3 sorts vmlinux BTF by name, unnamed types first; older kernels
    /// keep build order.
    #[test]
    fn tells_btf_sorted_by_name() {
        let strings = b"\0a\0b\0";
        let sorted = |first: u32, second: u32| {
            #[rustfmt::skip]
            let types = [
                0, info(Kind::Const, 0, false), 2,
                first, info(Kind::Int, 0, false), 4, 32,
                second, info(Kind::Int, 0, false), 4, 32,
            ];
            Btf::parse(blob(&types, strings)).unwrap().sorted_by_name()
        };
        assert!(sorted(1, 3));
        assert!(sorted(1, 1), "one name twice");
        assert!(!sorted(3, 1));
    }

    #[test]
    fn reads_structs_enums_and_prototypes() {
        // Names at 1 (int), 5 (s), 7 (a), 9 (b), 11 (e), 13 (E1), 16 (f).
        let strings = b"\0int\0s\0a\0b\0e\0E1\0f\0";
        #[rustfmt::skip]
        let types = [
            // 1: int, 4 bytes
            1, info(Kind::Int, 0, false), 4, 32,
            // 2: struct s { int a; int b:3 at bit 35 } (kind flag: bitfield)
            5, info(Kind::Struct, 2, true), 8, 7, 1, 0, 9, 1, (3 << 24) | 35,
            // 3: const struct s
            0, info(Kind::Const, 0, false), 2,
            // 4: enum e { E1 = 7 }
            11, info(Kind::Enum, 1, false), 4, 13, 7,
            // 5: prototype: const struct s f(int)
            0, info(Kind::FuncProto, 1, false), 3, 0, 1,
            // 6: function f
            16, info(Kind::Func, 0, false), 5,
        ];
        let btf = Btf::parse(blob(&types, strings)).unwrap();
        assert!(!btf.sorted_by_name(), "an unnamed type after named ones");
        let s = btf.named("s").next().unwrap();
        assert_eq!((s.kind, s.size()), (Kind::Struct, 8));
        let members: Vec<_> = s.members().map(|m| (m.name, m.type_id, m.bit_offset)).collect();
        assert_eq!(members, [("a", 1, 0), ("b", 1, 35)]);
        let e = btf.named("e").next().unwrap();
        assert_eq!(e.enum_values().collect::<Vec<_>>(), [("E1", 7)]);
        let f = btf.named("f").next().unwrap();
        assert_eq!(f.kind, Kind::Func);
        let proto = btf.get(f.type_id()).unwrap();
        assert_eq!(proto.parameters().collect::<Vec<_>>(), [1]);
        assert_eq!(btf.skip_modifiers(proto.type_id()).unwrap().name(), "s");
        assert!(btf.named("nothing").next().is_none());
        assert!(btf.get(0).is_none() && btf.get(7).is_none());
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(matches!(Btf::parse(vec![0; 24]), Err(BtfError::NotBtf)));
        // A kind past the last one known: its length is unknown.
        let unknown = blob(&[0, 31 << 24, 0], b"\0");
        assert!(matches!(Btf::parse(unknown), Err(BtfError::UnknownKind { id: 1, kind: 31 })));
        // Sections past the end.
        let mut short = blob(&[1, info(Kind::Int, 0, false), 4, 32], b"\0int\0");
        short.truncate(30);
        assert!(matches!(Btf::parse(short), Err(BtfError::Truncated)));
    }
}
