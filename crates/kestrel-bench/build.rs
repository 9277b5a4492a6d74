//! Stamps the commit the binary is built from (with `-dirty` when tracked
//! files differ from it) into `KESTREL_BUILD_COMMIT`: capsules name the
//! build that measured, not whatever checkout the binary later runs in
//! (GPU runs copy binaries to machines whose checkout may be older).
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let o = Command::new("git").args(args).current_dir(root).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn main() {
    for p in [".git/HEAD", ".git/index", ".git/refs/heads"] {
        println!("cargo:rerun-if-changed=../../{p}");
    }
    if let Some(head) = git(&["rev-parse", "HEAD"]) {
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        println!(
            "cargo:rustc-env=KESTREL_BUILD_COMMIT={head}{}",
            if dirty { "-dirty" } else { "" }
        );
    }
}
