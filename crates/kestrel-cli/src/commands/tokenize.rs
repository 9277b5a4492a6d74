//! `kestrel tokenize`: token ids of a text as a JSON array.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use kestrel_formats::ModelFile;

use crate::{loading, model_path};

#[derive(Args, Clone, Debug)]
pub struct TokenizeArgs {
    /// Model, then text; with only a text, the default model is used.
    #[arg(num_args = 1..=2, required = true, value_names = ["MODEL", "TEXT"])]
    pub args: Vec<String>,
    /// Leave out the BOS token.
    #[arg(long)]
    pub no_bos: bool,
    /// Print each id with its piece of text.
    #[arg(long)]
    pub pieces: bool,
}

pub fn main(a: TokenizeArgs) -> Result<()> {
    let (model, text) = match a.args.as_slice() {
        [text] => (None, text.clone()),
        [model, text] => (Some(PathBuf::from(model)), text.clone()),
        _ => unreachable!("clap enforces 1..=2 arguments"),
    };
    let path = model_path::resolve(model)?;
    let file = ModelFile::open(&path)?;
    let tok = loading::tokenizer_for(&file)?;
    let ids = tok.encode(&text, !a.no_bos && tok.add_bos_default())?;
    if a.pieces {
        let rows: Vec<_> = ids
            .iter()
            .map(|&id| serde_json::json!({"id": id, "piece": tok.token_text(id)}))
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        println!("{}", serde_json::to_string(&ids)?);
    }
    Ok(())
}
