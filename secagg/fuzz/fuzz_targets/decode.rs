//! Fuzzes every decoder of untrusted secure-aggregation bytes that the aggregator side runs:
//! the hospital-chunk and aggregate-chunk decoders, the aggregator's `add_chunk` and `finish`,
//! and the key-file parser. None may panic or allocate beyond the input's size, whatever the
//! input. Seeds: `secagg/fuzz/seeds/decode` (see `secagg/tests/fuzz_seeds.rs`).
#![no_main]

use std::sync::OnceLock;

use caduceus_secagg::wire::{decode_aggregate_chunk, decode_hospital_chunk};
use caduceus_secagg::{Aggregator, SecAggParams, StudyKey, SumBounds};
use libfuzzer_sys::fuzz_target;

/// Study id and round of the seed corpus.
const STUDY: &str = "fuzz-study";
const ROUND: u64 = 1;

fn params() -> &'static SecAggParams {
    static P: OnceLock<SecAggParams> = OnceLock::new();
    P.get_or_init(|| {
        SecAggParams::with_polys_per_chunk(1.0, SumBounds::default(), 1).expect("valid parameters")
    })
}

fuzz_target!(|data: &[u8]| {
    let params = params();
    let _ = decode_hospital_chunk(params, data);
    let _ = decode_aggregate_chunk(params, data);
    let mut agg = Aggregator::new(params, STUDY, ROUND).expect("aggregator");
    if agg.add_chunk(data, 3).is_ok() {
        // The same chunk again must be refused; then build the aggregate.
        assert!(agg.add_chunk(data, 3).is_err());
        let _ = agg.finish();
    }
    let _ = StudyKey::from_bytes(data);
});
