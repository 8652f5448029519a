//! candle models and local training.
