//! Any bytes as a record file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapcount_daemon::record::Reader;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut reader) = Reader::new(data) {
        while let Ok(Some(_)) = reader.next_record() {}
    }
});
