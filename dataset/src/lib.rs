//! Face dataset import, splitting and loading.
