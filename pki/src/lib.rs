//! mTLS certificate authority helpers (rcgen).
