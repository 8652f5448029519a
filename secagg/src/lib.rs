//! Packed additive homomorphic encryption of updates on tfhe core_crypto.
