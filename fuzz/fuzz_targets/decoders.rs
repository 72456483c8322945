//! The strict decoders (`tally_schemas::decode_increment`, `decode_batch` in both
//! framings) on arbitrary bytes: no panic, and the properties of
//! `tally_ingest::offline::check_decoders` hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(problem) = tally_ingest::offline::check_decoders(data) {
        panic!("{problem}\ninput: {:?}", String::from_utf8_lossy(data));
    }
});
