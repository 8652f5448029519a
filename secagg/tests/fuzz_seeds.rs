//! Regenerates the fuzz fixture key and seed corpus in `secagg/fuzz/` (run on demand):
//!
//! ```text
//! cargo test -p caduceus-secagg --test fuzz_seeds -- --ignored
//! ```
#![cfg(feature = "crypto")]

use std::path::PathBuf;

use caduceus_secagg::{Aggregator, Encryptor, SecAggParams, StudyKey, SumBounds};

#[test]
#[ignore = "writes files under secagg/fuzz; run on demand"]
fn write_fuzz_seeds() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let key_path = dir.join("fixtures/fuzz.key");
    let _ = std::fs::remove_file(&key_path);
    let key = StudyKey::generate("fuzz-study").unwrap();
    key.save(&key_path).unwrap();
    let params = SecAggParams::with_polys_per_chunk(1.0, SumBounds::default(), 1).unwrap();
    let seeds = dir.join("seeds/decode");
    std::fs::create_dir_all(&seeds).unwrap();
    let mut agg = Aggregator::new(&params, "fuzz-study", 1).unwrap();
    for (i, n) in [(0, 5usize), (1, 5)] {
        let enc = Encryptor::new(&key, &params, &format!("h{i}")).unwrap();
        let chunks = enc.encrypt_quantised(1, &vec![i as i64 + 1; n]).unwrap();
        std::fs::write(seeds.join(format!("hospital_chunk_{i}")), &chunks[0]).unwrap();
        agg.add_chunk(&chunks[0], 3).unwrap();
    }
    let aggregate = agg.finish().unwrap();
    std::fs::write(seeds.join("aggregate_chunk"), &aggregate[0]).unwrap();
    std::fs::write(seeds.join("key_file"), &*key.to_bytes()).unwrap();
}
