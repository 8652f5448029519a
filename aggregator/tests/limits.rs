//! The aggregator's limits on what one update may claim and how it may be streamed, through the real
//! binary over mutual TLS (no training data needed; this test plays the hospitals):
//!
//! - `num_examples` above `caduceus_aggregation::MAX_NUM_EXAMPLES` (u64::MAX, 2³² + 1) or 0 in a
//!   training update is refused with INVALID_ARGUMENT naming the field, and so are evaluation counts
//!   above 2³²;
//! - a stream of zero-length data chunks is refused at the first one, promptly, plaintext or
//!   encrypted; a vector cut into more chunks than its length allows is refused;
//! - an upload that stops sending (after its header, or before it) is cut off with
//!   DEADLINE_EXCEEDED after the idle timeout, and its upload slot is free again: the same hospital's
//!   proper update is accepted afterwards.
mod common;

use std::time::{Duration, Instant};

use caduceus_proto::{
    Code, FederationClient, UpdateChunk, UpdateHeader, Vector, data_chunk, f32_chunk, update_chunk,
};
use common::{Proc, StudyDir, expect_code, sample_counts};
use futures::StreamExt;

const STUDY: &str = "limits-itest";
const FINGERPRINT: &str = "0123456789abcdef0123456789abcdef";

/// Starts an aggregator (resnet8, 2 hospitals, 1 s idle timeout) with `extra` flags.
fn start(env: &StudyDir, tag: &str, extra: &[&str]) -> (Proc, u16) {
    let mut cmd = env.aggregator(tag, &format!("store-{tag}"));
    cmd.args(["--arch", "resnet8", "--init-seed", "1"])
        .args(["--round-deadline-secs", "300", "--linger-secs", "0"])
        .args(["--upload-idle-timeout-secs", "1"])
        .args(extra);
    env.start(cmd, tag)
}

fn header(num_examples: u64, n: u64) -> UpdateHeader {
    UpdateHeader {
        study_id: STUDY.into(),
        round: 0,
        num_examples,
        num_parameters: n,
        evaluation: Some(sample_counts()),
        ..Default::default()
    }
}

fn head(h: UpdateHeader) -> UpdateChunk {
    UpdateChunk {
        kind: Some(update_chunk::Kind::Header(h)),
    }
}

fn data(c: caduceus_proto::DataChunk) -> UpdateChunk {
    UpdateChunk {
        kind: Some(update_chunk::Kind::Data(c)),
    }
}

/// The resnet8 model's parameter count, as the aggregator serves it.
async fn model_len(c: &mut FederationClient) -> usize {
    c.fetch_model(0).await.unwrap().params.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_counts_empty_chunks_and_stalled_uploads_are_refused() {
    let env = StudyDir::new(STUDY);
    let (_agg, port) = start(&env, "plain", &[]);
    let mut c = env.client(0, port).await;
    let n = model_len(&mut c).await;
    let zeros = vec![0.0f32; n];

    // num_examples: u64::MAX, one above the maximum, and 0 are refused, naming the field.
    for bad in [u64::MAX, caduceus_aggregation::MAX_NUM_EXAMPLES + 1, 0] {
        expect_code(
            c.submit(header(bad, 0), Some(&zeros), None).await,
            Code::InvalidArgument,
            "num_examples",
        );
    }
    // Evaluation counts from the network are bounded too.
    let mut h = header(10, 0);
    h.evaluation.as_mut().unwrap().examples = u64::MAX;
    expect_code(
        c.submit(h, Some(&zeros), None).await,
        Code::InvalidArgument,
        "evaluation.examples",
    );

    // An endless stream of zero-length chunks is refused at the first one, promptly.
    let empty = f32_chunk(Vector::Parameters, 0, &[]);
    let endless = futures::stream::iter(
        std::iter::once(head(header(10, n as u64)))
            .chain(std::iter::repeat_with(move || data(empty.clone()))),
    );
    let t = Instant::now();
    expect_code(c.submit_stream(endless).await, Code::InvalidArgument, "no data");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    // A chunk without any payload is the same.
    let none = caduceus_proto::DataChunk {
        vector: Vector::Parameters as i32,
        offset: 0,
        payload: None,
    };
    expect_code(
        c.submit_raw(vec![head(header(10, n as u64)), data(none)]).await,
        Code::InvalidArgument,
        "no data",
    );
    // Chunks that each add one element: more chunks than the vector's length allows.
    let max = caduceus_proto::max_chunks(n as u64);
    let tiny: Vec<UpdateChunk> = std::iter::once(head(header(10, n as u64)))
        .chain((0..=max as usize).map(|i| data(f32_chunk(Vector::Parameters, i, &[0.0]))))
        .collect();
    expect_code(c.submit_raw(tiny).await, Code::InvalidArgument, "chunks");

    // A stream that stops after its header is cut off by the idle timeout (1 s here).
    let stalled = futures::stream::iter([head(header(10, n as u64))]).chain(futures::stream::pending());
    let t = Instant::now();
    expect_code(
        c.submit_stream(stalled).await,
        Code::DeadlineExceeded,
        "--upload-idle-timeout-secs",
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    // So is one that never sends its header.
    let t = Instant::now();
    expect_code(
        c.submit_stream(futures::stream::pending::<UpdateChunk>()).await,
        Code::DeadlineExceeded,
        "no message",
    );
    assert!(t.elapsed() < Duration::from_secs(10));

    // Nothing was recorded, and the hospital's upload slot is free: its proper update is accepted.
    let st = c.status(None, Duration::ZERO).await.unwrap();
    assert!(st.received_from.is_empty(), "{st:?}");
    let r = c.submit(header(10, 0), Some(&zeros), None).await.unwrap();
    assert_eq!((r.round, r.received), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_encrypted_chunk_is_refused() {
    let env = StudyDir::new(STUDY);
    let (_agg, port) = start(
        &env,
        "secure",
        &["--secure-aggregation", "tfhe", "--key-fingerprint", FINGERPRINT],
    );
    let mut c = env.client(1, port).await;
    let n = c.fetch_secure_model(0, None).await.unwrap().header.num_parameters;
    let mut h = header(10, n);
    h.secure_aggregation = true;
    h.key_fingerprint = FINGERPRINT.into();
    let empty = caduceus_proto::DataChunk {
        vector: Vector::Parameters as i32,
        offset: 0,
        payload: Some(data_chunk::Payload::Encrypted(Default::default())),
    };
    let endless = futures::stream::iter(
        std::iter::once(head(h)).chain(std::iter::repeat_with(move || data(empty.clone()))),
    );
    let t = Instant::now();
    expect_code(c.submit_stream(endless).await, Code::InvalidArgument, "no data");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
}
