//! Ring-buffer records to typed events.

use mapcount_common::{Event, EventType, FolioKind, Level, RmapOp, WriteFaultOutcome};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {size}", size = size_of::<Event>())]
    WrongSize(usize),
    #[error("unknown event type {0}")]
    UnknownType(u8),
    #[error("unknown {field} value {value}")]
    BadField { field: &'static str, value: u8 },
}

/// A checked view of one [`Event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    Rmap { op: RmapOp, level: Level, kind: FolioKind, raw: Event },
    WriteFault { outcome: WriteFaultOutcome, kind: Option<FolioKind>, raw: Event },
}

pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    if bytes.len() != size_of::<Event>() {
        return Err(DecodeError::WrongSize(bytes.len()));
    }
    // SAFETY: the length is checked and Event is plain integers (aya::Pod),
    // so any bytes form a valid value; the record may be unaligned.
    let raw: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    match raw.event_type {
        t if t == EventType::Rmap as u8 => Ok(Decoded::Rmap {
            op: rmap_op(raw.op)?,
            level: level(raw.level)?,
            kind: folio_kind(raw.kind)?,
            raw,
        }),
        t if t == EventType::WriteFault as u8 => Ok(Decoded::WriteFault {
            outcome: outcome(raw.outcome)?,
            kind: if raw.kind == 0 { None } else { Some(folio_kind(raw.kind)?) },
            raw,
        }),
        other => Err(DecodeError::UnknownType(other)),
    }
}

fn rmap_op(v: u8) -> Result<RmapOp, DecodeError> {
    Ok(match v {
        1 => RmapOp::Add,
        2 => RmapOp::AddNew,
        3 => RmapOp::Remove,
        value => return Err(DecodeError::BadField { field: "op", value }),
    })
}

fn level(v: u8) -> Result<Level, DecodeError> {
    Ok(match v {
        1 => Level::Pte,
        2 => Level::Pmd,
        3 => Level::Pud,
        value => {
            return Err(DecodeError::BadField { field: "level", value });
        }
    })
}

fn folio_kind(v: u8) -> Result<FolioKind, DecodeError> {
    Ok(match v {
        1 => FolioKind::Anon,
        2 => FolioKind::Ksm,
        3 => FolioKind::File,
        4 => FolioKind::Shmem,
        5 => FolioKind::NoMapping,
        value => return Err(DecodeError::BadField { field: "kind", value }),
    })
}

fn outcome(v: u8) -> Result<WriteFaultOutcome, DecodeError> {
    Ok(match v {
        1 => WriteFaultOutcome::Reuse,
        2 => WriteFaultOutcome::Copy,
        3 => WriteFaultOutcome::CopyZeroPage,
        4 => WriteFaultOutcome::Shared,
        5 => WriteFaultOutcome::Other,
        value => {
            return Err(DecodeError::BadField { field: "outcome", value });
        }
    })
}

pub fn op_label(op: RmapOp) -> &'static str {
    match op {
        RmapOp::Add => "add",
        RmapOp::AddNew => "add_new",
        RmapOp::Remove => "remove",
    }
}

pub fn level_label(level: Level) -> &'static str {
    match level {
        Level::Pte => "pte",
        Level::Pmd => "pmd",
        Level::Pud => "pud",
    }
}

pub fn kind_label(kind: FolioKind) -> &'static str {
    match kind {
        FolioKind::Anon => "anon",
        FolioKind::Ksm => "ksm",
        FolioKind::File => "file",
        FolioKind::Shmem => "shmem",
        FolioKind::NoMapping => "nomapping",
    }
}

pub fn outcome_label(outcome: WriteFaultOutcome) -> &'static str {
    match outcome {
        WriteFaultOutcome::Reuse => "reuse",
        WriteFaultOutcome::Copy => "copy",
        WriteFaultOutcome::CopyZeroPage => "copy_zero_page",
        WriteFaultOutcome::Shared => "shared",
        WriteFaultOutcome::Other => "other",
    }
}

/// The bytes of an event as the kernel writes them (for tests and record files).
pub fn encode(event: &Event) -> [u8; size_of::<Event>()] {
    // SAFETY: Event is repr(C) plain integers without padding.
    unsafe { std::mem::transmute_copy(event) }
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
        assert_eq!(decode(&bytes[..63]), Err(DecodeError::WrongSize(63)));
        let mut bad = rmap_event();
        bad.kind = 9;
        assert_eq!(decode(&encode(&bad)), Err(DecodeError::BadField { field: "kind", value: 9 }));
        bad = rmap_event();
        bad.event_type = 0;
        assert_eq!(decode(&encode(&bad)), Err(DecodeError::UnknownType(0)));
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
