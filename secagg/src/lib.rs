//! Packed additive homomorphic encryption of model updates on tfhe `core_crypto`.
//!
//! Hospitals quantise their update, encrypt it as seeded GLWE ciphertexts (2048 values per
//! ciphertext, one coefficient per value, only the 48-bit body and a 16-byte seed travel) and
//! send it in chunks of at most 4 MiB. The aggregator sums the bodies with public integer
//! weights — it holds no key, and no aggregator-side type can take one — and sends the summed
//! bodies back with the contributors' seeds. Each hospital verifies the contributors, expands
//! the masks again, decrypts and rounds to the exact integer weighted sum, then dequantises.
//!
//! ```
//! # #[cfg(feature = "crypto")] {
//! use caduceus_secagg::{AcceptPolicy, Aggregator, Decryptor, Encryptor, SecAggParams, StudyKey, SumBounds};
//!
//! let params = SecAggParams::new(1.0, SumBounds::default())?;
//! let key = StudyKey::generate("study-1")?; // trainers only
//! let updates = [vec![0.5f32, -0.25, 0.0], vec![0.25, 0.25, 1.0]];
//! let weights = [3u32, 1];
//!
//! let mut agg = Aggregator::new(&params, "study-1", 7)?; // no key
//! for (i, (u, w)) in updates.iter().zip(weights).enumerate() {
//!     let enc = Encryptor::new(&key, &params, &format!("hospital-{i}"))?;
//!     for chunk in enc.encrypt_update(7, u)? {
//!         agg.add_chunk(&chunk, w)?;
//!     }
//! }
//! let aggregate = agg.finish()?;
//!
//! let dec = Decryptor::new(&key, &params)?;
//! let sum = dec.decrypt_aggregate(7, &aggregate, &AcceptPolicy::new(2))?;
//! let mean = sum.mean(&params);
//! assert!((mean[0] - 0.4375).abs() as f64 <= params.quantisation_error_bound() + 1e-7);
//! # }
//! # Ok::<(), caduceus_secagg::Error>(())
//! ```
//!
//! See `docs/security.md` for the parameter choice, the noise bound and the threat model.
//!
//! The default `crypto` feature brings encryption and decryption (tfhe). Without it the crate
//! holds only what the aggregator needs — parameters, wire format, [`Aggregator`] — plus the
//! key-file parser, and does not depend on tfhe.

pub mod aggregate;
pub mod bundle;
#[cfg(feature = "crypto")]
pub mod decrypt;
#[cfg(feature = "crypto")]
pub mod encrypt;
pub mod error;
pub mod fingerprint;
pub mod key;
pub mod params;
pub mod quant;
pub mod seal;
pub mod wire;

pub use aggregate::{Accepted, Aggregator};
pub use bundle::{decode_bundle, encode_bundle};
#[cfg(feature = "crypto")]
pub use decrypt::{AcceptPolicy, DecryptedAggregate, Decryptor};
#[cfg(feature = "crypto")]
pub use encrypt::Encryptor;
pub use error::Error;
pub use fingerprint::Fingerprint;
pub use key::StudyKey;
pub use params::{SecAggParams, SumBounds};
pub use quant::{dequantise_mean, dequantise_sum, quantise};
pub use seal::SealKeyPair;

/// Turns non-negative real weights (e.g. FedAvg example counts or FairFed weights) into
/// integers summing exactly to `total` by the largest-remainder method, so they can weight an
/// encrypted sum. Weights that round to zero stay zero (exclude that hospital).
pub fn integer_weights(weights: &[f64], total: u32) -> Result<Vec<u32>, Error> {
    if weights.is_empty() {
        return Err(Error::InvalidParams("no weights given".into()));
    }
    if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        return Err(Error::InvalidParams(format!(
            "weights must be finite and >= 0, got {w}"
        )));
    }
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return Err(Error::InvalidParams("weights sum to zero".into()));
    }
    let exact: Vec<f64> = weights.iter().map(|w| w / sum * f64::from(total)).collect();
    let mut out: Vec<u32> = exact.iter().map(|e| e.floor() as u32).collect();
    let assigned: u32 = out.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().take((total - assigned) as usize) {
        out[i] += 1;
    }
    Ok(out)
}

/// The public integer weights of one secure-aggregation round: the real weights themselves when they
/// are whole numbers (e.g. FedAvg example counts) summing to at most `total` — then the encrypted
/// weighted mean is exactly the plaintext one up to quantisation — otherwise
/// [`integer_weights`]`(weights, total)`.
pub fn round_weights(weights: &[f64], total: u32) -> Result<Vec<u32>, Error> {
    let exact = weights
        .iter()
        .all(|w| w.is_finite() && *w >= 1.0 && w.fract() == 0.0)
        && weights.iter().sum::<f64>() <= f64::from(total);
    if exact && !weights.is_empty() {
        return Ok(weights.iter().map(|&w| w as u32).collect());
    }
    integer_weights(weights, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_weights_sum_exactly() {
        let w = integer_weights(&[1.0, 1.0, 1.0], 1024).unwrap();
        assert_eq!(w.iter().sum::<u32>(), 1024);
        assert_eq!(w, vec![342, 341, 341]);
        let w = integer_weights(&[5000.0, 120.0, 0.0, 33.3], 1000).unwrap();
        assert_eq!(w.iter().sum::<u32>(), 1000);
        assert_eq!(w[2], 0);
        assert!(integer_weights(&[f64::NAN], 10).is_err());
        assert!(integer_weights(&[0.0, 0.0], 10).is_err());
        assert!(integer_weights(&[], 10).is_err());
    }

    #[test]
    fn round_weights_keep_small_counts_exact() {
        assert_eq!(round_weights(&[300.0, 200.0], 1024).unwrap(), vec![300, 200]);
        assert_eq!(round_weights(&[3000.0, 1000.0], 1024).unwrap(), vec![768, 256]);
        assert_eq!(round_weights(&[0.5, 0.5], 1024).unwrap(), vec![512, 512]);
    }
}
