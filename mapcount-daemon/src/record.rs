//! Record files: the raw event stream, to aggregate later (`mapcountd
//! replay`), in tests and in benchmarks.
//!
//! Format: the 8-byte magic `MAPCOUNT`, a little-endian u32 version and a
//! u32 reserved word, then records, each a little-endian u16 length and
//! that many bytes exactly as the ring buffer delivered them.

use std::{
    fs::File,
    io::{self, BufRead, BufWriter, Write},
    path::Path,
};

pub const MAGIC: &[u8; 8] = b"MAPCOUNT";
/// Bumped whenever a record layout in `mapcount-common` changes.
pub const VERSION: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not a mapcount record file (no MAPCOUNT magic at byte 0)")]
    BadMagic,
    #[error("record file version {found}, this mapcountd reads version {VERSION}")]
    Version { found: u32 },
    #[error("file ends inside {what} at byte {offset}: truncated")]
    Truncated { what: &'static str, offset: u64 },
    #[error("zero-length record at byte {offset}: corrupt file")]
    Empty { offset: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        Ok(Self { out })
    }

    pub fn write(&mut self, record: &[u8]) -> io::Result<()> {
        let len = u16::try_from(record.len()).map_err(|_| io::Error::other("record longer than 64 KiB"))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(record)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Why a recording stopped before the daemon did.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error("the record file reached its size bound of {max_bytes} bytes (--record.max-size)")]
    SizeLimit { max_bytes: u64 },
    #[error("writing the record file failed: {0}")]
    WriteError(io::Error),
}

impl Stop {
    /// The `reason` label of `mapcount_record_stops_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Stop::SizeLimit { .. } => "size_limit",
            Stop::WriteError(_) => "write_error",
        }
    }
}

/// The daemon's `--record` file: bounded in size, and stopped rather than
/// the daemon at the first write error (a full disk). What it holds when
/// it stops replays: records are written whole, and after a write error
/// the file is cut back to the end of the last batch that reached it.
pub struct Recording {
    writer: Writer<BufWriter<File>>,
    max_bytes: u64,
    /// Bytes handed to the writer, and bytes known to be in the file.
    written: u64,
    flushed: u64,
    /// A write failed: what is buffered may end inside a record.
    failed: bool,
}

impl Recording {
    pub fn create(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = File::create(path)?;
        let mut writer = Writer::new(BufWriter::new(file))?;
        writer.flush()?;
        let header = (MAGIC.len() + 8) as u64;
        Ok(Self { writer, max_bytes, written: header, flushed: header, failed: false })
    }

    /// Writes one record; after an error the recording is over and the
    /// caller drops it (after [`Recording::finish`]).
    pub fn write(&mut self, record: &[u8]) -> Result<u64, Stop> {
        let size = 2 + record.len() as u64;
        if self.written + size > self.max_bytes {
            return Err(Stop::SizeLimit { max_bytes: self.max_bytes });
        }
        if let Err(e) = self.writer.write(record) {
            self.failed = true;
            return Err(Stop::WriteError(e));
        }
        self.written += size;
        Ok(size)
    }

    pub fn flush(&mut self) -> Result<(), Stop> {
        if let Err(e) = self.writer.flush() {
            self.failed = true;
            return Err(Stop::WriteError(e));
        }
        self.flushed = self.written;
        Ok(())
    }

    /// Ends the recording: whole records stay, a batch cut by an error goes.
    pub fn finish(mut self) -> io::Result<()> {
        if !self.failed && self.flush().is_ok() {
            return Ok(());
        }
        let (file, _unwritten) = self.writer.into_inner().into_parts();
        file.set_len(self.flushed)
    }
}

pub struct Reader<R: BufRead> {
    input: R,
    offset: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> Reader<R> {
    pub fn new(mut input: R) -> Result<Self, RecordError> {
        let mut header = [0u8; 16];
        let got = read_full(&mut input, &mut header)?;
        if got < 8 || &header[..8] != MAGIC {
            return Err(RecordError::BadMagic);
        }
        if got < 16 {
            return Err(RecordError::Truncated { what: "the header", offset: got as u64 });
        }
        let found = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if found != VERSION {
            return Err(RecordError::Version { found });
        }
        Ok(Self { input, offset: 16, buf: Vec::with_capacity(128) })
    }

    /// The next record, `None` at a clean end of file.
    pub fn next_record(&mut self) -> Result<Option<&[u8]>, RecordError> {
        let mut len = [0u8; 2];
        match read_full(&mut self.input, &mut len)? {
            0 => return Ok(None),
            2 => {}
            _ => return Err(RecordError::Truncated { what: "a record length", offset: self.offset }),
        }
        let len = usize::from(u16::from_le_bytes(len));
        if len == 0 {
            return Err(RecordError::Empty { offset: self.offset });
        }
        self.buf.resize(len, 0);
        if read_full(&mut self.input, &mut self.buf)? != len {
            return Err(RecordError::Truncated { what: "a record", offset: self.offset + 2 });
        }
        self.offset += 2 + len as u64;
        Ok(Some(&self.buf))
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

fn read_full<R: BufRead>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(records: &[&[u8]]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new()).unwrap();
        for r in records {
            w.write(r).unwrap();
        }
        w.out
    }

    #[test]
    fn round_trip() {
        let bytes = file(&[b"abc", &[1; 72]]);
        let mut r = Reader::new(&bytes[..]).unwrap();
        assert_eq!(r.next_record().unwrap(), Some(&b"abc"[..]));
        assert_eq!(r.next_record().unwrap().map(<[u8]>::len), Some(72));
        assert_eq!(r.next_record().unwrap(), None);
    }

    #[test]
    fn a_recording_stops_at_its_bound_and_replays() {
        let path = std::env::temp_dir().join(format!("mapcount-bound-{}.rec", std::process::id()));
        let mut recording = Recording::create(&path, 16 + 3 * 10).unwrap();
        for _ in 0..3 {
            assert_eq!(recording.write(&[7; 8]).unwrap(), 10);
        }
        assert!(matches!(recording.write(&[7; 8]), Err(Stop::SizeLimit { max_bytes: 46 })));
        recording.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 46);
        let mut r = Reader::new(&bytes[..]).unwrap();
        let mut records = 0;
        while r.next_record().unwrap().is_some() {
            records += 1;
        }
        assert_eq!(records, 3);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn corrupt_files_name_the_byte() {
        let bytes = file(&[b"abc", b"defg"]);
        let cut = &bytes[..bytes.len() - 1];
        let mut r = Reader::new(cut).unwrap();
        r.next_record().unwrap();
        let err = r.next_record().unwrap_err();
        assert_eq!(err.to_string(), "file ends inside a record at byte 23: truncated");
        assert!(matches!(Reader::new(&b"NOTMAPCT"[..]), Err(RecordError::BadMagic)));
        assert!(matches!(Reader::new(&bytes[..12]), Err(RecordError::Truncated { offset: 12, .. })));
        let mut zero = file(&[]);
        zero.extend_from_slice(&[0, 0]);
        assert!(matches!(
            Reader::new(&zero[..]).unwrap().next_record(),
            Err(RecordError::Empty { offset: 16 })
        ));
    }
}
