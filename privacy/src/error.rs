//! Errors of the accounting library.

/// What went wrong while accounting for privacy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// A parameter is outside its domain; `name` is the parameter's name.
    #[error("invalid {name}: {value} (must be {requirement})")]
    InvalidParameter {
        /// The parameter, e.g. `noise_multiplier`.
        name: &'static str,
        /// The value that was given.
        value: f64,
        /// The domain, in words, e.g. `> 0`.
        requirement: &'static str,
    },
    /// No noise multiplier up to the search limit reaches the target ε.
    #[error(
        "target epsilon {target_epsilon} cannot be reached for delta {delta}: even noise multiplier \
         {max_noise_multiplier} gives epsilon {epsilon_at_max}"
    )]
    Unreachable {
        /// The requested ε.
        target_epsilon: f64,
        /// The δ at which ε is measured.
        delta: f64,
        /// The largest noise multiplier tried.
        max_noise_multiplier: f64,
        /// ε at that noise multiplier.
        epsilon_at_max: f64,
    },
    /// The operating system's random number generator could not seed the noise stream.
    #[error("cannot seed the noise generator from the operating system: {0}")]
    Randomness(String),
}

/// Checks that `value` is finite and satisfies `ok`, or names the parameter in the error.
pub(crate) fn check(
    name: &'static str,
    value: f64,
    requirement: &'static str,
    ok: bool,
) -> Result<(), PrivacyError> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(PrivacyError::InvalidParameter {
            name,
            value,
            requirement,
        })
    }
}

/// δ must lie in (0, 1).
pub(crate) fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    check("delta", delta, "in (0, 1)", delta > 0.0 && delta < 1.0)
}
