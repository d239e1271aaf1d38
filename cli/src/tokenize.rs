//! `graft tokenize`: token ids of a text, as a JSON list.

use anyhow::Result;
use clap::Args;

use crate::common::ModelArgs;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to tokenize.
    #[arg(long)]
    pub text: String,
    /// Do not add the BOS token.
    #[arg(long)]
    pub no_bos: bool,
    /// Parse special tokens written in the text (e.g. `<s>`, `<|im_start|>`).
    #[arg(long)]
    pub special: bool,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let tokenizer = crate::common::tokenizer_only(&args.model)?;
    let ids = tokenizer.encode(&args.text, !args.no_bos, args.special);
    crate::write_stdout(&format!("{}\n", serde_json::to_string(&ids)?))
}
