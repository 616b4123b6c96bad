//! Arbitrary inner messages from a session's peer (coded data, parity shards with any
//! header, receipts) into the redundancy layer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::sim::fuzz_inner_messages(data);
});
