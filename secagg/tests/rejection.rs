//! Every ciphertext that is wrong in a single way is rejected with a clear error.
#![cfg(feature = "crypto")]

use caduceus_secagg::{
    AcceptPolicy, Aggregator, Decryptor, Encryptor, Error, SecAggParams, StudyKey, SumBounds,
};

const STUDY: &str = "study-a";
const ROUND: u64 = 9;

fn params() -> SecAggParams {
    SecAggParams::with_polys_per_chunk(1.0, SumBounds::default(), 1).unwrap()
}

/// One-chunk hospital message (100 values).
fn chunk(key: &StudyKey, params: &SecAggParams, hospital: &str, round: u64) -> Vec<u8> {
    let enc = Encryptor::new(key, params, hospital).unwrap();
    let mut v = enc.encrypt_quantised(round, &[3; 100]).unwrap();
    assert_eq!(v.len(), 1);
    v.remove(0)
}

fn aggregator() -> Aggregator {
    Aggregator::new(&params(), STUDY, ROUND).unwrap()
}

/// Offset of the byte after the study id in a header (study id length at 64).
fn after_study(msg: &[u8]) -> usize {
    65 + msg[64] as usize
}

#[test]
fn wrong_params_round_study_key_are_rejected_by_the_aggregator() {
    let p = params();
    let key = StudyKey::generate(STUDY).unwrap();
    let good = chunk(&key, &p, "h1", ROUND);

    let other_params = SecAggParams::with_polys_per_chunk(2.0, SumBounds::default(), 1).unwrap();
    let e = aggregator()
        .add_chunk(&chunk(&key, &other_params, "h1", ROUND), 1)
        .unwrap_err();
    assert!(matches!(e, Error::ParamsMismatch { .. }), "{e}");

    let e = aggregator()
        .add_chunk(&chunk(&key, &p, "h1", ROUND + 1), 1)
        .unwrap_err();
    assert!(
        matches!(e, Error::RoundMismatch { expected: ROUND, found } if found == ROUND + 1),
        "{e}"
    );

    let other_study = StudyKey::generate("study-b").unwrap();
    let e = aggregator()
        .add_chunk(&chunk(&other_study, &p, "h1", ROUND), 1)
        .unwrap_err();
    assert!(matches!(e, Error::StudyMismatch { .. }), "{e}");

    // Another key of the same study: the first accepted chunk fixes the key fingerprint.
    let other_key = StudyKey::generate(STUDY).unwrap();
    let mut agg = aggregator();
    agg.add_chunk(&good, 1).unwrap();
    let e = agg.add_chunk(&chunk(&other_key, &p, "h2", ROUND), 1).unwrap_err();
    assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");
    // Or it is pinned up front.
    let e = aggregator()
        .expect_key_fingerprint(key.fingerprint())
        .add_chunk(&chunk(&other_key, &p, "h2", ROUND), 1)
        .unwrap_err();
    assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");

    // Error messages name what is wrong.
    let msg = aggregator()
        .add_chunk(&chunk(&key, &p, "h1", 3), 1)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("round 3") && msg.contains("round 9"), "{msg}");
}

#[test]
fn truncated_and_extended_messages_are_rejected() {
    let p = params();
    let key = StudyKey::generate(STUDY).unwrap();
    let good = chunk(&key, &p, "h1", ROUND);
    aggregator().add_chunk(&good, 1).unwrap();

    // Every cut inside the header, and a sample through the body.
    let header_end = after_study(&good) + 1 + 2 + 32 + 4;
    let cuts = (0..header_end + 8).chain((header_end..good.len()).step_by(997));
    for cut in cuts {
        let e = aggregator().add_chunk(&good[..cut], 1).unwrap_err();
        match e {
            Error::Truncated { .. } | Error::BadMagic { .. } => {}
            other => panic!("cut at {cut}: unexpected {other}"),
        }
    }
    let e = aggregator().add_chunk(&good[..good.len() - 1], 1).unwrap_err();
    assert!(matches!(e, Error::Truncated { field: "body", .. }), "{e}");

    let mut longer = good.clone();
    longer.push(0);
    let e = aggregator().add_chunk(&longer, 1).unwrap_err();
    assert!(matches!(e, Error::TrailingBytes { extra: 1 }), "{e}");
}

#[test]
fn header_corruptions_are_rejected() {
    let p = params();
    let key = StudyKey::generate(STUDY).unwrap();
    let good = chunk(&key, &p, "h1", ROUND);
    let body_len_at = after_study(&good) + 3 + 32;
    let cases: Vec<(usize, u8, &str)> = vec![
        (0, b'X', "magic"),
        (4, 2, "version"),
        (5, 2, "kind"),
        (6, 1, "reserved"),
        (8, 0xff, "params"),
        (52, 9, "chunk count"),
        (48, 5, "chunk index"),
        (57, 0x10, "total values"),
        (64, 200, "study id length"),
        (65, b'/', "study id chars"),
        (body_len_at + 1, 0, "body length"),
    ];
    for (at, value, what) in cases {
        let mut bad = good.clone();
        bad[at] = value;
        assert_ne!(bad, good, "{what}");
        let e = aggregator().add_chunk(&bad, 1).unwrap_err();
        let expected = match what {
            "magic" => matches!(e, Error::BadMagic { .. }),
            "version" => matches!(e, Error::UnsupportedVersion { found: 2, .. }),
            "kind" => matches!(e, Error::WrongKind { found: 2, .. }),
            "params" => matches!(e, Error::ParamsMismatch { .. }),
            "study id chars" => matches!(e, Error::InvalidId { .. }),
            "study id length" => matches!(
                e,
                Error::Truncated { .. } | Error::InvalidId { .. } | Error::Malformed(_)
            ),
            _ => matches!(e, Error::Malformed(_)),
        };
        assert!(expected, "{what}: unexpected {e}");
    }
}

#[test]
fn aggregator_bookkeeping_errors() {
    let p = params();
    let key = StudyKey::generate(STUDY).unwrap();
    let mut agg = aggregator();
    let c = chunk(&key, &p, "h1", ROUND);
    assert!(matches!(
        agg.add_chunk_from("h2", &c, 10),
        Err(Error::SenderMismatch { .. })
    ));
    agg.add_chunk_from("h1", &c, 10).unwrap();
    assert!(matches!(
        agg.add_chunk(&c, 10),
        Err(Error::DuplicateContribution { .. })
    ));
    assert!(matches!(
        agg.add_chunk(&chunk(&key, &p, "h2", ROUND), 0),
        Err(Error::BadWeight { .. })
    ));
    assert!(matches!(
        agg.add_chunk(&chunk(&key, &p, "h2", ROUND), 1015),
        Err(Error::BadWeight { .. })
    ));
    agg.add_chunk(&chunk(&key, &p, "h2", ROUND), 1014).unwrap();

    // A two-chunk vector where one hospital sends only one chunk.
    let enc = Encryptor::new(&key, &p, "h1").unwrap();
    let enc2 = Encryptor::new(&key, &p, "h2").unwrap();
    let mut agg = aggregator();
    let a = enc.encrypt_quantised(ROUND, &[1; 3000]).unwrap();
    let b = enc2.encrypt_quantised(ROUND, &[1; 3000]).unwrap();
    assert_eq!(a.len(), 2);
    agg.add_chunk(&a[0], 1).unwrap();
    agg.add_chunk(&a[1], 1).unwrap();
    agg.add_chunk(&b[0], 1).unwrap();
    assert!(matches!(agg.add_chunk(&b[1], 2), Err(Error::BadWeight { .. })));
    // Another vector length in the same round.
    let short = enc2.encrypt_quantised(ROUND, &[1; 10]).unwrap();
    assert!(matches!(
        agg.add_chunk(&short[0], 1),
        Err(Error::InconsistentLayout(_))
    ));
    assert!(matches!(agg.finish(), Err(Error::Incomplete(_))));
    assert!(matches!(aggregator().finish(), Err(Error::Incomplete(_))));
}

/// Aggregate of hospitals h1 and h2 (weights 1 and 2) for ROUND.
fn aggregate(key: &StudyKey) -> Vec<Vec<u8>> {
    let p = params();
    let mut agg = aggregator();
    agg.add_chunk(&chunk(key, &p, "h1", ROUND), 1).unwrap();
    agg.add_chunk(&chunk(key, &p, "h2", ROUND), 2).unwrap();
    agg.finish().unwrap()
}

#[test]
fn decryptor_rejects_wrong_key_round_and_damage() {
    let p = params();
    let key = StudyKey::generate(STUDY).unwrap();
    let agg = aggregate(&key);
    let dec = Decryptor::new(&key, &p).unwrap();
    let ok = dec.decrypt_aggregate(ROUND, &agg, &AcceptPolicy::new(2)).unwrap();
    assert_eq!(ok.sums, vec![9; 100]);

    // Wrong key (same study): refused by fingerprint before any decryption.
    let other = StudyKey::generate(STUDY).unwrap();
    let e = Decryptor::new(&other, &p)
        .unwrap()
        .decrypt_aggregate(ROUND, &agg, &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");
    // Even with the fingerprint forged to the other key, the tags do not verify.
    let mut forged = agg[0].clone();
    forged[24..40].copy_from_slice(&other.fingerprint().0);
    let e = Decryptor::new(&other, &p)
        .unwrap()
        .decrypt_aggregate(ROUND, &[forged], &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::BadTag { .. }), "{e}");

    // Wrong round.
    let e = dec
        .decrypt_aggregate(ROUND + 1, &agg, &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::RoundMismatch { .. }), "{e}");
    // Relabelled to another round: the tags bind the round.
    let mut relabelled = agg[0].clone();
    relabelled[40..48].copy_from_slice(&(ROUND + 1).to_le_bytes());
    let e = dec
        .decrypt_aggregate(ROUND + 1, &[relabelled], &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::BadTag { .. }), "{e}");
    // A flipped seed.
    let mut bad_seed = agg[0].clone();
    let seed_at = after_study(&bad_seed) + 2 + 1 + 2 + 4;
    bad_seed[seed_at] ^= 1;
    let e = dec
        .decrypt_aggregate(ROUND, &[bad_seed], &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(
        matches!(e, Error::BadTag { ref hospital, .. } if hospital == "h1"),
        "{e}"
    );

    // Truncated, extended.
    let e = dec
        .decrypt_aggregate(ROUND, &[&agg[0][..agg[0].len() - 6]], &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    let mut longer = agg[0].clone();
    longer.extend_from_slice(&[0; 6]);
    let e = dec
        .decrypt_aggregate(ROUND, &[longer], &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::TrailingBytes { extra: 6 }), "{e}");

    // A hospital chunk is not an aggregate.
    let e = dec
        .decrypt_aggregate(ROUND, &[chunk(&key, &p, "h1", ROUND)], &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::WrongKind { .. }), "{e}");
}

#[test]
fn decryptor_enforces_its_policy() {
    let p = params();
    let key = StudyKey::generate(STUDY).unwrap();
    let agg = aggregate(&key);
    let dec = Decryptor::new(&key, &p).unwrap();
    let e = dec
        .decrypt_aggregate(ROUND, &agg, &AcceptPolicy::new(3))
        .unwrap_err();
    assert!(matches!(e, Error::PolicyViolation(_)), "{e}");
    let expected = [("h1".to_string(), 1u32), ("h2".to_string(), 3u32)].into();
    let e = dec
        .decrypt_aggregate(ROUND, &agg, &AcceptPolicy::new(1).with_expected_weights(expected))
        .unwrap_err();
    assert!(matches!(e, Error::PolicyViolation(_)), "{e}");
    let e = dec
        .decrypt_aggregate(ROUND, &agg, &AcceptPolicy::new(1).must_include("h3"))
        .unwrap_err();
    assert!(matches!(e, Error::PolicyViolation(_)), "{e}");
    let expected = [("h1".to_string(), 1u32), ("h2".to_string(), 2u32)].into();
    let policy = AcceptPolicy::new(2)
        .with_expected_weights(expected)
        .must_include("h2");
    assert_eq!(
        dec.decrypt_aggregate(ROUND, &agg, &policy).unwrap().sums,
        vec![9; 100]
    );

    // Incomplete multi-chunk aggregate.
    let enc = Encryptor::new(&key, &p, "h1").unwrap();
    let mut a = aggregator();
    for c in enc.encrypt_quantised(ROUND, &[1; 3000]).unwrap() {
        a.add_chunk(&c, 1).unwrap();
    }
    let chunks = a.finish().unwrap();
    assert_eq!(chunks.len(), 2);
    let e = dec
        .decrypt_aggregate(ROUND, &chunks[..1], &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::Incomplete(_)), "{e}");
    let e = dec
        .decrypt_aggregate(ROUND, &[&chunks[0], &chunks[0]], &AcceptPolicy::new(1))
        .unwrap_err();
    assert!(matches!(e, Error::InconsistentLayout(_)), "{e}");
    let full = dec
        .decrypt_aggregate(ROUND, &[&chunks[1], &chunks[0]], &AcceptPolicy::new(1))
        .unwrap();
    assert_eq!(full.sums, vec![1; 3000]);
}
