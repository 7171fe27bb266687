//! Ring-buffer records to typed events.

use mapcount_common::{
    Event, EventType, FolioKind, ForkEvent, Level, MoveEvent, RmapOp, ScanRefusalEvent, SourceEvent,
    TeardownEvent, WriteFaultOutcome, vma_class,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("record of type {event_type} has {len} bytes, expected {expected}")]
    WrongSize { event_type: u8, len: usize, expected: usize },
    #[error("unknown event type {0}")]
    UnknownType(u8),
    #[error("unknown {field} value {value}")]
    BadField { field: &'static str, value: u8 },
}

/// A checked view of one ring-buffer record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    Rmap { op: RmapOp, level: Level, kind: FolioKind, raw: Event },
    WriteFault { outcome: WriteFaultOutcome, kind: Option<FolioKind>, raw: Event },
    Fork(ForkEvent),
    Move(MoveEvent),
    Teardown(TeardownEvent),
    Source { op: RmapOp, raw: SourceEvent },
    ScanRefusal(ScanRefusalEvent),
}

impl Decoded {
    /// The CPU that produced the record.
    pub fn cpu(&self) -> u32 {
        match self {
            Decoded::Rmap { raw, .. } | Decoded::WriteFault { raw, .. } => raw.cpu,
            Decoded::Fork(raw) => raw.cpu,
            Decoded::Move(raw) => raw.cpu,
            Decoded::Teardown(raw) => raw.cpu,
            Decoded::Source { raw, .. } => raw.cpu,
            Decoded::ScanRefusal(raw) => raw.cpu,
        }
    }
}

/// Reads a plain-integer record of exactly `size_of::<T>()` bytes.
fn read_record<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() != size_of::<T>() {
        return Err(DecodeError::WrongSize {
            event_type: bytes[0],
            len: bytes.len(),
            expected: size_of::<T>(),
        });
    }
    // SAFETY: the length is checked and T is plain integers (aya::Pod), so
    // any bytes form a valid value; the record may be unaligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let &event_type = bytes.first().ok_or(DecodeError::Empty)?;
    match event_type {
        t if t == EventType::Rmap as u8 => {
            let raw: Event = read_record(bytes)?;
            check_order(raw.order)?;
            Ok(Decoded::Rmap {
                op: field("op", raw.op)?,
                level: field("level", raw.level)?,
                kind: field("kind", raw.kind)?,
                raw,
            })
        }
        t if t == EventType::WriteFault as u8 => {
            let raw: Event = read_record(bytes)?;
            check_order(raw.order)?;
            Ok(Decoded::WriteFault {
                outcome: field("outcome", raw.outcome)?,
                kind: if raw.kind == 0 { None } else { Some(field("kind", raw.kind)?) },
                raw,
            })
        }
        t if t == EventType::Fork as u8 => Ok(Decoded::Fork(read_record(bytes)?)),
        t if t == EventType::Move as u8 => Ok(Decoded::Move(read_record(bytes)?)),
        t if t == EventType::Teardown as u8 => Ok(Decoded::Teardown(read_record(bytes)?)),
        t if t == EventType::ScanRefusal as u8 => Ok(Decoded::ScanRefusal(read_record(bytes)?)),
        t if t == EventType::Source as u8 => {
            let raw: SourceEvent = read_record(bytes)?;
            if !(vma_class::MIXEDMAP..=vma_class::OTHER).contains(&raw.vma_class) {
                return Err(DecodeError::BadField { field: "vma_class", value: raw.vma_class });
            }
            Ok(Decoded::Source { op: field("op", raw.op)?, raw })
        }
        other => Err(DecodeError::UnknownType(other)),
    }
}

/// Largest folio order that exists (PUD-sized folios are order 18); the
/// daemon computes `1 << order`.
pub const MAX_ORDER: u8 = 31;

fn check_order(order: u8) -> Result<(), DecodeError> {
    if order > MAX_ORDER {
        return Err(DecodeError::BadField { field: "order", value: order });
    }
    Ok(())
}

/// A byte of a record as the enum it encodes, or the field named in the error.
fn field<T: TryFrom<u8, Error = u8>>(field: &'static str, byte: u8) -> Result<T, DecodeError> {
    T::try_from(byte).map_err(|value| DecodeError::BadField { field, value })
}

/// The bytes of a record as the kernel writes it (for tests and synthetic streams).
pub fn encode<T: aya::Pod>(record: &T) -> Vec<u8> {
    // SAFETY: T is repr(C) plain integers without padding (aya::Pod).
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rmap_event() -> Event {
        Event {
            event_type: EventType::Rmap as u8,
            op: RmapOp::Remove as u8,
            level: Level::Pmd as u8,
            kind: FolioKind::Shmem as u8,
            order: 9,
            nr_pages: 512,
            ..Event::ZERO
        }
    }

    #[test]
    fn round_trips_an_rmap_event() {
        let event = rmap_event();
        let decoded = decode(&encode(&event)).unwrap();
        assert_eq!(
            decoded,
            Decoded::Rmap { op: RmapOp::Remove, level: Level::Pmd, kind: FolioKind::Shmem, raw: event }
        );
    }

    #[test]
    fn rejects_short_records_and_unknown_values() {
        let bytes = encode(&rmap_event());
        assert_eq!(
            decode(&bytes[..63]),
            Err(DecodeError::WrongSize { event_type: 1, len: 63, expected: 80 })
        );
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        let mut bad = rmap_event();
        bad.kind = 9;
        assert_eq!(decode(&encode(&bad)), Err(DecodeError::BadField { field: "kind", value: 9 }));
        bad = rmap_event();
        bad.order = 200;
        assert_eq!(decode(&encode(&bad)), Err(DecodeError::BadField { field: "order", value: 200 }));
        bad = rmap_event();
        bad.event_type = 0;
        assert_eq!(decode(&encode(&bad)), Err(DecodeError::UnknownType(0)));
        // A fork record cut short, and an rmap record with the fork type byte.
        let fork = ForkEvent {
            event_type: EventType::Fork as u8,
            copy: 1,
            _pad: [0; 6],
            src_mm: 1,
            start: 2,
            dst_mm: 3,
            end: 4,
            timestamp_ns: 5,
            tgid: 6,
            cpu: 0,
        };
        assert_eq!(decode(&encode(&fork)), Ok(Decoded::Fork(fork)));
        assert!(matches!(decode(&encode(&fork)[..40]), Err(DecodeError::WrongSize { .. })));
        let mut mislabelled = encode(&rmap_event());
        mislabelled[0] = EventType::Fork as u8;
        assert!(matches!(decode(&mislabelled), Err(DecodeError::WrongSize { expected: 56, .. })));
    }

    #[test]
    fn write_fault_kind_is_optional() {
        let event = Event {
            event_type: EventType::WriteFault as u8,
            outcome: WriteFaultOutcome::CopyZeroPage as u8,
            ..Event::ZERO
        };
        assert!(matches!(
            decode(&encode(&event)),
            Ok(Decoded::WriteFault { outcome: WriteFaultOutcome::CopyZeroPage, kind: None, .. })
        ));
    }
}
