//! Placeholder while this command is being written (replaced in this session).

#[derive(clap::Args)]
pub struct Args {}

pub fn main(_a: Args) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
