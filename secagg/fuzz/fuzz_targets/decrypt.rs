//! Fuzzes the hospital's `decrypt_aggregate` with a fixed test key (`fixtures/fuzz.key`), so
//! seeds made under it reach the tag checks and the decryption itself. Needs tfhe:
//! `cargo +nightly fuzz run decrypt --features crypto -s none seeds/decode`.
#![no_main]

use std::sync::OnceLock;

use caduceus_secagg::{AcceptPolicy, Decryptor, SecAggParams, StudyKey, SumBounds};
use libfuzzer_sys::fuzz_target;

const ROUND: u64 = 1;

fn decryptor() -> &'static Decryptor {
    static D: OnceLock<Decryptor> = OnceLock::new();
    D.get_or_init(|| {
        let params =
            SecAggParams::with_polys_per_chunk(1.0, SumBounds::default(), 1).expect("valid parameters");
        let key = StudyKey::from_bytes(include_bytes!("../fixtures/fuzz.key")).expect("fixture key parses");
        Decryptor::new(&key, &params).expect("decryptor")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = decryptor().decrypt_aggregate(ROUND, &[data], &AcceptPolicy::new(1));
});
