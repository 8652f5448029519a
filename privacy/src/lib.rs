//! DP accountants (PLD, RDP) and the per-hospital privacy ledger.
