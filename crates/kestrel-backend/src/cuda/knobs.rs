//! Tuning knobs read from environment variables. Each knob is read once per
//! process (a `OnceLock` at its call site) so that A/B runs can switch one
//! kernel choice without rebuilding; these helpers hold the parsing they share.

/// A switch that is on unless the variable is set to `0`.
pub(crate) fn on_unless_zero(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v.trim() != "0")
}

/// A switch that is off unless the variable is set to `1`.
pub(crate) fn on_if_one(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim() == "1")
}

/// The variable as a non-negative integer; `None` when unset or not a number.
pub(crate) fn usize_of(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}
