//! OpenAI request bodies, parsed leniently about unknown fields (clients send many)
//! and strictly about the ones we use: wrong types and out-of-range values are 400s.

use serde::Deserialize;

use crate::error::ApiError;

/// A prompt: a string, a list holding one string, or a list of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string, or OpenAI's list of parts (only `text` parts).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// llama.cpp's per-request adapter list entry: `{"id": 0 | "name", "scale": 0.5}`.
#[derive(Debug, Deserialize)]
pub struct LoraRef {
    #[serde(default)]
    pub id: Option<LoraId>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub scale: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum LoraId {
    Index(u64),
    Name(String),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields of `/v1/completions` and `/v1/chat/completions` (one struct: the
/// handler checks that `prompt` or `messages` is the one its endpoint needs).
#[derive(Debug, Default, Deserialize)]
pub struct GenRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<Prompt>,
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    // Signed so that a negative value is reported as such, not as a type error.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// LoRAX's explicit adapter field.
    #[serde(default)]
    pub adapter_id: Option<String>,
    /// mistral.rs's explicit adapter field.
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub lora: Option<Vec<LoraRef>>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub best_of: Option<i64>,
}

/// Most stop strings a request may give.
const MAX_STOPS: usize = 16;

impl GenRequest {
    /// Parses a body; syntax errors and type errors get distinct codes.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(json_error)
    }

    /// Refuses the OpenAI options this server does not implement, rather than
    /// silently ignoring them.
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid_field(
                    "n",
                    format!("{n}: only n = 1 is supported"),
                ));
            }
        }
        if let Some(b) = self.best_of {
            if b != 1 {
                return Err(ApiError::invalid_field(
                    "best_of",
                    format!("{b}: only best_of = 1 is supported"),
                ));
            }
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid_field("echo", "not supported"));
        }
        match &self.logprobs {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
            Some(_) => return Err(ApiError::invalid_field("logprobs", "not supported")),
        }
        Ok(())
    }

    /// `max_tokens` (or `max_completion_tokens`), checked non-negative.
    pub fn max_tokens(&self) -> Result<Option<usize>, ApiError> {
        let (field, v) = match (self.max_tokens, self.max_completion_tokens) {
            (Some(v), _) => ("max_tokens", v),
            (None, Some(v)) => ("max_completion_tokens", v),
            (None, None) => return Ok(None),
        };
        usize::try_from(v)
            .map(Some)
            .map_err(|_| ApiError::invalid_field(field, format!("{v}: must be >= 0")))
    }

    pub fn stops(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid_field(
                "stop",
                format!("{} strings, at most {MAX_STOPS}", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid_field("stop", "empty stop string"));
        }
        Ok(stops)
    }
}

/// A serde_json error as a 400: malformed JSON vs. well-formed JSON of wrong shape.
pub fn json_error(e: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        ),
        Category::Data => {
            ApiError::bad_request("invalid_parameter", format!("invalid request: {e}"))
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct LoadAdapterRequest {
    pub lora_name: String,
    pub lora_path: String,
    /// Compare-and-set: replace only if the name is at this generation.
    #[serde(default)]
    pub expected_generation: Option<u64>,
    /// Replace an already loaded name unconditionally (vLLM's `load_inplace`).
    #[serde(default)]
    pub load_inplace: bool,
}

#[derive(Debug, Deserialize)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}
