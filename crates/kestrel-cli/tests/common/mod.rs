//! Helpers shared by the binary's end-to-end tests.
#![allow(dead_code)] // each test file uses its own subset

use std::process::{Command, Output};

/// Runs the built `kestrel` binary with `args`.
pub fn kestrel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(args)
        .output()
        .expect("kestrel runs")
}

/// Captured output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
